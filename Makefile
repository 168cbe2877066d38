# Fresh-machine entry points. Each target installs what it needs into .venv.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= tiny
OUT ?= checkpoints/$(CONFIG)
SEED ?= 0

.PHONY: test checkpoint clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[build,test]'
	touch $@

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

checkpoint: $(BIN)/.installed
	$(BIN)/python -m ideogram4_engine.export.synthetic --config $(CONFIG) --out $(OUT) --seed $(SEED)

clean:
	rm -rf $(VENV) checkpoints
