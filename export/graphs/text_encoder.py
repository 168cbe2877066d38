"""The Qwen3-VL text encoder as an ONNX graph (spec §3, traps 12, 13, 25, 28).

Input: the chat-templated ids of whole prompts, text tokens only (no padding, no image slots — trap 28: the
official code also runs the image slots, which changes nothing for the text tokens). Rows of one batch have
equal length (1…2048 tokens incl. template, trap 25); prompts of other lengths are separate batches.
Output: exactly `TextEncoder.encode(ids)` of the torch reference — the residual stream after the decoder layers
in `tap_layers(num_layers)` (tap 0 = after layer 0, the last tap before the final norm, which is never applied;
trap 13), laid out hidden-major / tap-minor (f = d·13 + j, trap 12), in fp32. The graph stops after the last
tapped layer, so neither the final norm nor any later layer is stored.

Compute is bf16 with the rounding points of transformers 5.23's Qwen3-VL text model (modeling_qwen3_vl.py):
  * embeddings: Gather from the bf16 table (kept bf16: it is the largest tensor);
  * RMSNorm (input/post-attention layernorm, q_norm/k_norm per head): fp32 statistics, x·rsqrt(…) rounded to
    bf16, then the bf16 gain multiply (one more bf16 rounding) — `Qwen3VLTextRMSNorm`;
  * projections: FP8 e4m3 weight → DequantizeLinear (bf16(q·bf16(s))) → bf16 MatMul, no biases;
  * RoPE: cos/sin computed in fp32 (positions 0…n−1 by Range, angles pos·inv_freq with inv_freq precomputed
    at export by transformers' own function), rounded to bf16; x·cos and rot(x)·sin and their sum each bf16;
  * attention: causal GQA, scale 1/√head_dim, softmax in fp32, probabilities rounded to bf16;
  * MLP: down(silu(gate(x)) ⊙ up(x)), SiLU in fp32 rounded once, the product and residual adds bf16.

RoPE stays in the graph: text-only input makes the three interleaved MRoPE axes equal, so the encoder's
RoPE is plain 1-D rotate-half RoPE that depends only on the sequence length.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..reference.text_encoder import NUM_TAPS, PREFIX, tap_layers, text_dims
from .builder import F32, I64, GraphBuilder
from .layers import apply_rope, linear, rms_norm, signed_sin, silu, to_bf16

ATTENTION_FORMS = ("op", "matmul")


def _text_config(config):
    return config.text_config if hasattr(config, "text_config") else config


def rope_inv_freq(text_config) -> torch.Tensor:
    """inv_freq (head_dim/2,) fp32, computed by transformers' own Qwen3-VL function (bit-identical to the
    module's buffer). Refuses RoPE variants other than the default one and any attention scaling ≠ 1."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    tc = _text_config(text_config)
    rope_type = (tc.rope_parameters or {}).get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"text encoder rope_type {rope_type!r}: only 'default' (theta) RoPE is supported")
    inv_freq, scaling = Qwen3VLTextRotaryEmbedding.compute_default_rope_parameters(tc)
    if scaling != 1.0:
        raise ValueError(f"text encoder RoPE attention_scaling {scaling}: only 1.0 is supported")
    _, _, _, _, _, head_dim, _ = text_dims(tc)
    assert inv_freq.dtype == torch.float32 and inv_freq.shape == (head_dim // 2,), inv_freq.shape
    return inv_freq


def positions(g: GraphBuilder, ids: str) -> str:
    """0…n−1 (n,) int64 for ids (batch, n): every row is one whole prompt starting at position 0."""
    n = g.op("Squeeze", g.op("Shape", ids, start=1, end=2), g.i64(0))
    return g.shape_hint(g.op("Range", g.const(0, torch.int64), n, g.const(1, torch.int64)), I64, ["text_tokens"])


def rope_cos_sin(g: GraphBuilder, pos: str, inv_freq: torch.Tensor) -> tuple[str, str]:
    """cos/sin (n, head_dim) bf16 of 1-D positions (n,) int64, as Qwen3VLTextRotaryEmbedding computes them for
    text-only input: freqs = float(pos)·inv_freq in fp32, cos/sin in fp32 of cat(freqs, freqs), cast to bf16.
    (Its interleaved MRoPE recomposition picks slots from three identical axes: a no-op here; ×1.0 scaling is
    exact.) cos/sin are taken of the half and then duplicated — the same values as of the duplicated angles."""
    freqs = g.op("Mul", g.op("Unsqueeze", g.op("Cast", pos, to=F32), g.i64(-1)), g.const(inv_freq))
    cos = to_bf16(g, g.op("Cos", freqs))
    sin = to_bf16(g, g.op("Sin", freqs))
    return g.op("Concat", cos, cos, axis=-1), g.op("Concat", sin, sin, axis=-1)


def _repeat_kv(g: GraphBuilder, x: str, heads: int, kv_heads: int, head_dim: int) -> str:
    """(B, KV, n, hd) → (B, H, n, hd), query head h reading KV head h // (H/KV) (transformers' repeat_kv)."""
    rep = heads // kv_heads
    if rep == 1:
        return x
    x = g.op("Expand", g.op("Unsqueeze", x, g.i64(2)), g.i64(1, 1, rep, 1, 1))      # (B, KV, rep, n, hd)
    return g.op("Reshape", x, g.i64(0, heads, -1, head_dim))


def attention(g: GraphBuilder, q: str, k: str, v: str, heads: int, kv_heads: int, head_dim: int, form: str,
              allowed: str | None = None) -> str:
    """Causal GQA attention on q (B, H, n, hd), k/v (B, KV, n, hd) bf16; scale 1/√hd, softmax in fp32.

    form "op": opset-23 Attention, is_causal=1 (4-D inputs: the head counts come from the shapes, GQA by
    broadcasting KV heads); softmax_precision = float is added by the onnxruntime twins (TensorRT refuses it).
    form "matmul": KV heads repeated, QKᵀ in bf16, scaled in fp32 (1/√128 is not a power of two), causal
    select with `allowed` (n, n) bool, fp32 Softmax, probabilities rounded to bf16, MatMul with V."""
    scale = 1.0 / math.sqrt(head_dim)
    if form == "op":
        return g.op("Attention", q, k, v, is_causal=1, scale=scale)
    k = _repeat_kv(g, k, heads, kv_heads, head_dim)
    v = _repeat_kv(g, v, heads, kv_heads, head_dim)
    scores = g.op("Mul", g.op("Cast", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), to=F32),
                  g.const(scale))
    scores = g.op("Where", allowed, scores, g.const(torch.finfo(torch.float32).min))
    return g.op("MatMul", to_bf16(g, g.op("Softmax", scores, axis=-1)), v)


def build_text_encoder(text_config, src, graph_path: Path, *, attention_form: str = "op",
                       progress=None) -> GraphBuilder:
    """Emit the text-encoder graph (`src`: TensorSource over the checkpoint's `text_encoder` component, keys
    `language_model.*`). input_ids int64 (batch, text_tokens) → text_features f32 (batch, text_tokens, 13·hidden)."""
    if attention_form not in ATTENTION_FORMS:
        raise ValueError(f"attention form {attention_form!r}; allowed: {', '.join(ATTENTION_FORMS)}")
    tc = _text_config(text_config)
    _, D, n_layers, H, KV, hd, _ = text_dims(tc)
    if H % KV:
        raise ValueError(f"text encoder: {H} attention heads are not a multiple of {KV} KV heads")
    eps = tc.rms_norm_eps
    taps = tap_layers(n_layers)
    used = max(taps) + 1                # stop after the last tapped layer; the final norm is never applied
    inv_freq = rope_inv_freq(tc)

    g = GraphBuilder(graph_path.stem, graph_path.with_name(graph_path.name + ".data"))
    ids = g.input("input_ids", I64, ["batch", "text_tokens"])
    pos = positions(g, ids)
    cos, sin = (g.op("Unsqueeze", t, g.i64(1)) for t in rope_cos_sin(g, pos, inv_freq))  # (n, 1, hd)
    sin = signed_sin(g, sin, hd)
    allowed = None
    if attention_form == "matmul":                                                  # key j ≤ query i
        allowed = g.op("GreaterOrEqual", g.op("Unsqueeze", pos, g.i64(1)), g.op("Unsqueeze", pos, g.i64(0)))

    h = g.op("Gather", g.weight(f"{PREFIX}embed_tokens.weight",
                                src.get(f"{PREFIX}embed_tokens.weight").to(torch.bfloat16)), ids, axis=0)
    caps: list[str] = []
    for i in range(used):
        p = f"{PREFIX}layers.{i}."
        x = rms_norm(g, h, p + "input_layernorm.weight", src, eps, gain_before_round=False)
        q, k, v = (g.op("Reshape", linear(g, x, f"{p}self_attn.{name}", src, bias=False), g.i64(0, 0, heads, hd))
                   for name, heads in (("q_proj", H), ("k_proj", KV), ("v_proj", KV)))
        q = apply_rope(g, rms_norm(g, q, p + "self_attn.q_norm.weight", src, eps, gain_before_round=False),
                       cos, sin, hd)
        k = apply_rope(g, rms_norm(g, k, p + "self_attn.k_norm.weight", src, eps, gain_before_round=False),
                       cos, sin, hd)
        q, k, v = (g.op("Transpose", t, perm=[0, 2, 1, 3]) for t in (q, k, v))
        o = attention(g, q, k, v, H, KV, hd, attention_form, allowed)
        o = g.op("Reshape", g.op("Transpose", o, perm=[0, 2, 1, 3]), g.i64(0, 0, H * hd))
        h = g.op("Add", h, linear(g, o, p + "self_attn.o_proj", src, bias=False))
        x = rms_norm(g, h, p + "post_attention_layernorm.weight", src, eps, gain_before_round=False)
        y = g.op("Mul", silu(g, linear(g, x, p + "mlp.gate_proj", src, bias=False)),
                 linear(g, x, p + "mlp.up_proj", src, bias=False))
        h = g.op("Add", h, linear(g, y, p + "mlp.down_proj", src, bias=False))
        if i in taps:
            caps += [g.op("Unsqueeze", h, g.i64(-1))] * taps.count(i)
        if progress:
            progress(i + 1, used)
    # (B, n, D, 13) → (B, n, D·13): f = d·13 + j (hidden-major, tap-minor)
    feats = g.op("Reshape", g.op("Concat", *caps, axis=-1), g.i64(0, 0, D * NUM_TAPS))
    g.output(g.op("Cast", feats, to=F32), "text_features", F32, ["batch", "text_tokens", D * NUM_TAPS])
    return g


def build_rope_probe(text_config, graph_path: Path | None = None) -> GraphBuilder:
    """A tiny graph exposing the encoder's RoPE: input_ids (batch, text_tokens) → rope_cos, rope_sin
    (text_tokens, head_dim) as bf16 values widened to f32. Same emitter as the encoder (for bit-exactness tests)."""
    g = GraphBuilder("text_encoder_rope", None if graph_path is None else
                     graph_path.with_name(graph_path.name + ".data"))
    ids = g.input("input_ids", I64, ["batch", "text_tokens"])
    cos, sin = rope_cos_sin(g, positions(g, ids), rope_inv_freq(text_config))
    hd = text_dims(_text_config(text_config))[5]
    for name, t in (("rope_cos", cos), ("rope_sin", sin)):
        g.output(g.op("Cast", t, to=F32), name, F32, ["text_tokens", hd])
    return g
