"""The arithmetic of the W8A8 kernels (kernels/fp8_quant.cuh, kernels/fp8_gemm.cu) in numpy, and the error
bound it implies against the faithful bf16 linear.

numpy only (no ml_dtypes, no torch), so the GPU check (scripts/gpu_w8a8_check.py) uses the same model as the
CPU tests. e4m3 (OCP "e4m3fn": bias 7, no infinities, ±448 largest, 2^-9 smallest subnormal) is encoded
bit by bit with round-to-nearest-even, saturating to ±448 as CUDA's __NV_SATFINITE does.

Per-token scaling: each row (token) of the activation gets its own scale a/448 with a = max|x_row| (optionally
capped by `clamp`). The weights keep the checkpoint's e4m3 bytes and per-row scales as stored.
"""
from __future__ import annotations

import numpy as np

E4M3_MAX = np.float32(448.0)
AMAX_FLOOR = np.float32(2.0 ** -100)
MANTISSA_BITS = 3
UNIT_ROUNDOFF = 2.0 ** -(MANTISSA_BITS + 1)          # 2^-4: relative error bound of e4m3 rounding (normal range)
SUBNORMAL_HALF_STEP = 2.0 ** -10                      # absolute error bound below 2^-6 (in units of the scale)
_MIN_NORMAL = 2.0 ** -6


def e4m3_encode(v: np.ndarray) -> np.ndarray:
    """float32 → e4m3 bit patterns (uint8): round to nearest even, |v| > 448 and ±inf saturate, NaN → 0x7f."""
    v = np.asarray(v, np.float32)
    a = np.abs(v).astype(np.float64)
    sign = np.signbit(v).astype(np.uint8) << 7
    finite = np.isfinite(a)
    a = np.where(finite, np.minimum(a, 448.0), 448.0)
    _, e2 = np.frexp(np.maximum(a, _MIN_NORMAL))              # a = f·2^e2, f in [0.5, 1)
    step = np.ldexp(1.0, e2 - 1 - MANTISSA_BITS)              # spacing of e4m3 values around a
    r = np.rint(a / step) * step                              # a/step is exact; rint rounds half to even
    r = np.minimum(r, 448.0)
    _, re = np.frexp(np.maximum(r, _MIN_NORMAL))
    exp = re - 1                                              # r in [2^exp, 2^(exp+1))
    normal = r >= _MIN_NORMAL
    mant = np.where(normal, r / np.ldexp(1.0, exp) - 1.0, r / 2.0 ** -9) * np.where(normal, 8, 1)
    code = np.where(normal, ((exp + 7) << 3) + mant.astype(np.int64), mant.astype(np.int64)).astype(np.uint8)
    code = np.where(np.isnan(v), np.uint8(0x7F), code)
    return code | sign


def e4m3_decode(code: np.ndarray) -> np.ndarray:
    """e4m3 bit patterns → float32 (exact)."""
    c = np.asarray(code, np.uint8).astype(np.int64)
    e, m = (c >> 3) & 0xF, c & 7
    mag = np.where(e == 0, m * 2.0 ** -9, (1 + m / 8.0) * np.ldexp(1.0, e - 7))
    mag = np.where((c & 0x7F) == 0x7F, np.nan, mag)
    return np.where(c & 0x80, -mag, mag).astype(np.float32)


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bf16 (ties to even), returned as float32."""
    b = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    return r.view(np.float32)


def row_scales(amax: np.ndarray, clamp: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(inv, scale) per row: a = max(min(amax, clamp if > 0), 2^-100); inv = 448/a, scale = a/448 in fp32."""
    a = np.asarray(amax, np.float32)
    if clamp > 0:
        a = np.minimum(a, np.float32(clamp))
    a = np.maximum(a, AMAX_FLOOR)
    return (E4M3_MAX / a).astype(np.float32), (a / E4M3_MAX).astype(np.float32)


def quantize_rows(x: np.ndarray, clamp: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Fp8QuantizeRows on bf16-valued float32 x (..., K): (e4m3 codes (..., K), fp32 scale (...))."""
    x = np.asarray(x, np.float32)
    inv, scale = row_scales(np.abs(x).max(axis=-1) if x.shape[-1] else np.zeros(x.shape[:-1], np.float32), clamp)
    return e4m3_encode(x * inv[..., None]), scale


def row_scaled_matmul(q: np.ndarray, scale: np.ndarray, w: np.ndarray, w_scale: np.ndarray) -> np.ndarray:
    """Fp8RowScaledMatMul: bf16(scale[m] · w_scale[n] · Σ_k q[m,k] w[n,k]) with an exact (fp64) sum; the kernel's
    fp32 accumulation differs from it within `gemm_bound`."""
    acc = e4m3_decode(q).astype(np.float64) @ e4m3_decode(w).astype(np.float64).T
    y = acc * np.asarray(scale, np.float64)[..., None] * np.asarray(w_scale, np.float64)
    return bf16_round(y.astype(np.float32))


def w8a8_linear(x: np.ndarray, w: np.ndarray, w_scale: np.ndarray, clamp: float = 0.0) -> np.ndarray:
    """The W8A8 linear: quantize the activation per token, then the row-scaled FP8 GEMM."""
    q, s = quantize_rows(x, clamp)
    return row_scaled_matmul(q, s, w, w_scale)


def gemm_bound(abs_sum: np.ndarray, y_exact: np.ndarray, K: int, fast_accumulation: bool = False) -> np.ndarray:
    """|kernel − exact| for the GEMM alone, elementwise: fp32 accumulation of K exact products (recursive
    summation, K·2^-24 of Σ|terms| = `abs_sum`, the scales included), two fp32 scale products, one bf16
    rounding (2^-9, doubled for slack). Hopper's FP8 tensor cores add their reduced-precision accumulation
    when fast_accumulation is on: 2^-12 of Σ|terms| assumed (not a documented figure: measured only)."""
    acc = (K + 2) * 2.0 ** -24 + (2.0 ** -12 if fast_accumulation else 0.0)
    return acc * abs_sum + 2.0 ** -8 * np.abs(y_exact)


def linear_bound(abs_sum: np.ndarray, w_abs_rows: np.ndarray, scale: np.ndarray, y_exact: np.ndarray, K: int,
                 fast_accumulation: bool = False) -> np.ndarray:
    """|W8A8 linear − x·w_effᵀ| elementwise, for x the bf16 activation (M, K), w_eff the exact dequantized weight
    q_w·s_w (N, K) and clamp off, given abs_sum = |x|·|w_eff|ᵀ (M, N), w_abs_rows = Σ_k |w_eff[n, k]| (N,) and
    the activation's token scales (M,) (the caller computes the sums in fp64 wherever it likes: numpy, a GPU).
    Each x_k is replaced by scale·e4m3(x_k·inv), off by at most 2^-4·|x_k| (+2^-21 for the fp32 roundings of
    inv and of x·inv) in e4m3's normal range and scale·2^-10 below it, so |Δy| ≤ (2^-4 + 2^-21)·Σ|x||w| +
    scale·2^-10·Σ|w|, plus the GEMM's own error (`gemm_bound`) on the quantized operands."""
    s = np.asarray(abs_sum, np.float64)
    quant = (UNIT_ROUNDOFF + 2.0 ** -21) * s + \
        np.asarray(scale, np.float64)[..., None] * SUBNORMAL_HALF_STEP * np.asarray(w_abs_rows, np.float64)
    return quant + gemm_bound((1 + UNIT_ROUNDOFF) * s + quant, np.abs(y_exact) + quant, K, fast_accumulation)


def abs_sums(x: np.ndarray, w_eff: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(|x|·|w_eff|ᵀ, Σ_k |w_eff[n, k]|) in fp64 with numpy: the inputs of `linear_bound`."""
    wa = np.abs(np.asarray(w_eff, np.float64))
    return np.abs(np.asarray(x, np.float64)) @ wa.T, wa.sum(1)


def rms_relative_error_range() -> tuple[float, float]:
    """Where the relative L2 error of a W8A8 linear falls for zero-mean random data without outliers: the
    rounding error of e4m3 at a value with mantissa m ∈ [1, 2) is uniform in ±2^-4/m, so its RMS is
    2^-4/(m·√3) — between 2^-5/√3 (m → 2) and 2^-4/√3 (m = 1) whatever the mantissas are; the output's
    relative error is that RMS (independent errors, zero-mean weights)."""
    return 2.0 ** -5 / np.sqrt(3.0), 2.0 ** -4 / np.sqrt(3.0)
