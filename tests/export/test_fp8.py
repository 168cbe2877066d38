"""FP8 weight-only format: quantizer and the official bf16 dequantization, bit for bit (spec §1.4)."""
import ml_dtypes
import numpy as np
import torch

from ideogram4_engine.export.reference.fp8 import FP8Linear, dequantize, quantize_rows


def e4m3_decode(codes: np.ndarray) -> np.ndarray:
    """Independent e4m3fn decoder from the bit layout (1 sign, 4 exponent bits bias 7, 3 mantissa bits)."""
    c = codes.astype(np.int64)
    sign = np.where(c & 0x80, -1.0, 1.0)
    exp = (c >> 3) & 0xF
    man = c & 0x7
    normal = sign * (1.0 + man / 8.0) * np.power(2.0, exp - 7)
    sub = sign * (man / 8.0) * 2.0**-6
    v = np.where(exp == 0, sub, normal)
    return np.where((exp == 0xF) & (man == 0x7), np.nan, v)


def to_bf16_rne(x: np.ndarray) -> np.ndarray:
    """Round float64 values (exactly representable in fp32) to bfloat16, nearest-even, via bit arithmetic."""
    b = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32).astype(np.float64)


def test_dequantize_bit_exact_including_subnormals_and_extremes():
    rng = np.random.default_rng(1234)
    rows, cols = 64, 96
    codes = rng.integers(0, 256, size=(rows, cols), dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x7E                      # no NaN codes
    codes[0, :8] = [0x01, 0x81, 0x07, 0x87, 0x7E, 0xFE, 0x00, 0x08]  # min subnormal, max subnormal, ±448
    scales = np.exp(rng.uniform(np.log(1e-5), np.log(1.0), rows)).astype(np.float32)
    q = torch.from_numpy(codes).view(torch.float8_e4m3fn)
    got = dequantize(q, torch.from_numpy(scales)).to(torch.float32).numpy().astype(np.float64)
    expected = to_bf16_rne(to_bf16_rne(e4m3_decode(codes)) * to_bf16_rne(scales.astype(np.float64))[:, None])
    assert e4m3_decode(np.array([0x7E]))[0] == 448.0 and e4m3_decode(np.array([0x01]))[0] == 2.0**-9
    np.testing.assert_array_equal(got, expected)
    # the fp32 multiply (training-side dequantizer) is NOT what the deploy path does: make sure they differ
    fp32_path = to_bf16_rne(e4m3_decode(codes) * scales.astype(np.float64)[:, None])
    assert (fp32_path != expected).any()


def test_quantize_rows_matches_formula():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(33, 200, generator=g) * torch.logspace(-4, 1, 33)[:, None]
    w[3] = 0.0                                               # an all-zero row takes the 1e-8 floor
    q, s = quantize_rows(w)
    wn = w.numpy().astype(np.float32)
    s_ref = np.maximum(np.abs(wn).max(1) / np.float32(448.0), np.float32(1e-8)).astype(np.float32)
    np.testing.assert_array_equal(s.numpy(), s_ref)
    q_ref = np.clip(wn / s_ref[:, None], -448, 448).astype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(q.view(torch.uint8).numpy(), q_ref.view(np.uint8))
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert np.abs(e4m3_decode(q.view(torch.uint8).numpy())).max() == 448.0   # each row's max hits the top code


def test_fp8_linear_is_bf16_gemm_on_dequantized_weight():
    g = torch.Generator().manual_seed(3)
    lin = FP8Linear(48, 20, bias=True)
    q, s = quantize_rows(torch.randn(20, 48, generator=g))
    lin.weight.data, lin.weight_scale.data = q, s
    lin.bias.data = torch.randn(20, generator=g).to(torch.bfloat16)
    x = torch.randn(5, 48, generator=g).to(torch.bfloat16)
    w_eff = (q.to(torch.bfloat16) * s.to(torch.bfloat16)[:, None])
    torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, w_eff, lin.bias), rtol=0, atol=0)
