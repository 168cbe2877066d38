"""Layer emitters shared by the component graphs. Each mirrors the reference's bf16 rounding points: an op
on bf16 tensors is one bf16 rounding, a composite (SiLU, norms) is computed in fp32 and rounded once, as
PyTorch's kernels do."""
from __future__ import annotations

import torch

from ..reference.fp8 import FP8_DTYPE
from .builder import BF16, F32, GraphBuilder


def linear(g: GraphBuilder, x: str, prefix: str, src, *, bias: bool) -> str:
    """y = x·W_effᵀ (+ b). An FP8 weight is stored as the checkpoint has it, (out, in) e4m3 with its per-output
    bf16 scale; DequantizeLinear(axis=0) gives W_eff = bf16(q·bf16(s)) — the official formula — and a Transpose
    makes it (in, out) for MatMul. TensorRT moves the DequantizeLinear past the Transpose into its FP8 GEMM;
    the onnxruntime CUDA twin multiplies the (out, in) bytes directly (rewrite.fp8_matmuls). A float weight is
    stored bf16, (in, out)."""
    w = src.get(f"{prefix}.weight")
    if w.dtype == FP8_DTYPE:
        q = g.weight(f"{prefix}.weight", w.contiguous())
        s = g.weight(f"{prefix}.weight_scale", src.get(f"{prefix}.weight_scale").to(torch.bfloat16))
        w_eff = g.op("Transpose", g.op("DequantizeLinear", q, s, axis=0), perm=[1, 0])
    else:
        w_eff = g.weight(f"{prefix}.weight", w.to(torch.bfloat16).t().contiguous())
    y = g.op("MatMul", x, w_eff)
    if bias:
        y = g.op("Add", y, g.weight(f"{prefix}.bias", src.get(f"{prefix}.bias").to(torch.bfloat16)))
    return y


def gain(g: GraphBuilder, name: str, src, dtype=torch.bfloat16) -> str:
    return g.weight(name, src.get(name).to(dtype))


def to_f32(g: GraphBuilder, x: str) -> str:
    return g.op("Cast", x, to=F32)


def to_bf16(g: GraphBuilder, x: str) -> str:
    return g.op("Cast", x, to=BF16)


def rms_norm(g: GraphBuilder, x: str, gain_name: str, src, eps: float, *, gain_before_round: bool = True) -> str:
    """RMSNorm of a bf16 tensor over its last axis as one opset-23 RMSNormalization (statistics in fp32,
    one rounding): one fused kernel on onnxruntime-CUDA and TensorRT instead of nine elementwise passes.

    gain_before_round=True: bf16(x·rsqrt(mean(x²)+eps)·g) — PyTorch's `F.rms_norm` (the DiT).
    False: bf16(x·rsqrt(…))·g in bf16 — the Hugging Face Qwen RMSNorm (the text encoder): a unit scale
    inside, the gain as its own bf16 Mul."""
    if gain_before_round:
        return g.op("RMSNormalization", x, gain(g, gain_name, src), axis=-1, epsilon=eps)
    unit = g.const(torch.ones(src.get(gain_name).shape[-1], dtype=torch.bfloat16))
    return g.op("Mul", g.op("RMSNormalization", x, unit, axis=-1, epsilon=eps), gain(g, gain_name, src))


def layer_norm(g: GraphBuilder, x: str, eps: float) -> str:
    """LayerNorm without affine parameters over the last axis: fp32 statistics, one bf16 rounding."""
    xf = to_f32(g, x)
    mean = g.op("ReduceMean", xf, g.i64(-1), keepdims=1)
    d = g.op("Sub", xf, mean)
    var = g.op("ReduceMean", g.op("Mul", d, d), g.i64(-1), keepdims=1)
    return to_bf16(g, g.op("Mul", d, g.op("Reciprocal", g.op("Sqrt", g.op("Add", var, g.const(eps))))))


def silu(g: GraphBuilder, x: str) -> str:
    """SiLU of a bf16 tensor computed in fp32 and rounded once (PyTorch's bf16 kernel)."""
    xf = to_f32(g, x)
    return to_bf16(g, g.op("Mul", xf, g.op("Sigmoid", xf)))


def signed_sin(g: GraphBuilder, sin: str, head_dim: int) -> str:
    """bf16 sign·sin with sign = −1 on the first half: rot(x)·sin = swap_halves(x)·(sign·sin) exactly
    (negation is exact and rounding is symmetric), which spares a Neg and a Concat per rotation."""
    half = head_dim // 2
    return g.op("Mul", sin, g.const(torch.cat([-torch.ones(half), torch.ones(half)]).to(torch.bfloat16)))


def apply_rope(g: GraphBuilder, x: str, cos: str, sin_signed: str, head_dim: int) -> str:
    """x·cos + swap_halves(x)·(sign·sin) — the NeoX pairing of element i with i + half, each product and the
    sum rounded to bf16 like the reference; the swap is one Gather."""
    half = head_dim // 2
    swap = g.const(torch.cat([torch.arange(half, head_dim), torch.arange(half)]).to(torch.int64))
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", g.op("Gather", x, swap, axis=-1), sin_signed))
