"""GPU sanity check of the two ways to hold FP8 weights, on the tiny synthetic model (seconds, before a full
benchmark): the default twin (dequantize per run, tied to each input) and `dequantize_at_load` must give
bit-identical latents on onnxruntime CUDA, and the per-run twin must not make onnxruntime copy the int64
shape values between host and device (Memcpy nodes in the optimized graph would mean a sync per weight).

    python scripts/gpu_dequant_check.py [--root /tmp/ideogram4_dqcheck]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/tmp/ideogram4_dqcheck")
    a = ap.parse_args()
    root = Path(a.root)
    if not (root / "engines" / "manifest.json").exists():
        from ideogram4_engine.export.synthetic.writer import write_checkpoint
        write_checkpoint(root / "ckpt", "tiny", seed=0)
        subprocess.run([sys.executable, "-m", "ideogram4_engine.export", "--checkpoint", str(root / "ckpt"),
                        "--out", str(root / "engines"), "--no-progress"], check=True)
    import onnx
    import onnxruntime as ort
    from ideogram4_engine.runtime.pipeline import Pipeline
    eng = root / "engines"
    o = ort.SessionOptions()
    o.add_session_config_entry("optimization.disable_specified_optimizers", "ConstantFolding")
    o.optimized_model_filepath = str(root / "dit_cond.cuda.optimized.onnx")
    ort.InferenceSession(str(eng / "dit_cond.cuda.onnx"), o, providers=["CUDAExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(o.optimized_model_filepath, load_external_data=False).graph.node)
    kw = dict(width=512, height=512, steps=3, guidance=(3.0, 5.0, 7.0), seed=3)
    res = {}
    for name, opts in (("default", {}), ("dequantize_at_load", {"dequantize_at_load": True})):
        p = Pipeline(eng, backend="onnxruntime-cuda", **opts)
        res[name] = p.generate("a lighthouse at dusk", **kw)
    same = bool(np.array_equal(res["default"].latents, res["dequantize_at_load"].latents))
    print(json.dumps({"memcpy_nodes": {k: v for k, v in ops.items() if "Memcpy" in k},
                      "latents_bit_identical": same,
                      "max_abs_diff": float(np.abs(res["default"].latents - res["dequantize_at_load"].latents).max()),
                      "step_ms": {k: 1e3 * float(np.median(r.timings["step_s"])) for k, r in res.items()}}))
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
