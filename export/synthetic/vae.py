"""Synthetic Flux2 VAE: a diffusers-style `vae/config.json` and the complete autoencoder in diffusers names.

Scales are chosen so the decoder output looks like an image's range: every block input is GroupNorm-ed, so
the output spread is set by `conv_out` (std ≈ 0.6 · gain for swish(GN(x))); residual branches are damped so
the stream does not blow up over 15 blocks.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch

from ..reference.vae import VAEConfig, vae_inventory
from .common import norm_gain, randn, tensor_seed

DIFFUSERS_VERSION = "0.36.0"
REAL_BLOCK_OUT_CHANNELS = (128, 256, 512, 512)
TINY_BLOCK_OUT_CHANNELS = (32, 32, 64, 64)  # four levels, widths multiple of 32 (§1.2a)

# Gain of each kind of weight (output RMS ≈ gain × input RMS).
_GAINS = {"conv1": 1.0, "conv2": 0.4, "conv_shortcut": 1.0, "to_q": 1.0, "to_k": 1.0, "to_v": 1.0,
          "to_out.0": 0.4, "conv": 1.0, "conv_in": 1.0, "quant_conv": 1.0, "post_quant_conv": 1.0}
CONV_OUT_GAIN = 0.75  # decoder RGB std ≈ 0.45
BIAS_STD = 0.02


def vae_config_json(block_out_channels: tuple[int, ...] = REAL_BLOCK_OUT_CHANNELS,
                    layers_per_block: int = 2) -> dict:
    """The `vae/config.json` dict (validated by VAEConfig, so an unrunnable config is refused here too)."""
    cfg = VAEConfig(block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block)
    d = cfg.to_json_dict()
    return {"_class_name": d.pop("_class_name"), "_diffusers_version": DIFFUSERS_VERSION, **d}


def _gain(name: str) -> float:
    """Weight gain from the module name (the part before `.weight`)."""
    mod = name.rsplit(".", 1)[0]
    if mod == "decoder.conv_out":
        return CONV_OUT_GAIN
    for key in sorted(_GAINS, key=len, reverse=True):
        if mod == key or mod.endswith("." + key):
            return _GAINS[key]
    return 1.0


def _is_norm(name: str) -> bool:
    return any(p in name for p in ("norm1.", "norm2.", "group_norm.", "conv_norm_out."))


def vae_tensors(cfg: VAEConfig, *, seed: int, device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of `vae_inventory(cfg)` in diffusers names: bf16, int64 `bn.num_batches_tracked`."""
    for name, spec in vae_inventory(cfg).items():
        shape = spec.shape
        if name == "bn.num_batches_tracked":
            t = torch.tensor(1 + tensor_seed(seed, name) % 100_000, dtype=torch.int64, device=device)
        elif name == "bn.running_mean":
            t = randn(name, shape, 0.2, seed, device)
        elif name == "bn.running_var":  # positive, around the latent variance 1.67²
            t = randn(name, shape, 0.1, seed, device, mean=math.log(2.8)).exp()
        elif _is_norm(name) and name.endswith(".weight"):
            t = norm_gain(name, shape[0], seed=seed, device=device)
        elif name.endswith(".bias"):
            t = randn(name, shape, BIAS_STD, seed, device)
        else:
            fan_in = math.prod(shape[1:])
            t = randn(name, shape, _gain(name) / math.sqrt(fan_in), seed, device)
        yield name, t if t.dtype == torch.int64 else t.to(torch.bfloat16)
