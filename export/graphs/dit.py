"""The DiT as an ONNX graph (spec §2), one builder for both weight sets.

Inputs are fp32 at the boundary; compute is bf16 inside, op for op like the reference. The conditional graph
takes the text tokens' features; the unconditional graph is the same topology without the text path, which
is exactly zero there (spec §2.4 "exact simplifications"). Only image-token velocities are returned (the
final layer is per token). There is no attention mask: every row of a batch has the same text length (no
padding), so attention stays mask-free and fast-kernel friendly; prompts of different lengths are run as
separate batches by the runtime (spec §11: "pack per sample"). MRoPE cos/sin are inputs: they depend only on (text length, grid)
and need fp32 angles up to 6.6e4 rad, so the host computes them once per request (spec §2.6, §11).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..dit import DiTConfig, FINAL_NORM_EPS, LLM_NORM_EPS, MAX_PERIOD, QK_NORM_EPS, TIME_SCALE
from .builder import F32, GraphBuilder
from .layers import apply_rope, layer_norm, linear, rms_norm, signed_sin, silu, to_bf16

ATTENTION_FORMS = ("op", "matmul")


def time_frequencies(dim: int) -> torch.Tensor:
    """exp(−k·ln(1e4)/(half−1)) in fp32, computed by the same torch ops as the reference (bit-identical)."""
    half = dim // 2
    return torch.exp(torch.arange(half, dtype=torch.float32)
                     * torch.tensor(-math.log(MAX_PERIOD) / (half - 1), dtype=torch.float32))


def attention(g: GraphBuilder, q: str, k: str, v: str, heads: int, head_dim: int, form: str) -> str:
    """Bidirectional attention on (B, H, L, hd) bf16 tensors, scale 1/√hd, softmax in fp32.

    form "op": the opset-23 Attention operator. No `softmax_precision` attribute: TensorRT's parser refuses
    it (TensorRT-RTX 1.7: "Setting softmax precision is not supported"; its fused kernels keep the softmax in
    fp32); the onnxruntime twins add softmax_precision = float (graphs/rewrite.py).
    form "matmul": Q pre-scaled (1/16 at head_dim 256 is a power of two: exact in bf16) → MatMul → mask →
    fp32 Softmax → MatMul, the pattern TensorRT's MHA fusion recognises."""
    scale = 1.0 / math.sqrt(head_dim)
    if form == "op":
        return g.op("Attention", q, k, v, scale=scale)
    qs = g.op("Mul", q, g.const(torch.tensor(scale, dtype=torch.bfloat16)))
    scores = g.op("Cast", g.op("MatMul", qs, g.op("Transpose", k, perm=[0, 1, 3, 2])), to=F32)
    p = to_bf16(g, g.op("Softmax", scores, axis=-1))
    return g.op("MatMul", p, v)


def build_dit(cfg: DiTConfig, src, graph_path: Path, *, text: bool, attention_form: str = "op",
              progress=None) -> GraphBuilder:
    """Emit the DiT graph for one weight set (`src`: TensorSource over the checkpoint component)."""
    if attention_form not in ATTENTION_FORMS:
        raise ValueError(f"attention form {attention_form!r}; allowed: {', '.join(ATTENTION_FORMS)}")
    name = graph_path.stem
    g = GraphBuilder(name, graph_path.with_name(graph_path.name + ".data"))
    D, H, hd, A = cfg.emb_dim, cfg.num_heads, cfg.head_dim, cfg.adanln_dim
    seq = "sequence" if text else "image_tokens"
    lat = g.input("latents", F32, ["batch", "image_tokens", cfg.in_channels])
    tau = g.input("tau", F32, ["batch"])
    cos_in = g.input("rope_cos", F32, ["batch", seq, hd])
    sin_in = g.input("rope_sin", F32, ["batch", seq, hd])
    one = g.const(torch.tensor(1.0, dtype=torch.bfloat16))

    indicator = g.weight("embed_image_indicator.weight", src.get("embed_image_indicator.weight").to(torch.bfloat16))
    h = g.op("Add", linear(g, to_bf16(g, lat), "input_proj", src, bias=True),
             g.op("Gather", indicator, g.i64(1), axis=0))

    # time conditioning: τ rounded to bf16 (trap 3), fp32 sinusoid [sin | cos], then the MLPs
    tb = g.op("Cast", to_bf16(g, tau), to=F32)
    args = g.op("Mul", g.op("Unsqueeze", g.op("Mul", tb, g.const(TIME_SCALE)), g.i64(1)),
                g.const(time_frequencies(D)))
    e = to_bf16(g, g.op("Concat", g.op("Sin", args), g.op("Cos", args), axis=-1))
    c = linear(g, silu(g, linear(g, e, "t_embedding.mlp_in", src, bias=True)), "t_embedding.mlp_out", src, bias=True)
    a = silu(g, linear(g, g.op("Unsqueeze", c, g.i64(1)), "adaln_proj", src, bias=True))    # (B, 1, A)

    if text:
        feats = g.input("text_features", F32, ["batch", "text_tokens", cfg.llm_features_dim])
        e_txt = linear(g, rms_norm(g, to_bf16(g, feats), "llm_cond_norm.weight", src, LLM_NORM_EPS),
                       "llm_cond_proj", src, bias=True)
        h = g.op("Concat", g.op("Add", e_txt, g.op("Gather", indicator, g.i64(0), axis=0)), h, axis=1)
        n_text = g.op("Shape", feats, start=1, end=2)

    cos = g.op("Unsqueeze", to_bf16(g, cos_in), g.i64(2))        # (B, L, 1, hd): broadcast over heads
    sin = signed_sin(g, g.op("Unsqueeze", to_bf16(g, sin_in), g.i64(2)), hd)
    g.marks = {"blocks_in": h}      # where the first-block cache cuts the graph (graphs/cache.py); names only
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        s1, g1, s2, g2 = g.op("Split", linear(g, a, p + "adaln_modulation", src, bias=True),
                              g.i64(D, D, D, D), axis=-1, n_out=4)
        x = g.op("Mul", rms_norm(g, h, p + "attention_norm1.weight", src, cfg.norm_eps), g.op("Add", s1, one))
        qkv = g.op("Reshape", linear(g, x, p + "attention.qkv", src, bias=False), g.i64(0, 0, 3, H, hd))
        q, k, v = (g.op("Squeeze", t, g.i64(2)) for t in g.op("Split", qkv, g.i64(1, 1, 1), axis=2, n_out=3))
        q = apply_rope(g, rms_norm(g, q, p + "attention.norm_q.weight", src, QK_NORM_EPS), cos, sin, hd)
        k = apply_rope(g, rms_norm(g, k, p + "attention.norm_k.weight", src, QK_NORM_EPS), cos, sin, hd)
        q, k, v = (g.op("Transpose", t, perm=[0, 2, 1, 3]) for t in (q, k, v))
        o = attention(g, q, k, v, H, hd, attention_form)
        o = g.op("Reshape", g.op("Transpose", o, perm=[0, 2, 1, 3]), g.i64(0, 0, D))
        o = rms_norm(g, linear(g, o, p + "attention.o", src, bias=False), p + "attention_norm2.weight", src,
                     cfg.norm_eps)
        h = g.op("Add", h, g.op("Mul", g.op("Tanh", g1), o))
        x = g.op("Mul", rms_norm(g, h, p + "ffn_norm1.weight", src, cfg.norm_eps), g.op("Add", s2, one))
        y = g.op("Mul", silu(g, linear(g, x, p + "feed_forward.w1", src, bias=False)),
                 linear(g, x, p + "feed_forward.w3", src, bias=False))
        y = rms_norm(g, linear(g, y, p + "feed_forward.w2", src, bias=False), p + "ffn_norm2.weight", src,
                     cfg.norm_eps)
        h = g.op("Add", h, g.op("Mul", g.op("Tanh", g2), y))
        g.marks.setdefault("first_block_out", h)
        g.marks["blocks_out"] = h
        if progress:
            progress(i + 1, cfg.num_layers)
    if text:   # image tokens only from here: the final layer is per token
        h = g.op("Slice", h, n_text, g.i64(2**62), g.i64(1))
    scale = linear(g, silu(g, a), "final_layer.adaln_modulation", src, bias=True)     # second SiLU (trap 5)
    out = linear(g, g.op("Mul", layer_norm(g, h, FINAL_NORM_EPS), g.op("Add", scale, one)),
                 "final_layer.linear", src, bias=True)
    g.output(g.op("Cast", out, to=F32), "velocity", F32, ["batch", "image_tokens", cfg.in_channels])
    return g
