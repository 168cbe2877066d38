"""Flux2 VAE: inventory, diffusers→native naming, reference decoder vs independent math, post-processing (spec §6)."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ideogram4_engine.export.synthetic.vae import TINY_BLOCK_OUT_CHANNELS, vae_config_json, vae_tensors
from ideogram4_engine.export.reference.vae import (Decoder, VAEConfig, diffusers_to_native, load_decoder, native_state_dict,
                                         postprocess, vae_inventory)

TINY = VAEConfig(block_out_channels=TINY_BLOCK_OUT_CHANNELS, layers_per_block=2)
SEED = 7


def _params(inv, prefixes) -> int:
    return sum(math.prod(s.shape) for k, s in inv.items() if k.startswith(prefixes))


def _latent(g: torch.Generator, b: int, h: int, w: int) -> torch.Tensor:
    """A de-normalised-looking latent: N(shift_c, 1.67²) with per-channel shifts in the §6.5 range."""
    shift = torch.rand(1, 32, 1, 1, generator=g) * 0.73 - 0.35
    return torch.randn(b, 32, h, w, generator=g) * 1.67 + shift


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    (folder / "config.json").write_text(json.dumps(vae_config_json(TINY_BLOCK_OUT_CHANNELS)))
    sd = dict(vae_tensors(VAEConfig.from_json(folder / "config.json"), seed=SEED))
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder, sd


# ------------------------------------------------------------------------------------------ inventory

def test_real_inventory_parameter_counts():
    inv = vae_inventory(VAEConfig())
    assert _params(inv, ("decoder.", "post_quant_conv.")) == 49_620_259
    assert _params(inv, ("encoder.", "quant_conv.")) == 34_425_856
    assert inv["bn.running_mean"].shape == inv["bn.running_var"].shape == (128,)
    assert {inv[f"bn.{b}"].kind for b in ("running_mean", "running_var", "num_batches_tracked")} == {"buffer"}
    assert inv["bn.num_batches_tracked"].optional and not inv["bn.running_var"].optional   # docs/checkpoint.md
    assert inv["decoder.mid_block.attentions.0.to_q.weight"].shape == (512, 512)
    assert {s.kind for k, s in inv.items() if ".attentions.0.to_" in k and k.endswith("weight")} == {"linear"}


def test_tiny_tensors_match_inventory(tiny_folder):
    _, sd = tiny_folder
    inv = vae_inventory(TINY)
    assert list(sd) == list(inv)
    for k, spec in inv.items():
        assert tuple(sd[k].shape) == spec.shape, k
        assert sd[k].dtype == (torch.int64 if k == "bn.num_batches_tracked" else torch.bfloat16), k
    # deterministic per name, and not degenerate
    again = dict(vae_tensors(TINY, seed=SEED))
    assert all(torch.equal(sd[k], again[k]) for k in sd)
    assert not torch.equal(sd["decoder.conv_in.weight"], dict(vae_tensors(TINY, seed=SEED + 1))["decoder.conv_in.weight"])
    assert (sd["bn.running_var"].float() > 0).all()
    gains = sd["decoder.conv_norm_out.weight"].float()
    assert (gains - 1).abs().max() < 0.3 and not torch.all(gains == 1)


def test_config_json_roundtrip(tmp_path):
    d = vae_config_json()
    assert d["_class_name"] == "AutoencoderKLFlux2" and "_diffusers_version" in d
    assert d["block_out_channels"] == [128, 256, 512, 512] and d["latent_channels"] == 32
    (tmp_path / "config.json").write_text(json.dumps({**d, "force_upcast": True}))
    cfg = VAEConfig.from_json(tmp_path / "config.json")
    assert cfg == VAEConfig() and cfg.to_json_dict() == {k: v for k, v in d.items() if k != "_diffusers_version"}


@pytest.mark.parametrize("kw, msg", [
    ({"block_out_channels": [128, 256, 512]}, r"3 levels; exactly 4"),
    ({"block_out_channels": [128, 256, 512, 48]}, r"\[48\] not a positive multiple of norm_num_groups=32"),
    ({"norm_num_groups": 16}, r"norm_num_groups 16 .* only 32"),
    ({"latent_channels": 16}, r"latent_channels 16 .* only 32"),
    ({"up_block_types": ["UpDecoderBlock2D"] * 3 + ["AttnUpDecoderBlock2D"]}, r"up_block_types"),
])
def test_bad_configs_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        VAEConfig.from_dict({**vae_config_json(), **kw})


# ---------------------------------------------------------------------------------------------- naming

@pytest.mark.parametrize("src, dst", [
    ("decoder.up_blocks.0.resnets.1.conv1.weight", "decoder.up.3.block.1.conv1.weight"),
    ("decoder.up_blocks.3.resnets.0.conv_shortcut.bias", "decoder.up.0.block.0.nin_shortcut.bias"),
    ("decoder.up_blocks.1.upsamplers.0.conv.weight", "decoder.up.2.upsample.conv.weight"),
    ("encoder.down_blocks.1.resnets.0.conv_shortcut.weight", "encoder.down.1.block.0.nin_shortcut.weight"),
    ("encoder.down_blocks.2.downsamplers.0.conv.bias", "encoder.down.2.downsample.conv.bias"),
    ("decoder.mid_block.resnets.0.norm2.weight", "decoder.mid.block_1.norm2.weight"),
    ("encoder.mid_block.resnets.1.conv2.bias", "encoder.mid.block_2.conv2.bias"),
    ("decoder.mid_block.attentions.0.group_norm.bias", "decoder.mid.attn_1.norm.bias"),
    ("decoder.mid_block.attentions.0.to_q.weight", "decoder.mid.attn_1.q.weight"),
    ("encoder.mid_block.attentions.0.to_out.0.weight", "encoder.mid.attn_1.proj_out.weight"),
    ("decoder.conv_norm_out.weight", "decoder.norm_out.weight"),
    ("decoder.conv_in.bias", "decoder.conv_in.bias"),
    ("quant_conv.weight", "encoder.quant_conv.weight"),
    ("post_quant_conv.bias", "decoder.post_quant_conv.bias"),
    ("bn.running_var", "bn.running_var"),
    ("bn.num_batches_tracked", "bn.num_batches_tracked"),
])
def test_key_mapping(src, dst):
    assert diffusers_to_native(src) == dst


@pytest.mark.parametrize("bad", ["decoder.up_blocks.4.resnets.0.conv1.weight", "decoder.mid_block.attentions.0.to_out.1.weight",
                                 "vae.decoder.conv_in.weight", "bn.weight", "decoder.mid.block_1.conv1.weight"])
def test_unknown_key_raises(bad):
    with pytest.raises(KeyError, match=re.escape(bad)):
        diffusers_to_native(bad)


def test_native_state_dict_reshapes_mid_attention(tiny_folder):
    _, sd = tiny_folder
    nat = native_state_dict(sd)
    assert len(nat) == len(sd)
    w = nat["decoder.mid.attn_1.proj_out.weight"]
    assert w.shape == (64, 64, 1, 1)
    assert torch.equal(w[:, :, 0, 0], sd["decoder.mid_block.attentions.0.to_out.0.weight"])
    assert nat["decoder.up.1.block.0.nin_shortcut.weight"].shape == (32, 64, 1, 1)  # up_blocks.2: 64 → 32


# ------------------------------------------------------------------------------------------- loading

def test_load_decoder_refusals(tiny_folder, tmp_path):
    folder, sd = tiny_folder
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text("{}")
    with pytest.raises(ValueError, match="single file"):
        load_decoder(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").unlink()
    partial = {k: v for k, v in sd.items() if k != "decoder.up_blocks.2.resnets.0.conv_shortcut.weight"}
    save_file(partial, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['up\.1\.block\.0\.nin_shortcut\.weight'\]"):
        load_decoder(tmp_path)


def test_decoder_shape_and_statistics(tiny_folder):
    folder, _ = tiny_folder
    dec = load_decoder(folder)
    assert dec.conv_out.weight.dtype == torch.bfloat16
    g = torch.Generator().manual_seed(11)
    z = _latent(g, 2, 6, 10).to(torch.bfloat16)
    with torch.no_grad():
        y = dec(z).float()
    assert y.shape == (2, 3, 48, 80)
    assert torch.isfinite(y).all()
    assert 0.2 < y.std().item() < 0.8
    assert (y.abs() >= 1).float().mean().item() < 0.2
    assert (y[0] - y[1]).abs().mean() > 0.05  # depends on the input


# ------------------------------------------------------------- independent fp32 math (explicit ops)

def _gn(x, w, b, groups=32, eps=1e-6):
    bsz, c, h, wd = x.shape
    xg = x.reshape(bsz, groups, -1)
    mu = xg.mean(-1, keepdim=True)
    var = ((xg - mu) ** 2).mean(-1, keepdim=True)
    return ((xg - mu) / torch.sqrt(var + eps)).reshape(bsz, c, h, wd) * w[:, None, None] + b[:, None, None]


def _silu(x):
    return x / (1 + torch.exp(-x))


def _conv(x, w, b):
    if w.ndim == 2:
        w = w[:, :, None, None]
    return F.conv2d(x, w, b, padding=w.shape[-1] // 2)


def _ref_resnet(sd, p, x):
    h = _conv(_silu(_gn(x, sd[f"{p}.norm1.weight"], sd[f"{p}.norm1.bias"])), sd[f"{p}.conv1.weight"], sd[f"{p}.conv1.bias"])
    h = _conv(_silu(_gn(h, sd[f"{p}.norm2.weight"], sd[f"{p}.norm2.bias"])), sd[f"{p}.conv2.weight"], sd[f"{p}.conv2.bias"])
    sc = f"{p}.conv_shortcut.weight"
    return (_conv(x, sd[sc], sd[f"{p}.conv_shortcut.bias"]) if sc in sd else x) + h


def _ref_attn(sd, p, x, heads=1, scale=None):
    """Diffusers-named attention from 2-D linears, explicit matmul/softmax over all H·W tokens."""
    bsz, c, h, w = x.shape
    y = _gn(x, sd[f"{p}.group_norm.weight"], sd[f"{p}.group_norm.bias"]).flatten(2).transpose(1, 2)  # (B, N, C)
    q, k, v = (y @ sd[f"{p}.{n}.weight"].T + sd[f"{p}.{n}.bias"] for n in ("to_q", "to_k", "to_v"))
    d = c // heads
    q, k, v = (t.reshape(bsz, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    a = torch.softmax(q @ k.transpose(-1, -2) * (scale or 1 / math.sqrt(d)), dim=-1)
    o = (a @ v).transpose(1, 2).reshape(bsz, -1, c)
    o = o @ sd[f"{p}.to_out.0.weight"].T + sd[f"{p}.to_out.0.bias"]
    return x + o.transpose(1, 2).reshape(bsz, c, h, w)


def _ref_decoder(sd, z):
    """The whole decoder straight from diffusers names: up_blocks 0..3 run in file order (coarse → fine)."""
    h = _conv(_conv(z, sd["post_quant_conv.weight"], sd["post_quant_conv.bias"]),
              sd["decoder.conv_in.weight"], sd["decoder.conv_in.bias"])
    h = _ref_resnet(sd, "decoder.mid_block.resnets.1",
                    _ref_attn(sd, "decoder.mid_block.attentions.0", _ref_resnet(sd, "decoder.mid_block.resnets.0", h)))
    for i in range(4):
        r = 0
        while f"decoder.up_blocks.{i}.resnets.{r}.conv1.weight" in sd:
            h = _ref_resnet(sd, f"decoder.up_blocks.{i}.resnets.{r}", h)
            r += 1
        up = f"decoder.up_blocks.{i}.upsamplers.0.conv"
        if f"{up}.weight" in sd:
            h = _conv(h.repeat_interleave(2, -1).repeat_interleave(2, -2), sd[f"{up}.weight"], sd[f"{up}.bias"])
    h = _silu(_gn(h, sd["decoder.conv_norm_out.weight"], sd["decoder.conv_norm_out.bias"]))
    return _conv(h, sd["decoder.conv_out.weight"], sd["decoder.conv_out.bias"])


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def fp32_sd(tiny_folder):
    return {k: v.float() for k, v in tiny_folder[1].items() if v.is_floating_point()}


def test_resnet_block_matches_reference(tiny_folder, fp32_sd):
    dec = load_decoder(tiny_folder[0])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 64, 6, 10, generator=g).to(torch.bfloat16)
    # up.1.block.0 is diffusers up_blocks.2.resnets.0: 64 → 32 with nin_shortcut
    for native, diff, cin in (("mid.block_1", "decoder.mid_block.resnets.0", 64),
                              ("up.1.block.0", "decoder.up_blocks.2.resnets.0", 64)):
        with torch.no_grad():
            out = dec.get_submodule(native)(x[:, :cin])
        ref = _ref_resnet(fp32_sd, diff, x[:, :cin].float())
        assert _rel(out, ref) <= 2e-2, native
    assert dec.up[1].block[0].nin_shortcut is not None and dec.up[1].block[1].nin_shortcut is None


def test_attention_is_single_head_width_c(tiny_folder, fp32_sd):
    dec = load_decoder(tiny_folder[0])
    g = torch.Generator().manual_seed(5)
    x = (0.3 * torch.randn(2, 64, 6, 10, generator=g)).to(torch.bfloat16)
    with torch.no_grad():
        out = dec.mid.attn_1(x).float() - x.float()
    p = "decoder.mid_block.attentions.0"
    ref = _ref_attn(fp32_sd, p, x.float()) - x.float()
    assert _rel(out, ref) <= 2e-2
    # the check discriminates: multi-head or another scale would fail it
    assert _rel(out, _ref_attn(fp32_sd, p, x.float(), heads=2) - x.float()) > 5e-2
    assert _rel(out, _ref_attn(fp32_sd, p, x.float(), scale=1 / 64) - x.float()) > 5e-2


def test_full_decoder_matches_diffusers_order_reference(tiny_folder, fp32_sd):
    """fp32 decoder == independent walk over diffusers names (proves the 3 − d reversal); bf16 stays close."""
    g = torch.Generator().manual_seed(9)
    z = _latent(g, 1, 4, 6)
    ref = _ref_decoder(fp32_sd, z)
    with torch.no_grad():
        out32 = load_decoder(tiny_folder[0], dtype=torch.float32)(z)
        out16 = load_decoder(tiny_folder[0])(z.to(torch.bfloat16))
    assert _rel(out32, ref) < 1e-4
    assert _rel(out16, ref) < 5e-2


def test_decoder_module_names_are_native():
    names = set(Decoder(TINY).state_dict())
    assert {"post_quant_conv.weight", "mid.attn_1.proj_out.weight", "up.3.upsample.conv.bias",
            "up.1.block.0.nin_shortcut.weight", "norm_out.weight"} <= names
    assert not any(n.startswith(("up.0.upsample", "up.0.block.0.nin_shortcut")) for n in names)  # 32 → 32


# ------------------------------------------------------------------------------------- postprocess

def _exact_x(target: float) -> float:
    """An fp32 x with fp32((x + 1)·127.5) == target exactly. Only ties ≳ 64 are reachable in fp32 (below, the
    spacing of representable products exceeds the ulp at the tie), so the test uses those."""
    bits = torch.tensor(target / 127.5 - 1, dtype=torch.float32).view(torch.int32).item()
    cand = torch.arange(bits - 4000, bits + 4000, dtype=torch.int32).view(torch.float32)
    hit = cand[(cand + 1) * 127.5 == target]
    assert len(hit), f"no fp32 x for {target}"
    return hit[0].item()


def test_postprocess_rounds_half_to_even_and_clamps():
    ties = [64.5, 100.5, 126.5, 127.5, 128.5, 129.5, 253.5, 254.5]
    xs = [_exact_x(t) for t in ties] + [-3.0, 5.0, 1.0, -1.0, -1 + 0.4 / 127.5]
    x = torch.tensor(xs, dtype=torch.float32).reshape(1, 1, 1, -1).expand(1, 3, 1, -1).clone()
    x[:, 1] = -x[:, 1]  # channel 1: mirrored values, checks the channel axis ends up last
    img = postprocess(x)
    assert img.dtype == np.uint8 and img.shape == (1, 1, len(xs), 3)
    assert img[0, 0, :, 0].tolist() == [64, 100, 126, 128, 128, 130, 254, 254, 0, 255, 255, 0, 0]
    assert img[0, 0, :, 2].tolist() == img[0, 0, :, 0].tolist()
    assert img[0, 0, 8:12, 1].tolist() == [255, 0, 0, 255]


def test_postprocess_layout_hwc():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 4, 5, generator=g) * 2.4 - 1.2
    img = postprocess(x.to(torch.bfloat16))
    assert img.shape == (2, 4, 5, 3)
    b, h, w, c = 1, 3, 2, 1
    expect = round((min(max(x.to(torch.bfloat16)[b, c, h, w].item(), -1), 1) + 1) * 127.5)
    assert abs(int(img[b, h, w, c]) - expect) <= 1
