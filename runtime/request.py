"""A generation request checked completely before any expensive work: prompts, size, sampling, seed, noise.

Needs only the manifest (presets, limits) and the tokenizer, never a backend, so the CLI refuses a bad
argument before it hashes or loads a single graph. The ranges come from packing (sizes) and schedule
(steps, mu, std, guidance). Every refusal is a ValueError (PromptError for prompts) whose message names
the bad value and what is allowed; Python API types are checked too (None, bytes, bools, numpy scalars).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .contract import TOKEN_CHANNELS
from .packing import MAX_SIDE, MIN_SIDE, PIXELS_PER_TOKEN, check_size, token_grid
from .schedule import GUIDANCE_LIMIT, MAX_STEPS, MU_LIMIT, STD_MAX, check_guidance, lookup_preset
from .tokenizer import PromptError, check_prompt_text

NOISE_SHAPE_TAIL = TOKEN_CHANNELS
MAX_SEED = 2**64 - 1
MAX_BATCH_INDEX = 1023


@dataclass(frozen=True)
class Sampling:
    """Resolved sampling parameters. `guidance[i]` belongs to loop index i, which counts down (0 = last step)."""
    preset: str | None
    steps: int
    mu: float
    std: float
    guidance: tuple[float, ...]


@dataclass(frozen=True)
class Request:
    """A checked request: what the pipeline runs. `z0` rows are the noise of the prompts, in order."""
    prompts: tuple[str, ...]
    ids: tuple[tuple[int, ...], ...]
    width: int
    height: int
    sampling: Sampling
    seed: int | None          # None when explicit noise was given
    batch_index: int          # position of the first prompt in the seed's noise stream
    z0: np.ndarray            # (batch, image tokens, 128) float32


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def check_prompts(prompts) -> list[str]:
    """A str or a non-empty list/tuple of str; anything else (None, bytes, numbers) is refused by type."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise PromptError(f"prompts must be a str or a list of str, got {type(prompts).__name__}"
                          + (" (decode bytes to str first)" if isinstance(prompts, (bytes, bytearray)) else ""))
    if not prompts:
        raise PromptError("no prompts given; allowed: a str or a non-empty list of str")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise PromptError(f"prompts[{i}] must be a str, got {type(p).__name__}"
                              + (" (decode bytes to str first)" if isinstance(p, (bytes, bytearray)) else ""))
    return list(prompts)


def check_dimensions(height, width) -> tuple[int, int]:
    for name, v in (("height", height), ("width", width)):
        if not _is_int(v):
            raise ValueError(f"{name}={v!r} must be an integer: a multiple of {PIXELS_PER_TOKEN} in "
                             f"{MIN_SIDE}…{MAX_SIDE}")
    height, width = int(height), int(width)
    check_size(height, width)
    return height, width


def _real(name: str, v, lo: float, hi: float, lo_open: bool = False) -> float:
    allowed = f"a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
    if not _is_real(v):
        raise ValueError(f"{name}={v!r} must be a number; allowed: {allowed}")
    f = float(v)
    if not math.isfinite(f) or f > hi or f < lo or (lo_open and f == lo):
        raise ValueError(f"{name}={f!r} outside the allowed range; allowed: {allowed}")
    return f


def _guidance(guidance, n: int) -> tuple[float, ...]:
    if _is_real(guidance) or isinstance(guidance, np.ndarray) and guidance.ndim == 0:
        values = (guidance.item() if isinstance(guidance, np.ndarray) else guidance,) * n
    elif isinstance(guidance, (str, bytes)) or not isinstance(guidance, (Sequence, np.ndarray)):
        raise ValueError(f"guidance={guidance!r} must be a number or a sequence of numbers (index 0 = last step)")
    else:
        values = tuple(guidance.tolist() if isinstance(guidance, np.ndarray) else guidance)
    out = tuple(_real(f"guidance[{i}]", g, -GUIDANCE_LIMIT, GUIDANCE_LIMIT) for i, g in enumerate(values))
    check_guidance(out, n)
    return out


def resolve_sampling(presets: dict, default_preset: str, preset: str | None = None, steps: int | None = None,
                     mu: float | None = None, std: float | None = None,
                     guidance: float | Sequence[float] | None = None) -> Sampling:
    """A preset (default: the manifest's) with optional overrides. Changing `steps` needs a `guidance`
    (a constant or one value per step, index 0 = last step): a preset's schedule never silently stretches."""
    name = default_preset if preset is None else preset
    p = lookup_preset(presets, name)
    if steps is not None and not (_is_int(steps) and 1 <= steps <= MAX_STEPS):
        raise ValueError(f"steps={steps!r} must be an integer >= 1 (at most {MAX_STEPS})")
    n = p.steps if steps is None else int(steps)
    if guidance is None:
        if n != p.steps:
            raise ValueError(f"steps={n} differs from preset {name} ({p.steps} steps): also give guidance "
                             f"(a constant or {n} values, index 0 = last step)")
        g = p.guidance
    else:
        g = _guidance(guidance, n)
    custom = any(x is not None for x in (steps, mu, std, guidance))
    mu = p.mu if mu is None else _real("mu", mu, -MU_LIMIT, MU_LIMIT)
    std = p.std if std is None else _real("std", std, 0.0, STD_MAX, lo_open=True)
    return Sampling(None if custom else name, n, float(mu), float(std), g)


def check_seed(seed) -> int:
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed={seed!r} outside 0…2^64-1 (an integer)")
    return int(seed)


def check_batch_index(batch_index) -> int:
    if not _is_int(batch_index) or not 0 <= batch_index <= MAX_BATCH_INDEX:
        raise ValueError(f"batch_index={batch_index!r} outside 0…{MAX_BATCH_INDEX} (an integer)")
    return int(batch_index)


def seeded_noise(seed: int, shape: tuple[int, int, int], batch_index: int = 0) -> np.ndarray:
    """Rows batch_index … batch_index+B-1 of the seed's noise stream (numpy PCG64 `standard_normal`, float32,
    one row of (image tokens, 128) after the other): image i of a batch drawn with seed S is row i, so it is
    reproduced alone with seed=S, batch_index=i."""
    rng = np.random.default_rng(seed)
    for _ in range(batch_index):          # row by row: the same stream as one draw, without holding the skipped rows
        rng.standard_normal(shape[1:], dtype=np.float32)
    return rng.standard_normal(shape, dtype=np.float32)


def check_noise(noise, shape: tuple[int, int, int]) -> np.ndarray:
    noise = np.asarray(noise)
    if noise.shape != shape:
        raise ValueError(f"noise has shape {noise.shape}, expected {shape} (batch, image tokens, 128)")
    if not (np.issubdtype(noise.dtype, np.floating) or np.issubdtype(noise.dtype, np.integer)):
        raise ValueError(f"noise has dtype {noise.dtype}; allowed: a float32 array")
    if not np.isfinite(noise).all():
        raise ValueError("noise contains NaN or Inf")
    return noise.astype(np.float32)


@dataclass(frozen=True)
class Arguments:
    """A request's arguments checked against the manifest alone (no tokenizer, nothing hashed)."""
    prompts: tuple[str, ...]
    width: int
    height: int
    sampling: Sampling
    seed: int | None
    batch_index: int
    noise: np.ndarray | None


def check_arguments(manifest, prompts, *, width=1024, height=1024, preset=None, steps=None, mu=None, std=None,
                    guidance=None, seed=0, noise=None, batch_index=0) -> Arguments:
    """Everything that needs only the manifest: prompt types and emptiness, size, sampling, seed, noise."""
    prompts = check_prompts(prompts)
    for p in prompts:
        check_prompt_text(p, manifest.limits["max_text_tokens"])
    height, width = check_dimensions(height, width)
    sampling = resolve_sampling(manifest.presets, manifest.default_preset, preset, steps, mu, std, guidance)
    gh, gw = token_grid(height, width)
    shape = (len(prompts), gh * gw, NOISE_SHAPE_TAIL)
    batch_index = check_batch_index(batch_index)
    if noise is not None:
        return Arguments(tuple(prompts), width, height, sampling, None, batch_index, check_noise(noise, shape))
    return Arguments(tuple(prompts), width, height, sampling, check_seed(seed), batch_index, None)


def prepare(manifest, tokenizer, prompts, **kwargs) -> Request:
    """Check everything (check_arguments, then the tokenizer's checks and tokenisation) and draw the noise.
    `prompts` may also be the Arguments of an earlier check_arguments (then no keyword arguments)."""
    a = prompts if isinstance(prompts, Arguments) else check_arguments(manifest, prompts, **kwargs)
    ids = tuple(tuple(tokenizer.encode(tokenizer.check_prompt(p))) for p in a.prompts)
    gh, gw = token_grid(a.height, a.width)
    z0 = a.noise if a.noise is not None else \
        seeded_noise(a.seed, (len(a.prompts), gh * gw, NOISE_SHAPE_TAIL), a.batch_index)
    return Request(a.prompts, ids, a.width, a.height, a.sampling, a.seed, a.batch_index, z0)
