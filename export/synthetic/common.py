"""Shared pieces of the synthetic checkpoint writer: per-tensor seeded randomness and sharded output."""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors.torch import save_file

from ..reference.fp8 import quantize_rows

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed per (checkpoint seed, tensor name): every tensor is reproducible on its own,
    independent of write order and of which other tensors exist."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class Correlated:
    """Seed of a weight set correlated with another one: value = ρ·N_base + √(1−ρ²)·N_own (unit variance
    kept). The unconditional DiT uses it so that, as in a trained model, the two branches agree roughly and
    classifier-free guidance amplifies a difference rather than two unrelated predictions."""
    own: int
    base: int
    rho: float


def randn(name: str, shape: tuple[int, ...], std: float, seed: int | Correlated, device: str = "cpu",
          mean: float = 0.0) -> torch.Tensor:
    """fp32 normal tensor, deterministic for (seed, name, shape, device type)."""
    if isinstance(seed, Correlated):
        t = randn(name, shape, seed.rho, seed.base, device)
        t.add_(randn(name, shape, math.sqrt(1.0 - seed.rho**2), seed.own, device))
        return t.mul_(std).add_(mean)
    g = torch.Generator(device=device).manual_seed(tensor_seed(seed, name))
    t = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
    return t.mul_(std).add_(mean)


def linear_tensors(prefix: str, out_f: int, in_f: int, *, seed: int | Correlated, device: str = "cpu",
                   bias: bool, quantize: bool = True, gain: float = 1.0,
                   bias_std: float = 0.02) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of one Linear `prefix` in checkpoint form: e4m3 weight + fp32 per-row scale (+ bf16 bias).

    Weights are N(0, (gain/sqrt(in))^2) so a unit-RMS input gives an output of RMS ~gain.
    """
    w = randn(f"{prefix}.weight", (out_f, in_f), gain / in_f**0.5, seed, device)
    if quantize:
        q, s = quantize_rows(w)
        yield f"{prefix}.weight", q
        yield f"{prefix}.weight_scale", s
    else:
        yield f"{prefix}.weight", w.to(torch.bfloat16)
    del w
    if bias:
        yield f"{prefix}.bias", randn(f"{prefix}.bias", (out_f,), bias_std, seed, device).to(torch.bfloat16)


def norm_gain(name: str, dim: int, *, seed: int | Correlated, device: str = "cpu", std: float = 0.05,
              mean: float = 1.0) -> torch.Tensor:
    """A bf16 norm gain near 1 (not exactly 1, so a wrong gain layout shows up in tests)."""
    return randn(name, (dim,), std, seed, device, mean=mean).to(torch.bfloat16)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_sharded(folder: Path, stem: str, tensors: Iterable[tuple[str, torch.Tensor]],
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """Write tensors as `<stem>.safetensors`, or as HF-style shards `<stem>-0000k-of-0000n.safetensors`
    plus `<stem>.safetensors.index.json` when they exceed `max_shard_bytes`. Streams: at most one shard
    is held in memory. Returns the written files.
    """
    folder.mkdir(parents=True, exist_ok=True)
    parts: list[Path] = []
    weight_map: dict[str, int] = {}
    total = 0
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        if not shard:
            return
        part = folder / f".{stem}.part{len(parts)}.safetensors"
        save_file({k: v.contiguous().cpu() for k, v in shard.items()}, str(part))
        for k in shard:
            weight_map[k] = len(parts)
        parts.append(part)
        shard, shard_bytes = {}, 0

    for name, t in tensors:
        if name in weight_map or name in shard:
            raise ValueError(f"duplicate tensor name {name!r}")
        if shard and shard_bytes + _nbytes(t) > max_shard_bytes:
            flush()
        shard[name] = t
        shard_bytes += _nbytes(t)
        total += _nbytes(t)
    flush()

    if len(parts) == 1:
        final = folder / f"{stem}.safetensors"
        os.replace(parts[0], final)
        return [final]
    n = len(parts)
    names = [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    out = []
    for part, name in zip(parts, names):
        os.replace(part, folder / name)
        out.append(folder / name)
    index = {"metadata": {"total_size": total},
             "weight_map": {k: names[i] for k, i in sorted(weight_map.items())}}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    out.append(folder / f"{stem}.safetensors.index.json")
    return out
