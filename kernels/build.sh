#!/usr/bin/env bash
# Build the project's op library for onnxruntime's CUDA provider (custom-op domain "ideogram4"): the fused
# elementwise kernels (fused.cu, ort_ops.cu) and the W8A8 kernels (fp8_quant.cu, fp8_gemm.cu, w8a8_ops.cu) ->
# $OUT_SO (default build/kernels/libideogram4_kernels.so). `make kernels` runs this; `make test` depends on it.
#
# Headers (kernels/fetch_headers.sh, fetched once into build/include, nothing system-wide changes): onnxruntime's
# C/C++ API headers from Debian's libonnxruntime-dev (1.21, API 21; the library loads into onnxruntime-gpu 1.31)
# and cuBLASLt's from PyPI's nvidia-cublas wheel. The library links the CUDA runtime statically and opens
# cuBLASLt at run time (dlopen, kernels/fp8_gemm.cu), so it loads wherever onnxruntime-gpu and the driver are;
# only the W8A8 GEMM op needs cuBLASLt (>= 12.9) and says so when it is missing.
# ARCHES: compute capabilities to emit machine code for (default 89 90 100 120: Ada, Hopper, Blackwell
# datacenter, Blackwell RTX; what nvcc 13 supports); PTX of the newest is embedded too.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD_DIR:-$root/build}
out=${OUT_SO:-$build/kernels/libideogram4_kernels.so}
headers=${HEADERS_DIR:-$build/include}
arches=${ARCHES:-89 90 100 120}
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}

if [ ! -x "$NVCC" ]; then
  echo "kernels/build.sh: nvcc not found (looked on PATH and at /usr/local/cuda/bin/nvcc); install the CUDA" \
       "toolkit (13.x) or set NVCC=/path/to/nvcc" >&2
  exit 2
fi
mkdir -p "$build"
if [ ! -f "$headers/ort/onnxruntime_cxx_api.h" ] || [ ! -f "$headers/cublas/cublasLt.h" ]; then
  echo "kernels/build.sh: fetching onnxruntime's and cuBLASLt's headers into $headers" >&2
  bash "$root/kernels/fetch_headers.sh" "$headers" >&2
fi

gencode=()
list=""
for a in $arches; do
  gencode+=(-gencode "arch=compute_$a,code=sm_$a")
  list="${list:+$list,}$a"
done
last=${arches##* }
gencode+=(-gencode "arch=compute_$last,code=compute_$last")

src=(fused.cu fused_warp.cu ort_ops.cu fp8_quant.cu fp8_gemm.cu w8a8_ops.cu)
mkdir -p "$(dirname "$out")"
tmp_so="$(dirname "$out")/.$(basename "$out").tmp-$$"
trap 'rm -f "$tmp_so"' EXIT
t0=$(date +%s)
"$NVCC" -std=c++17 -O3 -shared -Xcompiler -fPIC,-fvisibility=hidden,-Wall -I"$headers/ort" -I"$headers/cublas" \
  -DI4K_ARCHES="\"$list\"" "${gencode[@]}" --threads "${NVCC_THREADS:-0}" "${src[@]/#/$root/kernels/}" -ldl -o "$tmp_so"
mv "$tmp_so" "$out"
echo "built $out (sm $list, $(( $(date +%s) - t0 )) s)" >&2
