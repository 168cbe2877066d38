// Register-resident forms of the norm kernels (NormModulate, GatedResidual[Modulate]) and the per-row quantized
// SwiGLU: same arithmetic and summation order as fused.cu, so the same bits, but each thread loads all of its
// groups of a row up front (G groups of 4, unrolled: G loads in flight instead of one) and keeps the row in
// registers between the passes (the branch between its norm and the residual, h' between the residual and the
// next norm) instead of reading it again. Thread t of the 32 x threads_y block still owns the groups
// l = 4t + 4 * numx * g, in order, and the partial sums meet in ort_row_sum's tree: the layout onnxruntime uses.
//
// Taken when n % 4 == 0, every bf16 pointer is 8-byte aligned (e4m3 codes 4-byte), and a thread's groups fit the
// largest instantiation (kMaxGroups); otherwise the launcher returns false and fused.cu's kernel runs.
#include "fused.h"
#include "fused_common.cuh"

#include <algorithm>

namespace i4k {
namespace {

constexpr int kMaxGroups = 18;   // 4608 wide at threads_y 2 (the DiT): 18 groups of 4 per thread

// threads per block an instantiation is compiled for (registers: two rows of 4G floats per thread)
template <int G>
constexpr int max_threads() { return G <= 2 ? 512 : G <= 8 ? 512 : 256; }

template <int G>
__device__ __forceinline__ void load_groups(const bf16* __restrict__ p, int n, float (&v)[G][4]) {
  const int base = 4 * (threadIdx.x + threadIdx.y * blockDim.x), step = 4 * blockDim.x * blockDim.y;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (base + step * g + 3 < n) load4<true>(p + base + step * g, v[g]);
    else v[g][0] = v[g][1] = v[g][2] = v[g][3] = 0.f;
  }
}

template <int G>
__device__ __forceinline__ float sumsq_groups(const float (&v)[G][4], int n) {
  const int base = 4 * (threadIdx.x + threadIdx.y * blockDim.x), step = 4 * blockDim.x * blockDim.y;
  float s = 0.f;
#pragma unroll
  for (int g = 0; g < G; ++g)
    if (base + step * g + 3 < n) {
#pragma unroll
      for (int k = 0; k < 4; ++k) s = __fmaf_rn(v[g][k], v[g][k], s);
    }
  return s;
}

// v <- bf16(bf16((gain * inv) * v) * bf16(1 + scale)), the modulated row; then stored as bf16 y or quantized.
template <int G>
__device__ __forceinline__ void modulate_groups(float (&v)[G][4], const bf16* __restrict__ gain,
                                                const bf16* __restrict__ scale, int n, float inv) {
  const int base = 4 * (threadIdx.x + threadIdx.y * blockDim.x), step = 4 * blockDim.x * blockDim.y;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const int l = base + step * g;
    if (l + 3 < n) {
      float gn[4], m[4];
      load4<true>(gain + l, gn), load4<true>(scale + l, m);
#pragma unroll
      for (int k = 0; k < 4; ++k) v[g][k] = rb(rb(gn[k] * inv * v[g][k]) * rb(1.f + m[k]));
    }
  }
}

template <int G>
__device__ __forceinline__ void emit_groups(const float (&v)[G][4], bf16* __restrict__ y, uint8_t* __restrict__ q,
                                            float* __restrict__ q_scale, int n, float clamp, float* buf) {
  const int base = 4 * (threadIdx.x + threadIdx.y * blockDim.x), step = 4 * blockDim.x * blockDim.y;
  if (q == nullptr) {
#pragma unroll
    for (int g = 0; g < G; ++g)
      if (base + step * g + 3 < n) store4<true>(y + base + step * g, v[g]);
    return;
  }
  float amax = 0.f;
#pragma unroll
  for (int g = 0; g < G; ++g)
    if (base + step * g + 3 < n)
#pragma unroll
      for (int k = 0; k < 4; ++k) amax = fmaxf(amax, fabsf(v[g][k]));
  const ideogram4::RowScale rs = ideogram4::e4m3_row_scale(block_amax(amax, buf), clamp);
#pragma unroll
  for (int g = 0; g < G; ++g)
    if (base + step * g + 3 < n) store_e4m3x4(q + base + step * g, v[g], rs.inv);
  if (threadIdx.x == 0 && threadIdx.y == 0) *q_scale = rs.scale;
}

template <int G>
__global__ void __launch_bounds__(max_threads<G>())
    norm_modulate_rows_kernel(const bf16* __restrict__ x, const bf16* __restrict__ gain,
                              const bf16* __restrict__ scale, bf16* __restrict__ y, int64_t rows, int n,
                              int64_t rows_per_scale, float eps, Fp8Out fq) {
  __shared__ float buf[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    float v[G][4];
    load_groups<G>(x + row * n, n, v);
    const float inv = rsqrtf(ort_row_sum(sumsq_groups<G>(v, n), buf) / static_cast<float>(n) + eps);
    modulate_groups<G>(v, gain, scale + (row / rows_per_scale) * n, n, inv);
    emit_groups<G>(v, fq.q ? nullptr : y + row * n, fq.q ? fq.q + row * n : nullptr, fq.scale + (fq.q ? row : 0), n,
                   fq.clamp, buf);
  }
}

template <int G, bool MOD>
__global__ void __launch_bounds__(max_threads<G>())
    gated_residual_rows_kernel(const bf16* __restrict__ h, const bf16* __restrict__ branch,
                               const bf16* __restrict__ gain, const bf16* __restrict__ gate,
                               const bf16* __restrict__ gain2, const bf16* __restrict__ scale,
                               bf16* __restrict__ h_out, bf16* __restrict__ y, int64_t rows, int n,
                               int64_t rows_per_gate, float eps, float eps2, Fp8Out fq) {
  __shared__ float buf[32];
  const int base = 4 * (threadIdx.x + threadIdx.y * blockDim.x), step = 4 * blockDim.x * blockDim.y;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    float b[G][4], hv[G][4];
    load_groups<G>(branch + row * n, n, b);
    load_groups<G>(h + row * n, n, hv);
    const float inv = rsqrtf(ort_row_sum(sumsq_groups<G>(b, n), buf) / static_cast<float>(n) + eps);
    const bf16* gr = gate + (row / rows_per_gate) * n;
    bf16* ho = h_out + row * n;
    float s2 = 0.f;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const int l = base + step * g;
      if (l + 3 < n) {
        float gn[4], t[4];
        load4<true>(gain + l, gn), load4<true>(gr + l, t);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          hv[g][k] = rb(hv[g][k] + rb(rb(tanhf(t[k])) * rb(gn[k] * inv * b[g][k])));
          s2 = __fmaf_rn(hv[g][k], hv[g][k], s2);
        }
        store4<true>(ho + l, hv[g]);
      }
    }
    if (MOD) {
      const float inv2 = rsqrtf(ort_row_sum(s2, buf) / static_cast<float>(n) + eps2);
      modulate_groups<G>(hv, gain2, scale + (row / rows_per_gate) * n, n, inv2);
      emit_groups<G>(hv, fq.q ? nullptr : y + row * n, fq.q ? fq.q + row * n : nullptr, fq.scale + (fq.q ? row : 0),
                     n, fq.clamp, buf);
    }
  }
}

// SwiGLU values bf16(bf16(silu(a)) * b) of one row, quantized per row. V: 8-wide vectors per thread held in
// registers (V = 0: any shape, two passes that recompute the values, element by element).
__device__ __forceinline__ float silu(float x) {
  const float sig = x >= 0.f ? 1.f / (1.f + expf(-x)) : 1.f - 1.f / (1.f + expf(x));
  return x * sig;
}

template <int V>
__global__ void __launch_bounds__(256) swiglu_fp8_kernel(const bf16* __restrict__ a, const bf16* __restrict__ b,
                                                         int64_t rows, int n, Fp8Out fq) {
  __shared__ float buf[32];
  const int t = threadIdx.x + threadIdx.y * blockDim.x, threads = blockDim.x * blockDim.y;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const bf16* ar = a + row * n;
    const bf16* br = b + row * n;
    uint8_t* qr = fq.q + row * n;
    float amax = 0.f;
    if constexpr (V > 0) {
      float o[V > 0 ? V : 1][8];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const int i = t + j * threads;
        if (i < n / 8) {
          const uint4 ua = reinterpret_cast<const uint4*>(ar)[i], ub = reinterpret_cast<const uint4*>(br)[i];
          const __nv_bfloat162* pa = reinterpret_cast<const __nv_bfloat162*>(&ua);
          const __nv_bfloat162* pb = reinterpret_cast<const __nv_bfloat162*>(&ub);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            o[j][2 * e] = rb(rb(silu(__low2float(pa[e]))) * __low2float(pb[e]));
            o[j][2 * e + 1] = rb(rb(silu(__high2float(pa[e]))) * __high2float(pb[e]));
          }
#pragma unroll
          for (int e = 0; e < 8; ++e) amax = fmaxf(amax, fabsf(o[j][e]));
        }
      }
      const ideogram4::RowScale rs = ideogram4::e4m3_row_scale(block_amax(amax, buf), fq.clamp);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const int i = t + j * threads;
        if (i < n / 8) {
          store_e4m3x4(qr + 8 * i, o[j], rs.inv);
          store_e4m3x4(qr + 8 * i + 4, o[j] + 4, rs.inv);
        }
      }
      if (t == 0) fq.scale[row] = rs.scale;
    } else {
      auto value = [&](int i) { return rb(rb(silu(f32(ar[i]))) * f32(br[i])); };
      for (int i = t; i < n; i += threads) amax = fmaxf(amax, fabsf(value(i)));
      const ideogram4::RowScale rs = ideogram4::e4m3_row_scale(block_amax(amax, buf), fq.clamp);
      for (int i = t; i < n; i += threads) qr[i] = ideogram4::e4m3_quantize(value(i), rs.inv);
      if (t == 0) fq.scale[row] = rs.scale;
    }
  }
}

bool aligned(const void* p, unsigned bytes) { return (reinterpret_cast<uintptr_t>(p) % bytes) == 0; }

unsigned grid_for(int64_t blocks) { return static_cast<unsigned>(std::min<int64_t>(blocks, 1 << 30)); }

// the smallest instantiation that holds `groups` groups per thread at `threads` threads, or 0
int bucket(int groups, int threads) {
  for (int g : {1, 2, 4, 8, kMaxGroups}) {
    const int limit = g <= 8 ? 512 : 256;
    if (groups <= g) return threads <= limit ? g : 0;
  }
  return 0;
}

}  // namespace

bool norm_modulate_rows(cudaStream_t stream, int ty, const bf16* x, const bf16* gain, const bf16* scale, bf16* y,
                        int64_t rows, int n, int64_t rows_per_scale, float eps, const Fp8Out& fq) {
  const int threads = 32 * ty;
  const int g = bucket((n / 4 + threads - 1) / threads, threads);
  if (n % 4 || g == 0 || !aligned(x, 8) || !aligned(gain, 8) || !aligned(scale, 8) ||
      (fq.q ? !aligned(fq.q, 4) : !aligned(y, 8)))
    return false;
  const dim3 block(32, ty);
  const unsigned grid = grid_for(rows);
#define I4K_ROWS(G) \
  norm_modulate_rows_kernel<G><<<grid, block, 0, stream>>>(x, gain, scale, y, rows, n, rows_per_scale, eps, fq)
  switch (g) {
    case 1: I4K_ROWS(1); break;
    case 2: I4K_ROWS(2); break;
    case 4: I4K_ROWS(4); break;
    case 8: I4K_ROWS(8); break;
    default: I4K_ROWS(kMaxGroups); break;
  }
#undef I4K_ROWS
  return true;
}

bool gated_residual_rows(cudaStream_t stream, int ty, const bf16* h, const bf16* branch, const bf16* gain,
                         const bf16* gate, const bf16* gain2, const bf16* scale, bf16* h_out, bf16* y, int64_t rows,
                         int n, int64_t rows_per_gate, float eps, float eps2, const Fp8Out& fq) {
  const int threads = 32 * ty;
  const int g = bucket((n / 4 + threads - 1) / threads, threads);
  const bool mod = gain2 != nullptr && scale != nullptr;
  if (n % 4 || g == 0 || !aligned(h, 8) || !aligned(branch, 8) || !aligned(gain, 8) || !aligned(gate, 8) ||
      !aligned(h_out, 8) || (mod && (!aligned(gain2, 8) || !aligned(scale, 8) || (fq.q ? !aligned(fq.q, 4) : !aligned(y, 8)))))
    return false;
  const dim3 block(32, ty);
  const unsigned grid = grid_for(rows);
#define I4K_ROWS(G, M)                                                                                            \
  gated_residual_rows_kernel<G, M><<<grid, block, 0, stream>>>(h, branch, gain, gate, gain2, scale, h_out, y, rows, \
                                                               n, rows_per_gate, eps, eps2, fq)
#define I4K_ROWS_G(G) \
  if (mod) I4K_ROWS(G, true); else I4K_ROWS(G, false);
  switch (g) {
    case 1: I4K_ROWS_G(1); break;
    case 2: I4K_ROWS_G(2); break;
    case 4: I4K_ROWS_G(4); break;
    case 8: I4K_ROWS_G(8); break;
    default: I4K_ROWS_G(kMaxGroups); break;
  }
#undef I4K_ROWS_G
#undef I4K_ROWS
  return true;
}

cudaError_t swiglu_fp8(cudaStream_t stream, const bf16* a, const bf16* b, int64_t rows, int n, const Fp8Out& fq) {
  if (fq.q == nullptr || fq.scale == nullptr || n <= 0) return cudaErrorInvalidValue;
  const dim3 block(32, 8);
  const int vectors = (n / 8 + 255) / 256;
  const bool vec = n % 8 == 0 && aligned(a, 16) && aligned(b, 16) && aligned(fq.q, 4);
  const unsigned grid = grid_for(rows);
  if (vec && vectors <= 2) swiglu_fp8_kernel<2><<<grid, block, 0, stream>>>(a, b, rows, n, fq);
  else if (vec && vectors <= 4) swiglu_fp8_kernel<4><<<grid, block, 0, stream>>>(a, b, rows, n, fq);
  else if (vec && vectors <= 8) swiglu_fp8_kernel<8><<<grid, block, 0, stream>>>(a, b, rows, n, fq);
  else swiglu_fp8_kernel<0><<<grid, block, 0, stream>>>(a, b, rows, n, fq);
  return cudaGetLastError();
}

void preload_rows() {
  cudaFuncAttributes a;
#define I4K_PRELOAD(G)                                               \
  cudaFuncGetAttributes(&a, norm_modulate_rows_kernel<G>);           \
  cudaFuncGetAttributes(&a, gated_residual_rows_kernel<G, true>);    \
  cudaFuncGetAttributes(&a, gated_residual_rows_kernel<G, false>);
  I4K_PRELOAD(1) I4K_PRELOAD(2) I4K_PRELOAD(4) I4K_PRELOAD(8) I4K_PRELOAD(kMaxGroups)
#undef I4K_PRELOAD
  cudaFuncGetAttributes(&a, swiglu_fp8_kernel<0>);
  cudaFuncGetAttributes(&a, swiglu_fp8_kernel<2>);
  cudaFuncGetAttributes(&a, swiglu_fp8_kernel<4>);
  cudaFuncGetAttributes(&a, swiglu_fp8_kernel<8>);
  cudaGetLastError();
}

}  // namespace i4k
