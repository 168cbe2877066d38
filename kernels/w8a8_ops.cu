// onnxruntime custom ops (CUDA execution provider) around the W8A8 kernels:
//
//   Fp8QuantizeRows(x: bf16 (..., K)) -> (q: float8e4m3fn (..., K), scale: fp32 (...))
//       attribute clamp (float, default 0 = off): cap on a row's amax (fp8_quant.cuh)
//   Fp8RowScaledMatMul(q: e4m3 (..., K), scale: fp32 (...), w: e4m3 (N, K), w_scale: fp32 (N)) -> y: bf16 (..., N)
//       y = bf16(scale · w_scale · q·wᵀ), fp32 accumulation; attribute fast_accumulation (int, default 0)
//
// AddW8A8Ops(domain) adds both to a custom-op domain, so that another op library can carry them under its own
// domain; w8a8_register.cu is the entry point of the standalone library. Errors are returned as onnxruntime
// statuses with one line naming the op, the node and the reason.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>

#include "w8a8.h"

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace ideogram4 {
namespace {

OrtStatus* Fail(const std::string& what) { return Ort::GetApi().CreateStatus(ORT_FAIL, what.c_str()); }

template <typename T>
T Attribute(const OrtKernelInfo* info, const char* name, T fallback) {
  T v = fallback;
  OrtStatus* s = nullptr;
  if constexpr (std::is_same_v<T, float>)
    s = Ort::GetApi().KernelInfoGetAttribute_float(info, name, &v);
  else
    s = Ort::GetApi().KernelInfoGetAttribute_int64(info, name, &v);
  if (s) {
    Ort::GetApi().ReleaseStatus(s);
    v = fallback;
  }
  return v;
}

std::string NodeName(const OrtKernelInfo* info) {
  try {
    return Ort::ConstKernelInfo(info).GetNodeName();
  } catch (...) {
    return "?";
  }
}

// The library is usable on this device: a kernel image for its compute capability and, for the GEMM, cuBLASLt.
std::string DeviceProblem(bool needs_cublaslt) {
  if (cudaError_t e = QuantizeKernelAvailable(); e != cudaSuccess) {
    cudaGetLastError();
    return std::string("no kernel image for compute capability ") + ComputeCapability() + " (" +
           cudaGetErrorString(e) + ")";
  }
  if (needs_cublaslt) {
    std::string p = CublasLtProblem();
    if (!p.empty()) return p;
    int device = 0, major = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    if (major < 9) return "FP8 GEMMs with per-row scales need compute capability 9.0 or newer, this GPU has " + ComputeCapability();
  }
  return {};
}

struct QuantizeKernel {
  float clamp;
  std::string node;
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Ort::KernelContext ctx(context);
      auto x = ctx.GetInput(0);
      std::vector<int64_t> shape = x.GetTensorTypeAndShapeInfo().GetShape();
      if (shape.empty()) return Fail("Fp8QuantizeRows " + node + ": x must have at least one axis");
      const int64_t cols = shape.back();
      int64_t rows = 1;
      for (size_t i = 0; i + 1 < shape.size(); ++i) rows *= shape[i];
      auto q = ctx.GetOutput(0, shape);
      std::vector<int64_t> scale_shape(shape.begin(), shape.end() - 1);
      auto scale = ctx.GetOutput(1, scale_shape);
      auto stream = static_cast<cudaStream_t>(ctx.GetGPUComputeStream());
      cudaError_t e = LaunchQuantizeRows(x.GetTensorRawData(), q.GetTensorMutableRawData(),
                                         scale.GetTensorMutableData<float>(), rows, cols, clamp, stream);
      if (e != cudaSuccess)
        return Fail("Fp8QuantizeRows " + node + ": launch failed on compute capability " + ComputeCapability() + ": " +
                    cudaGetErrorString(e));
      return nullptr;
    } catch (const std::exception& ex) {
      return Fail("Fp8QuantizeRows " + node + ": " + ex.what());
    }
  }
};

struct MatMulKernel {
  std::unique_ptr<Fp8RowScaledGemm> gemm;
  std::string node;
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Ort::KernelContext ctx(context);
      auto q = ctx.GetInput(0), scale = ctx.GetInput(1), w = ctx.GetInput(2), w_scale = ctx.GetInput(3);
      std::vector<int64_t> xs = q.GetTensorTypeAndShapeInfo().GetShape();
      std::vector<int64_t> ws = w.GetTensorTypeAndShapeInfo().GetShape();
      if (xs.empty() || ws.size() != 2 || ws[1] != xs.back())
        return Fail("Fp8RowScaledMatMul " + node + ": q (..., K) and w (N, K) do not match");
      const int64_t K = xs.back(), N = ws[0];
      int64_t M = 1;
      for (size_t i = 0; i + 1 < xs.size(); ++i) M *= xs[i];
      if (scale.GetTensorTypeAndShapeInfo().GetElementCount() != static_cast<size_t>(M) ||
          w_scale.GetTensorTypeAndShapeInfo().GetElementCount() != static_cast<size_t>(N))
        return Fail("Fp8RowScaledMatMul " + node + ": scale needs one value per row of q, w_scale one per row of w");
      std::vector<int64_t> ys(xs.begin(), xs.end() - 1);
      ys.push_back(N);
      auto y = ctx.GetOutput(0, ys);
      gemm->Run(q.GetTensorRawData(), scale.GetTensorData<float>(), w.GetTensorRawData(), w_scale.GetTensorData<float>(),
                y.GetTensorMutableRawData(), M, N, K, static_cast<cudaStream_t>(ctx.GetGPUComputeStream()));
      return nullptr;
    } catch (const std::exception& ex) {
      return Fail("Fp8RowScaledMatMul " + node + ": " + ex.what());
    }
  }
};

constexpr ONNXTensorElementDataType kBf16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16;
constexpr ONNXTensorElementDataType kF32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
constexpr ONNXTensorElementDataType kE4M3 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT8E4M3FN;

struct QuantizeOp : Ort::CustomOpBase<QuantizeOp, QuantizeKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    std::string node = NodeName(info);
    std::string problem = DeviceProblem(false);
    if (!problem.empty()) return Fail("Fp8QuantizeRows " + node + ": " + problem);
    *kernel = new QuantizeKernel{Attribute<float>(info, "clamp", 0.f), node};
    return nullptr;
  }
  const char* GetName() const { return "Fp8QuantizeRows"; }
  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }
  size_t GetInputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetInputType(size_t) const { return kBf16; }
  size_t GetOutputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetOutputType(size_t i) const { return i == 0 ? kE4M3 : kF32; }
};

struct MatMulOp : Ort::CustomOpBase<MatMulOp, MatMulKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    std::string node = NodeName(info);
    std::string problem = DeviceProblem(true);
    if (!problem.empty()) return Fail("Fp8RowScaledMatMul " + node + ": " + problem);
    auto k = new MatMulKernel();
    k->gemm = std::make_unique<Fp8RowScaledGemm>(Attribute<int64_t>(info, "fast_accumulation", 0) != 0);
    k->node = node;
    *kernel = k;
    return nullptr;
  }
  const char* GetName() const { return "Fp8RowScaledMatMul"; }
  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }
  size_t GetInputTypeCount() const { return 4; }
  ONNXTensorElementDataType GetInputType(size_t i) const { return i == 0 || i == 2 ? kE4M3 : kF32; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return kBf16; }
};

}  // namespace

void AddW8A8Ops(Ort::CustomOpDomain& domain) {
  static QuantizeOp quantize;
  static MatMulOp matmul;
  domain.Add(&quantize);
  domain.Add(&matmul);
}

}  // namespace ideogram4
