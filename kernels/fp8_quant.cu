// Standalone per-token quantization: bf16 (rows, cols) -> e4m3 (rows, cols) + fp32 scale per row.
// One block per row: a first pass for the row's amax, a second (from L1/L2: a row is at most a few tens of KB)
// to round and store; 16-byte loads and 8-byte stores when cols % 8 == 0, element by element otherwise.
#include "fp8_quant.cuh"
#include "w8a8.h"

#include <cstdint>

namespace ideogram4 {
namespace {

constexpr int kThreads = 256;

template <bool kVec8>
__global__ void __launch_bounds__(kThreads) quantize_rows_kernel(const __nv_bfloat16* __restrict__ x,
                                                                 __nv_fp8_storage_t* __restrict__ q,
                                                                 float* __restrict__ scale, int64_t cols,
                                                                 float clamp) {
  __shared__ float warp_max[kThreads / 32];
  const int64_t row = blockIdx.x;
  const __nv_bfloat16* xr = x + row * cols;
  __nv_fp8_storage_t* qr = q + row * cols;
  float amax = 0.f;
  if constexpr (kVec8) {
    const int64_t n = cols / 8;
    const uint4* xv = reinterpret_cast<const uint4*>(xr);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      uint4 raw = xv[i];
      const __nv_bfloat16* v = reinterpret_cast<const __nv_bfloat16*>(&raw);
#pragma unroll
      for (int j = 0; j < 8; ++j) amax = fmaxf(amax, fabsf(__bfloat162float(v[j])));
    }
  } else {
    for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) amax = fmaxf(amax, fabsf(__bfloat162float(xr[i])));
  }
  amax = block_max(amax, warp_max);
  const RowScale rs = e4m3_row_scale(amax, clamp);
  if (threadIdx.x == 0) scale[row] = rs.scale;
  if constexpr (kVec8) {
    const int64_t n = cols / 8;
    const uint4* xv = reinterpret_cast<const uint4*>(xr);
    uint2* qv = reinterpret_cast<uint2*>(qr);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      uint4 raw = xv[i];
      const __nv_bfloat16* v = reinterpret_cast<const __nv_bfloat16*>(&raw);
      uint2 out;
      __nv_fp8_storage_t* o = reinterpret_cast<__nv_fp8_storage_t*>(&out);
#pragma unroll
      for (int j = 0; j < 8; ++j) o[j] = e4m3_quantize(__bfloat162float(v[j]), rs.inv);
      qv[i] = out;
    }
  } else {
    for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) qr[i] = e4m3_quantize(__bfloat162float(xr[i]), rs.inv);
  }
}

}  // namespace

cudaError_t LaunchQuantizeRows(const void* x, void* q, float* scale, int64_t rows, int64_t cols, float clamp,
                               cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  if (rows > 0x7fffffff) return cudaErrorInvalidValue;
  const bool vec = cols % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(q) % 8 == 0;
  const auto* xb = static_cast<const __nv_bfloat16*>(x);
  auto* qb = static_cast<__nv_fp8_storage_t*>(q);
  if (vec)
    quantize_rows_kernel<true><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(xb, qb, scale, cols, clamp);
  else
    quantize_rows_kernel<false><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(xb, qb, scale, cols, clamp);
  return cudaGetLastError();
}

cudaError_t QuantizeKernelAvailable() {
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, quantize_rows_kernel<true>);
}

}  // namespace ideogram4
