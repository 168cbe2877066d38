#!/usr/bin/env bash
# Headers the kernel library compiles against, fetched once into a private folder (nothing system-wide changes):
#   ort/      onnxruntime's C/C++ API headers from Debian 13's libonnxruntime-dev (1.21, API 21); a library built
#             against API 21 loads into onnxruntime-gpu 1.31 (the C API is versioned and backward compatible);
#             on Debian 12 the .deb comes from Debian 13's archive through a private apt state (-o options).
#   cublas/   cuBLAS / cuBLASLt headers from PyPI's nvidia-cublas wheel (only include/ is unpacked). The library
#             does not link cuBLASLt: it opens libcublasLt.so.13 at run time (kernels/fp8_gemm.cu says why).
# Usage: kernels/fetch_headers.sh DEST   (DEST/ort/onnxruntime_c_api.h and DEST/cublas/cublasLt.h afterwards)
set -euo pipefail
dest=$(mkdir -p "$1" && cd "$1" && pwd)
CUBLAS_VERSION=${CUBLAS_VERSION:-13.1.1.3}      # >= 12.9 for CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F
PIP=${PIP:-python3 -m pip}
if [ ! -f "$dest/ort/onnxruntime_c_api.h" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  chmod 755 "$work" && mkdir -p "$work/lists/partial"
  echo "deb http://deb.debian.org/debian trixie main" > "$work/sources.list"
  o=(-o Dir::Etc::SourceList="$work/sources.list" -o Dir::Etc::SourceParts=/dev/null -o Dir::State::Lists="$work/lists")
  apt-get "${o[@]}" update -qq
  (cd "$work" && apt-get "${o[@]}" download libonnxruntime-dev >/dev/null 2>&1) \
    || { echo "error: could not download libonnxruntime-dev from Debian 13 (onnxruntime headers)" >&2; exit 1; }
  dpkg -x "$work"/libonnxruntime-dev_*.deb "$work/deb"
  rm -rf "$dest/ort.tmp" && mkdir -p "$dest/ort.tmp"
  cp -r "$work"/deb/usr/include/onnxruntime/* "$dest/ort.tmp/"
  rm -rf "$dest/ort" && mv "$dest/ort.tmp" "$dest/ort"
fi
if [ ! -f "$dest/cublas/cublasLt.h" ]; then
  work2=$(mktemp -d)
  $PIP download -q --no-deps --only-binary=:all: -d "$work2" "nvidia-cublas==$CUBLAS_VERSION" 2>&1 | grep -v "is ignored" || true
  whl=$(ls "$work2"/nvidia_cublas-*.whl 2>/dev/null | head -1)
  [ -n "$whl" ] || { echo "error: could not download nvidia-cublas==$CUBLAS_VERSION (cuBLASLt headers)" >&2; exit 1; }
  rm -rf "$dest/cublas.tmp" && mkdir -p "$dest/cublas.tmp"
  python3 - "$whl" "$dest/cublas.tmp" <<'PY'
import sys, zipfile, pathlib
whl, out = sys.argv[1], pathlib.Path(sys.argv[2])
with zipfile.ZipFile(whl) as z:
    for n in z.namelist():
        if "/include/" in n and n.endswith(".h"):
            (out / pathlib.Path(n).name).write_bytes(z.read(n))
PY
  rm -rf "$work2" "$dest/cublas" && mv "$dest/cublas.tmp" "$dest/cublas"
fi
echo "headers in $dest (ort: $(ls "$dest/ort" | wc -l) files, cublas: $(ls "$dest/cublas" | wc -l) files)"
