#!/usr/bin/env bash
# CPU side of preparing a GPU machine: download the wheels of scripts/device_wheels.txt (Python 3.12, the GPU image's)
# into .device/wheels/ (git-ignored), then print the whole device call sequence: onnxruntime-gpu's parts (staged by
# ../shared/device/stage-ort-gpu.sh), then one call that runs scripts/gpu_prepare.sh with the wheels carried.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
exclude=$(git rev-parse --path-format=absolute --git-path info/exclude)     # a worktree's .git is a file
mkdir -p "$(dirname "$exclude")"
grep -qxF "/.device/" "$exclude" 2>/dev/null || echo "/.device/" >> "$exclude"
mkdir -p "$root/.device/wheels"
grep -v '^\s*#' "$root/scripts/device_wheels.txt" | grep -v '^\s*$' | xargs \
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$root/.device/wheels"
ls -la "$root/.device/wheels"
echo
echo "Device calls, back to back on one warm machine:"
for p in $(cd "$root/.device/ort" 2>/dev/null && ls); do
  echo "  run carry=[\".device/ort/$p\"]  command: mkdir -p /root/stage && cp .device/ort/$p /root/stage/"
done
[ -d "$root/.device/ort" ] || echo "  (first run ../shared/device/stage-ort-gpu.sh for onnxruntime-gpu's parts)"
echo "  run carry=[\".device/wheels\", \"build/kernels\"]  command: bash scripts/gpu_prepare.sh"
echo "then every GPU command on that machine: bash scripts/gpu_bench.sh <stages> (it sources scripts/device_env.sh)"
