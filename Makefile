# Fresh-machine entry points. Each target installs what it needs into .venv.
PY ?= python3.11
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

.PHONY: run reference test checkpoint export engines clean kernels serve cpp-client

include kernels/w8a8.mk

ENGINES ?= engines/$(notdir $(abspath $(CHECKPOINT)))
BACKEND ?= auto

# Main job: prompt -> $(OUTPUT) through the lean runtime. Exports CHECKPOINT to ENGINES first (unchanged
# components are reused, so a second run is quick); the default CHECKPOINT is the tiny synthetic one, created
# when absent. With CHECKPOINT=<the real ideogram-4-fp8 folder> the same command serves the real model.
run: $(BIN)/.installed $(if $(filter $(DEFAULT_CHECKPOINT),$(CHECKPOINT)),$(DEFAULT_CHECKPOINT)/synthetic.json)
	$(BIN)/python -m ideogram4_engine.export --checkpoint $(CHECKPOINT) --out $(ENGINES) --attention $(ATTENTION)
	$(BIN)/ideogram4 generate --engines $(ENGINES) --prompt "$(PROMPT)" --width $(WIDTH) --height $(HEIGHT) \
		--sampler-preset $(PRESET) --seed $(SEED) --backend $(BACKEND) --output $(OUTPUT) --progress

# The same request through the PyTorch reference pipeline (the oracle), straight from the checkpoint.
reference: $(BIN)/.installed $(if $(filter $(DEFAULT_CHECKPOINT),$(CHECKPOINT)),$(DEFAULT_CHECKPOINT)/synthetic.json)
	$(BIN)/python -m ideogram4_engine.export.reference --checkpoint $(CHECKPOINT) --prompt "$(PROMPT)" \
		--width $(WIDTH) --height $(HEIGHT) --sampler-preset $(PRESET) --seed $(SEED) --output $(OUTPUT)

$(DEFAULT_CHECKPOINT)/synthetic.json: | $(BIN)/.installed
	$(BIN)/python -m ideogram4_engine.export.synthetic --config tiny --out $(DEFAULT_CHECKPOINT)

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[build,ort-cpu,test,trt-rtx,serve]'
	touch $@

test: $(BIN)/.installed kernels $(W8A8_LIB) cpp-client
	$(BIN)/python -m pytest -q

# The fused CUDA kernels for onnxruntime's CUDA provider (kernels/, docs/runtime.md): nvcc 13 and network to
# Debian once (onnxruntime's API headers are cached under build/). ARCHES="90" builds for Hopper only.
KERNELS_LIB := build/kernels/libideogram4_kernels.so
kernels: $(KERNELS_LIB)
$(KERNELS_LIB): kernels/build.sh kernels/fused.h kernels/fused.cu kernels/ort_ops.cu
	bash kernels/build.sh

# The C++ gRPC client (clients/cpp) with Debian's gRPC: the system's, or the same packages fetched into
# build/cpp/deps (private apt state, nothing installed). Exit code 3 = cannot be obtained here: the C++ test
# then skips with the reason written to build/cpp/UNAVAILABLE; a compile error fails.
cpp-client:
	bash clients/cpp/build.sh || [ $$? -eq 3 ]

# The server (docs/serving.md): exports CHECKPOINT like `make run`, then `ideogram4 serve` in the foreground
# (HTTP :$(PORT), gRPC :$(GRPC_PORT); Ctrl-C or SIGTERM drains). SERVE_FLAGS=--replicas 2 --max-queue 32 …
PORT ?= 8000
GRPC_PORT ?= 9000
serve: $(BIN)/.installed $(if $(filter $(DEFAULT_CHECKPOINT),$(CHECKPOINT)),$(DEFAULT_CHECKPOINT)/synthetic.json)
	$(BIN)/python -m ideogram4_engine.export --checkpoint $(CHECKPOINT) --out $(ENGINES) --attention $(ATTENTION)
	$(BIN)/ideogram4 serve --engines $(ENGINES) --backend $(BACKEND) --default-size $(WIDTH)x$(HEIGHT) \
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
