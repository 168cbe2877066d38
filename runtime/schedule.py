"""Logit-normal sampling schedule and presets (spec §5). Pure numpy/stdlib: shared by runtime and reference."""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

LOGSNR_MAX = 18.0
LOGSNR_MIN = -15.0
TAU_MIN = 1.0 / (1.0 + math.exp(0.5 * LOGSNR_MAX))   # ≈ 1.2339458e-4: the first model time (noise end)
TAU_MAX = 1.0 / (1.0 + math.exp(0.5 * LOGSNR_MIN))   # ≈ 0.99944722: the last target (never exactly 1)
BASE_PIXELS = 512 * 512
# Bounds of the knobs a request may override (the presets sit well inside them). Within them the schedule is
# finite in float64 (|mu + std * ndtri(u)| <= 20 + 20 * 5.3 for float32 u) and a step table stays small.
MAX_STEPS = 1000
MU_LIMIT = 20.0                 # |mu_base| <= 20 (sigmoid saturates long before)
STD_MAX = 20.0                  # 0 < std <= 20
GUIDANCE_LIMIT = 100.0          # |g| <= 100 (the presets use 3 and 7)


def check_guidance(guidance, steps: int) -> None:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if len(guidance) != steps:
        raise ValueError(f"guidance schedule has {len(guidance)} entries, expected one per step ({steps})")


@dataclass(frozen=True)
class SamplerPreset:
    """Official sampling recipe. `guidance[i]` belongs to loop index i, which counts DOWN: index 0 is the
    last step executed (spec §5.3, trap 2)."""
    name: str
    steps: int
    guidance: tuple[float, ...]
    mu: float
    std: float

    def __post_init__(self) -> None:
        check_guidance(self.guidance, self.steps)


def _schedule(polish: int, steps: int) -> tuple[float, ...]:
    return (3.0,) * polish + (7.0,) * (steps - polish)


PRESETS: dict[str, SamplerPreset] = {p.name: p for p in (
    SamplerPreset("V4_QUALITY_48", 48, _schedule(3, 48), 0.0, 1.5),
    SamplerPreset("V4_DEFAULT_20", 20, _schedule(2, 20), 0.0, 1.75),
    SamplerPreset("V4_TURBO_12", 12, _schedule(1, 12), 0.5, 1.75),
)}
DEFAULT_PRESET = "V4_DEFAULT_20"


def get_preset(name: str) -> SamplerPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown sampler preset {name!r}; allowed: {', '.join(PRESETS)}") from None


def linspace_f32(steps: int) -> np.ndarray:
    """torch.linspace(0, 1, steps) in float32, reproduced bit for bit: the first half counts up from 0 by
    a float32 step, the second half counts down from 1, each value rounded once (PyTorch's kernel uses a
    fused multiply-add; the float64 products here are exact, so one final rounding matches it)."""
    if steps == 1:
        return np.zeros(1, np.float32)
    step = np.float64(np.float32(1.0) / np.float32(steps - 1))
    i = np.arange(steps)
    half = steps // 2
    up = i[:half] * step
    down = 1.0 - (steps - 1 - i[half:]) * step
    return np.concatenate([up, down]).astype(np.float32)


def resolution_mu(mu_base: float, height: int, width: int) -> float:
    """μ = μ_base + ½·ln(H·W / 512²): larger images are pushed towards noisier times (trap 24)."""
    return mu_base + 0.5 * math.log(height * width / BASE_PIXELS)


def tau(u: float, mu: float, std: float) -> float:
    """τ(u) = clamp(1 − sigmoid(μ + σ·Φ⁻¹(u)), τ_min, τ_max) in float64 (Φ⁻¹(0) = −∞, Φ⁻¹(1) = +∞)."""
    if u <= 0.0:
        x = -math.inf
    elif u >= 1.0:
        x = math.inf
    else:
        x = mu + std * NormalDist().inv_cdf(u)
    s = 0.0 if x == -math.inf else 1.0 if x == math.inf else 1.0 / (1.0 + math.exp(-x))
    return min(max(1.0 - s, TAU_MIN), TAU_MAX)


def tau_table(steps: int, mu: float, std: float) -> np.ndarray:
    """τ at u_k = linspace(0, 1, steps+1)[k] (float32). Index k+1 is the current time of loop index k,
    index k its target: the loop i = steps−1 … 0 runs from table[steps] = τ_min up to table[0] = τ_max."""
    u = linspace_f32(steps + 1)
    return np.array([tau(float(v), mu, std) for v in u], dtype=np.float32)


@dataclass(frozen=True)
class Step:
    index: int          # loop index i (counts down; guidance[i] applies)
    tau: np.float32     # model time fed to the DiTs (rounded to bf16 inside them)
    dt: np.float32      # τ_next − τ_cur in float32 (positive)
    guidance: float


def needs_uncond(guidance: float) -> bool:
    """g·v_c + (1 − g)·v_u needs v_u unless g is exactly 1 (then it is v_c, for any finite v_u)."""
    return guidance != 1.0


def plan(steps: int, mu: float, std: float, guidance) -> list[Step]:
    """The executed steps in order, each with its model time, Euler increment and guidance."""
    check_guidance(guidance, steps)
    t = tau_table(steps, mu, std)
    return [Step(i, t[i + 1], np.float32(t[i] - t[i + 1]), float(guidance[i]))
            for i in range(steps - 1, -1, -1)]
