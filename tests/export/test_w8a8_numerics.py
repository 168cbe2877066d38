"""The numpy model of the W8A8 kernels (export/reference/w8a8_model.py): its e4m3 encoder against ml_dtypes, the
per-token quantization's rules, and the W8A8 linear against an fp64 reference with the bound derived from
e4m3's 3 mantissa bits."""
import ml_dtypes
import numpy as np
import pytest

from ideogram4_engine.export.reference import w8a8_model as m

E4M3 = ml_dtypes.float8_e4m3fn


def _ml_encode(v: np.ndarray) -> np.ndarray:
    """ml_dtypes' round-to-nearest-even cast, after the saturation the kernel applies (ml_dtypes gives NaN)."""
    return np.clip(v, -448, 448).astype(E4M3).view(np.uint8)


def test_decode_matches_ml_dtypes_for_every_code():
    codes = np.arange(256, dtype=np.uint8)
    ours, ref = m.e4m3_decode(codes), codes.view(E4M3).astype(np.float32)
    assert np.array_equal(np.isnan(ours), np.isnan(ref))
    ok = ~np.isnan(ref)
    assert np.array_equal(ours[ok], ref[ok]) and np.array_equal(np.signbit(ours[ok]), np.signbit(ref[ok]))


def test_encode_round_trips_every_finite_code():
    codes = np.array([c for c in range(256) if c & 0x7F != 0x7F], np.uint8)
    assert np.array_equal(m.e4m3_encode(m.e4m3_decode(codes)), codes)


def test_encode_ties_to_even_and_matches_ml_dtypes():
    vals = np.unique(np.abs(m.e4m3_decode(np.arange(0, 0x7F, dtype=np.uint8))).astype(np.float64))
    mid = (vals[:-1] + vals[1:]) / 2                   # exact halfway points: ties
    near = np.concatenate([mid, np.nextafter(mid.astype(np.float32), 0), np.nextafter(mid.astype(np.float32), 1e9)])
    rng = np.random.default_rng(0)
    wide = (rng.standard_normal(200_000) * np.exp2(rng.uniform(-14, 10, 200_000))).astype(np.float32)
    v = np.concatenate([near.astype(np.float32), -near.astype(np.float32), wide, [0.0, -0.0, 2.0 ** -10, 2.0 ** -11]])
    v = v.astype(np.float32)
    assert np.array_equal(m.e4m3_encode(v), _ml_encode(v))


def test_encode_saturates_and_keeps_nan():
    v = np.array([448.0, 463.9, 464.0, 1e6, np.inf, -np.inf, -1e30, np.nan], np.float32)
    got = m.e4m3_encode(v)
    assert list(got[:5]) == [0x7E] * 5 and list(got[5:7]) == [0xFE] * 2
    assert got[7] & 0x7F == 0x7F


def test_bf16_round_matches_ml_dtypes():
    x = np.random.default_rng(1).standard_normal(100_000).astype(np.float32) * 37
    assert np.array_equal(m.bf16_round(x), x.astype(ml_dtypes.bfloat16).astype(np.float32))


def _activations(rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32) * np.exp2(rng.uniform(-6, 6, (rows, 1)))
    return m.bf16_round(x)


def test_quantize_rows_rules():
    x = _activations(64, 320, 2)
    x[3] = 0.0                                           # an all-zero row stays finite and exact
    q, s = m.quantize_rows(x)
    amax = np.abs(x).max(1)
    assert np.all(np.isfinite(s)) and np.all(m.e4m3_decode(q[3]) == 0)
    nz = amax > 0
    assert np.array_equal(s[nz], (amax[nz] / np.float32(448)).astype(np.float32))
    # the row's largest magnitude lands on 448 exactly, nothing beyond
    assert np.all(np.abs(m.e4m3_decode(q[nz])).max(1) == 448)
    deq = m.e4m3_decode(q).astype(np.float64) * s[:, None]
    err = np.abs(deq - x)
    assert np.all(err <= (m.UNIT_ROUNDOFF + 2.0 ** -21) * np.abs(x) + s[:, None] * m.SUBNORMAL_HALF_STEP)
    assert err.max() > 0                                 # it did quantize


def test_quantize_rows_clamp_saturates_outliers():
    x = _activations(8, 256, 3)
    x[:, 7] = 1000.0 * np.abs(x).max()                   # an outlier channel in every token
    clamp = float(np.abs(np.delete(x, 7, axis=1)).max())
    q, s = m.quantize_rows(x, clamp=clamp)
    assert np.all(s == np.float32(clamp) / np.float32(448))
    assert np.all(m.e4m3_decode(q[:, 7]) == 448)         # the outlier saturates at the cap
    rest = np.delete(x, 7, axis=1)
    deq = np.delete(m.e4m3_decode(q).astype(np.float64) * s[:, None], 7, axis=1)
    assert np.all(np.abs(deq - rest) <= m.UNIT_ROUNDOFF * 1.001 * np.abs(rest) + s[:, None] * m.SUBNORMAL_HALF_STEP)


def test_per_token_scale_keeps_precision_beside_an_outlier():
    """Without a clamp, a 1000x outlier only moves its token's scale: the other values stay in e4m3's normal
    range (above 2^-6 of 448/amax) and keep the 2^-4 relative bound."""
    x = _activations(4, 512, 4)
    x[:, 11] = 1000.0 * np.abs(x).max(1)
    q, s = m.quantize_rows(x)
    big = np.abs(x) >= 2.0 ** -6 * s[:, None]
    big[:, 11] = False
    deq = m.e4m3_decode(q).astype(np.float64) * s[:, None]
    assert big.mean() > 0.9
    assert np.all(np.abs(deq - x)[big] <= (m.UNIT_ROUNDOFF + 2.0 ** -21) * np.abs(x)[big])


def _weights(n: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.02
    scale = np.maximum(np.abs(w).max(1) / 448, 1e-8).astype(np.float32)
    scale = m.bf16_round(scale)                          # the graphs carry the checkpoint's scale as bf16
    q = m.e4m3_encode(w / scale[:, None])
    return q, scale


@pytest.mark.parametrize("rows,n,k", [(77, 96, 4608), (33, 64, 1024), (1, 48, 80)])
def test_w8a8_linear_within_the_e4m3_bound(rows, n, k):
    x = _activations(rows, k, 5)
    qw, sw = _weights(n, k, 6)
    w_eff = m.e4m3_decode(qw).astype(np.float64) * sw[:, None]
    exact = x.astype(np.float64) @ w_eff.T
    y = m.w8a8_linear(x, qw, sw)
    _, s = m.quantize_rows(x)
    bound = m.linear_bound(*m.abs_sums(x, w_eff), s, exact, k)
    assert np.all(np.abs(y - exact) <= bound)
    lo, hi = m.rms_relative_error_range()
    rel = np.linalg.norm(y - exact) / np.linalg.norm(exact)
    if rows * n >= 2000:                                 # enough outputs for the statistical range
        assert lo * 0.9 <= rel <= hi * 1.1, rel


def test_bound_catches_a_missing_weight_scale():
    x = _activations(16, 512, 7)
    qw, sw = _weights(32, 512, 8)
    w_eff = m.e4m3_decode(qw).astype(np.float64) * sw[:, None]
    exact = x.astype(np.float64) @ w_eff.T
    q, s = m.quantize_rows(x)
    wrong = m.row_scaled_matmul(q, s, qw, np.ones_like(sw))
    assert np.any(np.abs(wrong - exact) > m.linear_bound(*m.abs_sums(x, w_eff), s, exact, 512))


def test_gemm_model_is_exact_up_to_bf16_rounding():
    x = _activations(20, 256, 9)
    qw, sw = _weights(40, 256, 10)
    q, s = m.quantize_rows(x)
    terms = (m.e4m3_decode(q).astype(np.float64) * s[:, None]) @ (m.e4m3_decode(qw).astype(np.float64) * sw[:, None]).T
    y = m.row_scaled_matmul(q, s, qw, sw)
    assert np.all(np.abs(y - terms) <= 2.0 ** -8 * np.abs(terms) + 1e-30)
