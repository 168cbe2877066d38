// Per-token e4m3 quantization of bf16 activations: the rounding rules, as device functions, so that the
// standalone kernel (fp8_quant.cu) and any fused kernel that produces the activation (for example the
// modulation RMSNorm of the fused-kernel library: it already holds a row in registers and reduces over it)
// quantize bit-identically. A fused producer rounds its output to bf16 first (the value the faithful graph
// feeds the GEMM), takes the row's amax of those bf16 values with one more block reduction, then writes
// q = e4m3_quantize(v, inv) and the row's scale instead of (or besides) the bf16 row.
//
// Rules (the numpy model in tests/test_w8a8_numerics.py implements the same, bit for bit):
//   a     = max(min(amax_row, clamp if clamp > 0), 2^-100)   clamp: optional outlier cap, 0 = off
//   inv   = 448 / a          (fp32, correctly rounded)
//   scale = a / 448          (fp32, correctly rounded; the GEMM epilogue multiplies by it)
//   q     = e4m3(x · inv)    (fp32 product, round to nearest even, saturated to ±448)
// 2^-100 keeps an all-zero row finite (448 / 2^-100 is finite; its q are all 0).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp8.h>

namespace ideogram4 {

constexpr float kE4M3Max = 448.0f;
constexpr float kAmaxFloor = 7.888609052210118e-31f;   // 2^-100

struct RowScale {
  float inv;     // multiply the activation by this before rounding to e4m3
  float scale;   // multiply the GEMM's accumulator by this (and by the weight's row scale)
};

__device__ __forceinline__ RowScale e4m3_row_scale(float amax, float clamp) {
  float a = clamp > 0.f ? fminf(amax, clamp) : amax;
  a = fmaxf(a, kAmaxFloor);
  return {__fdiv_rn(kE4M3Max, a), __fdiv_rn(a, kE4M3Max)};
}

__device__ __forceinline__ __nv_fp8_storage_t e4m3_quantize(float v, float inv) {
  return __nv_cvt_float_to_fp8(__fmul_rn(v, inv), __NV_SATFINITE, __NV_E4M3);
}

// max(|x|) over a block; every thread gets the result. `shared` holds one float per warp (blockDim.x <= 1024).
__device__ __forceinline__ float block_max(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = (blockDim.x + 31) >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

}  // namespace ideogram4
