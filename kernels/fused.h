// Host entry points of the fused DiT kernels (fused.cu), called by the onnxruntime custom ops (ort_ops.cu).
// Every tensor is bf16, contiguous, on the device of `stream`. Each launcher returns cudaSuccess or the launch
// error; shapes are checked by the caller.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace i4k {

typedef __nv_bfloat16 bf16;

// Loads every kernel into the current device's context (called when onnxruntime creates a kernel).
void preload();

// Where a kernel writes its modulated output: bf16 `y`, or (q != nullptr) per-row e4m3 codes `q` and fp32 row
// scales `scale` quantized exactly as the standalone Fp8QuantizeRows does (fp8_quant.cuh) from the same bf16 values.
struct Fp8Out {
  uint8_t* q = nullptr;
  float* scale = nullptr;
  float clamp = 0.f;
};

// onnxruntime's RMSNormalization (cuApplyLayerNorm) reduces a row with 32 x threads_y threads; the sums, and so
// the bits, depend on that layout. This is its choice for `rows` rows of `n` elements on the stream's GPU.
int ort_norm_threads_y(cudaStream_t stream, int64_t rows, int n);

// The multiprocessor count of the stream's GPU (cached per stream: no CUDA query during a graph capture).
int stream_sms(cudaStream_t stream);

// y = bf16(bf16(RMSNorm(x) * gain) * bf16(1 + scale)); x (rows, n), gain (n), scale (rows / rows_per_scale, n).
// With q.q set, y is not written (may be null) and q/scale receive the quantized y.
cudaError_t norm_modulate(cudaStream_t stream, const bf16* x, const bf16* gain, const bf16* scale, bf16* y,
                          int64_t rows, int n, int64_t rows_per_scale, float eps, const Fp8Out& q = Fp8Out());

// h_out = bf16(h + bf16(bf16(tanh(gate)) * bf16(RMSNorm(branch) * gain))); gate (rows / rows_per_gate, n).
// With gain2/scale non-null also y = norm_modulate(h_out; gain2, scale, eps2) (the next modulation), as bf16 y
// or quantized into q.
cudaError_t gated_residual(cudaStream_t stream, const bf16* h, const bf16* branch, const bf16* gain,
                           const bf16* gate, const bf16* gain2, const bf16* scale, bf16* h_out, bf16* y,
                           int64_t rows, int n, int64_t rows_per_gate, float eps, float eps2,
                           const Fp8Out& q = Fp8Out());

// qkv (tokens, 3, heads, head_dim) -> q, k, v (tokens, heads * head_dim): q and k RMS-normalized per head
// (gain_q, gain_k), then rotated: out = bf16(bf16(x * cos) + bf16(swap_halves(x) * sin)) with `sin` already
// signed (-sin on the first half), cos/sin (tokens, head_dim); v copied.
cudaError_t qkv_norm_rope(cudaStream_t stream, const bf16* qkv, const bf16* gain_q, const bf16* gain_k,
                          const bf16* cos, const bf16* sin, bf16* q, bf16* k, bf16* v, int64_t tokens, int heads,
                          int head_dim, float eps_q, float eps_k);

// out = bf16(bf16(silu(a)) * b), SiLU in fp32 as onnxruntime's QuickGelu/Sigmoid compute it.
cudaError_t swiglu(cudaStream_t stream, const bf16* a, const bf16* b, bf16* out, int64_t n);

// The same SwiGLU values quantized per row of n (q.q and q.scale required): (rows, n) -> e4m3 + (rows) scales.
cudaError_t swiglu_fp8(cudaStream_t stream, const bf16* a, const bf16* b, int64_t rows, int n, const Fp8Out& q);

// The warp-per-row kernels (fused_warp.cu): onnxruntime's threads_y-2 reduction with one warp per row and
// 16-byte accesses. Each returns false, launching nothing, when the layout (ty), shape or alignment is outside what
// it handles; the caller then runs fused.cu's kernel. rows_ty2: NormModulate (h null), GatedResidual (gain2/scale
// null) and GatedResidualModulate, per = rows per gate/scale row.
bool rows_ty2(cudaStream_t stream, int ty, const bf16* h, const bf16* x, const bf16* gain, const bf16* gate,
              const bf16* gain2, const bf16* scale, bf16* h_out, bf16* y, int64_t rows, int n, int64_t per,
              float eps, float eps2, const Fp8Out& q);
bool qkv_ty2(cudaStream_t stream, int ty, const bf16* qkv, const bf16* gain_q, const bf16* gain_k, const bf16* cos,
             const bf16* sin, bf16* q, bf16* k, bf16* v, int64_t tokens, int heads, int hd, float eps_q, float eps_k);
void preload_warp();

}  // namespace i4k
