"""The reference DiT (spec §2): inventory and parameter counts, timestep sinusoid, τ rounding, MRoPE slots,
the unconditional fast path, segment masks, and one block / the final layer / the whole forward against an
independent fp32 re-implementation written here from the spec."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ideogram4_engine.export.checkpoint import open_checkpoint
from ideogram4_engine.export.reference.dit import (DiTConfig, dit_inventory, load_dit, mrope_angles, mrope_cos_sin,
                                         quantized_linears, rope_inv_freq, segment_mask, timestep_sinusoid)
from ideogram4_engine.runtime.packing import pack

REAL = DiTConfig()
BF16 = torch.bfloat16


# ---------------------------------------------------------------------------------------------- helpers


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    return float((got - ref).norm() / ref.norm())


def max_err_over_rms(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    return float((got - ref).abs().max() / ref.pow(2).mean().sqrt())


def packed_inputs(cfg: DiTConfig, lengths: list[int], height: int, width: int, seed: int):
    """Random features and latents at EVERY slot (pads and foreign slots included: the DiT must ignore
    them), plus the packing tensors. Returns (features, latents, positions, segments, indicators, T)."""
    p = pack(lengths, height, width)
    B, L = p.indicators.shape
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, L, cfg.llm_features_dim, generator=g)
    lat = torch.randn(B, L, cfg.in_channels, generator=g)
    pos, seg, ind = (torch.from_numpy(a) for a in (p.positions, p.segments, p.indicators))
    return feats, lat, pos, seg, ind, p.T


def taus(B: int, value: float) -> torch.Tensor:
    return torch.full((B,), value, dtype=torch.float32)


@pytest.fixture(scope="module")
def dits(tiny_checkpoint):
    ckpt = open_checkpoint(tiny_checkpoint)
    return (load_dit(ckpt.components["transformer"]), load_dit(ckpt.components["unconditional_transformer"]))


@pytest.fixture(scope="module")
def dit(dits):
    return dits[0]


# ---------------------------------------------------------------------------------------------- inventory


def _count(cfg: DiTConfig) -> tuple[int, int]:
    inv = dit_inventory(cfg)
    return len(inv), sum(1 for s in inv.values() if s.kind == "linear")


def test_inventory_real_config_669_tensors():
    n, n_lin = _count(REAL)
    assert n_lin == 211 == len(quantized_linears(REAL))
    assert n == 458                      # bf16 layout (§2.2)
    assert n + n_lin == 669              # FP8 layout: + one weight_scale per Linear


@pytest.mark.parametrize("layers", [1, 2, 5])
def test_inventory_19L_plus_23(layers):
    n, n_lin = _count(DiTConfig(num_layers=layers))
    assert n + n_lin == 19 * layers + 23


def test_real_parameter_counts():
    inv = dit_inventory(REAL)
    size = {k: math.prod(s.shape) for k, s in inv.items()}
    assert sum(size.values()) == 9_279_288_448
    assert sum(size[k] for k, s in inv.items() if s.kind == "linear") == 9_277_931_520
    assert sum(v for k, v in size.items() if k.endswith(".bias")) == 650_368
    block = sum(v for k, v in size.items() if k.startswith("layers.0."))
    assert block == 264_278_528
    assert inv["layers.0.attention.qkv.weight"].shape == (13824, 4608)
    assert inv["layers.0.adaln_modulation.weight"].shape == (18432, 512)
    assert inv["llm_cond_proj.weight"].shape == (4608, 53248)
    assert inv["embed_image_indicator.weight"].shape == (2, 4608)
    # no biases in qkv / o / w1 / w2 / w3
    for n in ("attention.qkv", "attention.o", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
        assert f"layers.0.{n}.bias" not in inv


# ---------------------------------------------------------------------------------------------- time


def _sinusoid_f64(tau: float, dim: int) -> np.ndarray:
    half = dim // 2
    k = np.arange(half, dtype=np.float64)
    freqs = np.exp(-k * np.log(1e4) / (half - 1))
    args = 1e4 * tau * freqs
    return np.concatenate([np.sin(args), np.cos(args)])


@pytest.mark.parametrize("dim", [4608, 512])
@pytest.mark.parametrize("tau", [0.000123395, 0.0273411, 0.5, 0.8984375, 0.898926, 0.99945])
def test_timestep_sinusoid_matches_float64(tau, dim):
    t = torch.tensor([tau], dtype=torch.float32)
    got = timestep_sinusoid(t, dim)
    assert got.dtype == torch.float32 and got.shape == (1, dim)
    err = np.abs(got[0].double().numpy() - _sinusoid_f64(float(t[0]), dim)).max()
    assert err <= 1e-3, err


def test_timestep_sinusoid_batched_shapes():
    t = torch.tensor([[0.1, 0.2], [0.3, 0.4]], dtype=torch.float32)
    got = timestep_sinusoid(t, 64)
    assert got.shape == (2, 2, 64)
    assert torch.equal(got[1, 0], timestep_sinusoid(torch.tensor([0.3]), 64)[0])


def _image_only(cfg: DiTConfig, seed: int, height=64, width=80):
    """An unconditional (image-only) sequence: the last N entries of a packed one (§4.3)."""
    feats, lat, pos, seg, ind, T = packed_inputs(cfg, [3], height, width, seed)
    return lat[:, T:], pos[:, T:], seg[:, T:], ind[:, T:]


def test_tau_is_rounded_to_bf16_inside_the_dit(dits):
    _, uncond = dits
    lat, pos, seg, ind = _image_only(uncond.cfg, seed=11)
    assert float(torch.tensor(0.898926).to(BF16)) == 0.8984375
    next_bf16 = 0.8984375 + 2.0**-8          # bf16 spacing in [0.5, 1): 2^-8 (0.90234375)
    assert float(torch.tensor(next_bf16).to(BF16)) == next_bf16
    a = uncond(None, lat, taus(1, 0.898926), pos, seg, ind)
    b = uncond(None, lat, taus(1, 0.8984375), pos, seg, ind)
    c = uncond(None, lat, taus(1, next_bf16), pos, seg, ind)
    assert torch.equal(a, b)
    assert not torch.equal(b, c)
    assert (b - c).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------- MRoPE


def bf16_round(x) -> np.ndarray:
    """float32 → nearest bf16 (ties to even), by bit arithmetic (independent of torch), held as float32."""
    b = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.astype(np.uint32).view(np.float32)


def official_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """§2.6 computed here: the formula in float64, rounded to float32, then to bf16 (the official model.to(bf16))."""
    i = np.arange(head_dim // 2, dtype=np.float64)
    return bf16_round((1.0 / theta ** (2 * i / head_dim)).astype(np.float32))


def test_bf16_rounding_helper():
    x = np.array([1.0, 1 + 2 ** -8, 1 + 2 ** -8 + 2 ** -20, 1 + 3 * 2 ** -8, 1 + 2 ** -9, -2.5e-7], np.float32)
    assert bf16_round(x).tolist() == torch.from_numpy(x).to(BF16).float().tolist()
    assert bf16_round(x)[1] == 1.0 and bf16_round(x)[2] == 1 + 2 ** -7     # tie to even; above a tie: up


@pytest.mark.parametrize("head_dim,theta", [(REAL.head_dim, REAL.rope_theta), (64, 10_000.0)])
def test_rope_table_is_the_fp32_formula_rounded_to_bf16(head_dim, theta):
    """The rotary table is bf16(fp32 formula) promoted to fp32, as the official DiT runs it after its loader's
    model.to(bf16) (§2.6, corrected): pinned against an independent computation, and not the plain fp32 table."""
    table = rope_inv_freq(head_dim, theta)
    assert table.dtype == torch.float32 and table.shape == (head_dim // 2,)
    np.testing.assert_array_equal(table.numpy(), official_inv_freq(head_dim, theta))
    assert not (table.numpy().view(np.uint32) & 0xFFFF).any()                  # bf16-representable
    exact = 1.0 / theta ** (2 * np.arange(head_dim // 2) / head_dim)
    rel = np.abs(table.numpy() / exact - 1)
    assert 1e-3 < rel.max() <= 2 ** -8         # rounded, by at most half a bf16 ulp (spec: max 3.7e-3)


def test_mrope_slot_assignment_real_config():
    """Interleaved slots (§2.6): i%3==1 and i<60 → h, i%3==2 and i<60 → w, everything else → t; each angle is one
    fp32 product of the position and the bf16-rounded table."""
    hd = REAL.head_dim
    pos = torch.tensor([[3, 5, 7], [65536, 65536 + 9, 65536 + 13]], dtype=torch.int64)
    got = mrope_angles(pos, hd, REAL.rope_theta, REAL.mrope_section)
    i = np.arange(hd // 2)
    inv = official_inv_freq(hd, REAL.rope_theta)
    axis = np.where((i % 3 == 1) & (i < 60), 1, np.where((i % 3 == 2) & (i < 60), 2, 0))
    assert (axis == 1).sum() == 20 and (axis == 2).sum() == 20 and (axis == 0).sum() == 88
    for r in range(2):
        want = pos[r].numpy()[axis].astype(np.float32) * inv
        np.testing.assert_array_equal(got[r].numpy(), want)
    cos, sin = mrope_cos_sin(pos, hd, REAL.rope_theta, REAL.mrope_section)
    assert cos.shape == (2, hd) and cos.dtype == torch.float32
    assert torch.equal(cos[:, : hd // 2], cos[:, hd // 2:]) and torch.equal(sin[:, : hd // 2], sin[:, hd // 2:])


# ---------------------------------------------------------------------------------------------- masks


def test_unconditional_fast_path_is_exact(dits):
    for model in dits:
        lat, pos, seg, ind = _image_only(model.cfg, seed=12)
        tau = taus(1, 0.37)
        zeros = torch.zeros(*lat.shape[:2], model.cfg.llm_features_dim)
        assert torch.equal(model(None, lat, tau, pos, seg, ind), model(zeros, lat, tau, pos, seg, ind))


def test_segment_mask_semantics():
    seg = torch.from_numpy(pack([2, 4], 32, 32).segments)
    assert segment_mask(torch.from_numpy(pack([4], 32, 32).segments)) is None
    assert segment_mask(torch.from_numpy(pack([3, 3], 32, 32).segments)) is None
    m = segment_mask(seg)
    assert m.shape == (2, 1, 8, 8) and m.dtype == torch.bool
    assert m[1].all()                                     # the longest prompt: no pads
    assert m[0, 0, :2, :2].all() and not m[0, 0, :2, 2:].any() and not m[0, 0, 2:, :2].any()


def test_segment_mask_batch_equals_single_prompts(dit):
    cfg = dit.cfg
    lengths = [5, 11]
    feats, lat, pos, seg, ind, T = packed_inputs(cfg, lengths, 64, 80, seed=21)
    tau = taus(2, 0.42)
    out = dit(feats, lat, tau, pos, seg, ind)
    assert torch.isfinite(out).all()                      # pads (which only see pads) included
    for b, n in enumerate(lengths):
        f1, l1, p1, s1, i1, T1 = packed_inputs(cfg, [n], 64, 80, seed=0)
        assert torch.equal(p1[0], pos[b, T - n:]) and torch.equal(i1[0], ind[b, T - n:])
        # same values at every slot of the prompt's own (unpadded) sequence
        alone = dit(feats[b:b + 1, T - n:], lat[b:b + 1, T - n:], tau[:1], p1, s1, i1)
        err, worst = rel_err(out[b, T:], alone[0, n:]), max_err_over_rms(out[b, T:], alone[0, n:])
        print(f"segment mask: prompt {b} (n={n}) batched vs alone: RMS err / RMS = {err:.3g}, "
              f"max err / RMS = {worst:.3g}")
        assert err <= 2e-2                                # bf16 (batch-shape-dependent GEMM rounding)
        assert worst <= 0.1
    # power check: without the mask the short prompt's image tokens would see its pads
    unmasked = dit(feats, lat, tau, pos, torch.ones_like(seg), ind)
    alone0 = dit(feats[:1, T - lengths[0]:], lat[:1, T - lengths[0]:], tau[:1],
                 *packed_inputs(cfg, [lengths[0]], 64, 80, seed=0)[2:5])
    e_unmasked = rel_err(unmasked[0, T:], alone0[0, lengths[0]:])
    print(f"segment mask: short prompt without the mask, RMS err / RMS = {e_unmasked:.3g}")
    assert e_unmasked > 3e-2                              # >10x the masked discrepancy


# ---------------------------------------------------------------------------------------------- dependence


def test_text_path_and_foreign_slots(dit):
    cfg = dit.cfg
    feats, lat, pos, seg, ind, T = packed_inputs(cfg, [7], 64, 80, seed=31)
    tau = taus(1, 0.25)
    base = dit(feats, lat, tau, pos, seg, ind)[:, T:]
    g = torch.Generator().manual_seed(32)
    # new text features → different image-token outputs
    f2 = feats.clone()
    f2[:, :T] = torch.randn(1, T, cfg.llm_features_dim, generator=g)
    changed = dit(f2, lat, tau, pos, seg, ind)[:, T:]
    d_text = rel_err(changed, base)
    print(f"text path: rel change of image outputs when text features change = {d_text:.3g}")
    assert d_text > 1e-2
    # features at image slots and latents at text slots are masked out: exactly no effect
    f3 = feats.clone()
    f3[:, T:] = torch.randn(1, lat.shape[1] - T, cfg.llm_features_dim, generator=g)
    l3 = lat.clone()
    l3[:, :T] = torch.randn(1, T, cfg.in_channels, generator=g)
    assert torch.equal(dit(f3, l3, tau, pos, seg, ind)[:, T:], base)


def test_attention_is_bidirectional(dits):
    for model in dits:
        lat, pos, seg, ind = _image_only(model.cfg, seed=41)
        tau = taus(1, 0.6)
        base = model(None, lat, tau, pos, seg, ind)
        lat2 = lat.clone()
        lat2[0, -1] = torch.randn(model.cfg.in_channels, generator=torch.Generator().manual_seed(42))
        other = model(None, lat2, tau, pos, seg, ind)
        # every other image token (the first one included, which precedes the change) moves
        per_token = (other[0, :-1] - base[0, :-1]).abs().amax(-1)
        assert (per_token > 0).all()
        assert rel_err(other[0, :-1], base[0, :-1]) > 1e-3


def test_output_statistics(dits):
    cond, uncond = dits
    feats, lat, pos, seg, ind, T = packed_inputs(cond.cfg, [9], 128, 160, seed=51)
    tau = taus(1, 0.3)
    v_c = cond(feats, lat, tau, pos, seg, ind)[0, T:]
    v_u = uncond(None, lat[:, T:], tau, pos[:, T:], seg[:, T:], ind[:, T:])[0]
    for name, v in (("cond", v_c), ("uncond", v_u)):
        assert torch.isfinite(v).all()
        std = float(v.std())
        per_channel = v.std(dim=0)                       # variation across tokens, per channel
        print(f"{name}: std {std:.3f}, per-channel token std min {float(per_channel.min()):.3f} "
              f"median {float(per_channel.median()):.3f}")
        assert 0.3 <= std <= 3.0
        assert float(per_channel.min()) > 0.1
    d = rel_err(v_u, v_c)
    print(f"cond vs uncond rel diff {d:.3f}")
    assert d > 0.05


# ---------------------------------------------------------------------------------------------- independent math


def _w(lin) -> torch.Tensor:
    """fp32 dequantized weight (FP8 q · fp32 scale per output row), or the plain weight."""
    if getattr(lin, "weight_scale", None) is not None:
        return lin.weight.to(torch.float32) * lin.weight_scale.to(torch.float32)[:, None]
    return lin.weight.to(torch.float32)


def _b(lin) -> torch.Tensor | float:
    return 0.0 if lin.bias is None else lin.bias.to(torch.float32)


def _lin(lin, x):
    return x @ _w(lin).T + _b(lin)


def _rms(x, gain, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain.to(torch.float32)


def _rot_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def ref_block(blk, x, a, cos, sin, mask, *, chunk_order=(0, 1, 2, 3)):
    """§2.7–2.8 in fp32: sandwich RMSNorms (eps 1e-5), 1+scale, tanh gates, QK-norm before rotate-half RoPE,
    softmax(q·k / sqrt(hd)), SwiGLU w2(silu(w1 y) * w3 y)."""
    B, L, D = x.shape
    H = blk.attention.heads
    hd = D // H
    chunks = _lin(blk.adaln_modulation, a).split(D, dim=-1)
    s_msa, g_msa, s_mlp, g_mlp = (chunks[i] for i in chunk_order)
    y = _rms(x, blk.attention_norm1.weight, 1e-5) * (1 + s_msa)
    q, k, v = _lin(blk.attention.qkv, y).view(B, L, 3, H, hd).unbind(2)
    q = _rms(q, blk.attention.norm_q.weight, 1e-5)
    k = _rms(k, blk.attention.norm_k.weight, 1e-5)
    c, s = cos[:, :, None], sin[:, :, None]
    q = q * c + _rot_half(q) * s
    k = k * c + _rot_half(k) * s
    scores = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(hd)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    att = torch.einsum("bhlm,bmhd->blhd", p, v).reshape(B, L, D)
    x = x + torch.tanh(g_msa) * _rms(_lin(blk.attention.o, att), blk.attention_norm2.weight, 1e-5)
    y = _rms(x, blk.ffn_norm1.weight, 1e-5) * (1 + s_mlp)
    ff = blk.feed_forward
    m = _lin(ff.w2, F.silu(_lin(ff.w1, y)) * _lin(ff.w3, y))
    return x + torch.tanh(g_mlp) * _rms(m, blk.ffn_norm2.weight, 1e-5)


def ref_final(fl, h, a, *, second_silu=True):
    """§2.9: W_f · (LayerNorm_1e-6(h), no affine) ⊙ (1 + W_fm · SiLU(a) + b_fm) + b_f."""
    mu = h.mean(-1, keepdim=True)
    var = (h - mu).pow(2).mean(-1, keepdim=True)
    ln = (h - mu) / torch.sqrt(var + 1e-6)
    scale = _lin(fl.adaln_modulation, F.silu(a) if second_silu else a)
    return _lin(fl.linear, ln * (1 + scale))


def ref_cos_sin(pos, cfg: DiTConfig, inv_freq: np.ndarray):
    """§2.6 written here: slot axes, angle = fp32(pos[axis]) · inv_freq[i] (one fp32 product), cos/sin in
    float64 of the duplicated angles."""
    i = np.arange(cfg.head_dim // 2)
    sec = cfg.mrope_section
    axis = np.where((i % 3 == 1) & (i < 3 * sec[1]), 1, np.where((i % 3 == 2) & (i < 3 * sec[2]), 2, 0))
    ang = np.take(pos.numpy(), axis, axis=-1).astype(np.float32) * np.asarray(inv_freq, np.float32)
    phi = np.concatenate([ang, ang], axis=-1).astype(np.float64)
    return torch.from_numpy(np.cos(phi)).float(), torch.from_numpy(np.sin(phi)).float()


def ref_forward(model, feats, lat, tau, pos, seg, ind, inv_freq: np.ndarray | None = None):
    """§2.4 in fp32 from the sub-steps above (τ rounded to bf16 first, sinusoid in float64, MRoPE from
    `inv_freq`, by default the official bf16-rounded table computed here)."""
    cfg = model.cfg
    t = tau.to(BF16).double().numpy()
    e = torch.from_numpy(np.stack([_sinusoid_f64(float(v), cfg.emb_dim) for v in t])).float()
    te = model.t_embedding
    c = _lin(te.mlp_out, F.silu(_lin(te.mlp_in, e)))[:, None]
    a = F.silu(_lin(model.adaln_proj, c))
    m_txt = (ind == 3).float()[..., None]
    m_img = ((ind == 2) | (ind == 4)).float()[..., None]
    f = feats * m_txt
    h = _lin(model.input_proj, lat * m_img) * m_img
    h = h + _lin(model.llm_cond_proj, _rms(f, model.llm_cond_norm.weight, 1e-6)) * m_txt
    h = h + model.embed_image_indicator.weight.float()[m_img[..., 0].long()]
    if inv_freq is None:
        inv_freq = official_inv_freq(cfg.head_dim, cfg.rope_theta)
    cos, sin = ref_cos_sin(pos, cfg, inv_freq)
    mask = (seg[:, :, None] == seg[:, None, :])[:, None]
    for blk in model.layers:
        h = ref_block(blk, h, a, cos, sin, mask)
    return ref_final(model.final_layer, h, a)


def _block_inputs(cfg, seed):
    feats, lat, pos, seg, ind, T = packed_inputs(cfg, [4, 9], 64, 64, seed)
    g = torch.Generator().manual_seed(seed + 1)
    B, L = ind.shape
    x = torch.randn(B, L, cfg.emb_dim, generator=g).to(BF16)
    a = F.silu(torch.randn(B, 1, cfg.adanln_dim, generator=g)).to(BF16)
    cos, sin = mrope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
    return x, a, cos, sin, segment_mask(seg)


def test_block_matches_independent_fp32_math(dit):
    x, a, cos, sin, mask = _block_inputs(dit.cfg, seed=61)
    assert mask is not None
    for i, blk in enumerate(dit.layers):
        got = blk(x, a, cos.to(BF16), sin.to(BF16), mask).float()
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        ref = ref_block(blk, x.float(), a.float(), cos, sin, mask)
        e_out = rel_err(got, ref)
        e_upd = rel_err(got - x.float(), ref - x.float())
        wrong = rel_err(got - x.float(), ref_block(blk, x.float(), a.float(), cos, sin, mask,
                                                    chunk_order=(1, 0, 3, 2)) - x.float())
        print(f"block {i}: rel err output {e_out:.3g}, residual update {e_upd:.3g} "
              f"(swapped scale/gate chunks: {wrong:.3g})")
        assert e_out <= 2e-2
        assert e_upd <= 5e-2
        assert wrong > 0.2                                # the comparison can tell a wrong layout apart


def test_final_layer_matches_independent_fp32_math(dit):
    x, a, *_ = _block_inputs(dit.cfg, seed=71)
    fl = dit.final_layer
    got = fl(x, a).float()
    ref = ref_final(fl, x.float(), a.float())
    e = rel_err(got, ref)
    wrong = rel_err(got, ref_final(fl, x.float(), a.float(), second_silu=False))
    print(f"final layer: rel err {e:.3g} (single SiLU: {wrong:.3g})")
    assert e <= 2e-2
    assert wrong > 2e-2 and wrong > 5 * e                # a single SiLU would be caught


def test_forward_matches_independent_fp32_math(dit):
    feats, lat, pos, seg, ind, T = packed_inputs(dit.cfg, [6, 13], 64, 80, seed=81)
    tau = torch.tensor([0.000123395, 0.898926], dtype=torch.float32)
    got = dit(feats, lat, tau, pos, seg, ind)[:, T:]
    ref = ref_forward(dit, feats, lat, tau, pos, seg, ind)[:, T:]
    for b in range(2):
        e = rel_err(got[b], ref[b])
        print(f"whole forward, sample {b}: rel err {e:.3g}")
        assert e <= 3e-2


def test_forward_at_image_positions_uses_the_bf16_rope_table(dit):
    """Image tokens sit at positions ≥ 65536, where the bf16 rounding of the rotary table moves the angles by
    up to ~250 rad: the DiT must match the independent forward with the official bf16 table, and measurably
    not the one with the plain fp32 table (§2.6)."""
    cfg = dit.cfg
    feats, lat, pos, seg, ind, T = packed_inputs(cfg, [11], 96, 128, seed=91)
    assert int(pos[0, T:].min()) >= 65536
    tau = torch.tensor([0.41], dtype=torch.float32)
    got = dit(feats, lat, tau, pos, seg, ind)[:, T:]
    i = np.arange(cfg.head_dim // 2, dtype=np.float64)
    fp32_table = (1.0 / cfg.rope_theta ** (2 * i / cfg.head_dim)).astype(np.float32)
    e_bf16 = rel_err(got, ref_forward(dit, feats, lat, tau, pos, seg, ind)[:, T:])
    e_fp32 = rel_err(got, ref_forward(dit, feats, lat, tau, pos, seg, ind, inv_freq=fp32_table)[:, T:])
    print(f"forward at image positions >= 65536: rel err vs bf16-table reference {e_bf16:.3g}, "
          f"vs fp32-table reference {e_fp32:.3g}")
    assert e_bf16 <= 3e-2
    assert e_fp32 > 3 * e_bf16
