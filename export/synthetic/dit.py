"""Synthetic DiT weights in the official FP8 layout (19·L + 23 tensors, every Linear e4m3 + fp32 scale)."""
from __future__ import annotations

from typing import Iterator

import torch

from ..reference.dit import DiTConfig, quantized_linears
from .common import Correlated, linear_tensors, norm_gain, randn

# Output RMS per unit-RMS input of each Linear. Modulation layers are kept small so that 1 + scale stays
# near 1 and tanh(gate) ≈ 0.1-0.3: every block then nudges the residual stream without swamping it.
_GAINS = {"adaln_modulation": 0.3, "final_layer.adaln_modulation": 0.3}


def dit_tensors(cfg: DiTConfig, *, seed: int | Correlated, device: str = "cpu",
                quantize: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of `dit_inventory(cfg)` (plus scales), deterministic per name, streamed."""
    linears = quantized_linears(cfg)
    top = [n for n in linears if not n.startswith("layers.")]
    for name in top:
        out_f, in_f, bias = linears[name]
        yield from linear_tensors(name, out_f, in_f, seed=seed, device=device, bias=bias, quantize=quantize,
                                  gain=_GAINS.get(name, 1.0), bias_std=0.1 if "adaln" in name else 0.02)
    yield "llm_cond_norm.weight", norm_gain("llm_cond_norm.weight", cfg.llm_features_dim, seed=seed,
                                            device=device)
    yield "embed_image_indicator.weight", randn("embed_image_indicator.weight", (2, cfg.emb_dim), 0.5,
                                                seed, device).to(torch.bfloat16)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        for name in [n for n in linears if n.startswith(p)]:
            out_f, in_f, bias = linears[name]
            yield from linear_tensors(name, out_f, in_f, seed=seed, device=device, bias=bias,
                                      quantize=quantize, gain=_GAINS.get(name[len(p):], 1.0),
                                      bias_std=0.1 if bias else 0.02)
        for n, dim in (("attention.norm_q", cfg.head_dim), ("attention.norm_k", cfg.head_dim),
                       ("attention_norm1", cfg.emb_dim), ("attention_norm2", cfg.emb_dim),
                       ("ffn_norm1", cfg.emb_dim), ("ffn_norm2", cfg.emb_dim)):
            yield f"{p}{n}.weight", norm_gain(f"{p}{n}.weight", dim, seed=seed, device=device)
