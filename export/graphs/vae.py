"""The Flux2 VAE decoder as an ONNX graph (spec §6), from sampler state to finished pixels.

Boundary (design decision): the graph takes the sampler's final state and returns the finished image, so the
runtime and the C++ service only reshape buffers and never touch a pixel or a latent value:

* input  `latents` f32 (batch, grid_h, grid_w, 128): the (B, N, 128) token tensor viewed with
  N = grid_h·grid_w in raster order (a free reshape on the host). Token channel k = (ph·2 + pw)·32 + c.
* output `image` uint8 (batch, 16·grid_h, 16·grid_w, 3): RGB, HWC, ready to encode as PNG.
* optional output `decoded` f32 (batch, 3, 16·grid_h, 16·grid_w) (`float_output=True`): the decoder's bf16
  output widened exactly — the pre-quantisation frame, for debugging/parity and float consumers.

Inside, op for op like the reference (`export/reference/vae.py` `Decoder`, `ReferencePipeline.decode`):

1. de-normalise in fp32, multiply then add, no eps: `z·LATENT_SCALE + LATENT_SHIFT` on the token channel
   (spec §6.5, trap 18; constants from `runtime/latents.py`). Two separate fp32 ops, as torch/numpy do them —
   a backend that contracts them into one FMA differs in the last fp32 bit;
2. unpatchify (B, gh, gw, 2, 2, 32) → permute (B, 32, gh, 2, gw, 2) → (B, 32, 2gh, 2gw) (§6.6, the (ph, pw, c)
   order, *not* diffusers' (c, ph, pw)); then cast to bf16;
3. the bf16 decoder: post_quant_conv 1×1 → conv_in → mid (Res, Attn, Res) → up levels 3, 2, 1, 0 (layers_per_block
   + 1 resnets each, nearest-×2 upsample + 3×3 conv on levels 3, 2, 1) → GroupNorm → swish → conv_out;
4. the official post-processing (§6.8): `uint8(round((clamp(float32(x), −1, 1) + 1)·127.5))` with ONNX Round
   (half to even, like torch.round), then NCHW → NHWC (transposed as uint8: 4× less traffic than fp32).

Rounding points mirror PyTorch's bf16 kernels (each bf16 op = compute wide, round once):
* Conv (bias included) is one op → one rounding, like cuDNN/oneDNN (fp32 accumulation, bias in the epilogue).
  The mid-attention q/k/v/proj_out stay 1×1 Convs (weights reshaped (C, C) → (C, C, 1, 1) as the official
  loader does) so their bias is also inside the op; a MatMul + Add would round twice.
* swish is the reference's literal `x * torch.sigmoid(x)` on bf16 tensors: Sigmoid (rounded) then Mul
  (rounded) — two roundings, not the one-rounding fused SiLU of `layers.silu` (that differs in ~27 % of
  elements).
* GroupNorm (32 groups, eps 1e-6) is emitted as plain ops, not the opset-21 `GroupNormalization`: the input is
  cast to fp32, statistics are mean and E[(x − mean)²] per group in fp32, and the output is
  `x·a + b` with a = rstd·γ, b = β − mean·a per (sample, channel), rounded to bf16 once — the structure of
  PyTorch's CPU and CUDA GroupNorm kernels for bf16 inputs. `GroupNormalization`-21 is not equivalent: its
  reference function computes var as E[x²] − mean² (cancellation) and, for a bf16 input, casts the
  normalised value to bf16 *before* multiplying by γ and adding β (three roundings: 36 % of elements differ
  from torch on a random test, up to 0.03 absolute), and engines may compute it in reduced precision. Plain ops
  pin every rounding point on every backend.
* Resize: nearest, `coordinate_transformation_mode="asymmetric"`, `nearest_mode="floor"`, scales (1, 1, 2, 2):
  source index = floor(dst / 2), exactly `F.interpolate(scale_factor=2, mode="nearest")`. Pure copy, exact.
* Mid attention (single head of width C over all H·W latent pixels, scale 1/√C, trap 19): by default the
  opset-23 `Attention` operator on (B, 1, HW, C) (the onnxruntime twins add `softmax_precision = float`; TensorRT
  refuses the attribute and keeps its softmax in fp32 anyway). Reason: it lets an engine
  use a fused kernel instead of materialising the (HW)² score matrix (1 GiB fp32 at 1024² = 16,384 tokens,
  16 GiB at 2048² = 65,536), and the reference (`F.scaled_dot_product_attention` on bf16) is itself a fused
  kernel with fp32 QKᵀ/softmax and one final rounding. The operator's exact-math result differs from a given
  flash kernel by ~1.6e-3 relative (the kernel rounds its unnormalised exp to bf16 for the PV product and
  rescales per KV block); that is below the bf16 noise the decoder accumulates anyway (see the tests).
  `attention_form="matmul"` is the fallback for engines without the operator, spelling out a flash kernel's
  rounding points: S = Q·Kᵀ in fp32, E = exp((S − max)·scale) in fp32, O = bf16((bf16(E)·V, fp32 accumulate)
  / ΣE) — 95 % bit-equal to torch's CPU kernel where it runs one KV block. Scores are never rounded to bf16:
  at C = 512 that would add ~2⁻⁹ relative logit error, and 1/√512 is not a power of two.

Weights: every tensor is stored bf16 (the reference runs the VAE in bf16; the checkpoint dtype is not fixed by
the spec), under its native name (§6.7); GroupNorm γ/β are stored bf16 reshaped to (G, C/G, 1) and widened in
the graph. `src` may use diffusers names (the file as shipped) or native names.
Dynamic axes: batch, grid_h, grid_w. Opset 23 / IR 11 (via `GraphBuilder`).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ...runtime.latents import LATENT_CHANNELS, LATENT_SCALE, LATENT_SHIFT, PATCH, TOKEN_CHANNELS
from ..reference.vae import NUM_GROUPS, NUM_LEVELS, VAEConfig, diffusers_to_native
from .builder import F32, U8, GraphBuilder
from .layers import to_bf16, to_f32

ATTENTION_FORMS = ("op", "matmul")


class _NativeSource:
    """Native-name view of a VAE tensor source (diffusers or native names); every tensor returned as bf16."""

    def __init__(self, src):
        self.src = src
        self._names: dict[str, str] = {}
        for k in src.keys():
            try:
                n = diffusers_to_native(k)
            except KeyError:
                n = k                                   # already native (or a key we never ask for)
            self._names[n] = k

    def get(self, native: str) -> torch.Tensor:
        if native not in self._names:
            raise KeyError(f"VAE tensor {native!r} (native name) not found in the checkpoint")
        return self.src.get(self._names[native]).to(torch.bfloat16)


# ------------------------------------------------------------------------------------------ helpers

def emit_tokens_to_latent(g: GraphBuilder, x: str) -> str:
    """(B, gh, gw, 128) f32 tokens → (B, 32, 2gh, 2gw) f32 VAE latent: z·scale + shift (fp32, multiply then
    add), then the (ph, pw, c) unpatchify of spec §6.6. Bit-exact with `runtime.latents.tokens_to_latent`."""
    z = g.op("Add", g.op("Mul", x, g.const(torch.from_numpy(LATENT_SCALE.copy()))),
             g.const(torch.from_numpy(LATENT_SHIFT.copy())))
    z = g.op("Reshape", z, g.i64(0, 0, 0, PATCH, PATCH, LATENT_CHANNELS))          # (B, gh, gw, 2, 2, 32)
    z = g.op("Transpose", z, perm=[0, 5, 1, 3, 2, 4])                               # (B, 32, gh, 2, gw, 2)
    hw = g.op("Mul", g.op("Shape", x, start=1, end=3), g.i64(PATCH))                # [2gh, 2gw]
    return g.op("Reshape", z, g.op("Concat", g.i64(0, LATENT_CHANNELS), hw, axis=0))


def _conv(g: GraphBuilder, x: str, prefix: str, src: _NativeSource, *, k: int = 3) -> str:
    """Conv2d stride 1, 'same' padding, bias inside the op (one bf16 rounding)."""
    w = src.get(f"{prefix}.weight")
    if w.ndim == 2:                                     # mid-attention linear (C, C) → 1×1 kernel (§6.7)
        w = w.reshape(*w.shape, 1, 1)
    if tuple(w.shape[2:]) != (k, k):
        raise ValueError(f"{prefix}.weight has shape {tuple(w.shape)}, expected a {k}×{k} kernel")
    p = k // 2
    return g.op("Conv", x, g.weight(f"{prefix}.weight", w.contiguous()),
                g.weight(f"{prefix}.bias", src.get(f"{prefix}.bias")),
                kernel_shape=[k, k], pads=[p, p, p, p], strides=[1, 1], dilations=[1, 1], group=1)


def _group_norm(g: GraphBuilder, x: str, prefix: str, src: _NativeSource, channels: int, eps: float) -> str:
    """GroupNorm(32) of a bf16 NCHW tensor: fp32 statistics, y = x·a + b with a = rstd·γ, b = β − mean·a,
    one bf16 rounding (PyTorch's bf16 GroupNorm kernels)."""
    G, cg = NUM_GROUPS, channels // NUM_GROUPS
    gamma = g.weight(f"{prefix}.weight", src.get(f"{prefix}.weight").reshape(G, cg, 1))
    beta = g.weight(f"{prefix}.bias", src.get(f"{prefix}.bias").reshape(G, cg, 1))
    xf = g.op("Reshape", to_f32(g, x), g.i64(0, G, cg, -1))                          # (B, G, C/G, HW)
    axes = g.i64(2, 3)
    mean = g.op("ReduceMean", xf, axes, keepdims=1)                                 # (B, G, 1, 1)
    d = g.op("Sub", xf, mean)
    var = g.op("ReduceMean", g.op("Mul", d, d), axes, keepdims=1)
    rstd = g.op("Reciprocal", g.op("Sqrt", g.op("Add", var, g.const(eps))))
    a = g.op("Mul", rstd, to_f32(g, gamma))                                         # (B, G, C/G, 1)
    b = g.op("Sub", to_f32(g, beta), g.op("Mul", mean, a))
    y = to_bf16(g, g.op("Add", g.op("Mul", xf, a), b))
    return g.op("Reshape", y, g.op("Shape", x))


def _swish(g: GraphBuilder, x: str) -> str:
    """`x * torch.sigmoid(x)` on bf16: two bf16 roundings, like the reference."""
    return g.op("Mul", x, g.op("Sigmoid", x))


def _resnet(g: GraphBuilder, x: str, prefix: str, src: _NativeSource, cin: int, cout: int, eps: float) -> str:
    h = _conv(g, _swish(g, _group_norm(g, x, f"{prefix}.norm1", src, cin, eps)), f"{prefix}.conv1", src)
    h = _conv(g, _swish(g, _group_norm(g, h, f"{prefix}.norm2", src, cout, eps)), f"{prefix}.conv2", src)
    short = x if cin == cout else _conv(g, x, f"{prefix}.nin_shortcut", src, k=1)
    return g.op("Add", short, h)


def _attention(g: GraphBuilder, x: str, prefix: str, src: _NativeSource, c: int, eps: float, form: str) -> str:
    """AttnBlock: GN → 1×1 q, k, v → single head of width C over H·W, scale 1/√C → proj_out → residual."""
    y = _group_norm(g, x, f"{prefix}.norm", src, c, eps)
    shape = g.op("Shape", x)

    def tokens(t: str) -> str:                          # (B, C, H, W) → (B, 1, HW, C)
        return g.op("Transpose", g.op("Reshape", t, g.i64(0, 1, c, -1)), perm=[0, 1, 3, 2])

    q, k, v = (tokens(_conv(g, y, f"{prefix}.{n}", src, k=1)) for n in ("q", "k", "v"))
    scale = 1.0 / math.sqrt(c)
    if form == "op":
        o = g.op("Attention", q, k, v, scale=scale)
    else:
        s = g.op("MatMul", to_f32(g, q), g.op("Transpose", to_f32(g, k), perm=[0, 1, 3, 2]))
        s = g.op("Mul", g.op("Sub", s, g.op("ReduceMax", s, g.i64(-1), keepdims=1)), g.const(scale))
        e = g.op("Exp", s)                                                          # fp32, ≤ 1
        pv = g.op("MatMul", to_f32(g, to_bf16(g, e)), to_f32(g, v))                 # bf16 P, fp32 accumulation
        o = to_bf16(g, g.op("Div", pv, g.op("ReduceSum", e, g.i64(-1), keepdims=1)))
    o = g.op("Reshape", g.op("Transpose", o, perm=[0, 1, 3, 2]), shape)             # (B, C, H, W)
    return g.op("Add", x, _conv(g, o, f"{prefix}.proj_out", src, k=1))


def _upsample(g: GraphBuilder, x: str) -> str:
    """Nearest ×2 with src = floor(dst / 2): torch's F.interpolate(scale_factor=2, mode="nearest")."""
    return g.op("Resize", x, None, g.const([1.0, 1.0, 2.0, 2.0]), mode="nearest",
                coordinate_transformation_mode="asymmetric", nearest_mode="floor")


def emit_postprocess(g: GraphBuilder, x: str) -> str:
    """(B, 3, H, W) bf16 → (B, H, W, 3) uint8: uint8(round((clamp(f32(x), −1, 1) + 1)·127.5)) (§6.8)."""
    y = g.op("Clip", to_f32(g, x), g.const(-1.0), g.const(1.0))
    y = g.op("Round", g.op("Mul", g.op("Add", y, g.const(1.0)), g.const(127.5)))
    # uint8 only as the graph output: TensorRT has no uint8 intermediate tensors
    return g.op("Cast", g.op("Transpose", y, perm=[0, 2, 3, 1]), to=U8)


# --------------------------------------------------------------------------------------------- build

def build_vae_decoder(cfg: VAEConfig, src, graph_path: Path, *, attention_form: str = "op",
                      float_output: bool = False, progress=None) -> GraphBuilder:
    """Emit the decoder graph (tokens → uint8 image) for `cfg`; weights from `src` (a `TensorSource` over the
    VAE component, diffusers or native names) are streamed to `<graph_path>.data`. Call `.save(graph_path)`."""
    if attention_form not in ATTENTION_FORMS:
        raise ValueError(f"attention form {attention_form!r}; allowed: {', '.join(ATTENTION_FORMS)}")
    if cfg.patch_size != (PATCH, PATCH) or cfg.latent_channels != LATENT_CHANNELS:
        raise ValueError(f"VAE patch {cfg.patch_size} / latent channels {cfg.latent_channels}: the graph "
                         f"expects ({PATCH}, {PATCH}) / {LATENT_CHANNELS}")
    nsrc = _NativeSource(src)
    g = GraphBuilder(graph_path.stem, graph_path.with_name(graph_path.name + ".data"))
    ch, eps, p = cfg.block_out_channels, cfg.gn_eps, "decoder"
    top = ch[-1]
    total = 3 + NUM_LEVELS
    lat = g.input("latents", F32, ["batch", "grid_h", "grid_w", TOKEN_CHANNELS])

    h = to_bf16(g, emit_tokens_to_latent(g, lat))
    h = _conv(g, _conv(g, h, f"{p}.post_quant_conv", nsrc, k=1), f"{p}.conv_in", nsrc)
    h = _resnet(g, h, f"{p}.mid.block_1", nsrc, top, top, eps)
    h = _attention(g, h, f"{p}.mid.attn_1", nsrc, top, eps, attention_form)
    h = _resnet(g, h, f"{p}.mid.block_2", nsrc, top, top, eps)
    if progress:
        progress(3, total)
    cin = top
    for i, lvl in enumerate(reversed(range(NUM_LEVELS))):
        for r in range(cfg.layers_per_block + 1):
            h = _resnet(g, h, f"{p}.up.{lvl}.block.{r}", nsrc, cin, ch[lvl], eps)
            cin = ch[lvl]
        if lvl != 0:
            h = _conv(g, _upsample(g, h), f"{p}.up.{lvl}.upsample.conv", nsrc)
        if progress:
            progress(4 + i, total)
    h = _conv(g, _swish(g, _group_norm(g, h, f"{p}.norm_out", nsrc, ch[0], eps)), f"{p}.conv_out", nsrc)

    g.output(emit_postprocess(g, h), "image", U8, ["batch", "height", "width", 3])
    if float_output:
        g.output(to_f32(g, h), "decoded", F32, ["batch", 3, "height", "width"])
    return g
