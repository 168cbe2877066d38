"""The load-time dequantization graph: one FP8 weight and its per-row scale in, the bf16 weight out.

The runtime's `dequantize_at_load` runs it once per weight on the device that will hold the weight and binds
the results to the `*_dql` graphs (weights as inputs). It is the onnxruntime twins' own dequantization —
Cast(scale → fp32), DequantizeLinear in fp32, Cast(bf16) — so the weights are bit-identical to the ones the
`cuda` / `cpu` twins expand on every run.
"""
from __future__ import annotations

from .builder import BF16, FP8, GraphBuilder
from .rewrite import for_cuda

AXIS = 1        # weights are stored transposed (in, out); the scale runs along the output axis


def build_dequantize() -> GraphBuilder:
    g = GraphBuilder("dequantize")
    q = g.input("weight", FP8, ["rows", "cols"])
    s = g.input("scale", BF16, ["cols"])
    g.output(g.op("DequantizeLinear", q, s, axis=AXIS), "dequantized", BF16, ["rows", "cols"])
    return g


def dequantize_model():
    """The graph in the onnxruntime twins' form (the CUDA provider has no bf16 DequantizeLinear)."""
    return for_cuda(build_dequantize().model("FP8 weight -> bf16, as the onnxruntime twins compute it"))
