// Host interface of the W8A8 kernels (FP8 activations × FP8 weights → bf16), shared by the onnxruntime op
// wrappers (w8a8_ops.cu) and usable from any other op library that links these sources.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

namespace ideogram4 {

// bf16 x (rows, cols) -> e4m3 q (rows, cols) and fp32 scale (rows): rules in fp8_quant.cuh. Asynchronous on `stream`.
cudaError_t LaunchQuantizeRows(const void* x, void* q, float* scale, int64_t rows, int64_t cols, float clamp,
                               cudaStream_t stream);
// cudaSuccess when this library holds a kernel image for the current device.
cudaError_t QuantizeKernelAvailable();

// y (M, N) bf16 = (x_scale[m] · w_scale[n]) · Σ_k xq[m, k] · wq[n, k], fp32 accumulation, one bf16 rounding;
// xq (M, K) and wq (N, K) e4m3, both K-major (the checkpoint's (out, in) weight as stored). cuBLASLt with
// outer-vector (per-row) fp32 scales; its algorithm is chosen once per shape and cached. Thread-safe.
class Fp8RowScaledGemm {
 public:
  explicit Fp8RowScaledGemm(bool fast_accumulation) : fast_(fast_accumulation) {}
  ~Fp8RowScaledGemm();
  Fp8RowScaledGemm(const Fp8RowScaledGemm&) = delete;
  Fp8RowScaledGemm& operator=(const Fp8RowScaledGemm&) = delete;
  // Throws std::runtime_error with a one-line reason (cuBLASLt missing or too old, no algorithm, launch error).
  void Run(const void* xq, const float* x_scale, const void* wq, const float* w_scale, void* y, int64_t M, int64_t N,
           int64_t K, cudaStream_t stream);

 private:
  struct Plan;
  bool fast_;
  void* handle_ = nullptr;
  std::mutex mu_;
  std::map<std::tuple<int64_t, int64_t, int64_t>, Plan*> plans_;
};

// Empty when cuBLASLt (libcublasLt.so.13, >= 12.9) can be opened, else the reason. Cached after the first call.
std::string CublasLtProblem();
// "9.0" etc. for the current device, or "unknown".
std::string ComputeCapability();

constexpr int64_t kGemmAlignment = 16;   // K and N must be multiples of this (cuBLASLt's FP8 layout rules)

}  // namespace ideogram4
