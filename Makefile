# Fresh-machine entry points. Each target installs what it needs into .venv.
# PY: the interpreter for .venv; default: the first of PY_CANDIDATES that is Python >= 3.11.
PY_CANDIDATES := python3.11 python3.12 python3.13 python3.14 python3
PY_OK := import sys; sys.exit(sys.version_info < (3, 11))
PY ?= $(firstword $(foreach p,$(PY_CANDIDATES),$(shell $(p) -c '$(PY_OK)' >/dev/null 2>&1 && echo $(p))))
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= tiny
# OUT is the output folder of `make checkpoint` (default checkpoints/$(CONFIG)) and of `make export`
# (default engines/tiny); the default depends on the target, so it is resolved per recipe.
given = $(if $(filter command line environment,$(origin $(1))),$($(1)),$(2))
SEED ?= 0
DEFAULT_CHECKPOINT := checkpoints/tiny
CHECKPOINT ?= $(DEFAULT_CHECKPOINT)
PROMPT ?= A lighthouse on a rocky coast at dusk, long exposure, waves crashing on the rocks.
WIDTH ?= 512
HEIGHT ?= 512
PRESET ?= V4_DEFAULT_20
OUTPUT ?= out.png
ATTENTION ?= op

.PHONY: run reference test checkpoint export engines clean kernels python serve cpp-client

# `user X` is X as the user gave it (command line or environment: never expanded by make, so `$`, `$(…)`
# and backticks stay text) or the Makefile's default. run/reference hand their values to the commands only
# through the environment (I4_<NAME>, quoted "$$I4_<NAME>" in the recipe, the prompt through --prompt-env):
# no shell ever parses a prompt. The originals are not exported (make would expand them to do so).
user = $(if $(filter command line environment environment override,$(origin $(1))),$(value $(1)),$($(1)))
ENGINES ?= engines/$(notdir $(abspath $(call user,CHECKPOINT)))
BACKEND ?= auto
RUN_VARS := PROMPT PROMPT_FILE WIDTH HEIGHT PRESET SEED OUTPUT BACKEND CHECKPOINT ENGINES ATTENTION
$(foreach v,$(RUN_VARS),$(eval export I4_$(v) := $$(call user,$(v))))
unexport $(RUN_VARS)
PROMPT_ARG = $(if $(call user,PROMPT_FILE),--prompt-file "$$I4_PROMPT_FILE",--prompt-env I4_PROMPT)
DEFAULT_CKPT_DEP = $(if $(filter $(DEFAULT_CHECKPOINT),$(call user,CHECKPOINT)),$(DEFAULT_CHECKPOINT)/synthetic.json)

# Main job: prompt -> OUTPUT through the lean runtime. Exports CHECKPOINT to ENGINES first (unchanged
# components are reused, so a second run is quick); the default CHECKPOINT is the tiny synthetic one, created
# when absent. With CHECKPOINT=<the real ideogram-4-fp8 folder> the same command serves the real model.
# PROMPT= any text or JSON caption, byte for byte; PROMPT_FILE=<file> instead (its exact bytes: make strips
# leading blanks from a command-line PROMPT=, PROMPT in the environment keeps them).
run: $(BIN)/.installed $(DEFAULT_CKPT_DEP)
	$(BIN)/python -m ideogram4_engine.export --checkpoint "$$I4_CHECKPOINT" --out "$$I4_ENGINES" --attention "$$I4_ATTENTION"
	$(BIN)/ideogram4 generate --engines "$$I4_ENGINES" $(PROMPT_ARG) --width "$$I4_WIDTH" --height "$$I4_HEIGHT" \
		--sampler-preset "$$I4_PRESET" --seed "$$I4_SEED" --backend "$$I4_BACKEND" --output "$$I4_OUTPUT" --progress

# The same request through the PyTorch reference pipeline (the oracle), straight from the checkpoint.
reference: $(BIN)/.installed $(DEFAULT_CKPT_DEP)
	$(BIN)/python -m ideogram4_engine.export.reference --checkpoint "$$I4_CHECKPOINT" $(PROMPT_ARG) \
		--width "$$I4_WIDTH" --height "$$I4_HEIGHT" --sampler-preset "$$I4_PRESET" --seed "$$I4_SEED" \
		--output "$$I4_OUTPUT"

$(DEFAULT_CHECKPOINT)/synthetic.json: | $(BIN)/.installed
	$(BIN)/python -m ideogram4_engine.export.synthetic --config tiny --out $(DEFAULT_CHECKPOINT)

# the interpreter .venv is made with (or a one-line error saying how to choose one)
python:
	@test -n "$(PY)" || { echo "error: no Python >= 3.11 found (tried $(PY_CANDIDATES)); install one or pass PY=/path/to/python3.11+" >&2; exit 1; }
	@$(PY) -c '$(PY_OK)' 2>/dev/null || { echo "error: PY=$(PY) is not a working Python >= 3.11; pass PY=/path/to/python3.11+" >&2; exit 1; }
	@echo "$(PY)"

$(BIN)/.installed: pyproject.toml
	@$(MAKE) -s --no-print-directory python >/dev/null
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[build,ort-cpu,test,trt-rtx,serve]'
	touch $@

test: $(BIN)/.installed kernels cpp-client
	$(BIN)/python -m pytest -q

# The op library for onnxruntime's CUDA provider (kernels/: fused kernels + W8A8, docs/runtime.md): nvcc 13 and
# network once (onnxruntime's and cuBLASLt's headers are cached under build/include). ARCHES="90": Hopper only.
KERNELS_LIB := build/kernels/libideogram4_kernels.so
kernels: $(KERNELS_LIB)
$(KERNELS_LIB): kernels/build.sh kernels/fetch_headers.sh $(wildcard kernels/*.cu kernels/*.cuh kernels/*.h) | $(BIN)/.installed
	PIP="$(abspath $(BIN))/pip" bash kernels/build.sh

# The C++ gRPC client (clients/cpp) with Debian's gRPC: the system's, or the same packages fetched into
# build/cpp/deps (private apt state, nothing installed). Exit code 3 = cannot be obtained here: the C++ test
# then skips with the reason written to build/cpp/UNAVAILABLE; a compile error fails.
cpp-client:
	bash clients/cpp/build.sh || [ $$? -eq 3 ]

# The server (docs/serving.md): exports CHECKPOINT like `make run`, then `ideogram4 serve` in the foreground
# (HTTP :$(PORT), gRPC :$(GRPC_PORT); Ctrl-C or SIGTERM drains). SERVE_FLAGS=--replicas 2 --max-queue 32 …
PORT ?= 8000
GRPC_PORT ?= 9000
serve: $(BIN)/.installed $(DEFAULT_CKPT_DEP)
	$(BIN)/python -m ideogram4_engine.export --checkpoint "$$I4_CHECKPOINT" --out "$$I4_ENGINES" --attention "$$I4_ATTENTION"
	$(BIN)/ideogram4 serve --engines "$$I4_ENGINES" --backend "$$I4_BACKEND" --default-size "$$I4_WIDTH"x"$$I4_HEIGHT" \
		--port $(PORT) --grpc-port $(GRPC_PORT) $(SERVE_FLAGS)

checkpoint: $(BIN)/.installed
	$(BIN)/python -m ideogram4_engine.export.synthetic --config $(CONFIG) --out $(call given,OUT,checkpoints/$(CONFIG)) --seed $(SEED)

# checkpoint -> ONNX graphs (FP8 kept as FP8) + manifest.json. ATTENTION=op|matmul; EXPORT_FLAGS=--keep-dtype …
export: $(BIN)/.installed $(if $(filter $(DEFAULT_CHECKPOINT),$(CHECKPOINT)),$(DEFAULT_CHECKPOINT)/synthetic.json)
	$(BIN)/python -m ideogram4_engine.export --checkpoint $(CHECKPOINT) --out $(call given,OUT,engines/tiny) \
		--attention $(ATTENTION) $(EXPORT_FLAGS)
	$(BIN)/python -m ideogram4_engine.export.engines --engines $(call given,OUT,engines/tiny) --if-available $(ENGINE_ARGS)

# exported ONNX -> TensorRT / TensorRT-RTX engines, the manifest's engines section and <c>.layers.json reports
# (docs/engines.md). BUILDER=tensorrt|tensorrt-rtx (default: whichever is installed), BUCKETS=1024x1024,512x512
# (W x H; default: the official table + 512², 768²), ENGINE_FLAGS=--max-text-tokens 512 --compute-capabilities 8.9,12.0 …
ENGINE_ARGS = $(if $(BUILDER),--builder $(BUILDER)) $(if $(BUCKETS),--buckets $(BUCKETS)) $(ENGINE_FLAGS)
engines: $(BIN)/.installed
	$(BIN)/python -m ideogram4_engine.export.engines --engines $(call given,OUT,engines/tiny) $(ENGINE_ARGS)

# CPU benchmark on the tiny checkpoint: runtime (onnxruntime CPU) vs the torch reference, same noise.
BENCH_ROOT ?= build/bench
BENCH_CASES ?= 512x512:V4_TURBO_12
bench: $(BIN)/.installed
	rm -rf $(BENCH_ROOT)
	$(BIN)/python scripts/bench.py prepare --config tiny --root $(BENCH_ROOT)
	$(BIN)/python scripts/bench.py reference --device cpu --root $(BENCH_ROOT) --cases $(BENCH_CASES)
	$(BIN)/python scripts/bench.py runtime --backend onnxruntime-cpu --root $(BENCH_ROOT) --cases $(BENCH_CASES)
	$(BIN)/python scripts/bench.py report --root $(BENCH_ROOT)

clean:
	rm -rf $(VENV) checkpoints engines/*/ build/kernels
