"""The load-time dequantization graph: one FP8 weight (out, in) and its per-row scale in, the bf16 weight
(in, out) out, as the `*_dql` graphs take it.

The runtime's `dequantize_at_load` runs it once per weight on the device that will hold the weight and binds
the results to the `*_dql` graphs (weights as inputs). It is the onnxruntime twins' own dequantization —
Cast(scale → fp32), DequantizeLinear in fp32, Cast(bf16), Transpose — so the weights are bit-identical to the
ones the `cpu` twin expands on every run.
"""
from __future__ import annotations

from .builder import BF16, FP8, GraphBuilder
from .rewrite import CUDA_FP32_OPS, emulate_bf16

AXIS = 0        # weights are stored (out, in), the checkpoint's layout; the scale runs along the output rows


def build_dequantize() -> GraphBuilder:
    g = GraphBuilder("dequantize")
    q = g.input("weight", FP8, ["rows", "cols"])
    s = g.input("scale", BF16, ["rows"])
    w = g.op("DequantizeLinear", q, s, axis=AXIS)
    g.output(g.op("Transpose", w, perm=[1, 0]), "dequantized", BF16, ["cols", "rows"])
    return g


def dequantize_model():
    """The graph in the onnxruntime twins' form (the CUDA provider has no bf16 DequantizeLinear)."""
    return emulate_bf16(build_dequantize().model("FP8 weight -> bf16, as the onnxruntime twins compute it"),
                        CUDA_FP32_OPS)
