// Bandwidth-oriented forms of the fused kernels: one warp per normalized row, 16-byte accesses, the row held in
// registers as packed bf16, the row-invariant vectors (gains, bf16(tanh(gate)), bf16(1 + scale)) computed once per
// block into shared memory; the quantized SwiGLU one 512-thread block per row with the row in registers (the
// bf16 SwiGLU stays fused.cu's kernel: a form with four loads in flight per thread measured slower).
//
// Same bits as fused.cu: onnxruntime's RMSNormalization at threads_y 2 (every DiT norm: 4170 rows of 4608, and
// the 18 x 256 head norms) reduces a row with 64 threads, thread t summing x^2 over the groups of four
// l = 4t + 256g in order, then a shuffle-down tree per warp (strides 16..1) and buf[0] + buf[1]. Here lane p of
// one warp plays threads 2p and 2p+1: its 16-byte chunk 8p + 256g holds exactly their groups g, so it keeps their
// two partial sums (e, o) in the same order; the virtual strides 16, 8, 4, 2 are lane strides 8, 4, 2, 1 inside
// each half warp (the halves are the two virtual warps), the virtual stride 1 is e + o, and the halves meet as
// r(lane 0) + r(lane 16). The squares of bf16 values are exact in fp32, the adds are the same adds in the same
// association, so the sums match bit for bit; everything after them repeats fused.cu's arithmetic.
#include "fused.h"
#include "fused_common.cuh"

#include <algorithm>

namespace i4k {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kRowWarps = 12;   // rows in flight per block (one block per SM at 18 chunks: <= 168 registers)

__device__ __forceinline__ float lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  const __nv_bfloat162 t = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&t);
}
__device__ __forceinline__ void unpack8(const uint4& u, float v[8]) {
  v[0] = lo(u.x), v[1] = hi(u.x), v[2] = lo(u.y), v[3] = hi(u.y);
  v[4] = lo(u.z), v[5] = hi(u.z), v[6] = lo(u.w), v[7] = hi(u.w);
}
__device__ __forceinline__ uint4 pack8(const float v[8]) {
  return make_uint4(pack2(v[0], v[1]), pack2(v[2], v[3]), pack2(v[4], v[5]), pack2(v[6], v[7]));
}
__device__ __forceinline__ uint4 ld16(const bf16* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ void st16(bf16* p, const uint4& u) { *reinterpret_cast<uint4*>(p) = u; }

// 8 e4m3 codes of v * inv (fp8_quant.cuh's rounding) in one 8-byte store; p 8-byte aligned.
__device__ __forceinline__ void store_e4m3x8(uint8_t* p, const float v[8], float inv) {
  uint2 u = make_uint2(0u, 0u);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    u.x |= static_cast<uint32_t>(ideogram4::e4m3_quantize(v[k], inv)) << (8 * k);
    u.y |= static_cast<uint32_t>(ideogram4::e4m3_quantize(v[k + 4], inv)) << (8 * k);
  }
  *reinterpret_cast<uint2*>(p) = u;
}

// e, o: this lane's partial sums for onnxruntime's threads 2p and 2p+1 (threads_y 2); the row's sum, every lane.
__device__ __forceinline__ float ty2_row_sum(float e, float o) {
#pragma unroll
  for (int s = 8; s > 0; s >>= 1) {
    e = e + __shfl_down_sync(kFull, e, s, 16);
    o = o + __shfl_down_sync(kFull, o, s, 16);
  }
  const float r = e + o;
  return __shfl_sync(kFull, r, 0) + __shfl_sync(kFull, r, 16);
}

__device__ __forceinline__ void sumsq8(const float v[8], float& e, float& o) {
#pragma unroll
  for (int k = 0; k < 4; ++k) e = __fmaf_rn(v[k], v[k], e);
#pragma unroll
  for (int k = 4; k < 8; ++k) o = __fmaf_rn(v[k], v[k], o);
}

// RES: h' = bf16(h + bf16(bf16(tanh(gate)) * bf16((gain * inv) * x))) -> h_out.
// MOD: y = bf16(bf16((gain2 * inv') * src) * bf16(1 + scale)), src = h' (RES) or x, inv' its RMSNorm; bf16 y or
// (QUANT) e4m3 codes + row scale. Grid (blocks, batches); rows of a batch share gate and scale.
template <int G, bool RES, bool MOD, bool QUANT>
__global__ void __launch_bounds__(32 * kRowWarps, 1)
    rows_ty2_kernel(const bf16* __restrict__ h, const bf16* __restrict__ x, const bf16* __restrict__ gain,
                    const bf16* __restrict__ gate, const bf16* __restrict__ gain2, const bf16* __restrict__ scale,
                    bf16* __restrict__ h_out, bf16* __restrict__ y, int per_batch, int n, float eps, float eps2,
                    Fp8Out fq) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* s_gain = reinterpret_cast<bf16*>(smem_raw);   // RES: gain, bf16(tanh(gate))
  bf16* s_tg = s_gain + n;
  bf16* s_gain2 = s_gain + (RES ? 2 * n : 0);          // MOD: gain2, bf16(1 + scale)
  bf16* s_sc = s_gain2 + n;
  const int64_t batch = blockIdx.y;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    if (RES) s_gain[i] = gain[i], s_tg[i] = __float2bfloat16_rn(tanhf(f32(gate[batch * n + i])));
    if (MOD) s_gain2[i] = gain2[i], s_sc[i] = __float2bfloat16_rn(1.f + f32(scale[batch * n + i]));
  }
  __syncthreads();
  const int lane = threadIdx.x & 31;
  for (int r = blockIdx.x * kRowWarps + (threadIdx.x >> 5); r < per_batch; r += gridDim.x * kRowWarps) {
    const int64_t row = batch * per_batch + r;
    uint4 xb[G], hb[G];
#pragma unroll
    for (int c = 0; c < G; ++c) {
      const int l = 8 * lane + 256 * c;
      if (l < n) {
        xb[c] = ld16(x + row * n + l);
        if (RES) hb[c] = ld16(h + row * n + l);
      }
    }
    float e = 0.f, o = 0.f;
#pragma unroll
    for (int c = 0; c < G; ++c)
      if (8 * lane + 256 * c < n) {
        float v[8];
        unpack8(xb[c], v);
        sumsq8(v, e, o);
      }
    float inv = rsqrtf(ty2_row_sum(e, o) / static_cast<float>(n) + eps);
    if (RES) {
      e = o = 0.f;
#pragma unroll
      for (int c = 0; c < G; ++c) {
        const int l = 8 * lane + 256 * c;
        if (l < n) {
          float b[8], hv[8], g[8], t[8];
          unpack8(xb[c], b), unpack8(hb[c], hv), unpack8(ld16(s_gain + l), g), unpack8(ld16(s_tg + l), t);
#pragma unroll
          for (int k = 0; k < 8; ++k) hv[k] = rb(hv[k] + rb(t[k] * rb(g[k] * inv * b[k])));
          sumsq8(hv, e, o);
          hb[c] = pack8(hv);   // exact: the values are bf16
          st16(h_out + row * n + l, hb[c]);
        }
      }
      if (!MOD) continue;
      inv = rsqrtf(ty2_row_sum(e, o) / static_cast<float>(n) + eps2);
    }
    float amax = 0.f;
#pragma unroll
    for (int c = 0; c < G; ++c) {
      const int l = 8 * lane + 256 * c;
      if (l < n) {
        float v[8], g[8], m[8];
        unpack8(RES ? hb[c] : xb[c], v), unpack8(ld16(s_gain2 + l), g), unpack8(ld16(s_sc + l), m);
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] = rb(rb(g[k] * inv * v[k]) * m[k]);
        if (QUANT) {
#pragma unroll
          for (int k = 0; k < 8; ++k) amax = fmaxf(amax, fabsf(v[k]));
          xb[c] = pack8(v);
        } else {
          st16(y + row * n + l, pack8(v));
        }
      }
    }
    if (QUANT) {
#pragma unroll
      for (int s = 16; s > 0; s >>= 1) amax = fmaxf(amax, __shfl_xor_sync(kFull, amax, s));
      const ideogram4::RowScale rs = ideogram4::e4m3_row_scale(amax, fq.clamp);
#pragma unroll
      for (int c = 0; c < G; ++c) {
        const int l = 8 * lane + 256 * c;
        if (l < n) {
          float v[8];
          unpack8(xb[c], v);
          store_e4m3x8(fq.q + row * n + l, v, rs.inv);
        }
      }
      if (lane == 0) fq.scale[row] = rs.scale;
    }
  }
}

// One warp per (token, head): q and k RMS-normalized (threads_y 2 layout) and rotated, v copied. Lane p holds the
// head's elements 8p..8p+7; the rotation partner of element i (i +- head_dim / 2) sits in lane p +- head_dim / 16.
__global__ void __launch_bounds__(256)
    qkv_ty2_kernel(const bf16* __restrict__ qkv, const bf16* __restrict__ gain_q, const bf16* __restrict__ gain_k,
                   const bf16* __restrict__ cos, const bf16* __restrict__ sin, bf16* __restrict__ q,
                   bf16* __restrict__ k, bf16* __restrict__ v, int64_t units, int heads, int hd, float eps_q,
                   float eps_k) {
  const int64_t u = static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x >> 5);
  if (u >= units) return;   // whole warps
  const int lane = threadIdx.x & 31, l = 8 * lane, quarter = hd / 16;
  const bool act = l < hd;
  const int src = !act ? lane : lane < quarter ? lane + quarter : lane - quarter;
  const int64_t tok = u / heads, head = u % heads;
  const bf16* in = qkv + (tok * 3 * heads + head) * hd + l;
  const int64_t out = u * hd + l;
  uint4 xq = make_uint4(0, 0, 0, 0), xk = xq, xv = xq, c = xq, s = xq, gq = xq, gk = xq;
  if (act) {
    xq = ld16(in), xk = ld16(in + heads * hd), xv = ld16(in + 2 * heads * hd);
    c = ld16(cos + tok * hd + l), s = ld16(sin + tok * hd + l), gq = ld16(gain_q + l), gk = ld16(gain_k + l);
    st16(v + out, xv);
  }
  float cf[8], sf[8];
  unpack8(c, cf), unpack8(s, sf);
#pragma unroll
  for (int which = 0; which < 2; ++which) {
    float xf[8], gf[8], nf[8], pf[8];
    unpack8(which ? xk : xq, xf), unpack8(which ? gk : gq, gf);
    float e = 0.f, o = 0.f;
    sumsq8(xf, e, o);
    const float inv = rsqrtf(ty2_row_sum(e, o) / static_cast<float>(hd) + (which ? eps_k : eps_q));
#pragma unroll
    for (int j = 0; j < 8; ++j) nf[j] = rb(gf[j] * inv * xf[j]);
    const uint4 pn = pack8(nf);   // exact
    const uint4 pp = make_uint4(__shfl_sync(kFull, pn.x, src), __shfl_sync(kFull, pn.y, src),
                                __shfl_sync(kFull, pn.z, src), __shfl_sync(kFull, pn.w, src));
    unpack8(pp, pf);
#pragma unroll
    for (int j = 0; j < 8; ++j) nf[j] = rb(nf[j] * cf[j]) + rb(pf[j] * sf[j]);
    if (act) st16((which ? k : q) + out, pack8(nf));
  }
}

__device__ __forceinline__ float silu(float x) {
  const float sig = x >= 0.f ? 1.f / (1.f + expf(-x)) : 1.f - 1.f / (1.f + expf(x));
  return x * sig;
}

// bf16(bf16(silu(a)) * b) of 8 values
__device__ __forceinline__ void swiglu8(const uint4& ua, const uint4& ub, float o[8]) {
  float a[8], b[8];
  unpack8(ua, a), unpack8(ub, b);
#pragma unroll
  for (int j = 0; j < 8; ++j) o[j] = rb(rb(silu(a[j])) * b[j]);
}

// SwiGLU values of one row quantized per row, block (32, 16): C > 0: C 16-byte vectors per thread held in
// registers; C = 0: any shape, two passes that recompute the values element by element.
template <int C>
__global__ void __launch_bounds__(512) swiglu_fp8_rows_kernel(const bf16* __restrict__ a, const bf16* __restrict__ b,
                                                              int64_t rows, int n, Fp8Out fq) {
  __shared__ float buf[32];
  const int t = threadIdx.x + threadIdx.y * blockDim.x, threads = blockDim.x * blockDim.y;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const bf16* ar = a + row * n;
    const bf16* br = b + row * n;
    uint8_t* qr = fq.q + row * n;
    float amax = 0.f;
    if constexpr (C > 0) {
      uint4 ua[C], ub[C];
#pragma unroll
      for (int j = 0; j < C; ++j)
        if (t + j * threads < n / 8) ua[j] = ld16(ar + 8 * (t + j * threads)), ub[j] = ld16(br + 8 * (t + j * threads));
#pragma unroll
      for (int j = 0; j < C; ++j)
        if (t + j * threads < n / 8) {
          float o[8];
          swiglu8(ua[j], ub[j], o);
#pragma unroll
          for (int e = 0; e < 8; ++e) amax = fmaxf(amax, fabsf(o[e]));
          ua[j] = pack8(o);   // exact
        }
      const ideogram4::RowScale rs = ideogram4::e4m3_row_scale(block_amax(amax, buf), fq.clamp);
#pragma unroll
      for (int j = 0; j < C; ++j)
        if (t + j * threads < n / 8) {
          float o[8];
          unpack8(ua[j], o);
          store_e4m3x8(qr + 8 * (t + j * threads), o, rs.inv);
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

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) % 16) == 0; }

template <int G>
void launch_rows(cudaStream_t stream, bool res, bool mod, bool quant, dim3 grid, size_t smem, const bf16* h,
                 const bf16* x, const bf16* gain, const bf16* gate, const bf16* gain2, const bf16* scale, bf16* h_out,
                 bf16* y, int per, int n, float eps, float eps2, const Fp8Out& fq) {
  const dim3 block(32 * kRowWarps);
#define I4K_ROWS(R, M, Q) \
  rows_ty2_kernel<G, R, M, Q><<<grid, block, smem, stream>>>(h, x, gain, gate, gain2, scale, h_out, y, per, n, eps, eps2, fq)
  if (!res) quant ? I4K_ROWS(false, true, true) : I4K_ROWS(false, true, false);
  else if (!mod) I4K_ROWS(true, false, false);
  else quant ? I4K_ROWS(true, true, true) : I4K_ROWS(true, true, false);
#undef I4K_ROWS
}

}  // namespace

bool rows_ty2(cudaStream_t stream, int ty, const bf16* h, const bf16* x, const bf16* gain, const bf16* gate,
              const bf16* gain2, const bf16* scale, bf16* h_out, bf16* y, int64_t rows, int n, int64_t per,
              float eps, float eps2, const Fp8Out& fq) {
  const bool res = h != nullptr, mod = gain2 != nullptr && scale != nullptr, quant = fq.q != nullptr;
  const int chunks = (n + 255) / 256;
  if (ty != 2 || n % 8 || chunks > 18 || per <= 0 || rows % per || per > (1 << 30) || (!res && !mod)) return false;
  if (!aligned16(x) || (res && (!aligned16(h) || !aligned16(h_out))) ||
      (mod && (quant ? reinterpret_cast<uintptr_t>(fq.q) % 8 != 0 : !aligned16(y))))
    return false;
  const int64_t batches = rows / per;
  if (batches > 65535) return false;
  const int sms = stream_sms(stream);
  const int64_t want = (per + kRowWarps - 1) / kRowWarps;
  const dim3 grid(static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(want, (2 * sms + batches - 1) / batches))),
                  static_cast<unsigned>(batches));
  const size_t smem = static_cast<size_t>((res ? 2 : 0) + (mod ? 2 : 0)) * n * sizeof(bf16);
  if (chunks <= 4)
    launch_rows<4>(stream, res, mod, quant, grid, smem, h, x, gain, gate, gain2, scale, h_out, y, int(per), n, eps,
                   eps2, fq);
  else
    launch_rows<18>(stream, res, mod, quant, grid, smem, h, x, gain, gate, gain2, scale, h_out, y, int(per), n, eps,
                    eps2, fq);
  return true;
}

bool qkv_ty2(cudaStream_t stream, int ty, const bf16* qkv, const bf16* gain_q, const bf16* gain_k, const bf16* cos,
             const bf16* sin, bf16* q, bf16* k, bf16* v, int64_t tokens, int heads, int hd, float eps_q, float eps_k) {
  if (ty != 2 || hd % 16 || hd > 256 || !aligned16(qkv) || !aligned16(gain_q) || !aligned16(gain_k) ||
      !aligned16(cos) || !aligned16(sin) || !aligned16(q) || !aligned16(k) || !aligned16(v))
    return false;
  const int64_t units = tokens * heads;
  qkv_ty2_kernel<<<static_cast<unsigned>((units + 7) / 8), 256, 0, stream>>>(qkv, gain_q, gain_k, cos, sin, q, k, v,
                                                                             units, heads, hd, eps_q, eps_k);
  return true;
}

cudaError_t swiglu_fp8(cudaStream_t stream, const bf16* a, const bf16* b, int64_t rows, int n, const Fp8Out& fq) {
  if (fq.q == nullptr || fq.scale == nullptr || n <= 0) return cudaErrorInvalidValue;
  const dim3 block(32, 16);
  const int vectors = (n / 8 + 511) / 512;
  const bool vec = n % 8 == 0 && aligned16(a) && aligned16(b) && reinterpret_cast<uintptr_t>(fq.q) % 8 == 0;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(rows, 1 << 30));
  if (vec && vectors <= 1) swiglu_fp8_rows_kernel<1><<<grid, block, 0, stream>>>(a, b, rows, n, fq);
  else if (vec && vectors <= 2) swiglu_fp8_rows_kernel<2><<<grid, block, 0, stream>>>(a, b, rows, n, fq);
  else if (vec && vectors <= 3) swiglu_fp8_rows_kernel<3><<<grid, block, 0, stream>>>(a, b, rows, n, fq);
  else if (vec && vectors <= 6) swiglu_fp8_rows_kernel<6><<<grid, block, 0, stream>>>(a, b, rows, n, fq);
  else swiglu_fp8_rows_kernel<0><<<grid, block, 0, stream>>>(a, b, rows, n, fq);
  return cudaGetLastError();
}

void preload_warp() {
  cudaFuncAttributes f;
#define I4K_PRELOAD(G)                                              \
  cudaFuncGetAttributes(&f, rows_ty2_kernel<G, false, true, false>); \
  cudaFuncGetAttributes(&f, rows_ty2_kernel<G, false, true, true>);  \
  cudaFuncGetAttributes(&f, rows_ty2_kernel<G, true, false, false>); \
  cudaFuncGetAttributes(&f, rows_ty2_kernel<G, true, true, false>);  \
  cudaFuncGetAttributes(&f, rows_ty2_kernel<G, true, true, true>);
  I4K_PRELOAD(4) I4K_PRELOAD(18)
#undef I4K_PRELOAD
  cudaFuncGetAttributes(&f, qkv_ty2_kernel);
  cudaFuncGetAttributes(&f, swiglu_fp8_rows_kernel<0>);
  cudaFuncGetAttributes(&f, swiglu_fp8_rows_kernel<1>);
  cudaFuncGetAttributes(&f, swiglu_fp8_rows_kernel<2>);
  cudaFuncGetAttributes(&f, swiglu_fp8_rows_kernel<3>);
  cudaFuncGetAttributes(&f, swiglu_fp8_rows_kernel<6>);
  cudaGetLastError();
}

}  // namespace i4k
