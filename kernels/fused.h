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

// onnxruntime's RMSNormalization (cuApplyLayerNorm) reduces a row with 32 x threads_y threads; the sums, and so
// the bits, depend on that layout. This is its choice for `rows` rows of `n` elements on the stream's GPU.
int ort_norm_threads_y(cudaStream_t stream, int64_t rows, int n);

// y = bf16(bf16(RMSNorm(x) * gain) * bf16(1 + scale)); x (rows, n), gain (n), scale (rows / rows_per_scale, n).
cudaError_t norm_modulate(cudaStream_t stream, const bf16* x, const bf16* gain, const bf16* scale, bf16* y,
                          int64_t rows, int n, int64_t rows_per_scale, float eps);

// h_out = bf16(h + bf16(bf16(tanh(gate)) * bf16(RMSNorm(branch) * gain))); gate (rows / rows_per_gate, n).
// With gain2/scale/y non-null also y = norm_modulate(h_out; gain2, scale, eps2) (the next modulation).
cudaError_t gated_residual(cudaStream_t stream, const bf16* h, const bf16* branch, const bf16* gain,
                           const bf16* gate, const bf16* gain2, const bf16* scale, bf16* h_out, bf16* y,
                           int64_t rows, int n, int64_t rows_per_gate, float eps, float eps2);

// qkv (tokens, 3, heads, head_dim) -> q, k, v (tokens, heads * head_dim): q and k RMS-normalized per head
// (gain_q, gain_k), then rotated: out = bf16(bf16(x * cos) + bf16(swap_halves(x) * sin)) with `sin` already
// signed (-sin on the first half), cos/sin (tokens, head_dim); v copied.
cudaError_t qkv_norm_rope(cudaStream_t stream, const bf16* qkv, const bf16* gain_q, const bf16* gain_k,
                          const bf16* cos, const bf16* sin, bf16* q, bf16* k, bf16* v, int64_t tokens, int heads,
                          int head_dim, float eps_q, float eps_k);

// out = bf16(bf16(silu(a)) * b), SiLU in fp32 as onnxruntime's QuickGelu/Sigmoid compute it.
cudaError_t swiglu(cudaStream_t stream, const bf16* a, const bf16* b, bf16* out, int64_t n);

}  // namespace i4k
