// Device helpers shared by the fused kernels (fused.cu: the general ones, any layout and shape; fused_warp.cu: the
// warp-per-row ones at the DiT's shapes): bf16 rounding, 4-wide access, and onnxruntime's RMSNormalization element order and
// reduction tree (fused.cu's header comment says what that order is and why it matters).
#pragma once
#include "fused.h"
#include "fp8_quant.cuh"

#include <cstdint>

namespace i4k {
namespace {

__device__ __forceinline__ float f32(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float rb(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }  // bf16 value

// 4 consecutive bf16 values; V4: one 8-byte access (the caller checked the alignment).
template <bool V4>
__device__ __forceinline__ void load4(const bf16* p, float v[4]) {
  if (V4) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    const __nv_bfloat162 a = *reinterpret_cast<const __nv_bfloat162*>(&u.x);
    const __nv_bfloat162 b = *reinterpret_cast<const __nv_bfloat162*>(&u.y);
    v[0] = __low2float(a), v[1] = __high2float(a), v[2] = __low2float(b), v[3] = __high2float(b);
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = f32(p[k]);
  }
}

template <bool V4>
__device__ __forceinline__ void store4(bf16* p, const float v[4]) {
  if (V4) {
    __nv_bfloat162 a = __floats2bfloat162_rn(v[0], v[1]), b = __floats2bfloat162_rn(v[2], v[3]);
    uint2 u;
    u.x = *reinterpret_cast<uint32_t*>(&a);
    u.y = *reinterpret_cast<uint32_t*>(&b);
    *reinterpret_cast<uint2*>(p) = u;
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) p[k] = __float2bfloat16_rn(v[k]);
  }
}

// Visit this thread's elements of a row of n in onnxruntime's order: groups of four, then the tail.
template <class F4, class F1>
__device__ __forceinline__ void ort_walk(int n, F4 group, F1 single) {
  const int numx = blockDim.x * blockDim.y;
  const int thrx = threadIdx.x + threadIdx.y * blockDim.x;
  int l = 4 * thrx;
  for (; l + 3 < n; l += 4 * numx) group(l);
  for (; l < n; ++l) single(l);
}

// Sum of the per-thread partials of one row over its 32 x blockDim.y threads, in onnxruntime's association.
// buf: blockDim.y floats of shared memory for this row; every thread of the block must call it.
__device__ __forceinline__ float ort_row_sum(float s, float* buf) {
#pragma unroll
  for (int stride = 16; stride > 0; stride >>= 1) s = s + __shfl_down_sync(0xffffffffu, s, stride);
  if (blockDim.y == 1) return __shfl_sync(0xffffffffu, s, 0);
  if (threadIdx.x == 0) buf[threadIdx.y] = s;
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0)
    for (int off = blockDim.y / 2; off > 0; off >>= 1)
      for (int y = 0; y < off; ++y) buf[y] = buf[y] + buf[y + off];
  __syncthreads();
  s = buf[0];
  __syncthreads();
  return s;
}

template <bool V4>
__device__ __forceinline__ float row_sumsq(const bf16* x, int n) {
  float s = 0.f;
  ort_walk(
      n,
      [&](int l) {
        float v[4];
        load4<V4>(x + l, v);
#pragma unroll
        for (int k = 0; k < 4; ++k) s = __fmaf_rn(v[k], v[k], s);
      },
      [&](int l) {
        const float c = f32(x[l]);
        s = __fmaf_rn(c, c, s);
      });
  return s;
}

// max over the 32 x blockDim.y threads of a block (exact in any order: max neither rounds nor depends on
// association); every thread gets it. buf: blockDim.y floats of shared memory; every thread must call it.
__device__ __forceinline__ float block_amax(float v, float* buf) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  if (blockDim.y == 1) return v;
  if (threadIdx.x == 0) buf[threadIdx.y] = v;
  __syncthreads();
  v = buf[0];
  for (unsigned y = 1; y < blockDim.y; ++y) v = fmaxf(v, buf[y]);
  __syncthreads();
  return v;
}

// 4 e4m3 codes of v * inv (fp8_quant.cuh's rounding) in one 4-byte store; p 4-byte aligned.
__device__ __forceinline__ void store_e4m3x4(uint8_t* p, const float v[4], float inv) {
  uint32_t u = 0;
#pragma unroll
  for (int k = 0; k < 4; ++k) u |= static_cast<uint32_t>(ideogram4::e4m3_quantize(v[k], inv)) << (8 * k);
  *reinterpret_cast<uint32_t*>(p) = u;
}

}  // namespace
}  // namespace i4k
