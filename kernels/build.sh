#!/usr/bin/env bash
# Build the fused-kernel library for onnxruntime's CUDA provider: kernels/*.cu -> $OUT_SO
# (default build/kernels/libideogram4_kernels.so). `make kernels` runs this; `make test` depends on it.
#
# onnxruntime's C/C++ API headers come from Debian's libonnxruntime-dev (Debian 13 "trixie", 1.21, API 21),
# fetched once with apt into a private state folder under build/ (signed Debian index, nothing in the system's
# apt configuration changes) and cached there. The library links the CUDA runtime statically, so it needs
# nothing beside onnxruntime-gpu and the driver on the machine that loads it.
# ARCHES: compute capabilities to emit machine code for (default 89 90 100 120: Ada, Hopper, Blackwell
# datacenter, Blackwell RTX; what nvcc 13 supports); PTX of the newest is embedded too.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD_DIR:-$root/build}
out=${OUT_SO:-$build/kernels/libideogram4_kernels.so}
headers=$build/ort-headers
arches=${ARCHES:-89 90 100 120}
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}

if [ ! -x "$NVCC" ]; then
  echo "kernels/build.sh: nvcc not found (looked on PATH and at /usr/local/cuda/bin/nvcc); install the CUDA" \
       "toolkit (13.x) or set NVCC=/path/to/nvcc" >&2
  exit 2
fi

if [ ! -f "$headers/include/onnxruntime_cxx_api.h" ]; then
  echo "kernels/build.sh: fetching onnxruntime's C++ API headers (Debian libonnxruntime-dev) into $headers" >&2
  mkdir -p "$build"
  tmp=$(mktemp -d "$build/.ort-headers.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  mkdir -p "$tmp/lists/partial"
  echo "deb http://deb.debian.org/debian trixie main" > "$tmp/sources.list"
  o=(-o Dir::Etc::SourceList="$tmp/sources.list" -o Dir::Etc::SourceParts=/dev/null -o Dir::State::Lists="$tmp/lists"
     -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
  apt-get "${o[@]}" update -qq
  (cd "$tmp" && apt-get "${o[@]}" download libonnxruntime-dev 2>/dev/null)
  dpkg -x "$tmp"/libonnxruntime-dev_*.deb "$tmp/deb"
  mkdir -p "$tmp/out/include"
  cp -r "$tmp"/deb/usr/include/onnxruntime/* "$tmp/out/include/"
  basename "$tmp"/libonnxruntime-dev_*.deb > "$tmp/out/PACKAGE"
  rm -rf "$headers" && mv "$tmp/out" "$headers"
fi

gencode=()
list=""
for a in $arches; do
  gencode+=(-gencode "arch=compute_$a,code=sm_$a")
  list="${list:+$list,}$a"
done
last=${arches##* }
gencode+=(-gencode "arch=compute_$last,code=compute_$last")

mkdir -p "$(dirname "$out")"
tmp_so="$(dirname "$out")/.$(basename "$out").tmp-$$"
"$NVCC" -std=c++17 -O3 -shared -Xcompiler -fPIC,-fvisibility=hidden -I"$headers/include" -DI4K_ARCHES="\"$list\"" \
  "${gencode[@]}" "$root/kernels/fused.cu" "$root/kernels/ort_ops.cu" -o "$tmp_so"
mv "$tmp_so" "$out"
echo "built $out (sm $list; headers $(cat "$headers/PACKAGE"))" >&2
