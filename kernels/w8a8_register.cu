// Entry point of the standalone W8A8 op library (libideogram4_w8a8.so, custom-op domain "ideogram4.w8a8").
// A library that carries these ops under its own domain calls ideogram4::AddW8A8Ops(domain) from its own
// RegisterCustomOps instead and leaves this file out.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>

namespace ideogram4 {
void AddW8A8Ops(Ort::CustomOpDomain& domain);
}

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  static Ort::CustomOpDomain* domain = nullptr;
  try {
    if (!domain) {
      domain = new Ort::CustomOpDomain("ideogram4.w8a8");
      ideogram4::AddW8A8Ops(*domain);
    }
    Ort::UnownedSessionOptions(options).Add(*domain);
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}
