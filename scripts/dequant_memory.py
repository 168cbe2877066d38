"""Where `dequantize_at_load`'s GPU memory goes (docs/tuning.md §16): the FP8 weights of every component are
dequantized on the GPU into kept bf16 tensors the way the onnxruntime backend does it, one process per variant,
and nvidia-smi's used MiB is printed after each component next to the bf16 bytes kept.

  held     : the loop as it was up to exporter v8: the e4m3 bytes are bound as a host tensor, which onnxruntime
             copies to the GPU at bind time into the session's arena; that copy is freed only when the next
             weight's binding replaces it, after the run's arena shrink
  released : the copy is released after each run and an empty run shrinks the arena before the next weight
             (the backend's loop since §16)

    python scripts/dequant_memory.py --engines /tmp/ideogram4_bench/engines
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np


def used_mib() -> int:
    from runtime_memory import used_mib as used        # this folder's script: nvidia-smi per GPU
    return used("onnxruntime-cuda")["gpu_mib"][0]


def one(engines: str, variant: str) -> dict:
    import onnxruntime as ort
    from ideogram4_engine.runtime.manifest import load_manifest
    from ideogram4_engine.runtime.backends.onnxruntime import _read_tensor, shrinking_runs
    m = load_manifest(engines)
    rec = {"variant": variant, "before_mib": used_mib(), "components": []}
    kept, bf16 = [], 0
    for comp in m.components:
        dq = m.dequantize(comp)
        if dq is None:
            continue
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(m.root / dq["graph"]["file"]), opts, providers=[
            ("CUDAExecutionProvider", {"device_id": 0, "arena_extend_strategy": "kSameAsRequested"})])
        shrink, empty = shrinking_runs(ort, sess, "cuda", 0)
        try:
            with open(m.data_path(comp), "rb") as f:
                for w in dq["weights"]:
                    run = sess.io_binding()
                    for name in ("weight", "scale"):
                        run.bind_ortvalue_input(name, _read_tensor(f, w[name], ort))
                    run.bind_output("dequantized", "cuda", 0)
                    sess.run_with_iobinding(run, shrink)
                    kept.append(run.get_outputs()[0])
                    bf16 += 2 * int(np.prod(w["weight"]["shape"]))
                    if variant == "released":
                        run.clear_binding_inputs()
                        sess.run_with_iobinding(empty, shrink)
        except Exception as e:  # noqa: BLE001 -- an 80 GB card runs out under `held`: record where
            rec["error"] = f"{comp}: {str(e).splitlines()[0][-160:]}"
        rec["components"].append({"component": comp, "used_mib": used_mib(), "bf16_kept_mib": bf16 >> 20})
        kept.append(sess)
        if "error" in rec:
            break
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", required=True)
    ap.add_argument("--variants", default="released,held")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.engines, a.one)), flush=True)
        return
    for v in a.variants.split(","):
        r = subprocess.run([sys.executable, __file__, "--engines", a.engines, "--one", v], capture_output=True, text=True)
        print(r.stdout.strip() or r.stderr[-2000:], flush=True)


if __name__ == "__main__":
    main()
