// Fused elementwise kernels of the DiT block for onnxruntime's CUDA provider (bf16 in, bf16 out).
//
// Each kernel keeps the rounding points of the op-by-op graph it replaces (export/graphs/dit.py): every value the
// unfused graph holds as a bf16 tensor is rounded to bf16 here too, and each fp32 computation is done the way
// onnxruntime's CUDA kernels do it, so that the results are bit-identical:
//  * RMSNormalization (onnxruntime's cuApplyLayerNorm, simplified): per row, 32 x threads_y threads; thread t sums
//    x^2 in fp32 over the groups of 4 elements l = 4t + 4*numx*g, in order; a shuffle-down tree in each warp, then a
//    halving tree across the warps; inv = rsqrtf(sum / n + eps); out = bf16((gain * inv) * x). The layout
//    (threads_y) depends on the row count and the GPU, so `ort_norm_threads_y` repeats onnxruntime's choice and
//    the reductions below walk the elements in the same order.
//  * bf16 Add / Mul / Tanh: fp32 operation on the widened values, rounded to nearest even once.
//  * SiLU: x * sigmoid(x) in fp32, sigmoid = x >= 0 ? 1/(1+exp(-x)) : 1 - 1/(1+exp(x)) (QuickGelu / Sigmoid).
#include "fused.h"
#include "fused_common.cuh"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace i4k {
namespace {

// y = bf16(bf16((gain * inv) * x) * bf16(1 + scale)) for this thread's elements of one row
template <bool V4>
__device__ __forceinline__ void modulate_row(const bf16* x, const bf16* gain, const bf16* scale, bf16* y, int n,
                                             float inv) {
  ort_walk(
      n,
      [&](int l) {
        float v[4], g[4], m[4], o[4];
        load4<V4>(x + l, v), load4<V4>(gain + l, g), load4<V4>(scale + l, m);
#pragma unroll
        for (int k = 0; k < 4; ++k) o[k] = rb(g[k] * inv * v[k]) * rb(1.f + m[k]);
        store4<V4>(y + l, o);
      },
      [&](int l) { y[l] = __float2bfloat16_rn(rb(f32(gain[l]) * inv * f32(x[l])) * rb(1.f + f32(scale[l]))); });
}

// The same values, quantized per row instead of stored (fp8_quant.cuh's rules on the bf16 values): one walk for
// the row's amax, a block max, a second walk that recomputes each value (same arithmetic, same bits) and stores
// its e4m3 code. The scalar-capable path for shapes the warp-per-row kernels (fused_warp.cu) do not take.
template <bool V4>
__device__ __forceinline__ void quantize_modulated_row(const bf16* x, const bf16* gain, const bf16* scale, uint8_t* q,
                                                       float* q_scale, int n, float inv, float clamp, float* buf) {
  auto value = [&](int l) { return rb(rb(f32(gain[l]) * inv * f32(x[l])) * rb(1.f + f32(scale[l]))); };
  float amax = 0.f;
  ort_walk(
      n,
      [&](int l) {
        float v[4], g[4], m[4];
        load4<V4>(x + l, v), load4<V4>(gain + l, g), load4<V4>(scale + l, m);
#pragma unroll
        for (int k = 0; k < 4; ++k) amax = fmaxf(amax, fabsf(rb(rb(g[k] * inv * v[k]) * rb(1.f + m[k]))));
      },
      [&](int l) { amax = fmaxf(amax, fabsf(value(l))); });
  const ideogram4::RowScale rs = ideogram4::e4m3_row_scale(block_amax(amax, buf), clamp);
  ort_walk(
      n,
      [&](int l) {
        float v[4], g[4], m[4];
        load4<V4>(x + l, v), load4<V4>(gain + l, g), load4<V4>(scale + l, m);
#pragma unroll
        for (int k = 0; k < 4; ++k) q[l + k] = ideogram4::e4m3_quantize(rb(rb(g[k] * inv * v[k]) * rb(1.f + m[k])), rs.inv);
      },
      [&](int l) { q[l] = ideogram4::e4m3_quantize(value(l), rs.inv); });
  if (threadIdx.x == 0 && threadIdx.y == 0) *q_scale = rs.scale;
}

template <bool V4, bool QUANT>
__global__ void norm_modulate_kernel(const bf16* __restrict__ x, const bf16* __restrict__ gain,
                                     const bf16* __restrict__ scale, bf16* __restrict__ y, int64_t rows, int n,
                                     int64_t rows_per_scale, float eps, Fp8Out fq) {
  __shared__ float buf[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const bf16* xr = x + row * n;
    const float inv = rsqrtf(ort_row_sum(row_sumsq<V4>(xr, n), buf) / static_cast<float>(n) + eps);
    if (QUANT)
      quantize_modulated_row<V4>(xr, gain, scale + (row / rows_per_scale) * n, fq.q + row * n, fq.scale + row, n, inv,
                                 fq.clamp, buf);
    else
      modulate_row<V4>(xr, gain, scale + (row / rows_per_scale) * n, y + row * n, n, inv);
  }
}

// h' = bf16(h + bf16(bf16(tanh(gate)) * bf16((gain * inv) * branch))) in onnxruntime's element order, returning
// this thread's partial sum of h'^2 (the next RMSNorm's statistics).
__device__ __forceinline__ float gated(float h, float b, float g, float gate, float inv) {
  return rb(h + rb(rb(tanhf(gate)) * rb(g * inv * b)));
}

template <bool V4, bool MOD, bool QUANT>
__global__ void gated_residual_kernel(const bf16* __restrict__ h, const bf16* __restrict__ branch,
                                      const bf16* __restrict__ gain, const bf16* __restrict__ gate,
                                      const bf16* __restrict__ gain2, const bf16* __restrict__ scale,
                                      bf16* __restrict__ h_out, bf16* __restrict__ y, int64_t rows, int n,
                                      int64_t rows_per_gate, float eps, float eps2, Fp8Out fq) {
  __shared__ float buf[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const bf16* br = branch + row * n;
    const bf16* hr = h + row * n;
    const bf16* gr = gate + (row / rows_per_gate) * n;
    bf16* ho = h_out + row * n;
    const float inv = rsqrtf(ort_row_sum(row_sumsq<V4>(br, n), buf) / static_cast<float>(n) + eps);
    float s2 = 0.f;
    ort_walk(
        n,
        [&](int l) {
          float b[4], hv[4], g[4], t[4];
          load4<V4>(br + l, b), load4<V4>(hr + l, hv), load4<V4>(gain + l, g), load4<V4>(gr + l, t);
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            hv[k] = gated(hv[k], b[k], g[k], t[k], inv);
            s2 = __fmaf_rn(hv[k], hv[k], s2);
          }
          store4<V4>(ho + l, hv);
        },
        [&](int l) {
          const float v = gated(f32(hr[l]), f32(br[l]), f32(gain[l]), f32(gr[l]), inv);
          s2 = __fmaf_rn(v, v, s2);
          ho[l] = __float2bfloat16_rn(v);
        });
    if (MOD) {   // each thread reads back only what it wrote above (same walk)
      const float inv2 = rsqrtf(ort_row_sum(s2, buf) / static_cast<float>(n) + eps2);
      if (QUANT)
        quantize_modulated_row<V4>(ho, gain2, scale + (row / rows_per_gate) * n, fq.q + row * n, fq.scale + row, n,
                                   inv2, fq.clamp, buf);
      else
        modulate_row<V4>(ho, gain2, scale + (row / rows_per_gate) * n, y + row * n, n, inv2);
    }
  }
}

// One row = one (token, q|k, head) of head_dim values; blockDim = (32, threads_y, rows per block).
template <bool V4>
__global__ void qkv_norm_rope_kernel(const bf16* __restrict__ qkv, const bf16* __restrict__ gain_q,
                                     const bf16* __restrict__ gain_k, const bf16* __restrict__ cos,
                                     const bf16* __restrict__ sin, bf16* __restrict__ q, bf16* __restrict__ k,
                                     bf16* __restrict__ v, int64_t tokens, int heads, int hd, float eps_q,
                                     float eps_k) {
  extern __shared__ float smem[];
  float* normed = smem + threadIdx.z * hd;
  float* buf = smem + blockDim.z * hd + threadIdx.z * 32;
  const int64_t rows = tokens * 2 * heads;
  const int half = hd / 2, numx = blockDim.x * blockDim.y, thrx = threadIdx.x + threadIdx.y * blockDim.x;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.z; base < rows;
       base += static_cast<int64_t>(gridDim.x) * blockDim.z) {
    const int64_t row = base + threadIdx.z;
    const bool valid = row < rows;
    const int64_t tok = valid ? row / (2 * heads) : 0;
    const int which = valid ? static_cast<int>(row / heads % 2) : 0, head = valid ? static_cast<int>(row % heads) : 0;
    const bf16* x = qkv + ((tok * 3 + which) * heads + head) * hd;
    const bf16* gain = which ? gain_k : gain_q;
    const float s = valid ? row_sumsq<V4>(x, hd) : 0.f;
    const float inv = rsqrtf(ort_row_sum(s, buf) / static_cast<float>(hd) + (which ? eps_k : eps_q));
    if (valid)
      ort_walk(
          hd,
          [&](int l) {
            float xv[4], g[4];
            load4<V4>(x + l, xv), load4<V4>(gain + l, g);
#pragma unroll
            for (int j = 0; j < 4; ++j) normed[l + j] = rb(g[j] * inv * xv[j]);
          },
          [&](int l) { normed[l] = rb(f32(gain[l]) * inv * f32(x[l])); });
    __syncthreads();
    if (valid) {
      const bf16* c = cos + tok * hd;
      const bf16* sn = sin + tok * hd;
      bf16* out = (which ? k : q) + (tok * heads + head) * hd;
      for (int i = thrx; i < hd; i += numx) {
        const int p = i < half ? i + half : i - half;
        out[i] = __float2bfloat16_rn(rb(normed[i] * f32(c[i])) + rb(normed[p] * f32(sn[i])));
      }
      if (which == 0) {      // v rides along with q
        const bf16* vin = qkv + ((tok * 3 + 2) * heads + head) * hd;
        bf16* vout = v + (tok * heads + head) * hd;
        for (int i = thrx; i < hd; i += numx) vout[i] = vin[i];
      }
    }
    __syncthreads();
  }
}

__device__ __forceinline__ float silu(float x) {
  const float sig = x >= 0.f ? 1.f / (1.f + expf(-x)) : 1.f - 1.f / (1.f + expf(x));
  return x * sig;
}

template <bool V8>
__global__ void swiglu_kernel(const bf16* __restrict__ a, const bf16* __restrict__ b, bf16* __restrict__ out,
                              int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if (V8) {
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n / 8; i += stride) {
      const uint4 ua = reinterpret_cast<const uint4*>(a)[i], ub = reinterpret_cast<const uint4*>(b)[i];
      const __nv_bfloat162* pa = reinterpret_cast<const __nv_bfloat162*>(&ua);
      const __nv_bfloat162* pb = reinterpret_cast<const __nv_bfloat162*>(&ub);
      uint4 uo;
      __nv_bfloat162* po = reinterpret_cast<__nv_bfloat162*>(&uo);
#pragma unroll
      for (int j = 0; j < 4; ++j)
        po[j] = __floats2bfloat162_rn(rb(silu(__low2float(pa[j]))) * __low2float(pb[j]),
                                      rb(silu(__high2float(pa[j]))) * __high2float(pb[j]));
      reinterpret_cast<uint4*>(out)[i] = uo;
    }
  } else {
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
      out[i] = __float2bfloat16_rn(rb(silu(f32(a[i]))) * f32(b[i]));
  }
}

struct DeviceFacts {
  int sms = 0, max_threads = 0;
};

// The stream's device, asked of CUDA once per stream (in onnxruntime's warm-up run) and remembered, so that a
// CUDA-graph capture sees kernel launches only, no stream queries.
int stream_device(cudaStream_t stream, std::mutex& mu) {
  static cudaStream_t streams[64];
  static int devices[64], known = 0;
  {
    std::lock_guard<std::mutex> lock(mu);
    for (int i = 0; i < known; ++i)
      if (streams[i] == stream) return devices[i];
  }
  int dev = 0;
  if (cudaStreamGetDevice(stream, &dev) != cudaSuccess) {
    cudaGetLastError();
    cudaGetDevice(&dev);
  }
  std::lock_guard<std::mutex> lock(mu);
  if (known < 64) streams[known] = stream, devices[known++] = dev;
  return dev;
}

DeviceFacts device_facts(cudaStream_t stream) {
  static std::mutex mu;
  static DeviceFacts cache[64];
  const int dev = stream_device(stream, mu);
  std::lock_guard<std::mutex> lock(mu);
  DeviceFacts& f = cache[dev & 63];
  if (f.sms == 0) {
    cudaDeviceGetAttribute(&f.sms, cudaDevAttrMultiProcessorCount, dev);
    cudaDeviceGetAttribute(&f.max_threads, cudaDevAttrMaxThreadsPerBlock, dev);
  }
  return f;
}

int pow2_ceil(int v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

unsigned grid_for(int64_t blocks) { return static_cast<unsigned>(std::min<int64_t>(blocks, 1 << 30)); }

bool aligned(const void* p, unsigned bytes) { return (reinterpret_cast<uintptr_t>(p) % bytes) == 0; }

}  // namespace

void preload() {
  // Load every kernel now (session creation) rather than lazily at its first launch, which could fall inside a
  // CUDA-graph capture. Errors are left to the launches to report.
  cudaFuncAttributes a;
  cudaFuncGetAttributes(&a, norm_modulate_kernel<true, false>);
  cudaFuncGetAttributes(&a, norm_modulate_kernel<false, false>);
  cudaFuncGetAttributes(&a, norm_modulate_kernel<true, true>);
  cudaFuncGetAttributes(&a, norm_modulate_kernel<false, true>);
  cudaFuncGetAttributes(&a, gated_residual_kernel<true, true, false>);
  cudaFuncGetAttributes(&a, gated_residual_kernel<true, false, false>);
  cudaFuncGetAttributes(&a, gated_residual_kernel<false, true, false>);
  cudaFuncGetAttributes(&a, gated_residual_kernel<false, false, false>);
  cudaFuncGetAttributes(&a, gated_residual_kernel<true, true, true>);
  cudaFuncGetAttributes(&a, gated_residual_kernel<false, true, true>);
  cudaFuncGetAttributes(&a, qkv_norm_rope_kernel<true>);
  cudaFuncGetAttributes(&a, qkv_norm_rope_kernel<false>);
  cudaFuncGetAttributes(&a, swiglu_kernel<true>);
  cudaFuncGetAttributes(&a, swiglu_kernel<false>);
  preload_warp();
  cudaGetLastError();
}

int stream_sms(cudaStream_t stream) { return std::max(1, device_facts(stream).sms); }

int ort_norm_threads_y(cudaStream_t stream, int64_t rows, int n) {
  if (const char* forced = std::getenv("IDEOGRAM4_KERNELS_NORM_THREADS_Y")) {   // for bisecting on a new build
    const int t = std::atoi(forced);
    if (t == 1 || t == 2 || t == 4 || t == 8 || t == 16) return t;
  }
  const DeviceFacts d = device_facts(stream);
  int ty = std::min(pow2_ceil((n + 127) / 128), d.max_threads / 64);
  int64_t parallel_rows = static_cast<int64_t>(d.sms) * ((d.max_threads / 2) / 32 / ty);
  while (ty > 2 && parallel_rows < rows) {
    ty /= 2;
    parallel_rows *= 2;
  }
  return ty;
}

cudaError_t norm_modulate(cudaStream_t stream, const bf16* x, const bf16* gain, const bf16* scale, bf16* y,
                          int64_t rows, int n, int64_t rows_per_scale, float eps, const Fp8Out& fq) {
  const int ty = ort_norm_threads_y(stream, rows, n);
  if (rows_per_scale <= 0 || (fq.q != nullptr && fq.scale == nullptr) || (fq.q == nullptr && y == nullptr))
    return cudaErrorInvalidValue;
  if (rows_ty2(stream, ty, nullptr, x, nullptr, nullptr, gain, scale, nullptr, y, rows, n, rows_per_scale,
                          eps, 0.f, fq))
    return cudaGetLastError();
  const dim3 block(32, ty);
  const bool v4 = n % 4 == 0 && aligned(x, 8) && aligned(gain, 8) && aligned(scale, 8) && (fq.q || aligned(y, 8));
#define I4K_NORM(V, Q) \
  norm_modulate_kernel<V, Q><<<grid_for(rows), block, 0, stream>>>(x, gain, scale, y, rows, n, rows_per_scale, eps, fq)
  if (fq.q) {
    if (v4) I4K_NORM(true, true);
    else I4K_NORM(false, true);
  } else if (v4) I4K_NORM(true, false);
  else I4K_NORM(false, false);
#undef I4K_NORM
  return cudaGetLastError();
}

cudaError_t gated_residual(cudaStream_t stream, const bf16* h, const bf16* branch, const bf16* gain,
                           const bf16* gate, const bf16* gain2, const bf16* scale, bf16* h_out, bf16* y,
                           int64_t rows, int n, int64_t rows_per_gate, float eps, float eps2, const Fp8Out& fq) {
  // both norms see the same row count and width, so onnxruntime picks the same layout for them
  const int ty = ort_norm_threads_y(stream, rows, n);
  const bool mod = gain2 != nullptr && scale != nullptr;
  if (rows_per_gate <= 0 || (mod && fq.q == nullptr && y == nullptr) || (fq.q != nullptr && (!mod || !fq.scale)))
    return cudaErrorInvalidValue;
  if (rows_ty2(stream, ty, h, branch, gain, gate, gain2, scale, h_out, y, rows, n, rows_per_gate, eps,
                          eps2, fq))
    return cudaGetLastError();
  const dim3 block(32, ty);
  const bool v4 = n % 4 == 0 && aligned(h, 8) && aligned(branch, 8) && aligned(gain, 8) && aligned(gate, 8) &&
                  aligned(h_out, 8) && (!mod || (aligned(gain2, 8) && aligned(scale, 8) && (fq.q || aligned(y, 8))));
  const unsigned grid = grid_for(rows);
#define I4K_GATED(V, M, Q) \
  gated_residual_kernel<V, M, Q><<<grid, block, 0, stream>>>(h, branch, gain, gate, gain2, scale, h_out, y, rows, n, \
                                                             rows_per_gate, eps, eps2, fq)
  if (fq.q) {
    if (v4) I4K_GATED(true, true, true);
    else I4K_GATED(false, true, true);
  } else if (v4 && mod) I4K_GATED(true, true, false);
  else if (v4) I4K_GATED(true, false, false);
  else if (mod) I4K_GATED(false, true, false);
  else I4K_GATED(false, false, false);
#undef I4K_GATED
  return cudaGetLastError();
}

cudaError_t qkv_norm_rope(cudaStream_t stream, const bf16* qkv, const bf16* gain_q, const bf16* gain_k,
                          const bf16* cos, const bf16* sin, bf16* q, bf16* k, bf16* v, int64_t tokens, int heads,
                          int head_dim, float eps_q, float eps_k) {
  const int ty = ort_norm_threads_y(stream, tokens * heads, head_dim);   // each norm node sees tokens*heads rows
  if (qkv_ty2(stream, ty, qkv, gain_q, gain_k, cos, sin, q, k, v, tokens, heads, head_dim, eps_q, eps_k))
    return cudaGetLastError();
  const int per_block = std::max(1, 8 / ty);
  const dim3 block(32, ty, per_block);
  const size_t shared = static_cast<size_t>(per_block) * (head_dim + 32) * sizeof(float);
  const int64_t rows = tokens * 2 * heads;
  const unsigned grid = grid_for((rows + per_block - 1) / per_block);
  const bool v4 = head_dim % 4 == 0 && aligned(qkv, 8) && aligned(gain_q, 8) && aligned(gain_k, 8);
  if (v4)
    qkv_norm_rope_kernel<true><<<grid, block, shared, stream>>>(qkv, gain_q, gain_k, cos, sin, q, k, v, tokens, heads,
                                                                head_dim, eps_q, eps_k);
  else
    qkv_norm_rope_kernel<false><<<grid, block, shared, stream>>>(qkv, gain_q, gain_k, cos, sin, q, k, v, tokens,
                                                                 heads, head_dim, eps_q, eps_k);
  return cudaGetLastError();
}

cudaError_t swiglu(cudaStream_t stream, const bf16* a, const bf16* b, bf16* out, int64_t n) {
  const int threads = 256;
  const bool v8 = n % 8 == 0 && aligned(a, 16) && aligned(b, 16) && aligned(out, 16);
  const int64_t work = v8 ? n / 8 : n;
  const unsigned grid = grid_for(std::max<int64_t>(1, std::min<int64_t>((work + threads - 1) / threads, 132 * 64)));
  if (v8)
    swiglu_kernel<true><<<grid, threads, 0, stream>>>(a, b, out, n);
  else
    swiglu_kernel<false><<<grid, threads, 0, stream>>>(a, b, out, n);
  return cudaGetLastError();
}

}  // namespace i4k
