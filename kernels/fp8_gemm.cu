// FP8 GEMM with per-row scales through cuBLASLt (CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F, cuBLAS >= 12.9).
//
// cuBLASLt is column-major; the row-major problem y(M, N) = x(M, K) · w(N, K)ᵀ is solved as its transpose
// yᵀ(N, M) = w · xᵀ: A = w seen as a (K, N) column-major matrix with op T, B = x as (K, M) with op N ("TN", the
// only FP8 layout Hopper's cuBLASLt supports), D = yᵀ (N, M) column-major = y row-major. The A scale vector has
// N entries (the weight's row scales), the B scale vector M (the activation's token scales).
//
// cuBLASLt is opened with dlopen at first use rather than linked: onnxruntime's CUDA provider has already
// loaded libcublasLt.so.13 by then (the same library is reused), and a library of fused kernels that also
// holds these ops still loads where cuBLASLt cannot be found (only these ops then fail, with the reason).
// Workspace: one 32 MiB buffer per (device, stream), kept for the process; kernels on one stream run in
// order, so they can share it (onnxruntime gives each session its own stream).
#include "w8a8.h"

#include <cublasLt.h>
#include <dlfcn.h>

#include <cstdio>
#include <stdexcept>

namespace ideogram4 {
namespace {

constexpr size_t kWorkspaceBytes = 32u << 20;
constexpr size_t kMinCublasLtVersion = 120900;   // first with OUTER_VEC_32F

struct LtApi {
  decltype(&cublasLtGetVersion) GetVersion = nullptr;
  decltype(&cublasLtCreate) Create = nullptr;
  decltype(&cublasLtDestroy) Destroy = nullptr;
  decltype(&cublasLtMatmulDescCreate) DescCreate = nullptr;
  decltype(&cublasLtMatmulDescDestroy) DescDestroy = nullptr;
  decltype(&cublasLtMatmulDescSetAttribute) DescSet = nullptr;
  decltype(&cublasLtMatrixLayoutCreate) LayoutCreate = nullptr;
  decltype(&cublasLtMatrixLayoutDestroy) LayoutDestroy = nullptr;
  decltype(&cublasLtMatmulPreferenceCreate) PrefCreate = nullptr;
  decltype(&cublasLtMatmulPreferenceDestroy) PrefDestroy = nullptr;
  decltype(&cublasLtMatmulPreferenceSetAttribute) PrefSet = nullptr;
  decltype(&cublasLtMatmulAlgoGetHeuristic) Heuristic = nullptr;
  decltype(&cublasLtMatmul) Matmul = nullptr;
  std::string problem;    // empty when usable
  size_t version = 0;
};

template <typename F>
bool Sym(void* lib, const char* name, F& f) {
  f = reinterpret_cast<F>(dlsym(lib, name));
  return f != nullptr;
}

const LtApi& Lt() {
  static const LtApi api = [] {
    LtApi a;
    void* lib = nullptr;
    for (const char* name : {"libcublasLt.so.13", "libcublasLt.so"}) {
      lib = dlopen(name, RTLD_NOW | RTLD_GLOBAL);
      if (lib) break;
    }
    if (!lib) {
      const char* why = dlerror();
      a.problem = std::string("cannot open libcublasLt.so.13 (") + (why ? why : "not found") + ")";
      return a;
    }
    bool ok = Sym(lib, "cublasLtGetVersion", a.GetVersion) && Sym(lib, "cublasLtCreate", a.Create) &&
              Sym(lib, "cublasLtDestroy", a.Destroy) && Sym(lib, "cublasLtMatmulDescCreate", a.DescCreate) &&
              Sym(lib, "cublasLtMatmulDescDestroy", a.DescDestroy) &&
              Sym(lib, "cublasLtMatmulDescSetAttribute", a.DescSet) &&
              Sym(lib, "cublasLtMatrixLayoutCreate", a.LayoutCreate) &&
              Sym(lib, "cublasLtMatrixLayoutDestroy", a.LayoutDestroy) &&
              Sym(lib, "cublasLtMatmulPreferenceCreate", a.PrefCreate) &&
              Sym(lib, "cublasLtMatmulPreferenceDestroy", a.PrefDestroy) &&
              Sym(lib, "cublasLtMatmulPreferenceSetAttribute", a.PrefSet) &&
              Sym(lib, "cublasLtMatmulAlgoGetHeuristic", a.Heuristic) && Sym(lib, "cublasLtMatmul", a.Matmul);
    if (!ok) {
      a.problem = "libcublasLt lacks a cublasLt function this library needs";
      return a;
    }
    a.version = a.GetVersion();
    if (a.version < kMinCublasLtVersion)
      a.problem = "cuBLASLt " + std::to_string(a.version) + " is older than 12.9 (no per-row FP8 scales)";
    return a;
  }();
  return api;
}

void Check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw std::runtime_error(std::string("cuBLASLt ") + what + " failed (status " + std::to_string(int(s)) + ")");
}

void* Workspace(cudaStream_t stream) {
  static std::mutex mu;
  static std::map<std::pair<int, cudaStream_t>, void*> buffers;
  int device = 0;
  cudaGetDevice(&device);
  std::lock_guard<std::mutex> lock(mu);
  void*& buf = buffers[{device, stream}];
  if (!buf && cudaMalloc(&buf, kWorkspaceBytes) != cudaSuccess) {
    cudaGetLastError();
    buf = nullptr;
    throw std::runtime_error("cannot allocate the 32 MiB cuBLASLt workspace (out of GPU memory)");
  }
  return buf;
}

}  // namespace

std::string CublasLtProblem() { return Lt().problem; }

std::string ComputeCapability() {
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();
    return "unknown";
  }
  return std::to_string(major) + "." + std::to_string(minor);
}

struct Fp8RowScaledGemm::Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
  size_t workspace = 0;
};

Fp8RowScaledGemm::~Fp8RowScaledGemm() {
  const LtApi& lt = Lt();
  if (!lt.problem.empty()) return;
  for (auto& [key, p] : plans_) {
    if (p->desc) lt.DescDestroy(p->desc);
    for (auto l : {p->a, p->b, p->d})
      if (l) lt.LayoutDestroy(l);
    delete p;
  }
  if (handle_) lt.Destroy(static_cast<cublasLtHandle_t>(handle_));
}

void Fp8RowScaledGemm::Run(const void* xq, const float* x_scale, const void* wq, const float* w_scale, void* y,
                           int64_t M, int64_t N, int64_t K, cudaStream_t stream) {
  const LtApi& lt = Lt();
  if (!lt.problem.empty()) throw std::runtime_error(lt.problem);
  if (M == 0 || N == 0) return;
  if (K % kGemmAlignment || N % kGemmAlignment)
    throw std::runtime_error("FP8 GEMM needs K and N multiples of 16, got N=" + std::to_string(N) +
                             " K=" + std::to_string(K));
  std::lock_guard<std::mutex> lock(mu_);      // the plan's descriptor holds this call's scale pointers
  if (!handle_) {
    cublasLtHandle_t h = nullptr;
    Check(lt.Create(&h), "create");
    handle_ = h;
  }
  void* workspace = Workspace(stream);
  Plan*& plan = plans_[{M, N, K}];
  if (!plan) {
    auto p = new Plan();
    try {
      Check(lt.DescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "descriptor");
      const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
      const cublasLtMatmulMatrixScale_t mode = CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
      const int8_t fast = fast_ ? 1 : 0;
      Check(lt.DescSet(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta), "TRANSA");
      Check(lt.DescSet(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb), "TRANSB");
      Check(lt.DescSet(p->desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode, sizeof mode), "A_SCALE_MODE");
      Check(lt.DescSet(p->desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode, sizeof mode), "B_SCALE_MODE");
      Check(lt.DescSet(p->desc, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast, sizeof fast), "FAST_ACCUM");
      Check(lt.DescSet(p->desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &w_scale, sizeof w_scale), "A_SCALE_POINTER");
      Check(lt.DescSet(p->desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &x_scale, sizeof x_scale), "B_SCALE_POINTER");
      Check(lt.LayoutCreate(&p->a, CUDA_R_8F_E4M3, K, N, K), "layout A");
      Check(lt.LayoutCreate(&p->b, CUDA_R_8F_E4M3, K, M, K), "layout B");
      Check(lt.LayoutCreate(&p->d, CUDA_R_16BF, N, M, N), "layout D");
      cublasLtMatmulPreference_t pref = nullptr;
      Check(lt.PrefCreate(&pref), "preference");
      size_t limit = kWorkspaceBytes;
      lt.PrefSet(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &limit, sizeof limit);
      cublasLtMatmulHeuristicResult_t result{};
      int found = 0;
      cublasStatus_t s = lt.Heuristic(static_cast<cublasLtHandle_t>(handle_), p->desc, p->a, p->b, p->d, p->d, pref,
                                      1, &result, &found);
      lt.PrefDestroy(pref);
      if (s != CUBLAS_STATUS_SUCCESS || found == 0)
        throw std::runtime_error("cuBLASLt " + std::to_string(lt.version) +
                                 " has no FP8 e4m3 GEMM with per-row scales for M=" + std::to_string(M) +
                                 " N=" + std::to_string(N) + " K=" + std::to_string(K) + " on compute capability " +
                                 ComputeCapability() + " (needs sm_90 or newer)");
      p->algo = result.algo;
      p->workspace = result.workspaceSize;
    } catch (...) {
      if (p->desc) lt.DescDestroy(p->desc);
      for (auto l : {p->a, p->b, p->d})
        if (l) lt.LayoutDestroy(l);
      delete p;
      plans_.erase({M, N, K});
      throw;
    }
    plan = p;
  }
  Check(lt.DescSet(plan->desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &w_scale, sizeof w_scale), "A_SCALE_POINTER");
  Check(lt.DescSet(plan->desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &x_scale, sizeof x_scale), "B_SCALE_POINTER");
  const float alpha = 1.f, beta = 0.f;
  Check(lt.Matmul(static_cast<cublasLtHandle_t>(handle_), plan->desc, &alpha, wq, plan->a, xq, plan->b, &beta, y,
                  plan->d, y, plan->d, &plan->algo, workspace, plan->workspace, stream),
        "matmul");
}

}  // namespace ideogram4

// For diagnostics (scripts/gpu_w8a8_check.py reads them through ctypes): the cuBLASLt version this library
// uses (0 when it cannot be opened) and why it cannot (empty when it can).
extern "C" __attribute__((visibility("default"))) size_t ideogram4_cublaslt_version() { return ideogram4::Lt().version; }
extern "C" __attribute__((visibility("default"))) const char* ideogram4_cublaslt_problem() {
  return ideogram4::Lt().problem.c_str();
}
