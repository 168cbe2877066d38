"""GPU sanity check of the two ways to hold FP8 weights, on the tiny synthetic model (seconds, before a full
benchmark): after onnxruntime's optimizations (constant folding on, as in the backend) the default twin must
keep no Transpose of a weight (folded at load), no Memcpy node (a host/device copy per run) and run its FP8
linears as MatMulBlockQuantizedFp8Weight and its attention as MultiHeadAttention (head_dim 256, as in the real
model; no opset-23 Attention left). It reports how far its latents are from the cpu twin (fp32-emulated bf16,
the opset-23 Attention) and how far its latents are from `dequantize_at_load`
(bf16 weights from DequantizeLinear → Cast): not bit-identical since v4, because the op computes rows M ≤ 8
(the conditioning linears, M = batch) with a GEMV kernel of another fp32 summation order (docs/tuning.md §10).

    python scripts/gpu_dequant_check.py [--root /tmp/ideogram4_dqcheck]
"""
from __future__ import annotations

import argparse
import json
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
        from ideogram4_engine.export.devtools import checkpoint_and_export
        checkpoint_and_export(root, "tiny")
    import onnx
    import onnxruntime as ort
    from ideogram4_engine.runtime.pipeline import Pipeline
    eng = root / "engines"
    o = ort.SessionOptions()
    o.optimized_model_filepath = str(root / "dit_cond.cuda.optimized.onnx")
    ort.InferenceSession(str(eng / "dit_cond.cuda.onnx"), o, providers=["CUDAExecutionProvider"])
    opt = onnx.load(o.optimized_model_filepath, load_external_data=False)
    ops = Counter(n.op_type for n in opt.graph.node)
    inits = {i.name for i in opt.graph.initializer}
    weight_transposes = sum(n.op_type == "Transpose" and n.input[0] in inits for n in opt.graph.node)
    kw = dict(width=512, height=512, steps=3, guidance=(3.0, 5.0, 7.0), seed=3)
    res = {}
    for name, backend, opts in (("default", "onnxruntime-cuda", {}),
                                ("dequantize_at_load", "onnxruntime-cuda", {"dequantize_at_load": True}),
                                ("cpu", "onnxruntime-cpu", {})):
        p = Pipeline(eng, backend=backend, **opts)
        res[name] = p.generate("a lighthouse at dusk", **kw)
    cpu = res.pop("cpu").latents
    a, b = res["default"].latents, res["dequantize_at_load"].latents
    same = bool(np.array_equal(a, b))
    folded = weight_transposes == 0 and ops.get("MatMulBlockQuantizedFp8Weight", 0) > 0
    fused = ops.get("MultiHeadAttention", 0) > 0 and ops.get("Attention", 0) == 0
    print(json.dumps({"memcpy_nodes": {k: v for k, v in ops.items() if "Memcpy" in k},
                      "fp8_matmuls": ops.get("MatMulBlockQuantizedFp8Weight", 0),
                      "weight_transposes_left": weight_transposes,
                      "attention_ops": {k: ops.get(k, 0) for k in ("Attention", "MultiHeadAttention")},
                      "latents_rel_err_vs_cpu": {k: float(np.linalg.norm(r.latents - cpu) / np.linalg.norm(cpu))
                                                 for k, r in res.items()},
                      "latents_bit_identical": same,
                      "latents_rel_err": float(np.linalg.norm(a - b) / np.linalg.norm(b)),
                      "max_abs_diff": float(np.abs(res["default"].latents - res["dequantize_at_load"].latents).max()),
                      "step_ms": {k: 1e3 * float(np.median(r.timings["step_s"])) for k, r in res.items()}}))
    sys.exit(0 if folded and fused and not any('Memcpy' in k for k in ops) else 1)


if __name__ == "__main__":
    main()
