// onnxruntime custom ops (domain "ideogram4", CUDA provider) around the fused kernels of fused.cu.
//
// Built against onnxruntime's C++ API headers (API 21, Debian's libonnxruntime-dev); the C API is versioned and
// backward compatible, so the library loads into newer onnxruntime builds (1.31 measured). Each kernel runs on
// onnxruntime's compute stream. Bad shapes give an error status naming the op, the input and what was expected.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>

#include <string>
#include <vector>

#include "fused.h"

namespace ideogram4 {
void AddW8A8Ops(Ort::CustomOpDomain& domain);   // w8a8_ops.cu: Fp8QuantizeRows, Fp8RowScaledMatMul
}

#ifndef I4K_ARCHES
#define I4K_ARCHES "unknown"
#endif

namespace {

using i4k::bf16;
constexpr ONNXTensorElementDataType kBF16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16;
constexpr ONNXTensorElementDataType kE4M3 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT8E4M3FN;
constexpr ONNXTensorElementDataType kF32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
const char* const kDomain = "ideogram4";

std::string dims(const std::vector<int64_t>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + ")";
}

struct In {
  const bf16* data;
  std::vector<int64_t> shape;
  int64_t size;
};

In input(Ort::KernelContext& ctx, size_t i) {
  Ort::ConstValue v = ctx.GetInput(i);
  auto info = v.GetTensorTypeAndShapeInfo();
  return {static_cast<const bf16*>(v.GetTensorRawData()), info.GetShape(), static_cast<int64_t>(info.GetElementCount())};
}

bf16* output(Ort::KernelContext& ctx, size_t i, const std::vector<int64_t>& shape) {
  return static_cast<bf16*>(ctx.GetOutput(i, shape).GetTensorMutableRawData());
}

struct Failure {
  std::string what;
};

void require(bool ok, const std::string& what) {
  if (!ok) throw Failure{what};
}

void launched(cudaError_t e, const char* op) {
  if (e == cudaErrorStreamCaptureInvalidated)   // the capture was broken before this op: the cause is upstream
    throw Failure{std::string("CUDA graph capture was already invalidated when ") + op +
                  " launched (an earlier node made a call not allowed during capture; docs/tuning.md §21)"};
  if (e != cudaSuccess)
    throw Failure{std::string("CUDA launch failed: ") + cudaGetErrorString(e) + " (" + op +
                  "; this library has machine code for sm " I4K_ARCHES ")"};
}

// rows of x that share one row of a (B, 1, n) or (n) broadcast operand (the adaLN scale or gate)
int64_t rows_per_broadcast(const In& x, const In& b, int64_t n, const char* name) {
  const int64_t rows = x.size / n;
  if (b.size == n) return rows;
  const bool batched = x.shape.size() == 3 && b.shape.size() == 3 && b.shape[1] == 1 && b.shape[2] == n &&
                       b.shape[0] == x.shape[0];
  require(batched, std::string(name) + " has shape " + dims(b.shape) + "; expected (" + std::to_string(n) +
                       ") or (batch, 1, " + std::to_string(n) + ") for x of shape " + dims(x.shape));
  return x.shape[1];
}

int64_t width(const In& x, const In& gain, const char* what) {
  require(!x.shape.empty() && x.shape.back() > 0, std::string(what) + " must have a non-empty last axis, got " +
                                                      dims(x.shape));
  const int64_t n = x.shape.back();
  require(gain.size == n, std::string("gain has ") + std::to_string(gain.size) + " elements; expected " +
                              std::to_string(n) + " (the last axis of " + what + " " + dims(x.shape) + ")");
  require(n < (1 << 30), "rows over 2^30 elements are not supported");
  return n;
}

// e4m3 codes of x's shape and one fp32 scale per row (x.shape[:-1]): what Fp8QuantizeRows writes
i4k::Fp8Out fp8_outputs(Ort::KernelContext& ctx, size_t i, const std::vector<int64_t>& shape, float clamp) {
  i4k::Fp8Out o;
  o.q = static_cast<uint8_t*>(ctx.GetOutput(i, shape).GetTensorMutableRawData());
  o.scale = ctx.GetOutput(i + 1, std::vector<int64_t>(shape.begin(), shape.end() - 1)).GetTensorMutableData<float>();
  o.clamp = clamp;
  return o;
}

float optional_float(const Ort::ConstKernelInfo& info, const char* name, float fallback) {
  try {
    return info.GetAttribute<float>(name);
  } catch (const Ort::Exception&) {
    return fallback;
  }
}

cudaStream_t stream_of(Ort::KernelContext& ctx) { return static_cast<cudaStream_t>(ctx.GetGPUComputeStream()); }

// ----------------------------------------------------------------------------------------------------- kernels

// Each op: kName, kInputs, kOutputs, output_type(i), compute(ctx). The *Fp8 ops write the modulated / SwiGLU output as
// Fp8QuantizeRows would from it: e4m3 codes of its shape and one fp32 scale per row (attribute clamp, default 0).
struct Bf16Outputs {
  static ONNXTensorElementDataType output_type(size_t) { return kBF16; }
};

template <bool kFp8>
struct NormModulateT {   // (x, gain, scale) -> bf16(bf16(RMSNorm(x) * gain) * bf16(1 + scale)) [quantized]
  static constexpr const char* kName = kFp8 ? "NormModulateFp8" : "NormModulate";
  static constexpr size_t kInputs = 3, kOutputs = kFp8 ? 2 : 1;
  static ONNXTensorElementDataType output_type(size_t i) { return !kFp8 ? kBF16 : i == 0 ? kE4M3 : kF32; }
  float eps, clamp;
  explicit NormModulateT(const Ort::ConstKernelInfo& info)
      : eps(info.GetAttribute<float>("epsilon")), clamp(optional_float(info, "clamp", 0.f)) {}
  void compute(Ort::KernelContext& ctx) {
    const In x = input(ctx, 0), gain = input(ctx, 1), scale = input(ctx, 2);
    const int64_t n = width(x, gain, "x");
    const int64_t per = rows_per_broadcast(x, scale, n, "scale");
    bf16* y = kFp8 ? nullptr : output(ctx, 0, x.shape);
    const i4k::Fp8Out q = kFp8 ? fp8_outputs(ctx, 0, x.shape, clamp) : i4k::Fp8Out();
    if (x.size)
      launched(i4k::norm_modulate(stream_of(ctx), x.data, gain.data, scale.data, y, x.size / n, int(n), per, eps, q),
               kName);
  }
};
using NormModulate = NormModulateT<false>;
using NormModulateFp8 = NormModulateT<true>;

struct GatedResidual : Bf16Outputs {   // (h, branch, gain, gate) -> h + bf16(tanh(gate)) * RMSNorm(branch) * gain
  static constexpr const char* kName = "GatedResidual";
  static constexpr size_t kInputs = 4, kOutputs = 1;
  float eps;
  explicit GatedResidual(const Ort::ConstKernelInfo& info) : eps(info.GetAttribute<float>("epsilon")) {}
  void compute(Ort::KernelContext& ctx) {
    const In h = input(ctx, 0), b = input(ctx, 1), gain = input(ctx, 2), gate = input(ctx, 3);
    const int64_t n = width(b, gain, "branch");
    require(h.shape == b.shape, "h has shape " + dims(h.shape) + ", branch " + dims(b.shape) + "; they must match");
    const int64_t per = rows_per_broadcast(h, gate, n, "gate");
    bf16* ho = output(ctx, 0, h.shape);
    if (h.size)
      launched(i4k::gated_residual(stream_of(ctx), h.data, b.data, gain.data, gate.data, nullptr, nullptr, ho, nullptr,
                                   h.size / n, int(n), per, eps, 0.f), kName);
  }
};

template <bool kFp8>
struct GatedResidualModulateT {   // (h, branch, gain, gate, gain2, scale) -> (h', NormModulate(h'; gain2, scale) [quantized])
  static constexpr const char* kName = kFp8 ? "GatedResidualModulateFp8" : "GatedResidualModulate";
  static constexpr size_t kInputs = 6, kOutputs = kFp8 ? 3 : 2;
  static ONNXTensorElementDataType output_type(size_t i) { return !kFp8 || i == 0 ? kBF16 : i == 1 ? kE4M3 : kF32; }
  float eps, eps2, clamp;
  explicit GatedResidualModulateT(const Ort::ConstKernelInfo& info)
      : eps(info.GetAttribute<float>("epsilon")), eps2(info.GetAttribute<float>("epsilon2")),
        clamp(optional_float(info, "clamp", 0.f)) {}
  void compute(Ort::KernelContext& ctx) {
    const In h = input(ctx, 0), b = input(ctx, 1), gain = input(ctx, 2), gate = input(ctx, 3);
    const In gain2 = input(ctx, 4), scale = input(ctx, 5);
    const int64_t n = width(b, gain, "branch");
    require(h.shape == b.shape, "h has shape " + dims(h.shape) + ", branch " + dims(b.shape) + "; they must match");
    require(gain2.size == n, "gain2 has " + std::to_string(gain2.size) + " elements; expected " + std::to_string(n));
    const int64_t per = rows_per_broadcast(h, gate, n, "gate");
    require(rows_per_broadcast(h, scale, n, "scale") == per, "gate " + dims(gate.shape) + " and scale " +
                                                                 dims(scale.shape) + " must broadcast alike");
    bf16* ho = output(ctx, 0, h.shape);
    bf16* y = kFp8 ? nullptr : output(ctx, 1, h.shape);
    const i4k::Fp8Out q = kFp8 ? fp8_outputs(ctx, 1, h.shape, clamp) : i4k::Fp8Out();
    if (h.size)
      launched(i4k::gated_residual(stream_of(ctx), h.data, b.data, gain.data, gate.data, gain2.data, scale.data, ho, y,
                                   h.size / n, int(n), per, eps, eps2, q), kName);
  }
};
using GatedResidualModulate = GatedResidualModulateT<false>;
using GatedResidualModulateFp8 = GatedResidualModulateT<true>;

struct QkvNormRope : Bf16Outputs {   // (qkv, gain_q, gain_k, cos, sin_signed) -> q, k, v as (..., heads * head_dim)
  static constexpr const char* kName = "QkvNormRope";
  static constexpr size_t kInputs = 5, kOutputs = 3;
  int64_t heads;
  float eps_q, eps_k;
  explicit QkvNormRope(const Ort::ConstKernelInfo& info)
      : heads(info.GetAttribute<int64_t>("num_heads")), eps_q(info.GetAttribute<float>("epsilon_q")),
        eps_k(info.GetAttribute<float>("epsilon_k")) {}
  void compute(Ort::KernelContext& ctx) {
    const In qkv = input(ctx, 0), gq = input(ctx, 1), gk = input(ctx, 2), cos = input(ctx, 3), sin = input(ctx, 4);
    const int64_t hd = gq.size;
    require(heads > 0 && hd > 0 && hd % 2 == 0, "num_heads " + std::to_string(heads) + " and head_dim " +
                                                    std::to_string(hd) + " (gain_q) must be positive, head_dim even");
    require(gk.size == hd, "gain_k has " + std::to_string(gk.size) + " elements; expected head_dim " + std::to_string(hd));
    require(!qkv.shape.empty() && qkv.shape.back() == 3 * heads * hd,
            "qkv has shape " + dims(qkv.shape) + "; its last axis must be 3 * num_heads * head_dim = " +
                std::to_string(3 * heads * hd));
    const int64_t tokens = qkv.size / (3 * heads * hd);
    require(cos.size == tokens * hd && sin.size == tokens * hd,
            "cos " + dims(cos.shape) + " and sin " + dims(sin.shape) + " must hold head_dim values per token (" +
                std::to_string(tokens) + " tokens x " + std::to_string(hd) + ")");
    std::vector<int64_t> shape = qkv.shape;
    shape.back() = heads * hd;
    bf16 *q = output(ctx, 0, shape), *k = output(ctx, 1, shape), *v = output(ctx, 2, shape);
    if (tokens)
      launched(i4k::qkv_norm_rope(stream_of(ctx), qkv.data, gq.data, gk.data, cos.data, sin.data, q, k, v, tokens,
                                  int(heads), int(hd), eps_q, eps_k), kName);
  }
};

struct SwiGLU : Bf16Outputs {   // (a, b) -> bf16(bf16(silu(a)) * b)
  static constexpr const char* kName = "SwiGLU";
  static constexpr size_t kInputs = 2, kOutputs = 1;
  explicit SwiGLU(const Ort::ConstKernelInfo&) {}
  void compute(Ort::KernelContext& ctx) {
    const In a = input(ctx, 0), b = input(ctx, 1);
    require(a.shape == b.shape, "a has shape " + dims(a.shape) + ", b " + dims(b.shape) + "; they must match");
    bf16* out = output(ctx, 0, a.shape);
    if (a.size) launched(i4k::swiglu(stream_of(ctx), a.data, b.data, out, a.size), kName);
  }
};

struct SwiGLUFp8 {   // (a, b) -> the SwiGLU values quantized per row of the last axis
  static constexpr const char* kName = "SwiGLUFp8";
  static constexpr size_t kInputs = 2, kOutputs = 2;
  static ONNXTensorElementDataType output_type(size_t i) { return i == 0 ? kE4M3 : kF32; }
  float clamp;
  explicit SwiGLUFp8(const Ort::ConstKernelInfo& info) : clamp(optional_float(info, "clamp", 0.f)) {}
  void compute(Ort::KernelContext& ctx) {
    const In a = input(ctx, 0), b = input(ctx, 1);
    require(a.shape == b.shape, "a has shape " + dims(a.shape) + ", b " + dims(b.shape) + "; they must match");
    require(!a.shape.empty() && a.shape.back() > 0 && a.shape.back() < (1 << 30),
            "a must have a non-empty last axis under 2^30 elements, got " + dims(a.shape));
    const i4k::Fp8Out q = fp8_outputs(ctx, 0, a.shape, clamp);
    const int64_t n = a.shape.back();
    if (a.size) launched(i4k::swiglu_fp8(stream_of(ctx), a.data, b.data, a.size / n, int(n), q), kName);
  }
};

// ----------------------------------------------------------------------------------------------------- glue

OrtStatusPtr status(OrtErrorCode code, const char* op, const std::string& what) {
  return Ort::GetApi().CreateStatus(code, (std::string(kDomain) + "." + op + ": " + what).c_str());
}

template <class K>
struct Kernel {
  K k;
  explicit Kernel(const OrtKernelInfo* info) : k(Ort::ConstKernelInfo(info)) {
    i4k::preload();
  }
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Ort::KernelContext ctx(context);
      k.compute(ctx);
      return nullptr;
    } catch (const Failure& f) {
      return status(ORT_INVALID_ARGUMENT, K::kName, f.what);
    } catch (const std::exception& e) {
      return status(ORT_FAIL, K::kName, e.what());
    }
  }
};

template <class K>
struct Op : Ort::CustomOpBase<Op<K>, Kernel<K>, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new Kernel<K>(info);
      return nullptr;
    } catch (const std::exception& e) {
      return status(ORT_INVALID_ARGUMENT, K::kName, std::string("bad attributes: ") + e.what());
    }
  }
  const char* GetName() const { return K::kName; }
  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }
  size_t GetInputTypeCount() const { return K::kInputs; }
  ONNXTensorElementDataType GetInputType(size_t) const { return kBF16; }
  size_t GetOutputTypeCount() const { return K::kOutputs; }
  ONNXTensorElementDataType GetOutputType(size_t i) const { return K::output_type(i); }
};

Op<NormModulate> g_norm_modulate;
Op<GatedResidual> g_gated_residual;
Op<GatedResidualModulate> g_gated_residual_modulate;
Op<QkvNormRope> g_qkv_norm_rope;
Op<SwiGLU> g_swiglu;
Op<NormModulateFp8> g_norm_modulate_fp8;
Op<GatedResidualModulateFp8> g_gated_residual_modulate_fp8;
Op<SwiGLUFp8> g_swiglu_fp8;

}  // namespace

extern "C" {

// onnxruntime's entry point (SessionOptions.register_custom_ops_library).
__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                 const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr)
    return nullptr;   // cannot even report: this onnxruntime is older than the headers (API 21)
  Ort::InitApi(api);
  try {
    static Ort::CustomOpDomain* domain = nullptr;
    if (domain == nullptr) {
      domain = new Ort::CustomOpDomain(kDomain);
      domain->Add(&g_norm_modulate);
      domain->Add(&g_gated_residual);
      domain->Add(&g_gated_residual_modulate);
      domain->Add(&g_qkv_norm_rope);
      domain->Add(&g_swiglu);
      domain->Add(&g_norm_modulate_fp8);
      domain->Add(&g_gated_residual_modulate_fp8);
      domain->Add(&g_swiglu_fp8);
      ideogram4::AddW8A8Ops(*domain);
    }
    Ort::UnownedSessionOptions(options).Add(*domain);
    return nullptr;
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
}

// For the runtime's check before registering: the compute capabilities this build has machine code for
// ("89,90,100,120") and the op domain.
__attribute__((visibility("default"))) const char* ideogram4_kernels_arches() { return I4K_ARCHES; }
__attribute__((visibility("default"))) const char* ideogram4_kernels_domain() { return kDomain; }

}  // extern "C"
