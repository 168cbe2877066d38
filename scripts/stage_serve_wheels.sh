#!/usr/bin/env bash
# Stage Ray Serve and its dependencies (the `serve` extra, Python 3.12 wheels, ~115 MB) for the GPU machine,
# which cannot reach a package registry. One device call carries at most 64 MiB, so the wheels travel in
# parts under .device/serve/ (git-ignored via .git/info/exclude), like ../shared/device/stage-ort-gpu.sh.
# numpy is left out: the image's own numpy stays in charge. Prints the device calls to make.
set -euo pipefail
PART_MIB=${PART_MIB:-48}            # room for the project's own files in each call
root=$(git rev-parse --show-toplevel)
out="$root/.device/serve"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/device-stage/serve-wheels"
mkdir -p "$out" "$cache/wheels"
exclude=$(git rev-parse --path-format=absolute --git-path info/exclude)      # a worktree's .git is a file
mkdir -p "$(dirname "$exclude")"
grep -qxF "/.device/" "$exclude" 2>/dev/null || echo "/.device/" >> "$exclude"
if [ ! -s "$cache/serve.tar" ]; then
  python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$cache/wheels" \
    "ray[serve]==2.60.0" fastapi==0.165.0 grpcio==1.85.3 prometheus-client==0.26.0
  rm -f "$cache"/wheels/numpy-*.whl
  tar -cf "$cache/serve.tar.tmp" -C "$cache" wheels && mv "$cache/serve.tar.tmp" "$cache/serve.tar"
fi
rm -f "$out"/part-*
split -b $((PART_MIB * 1024 * 1024)) -d -a 1 "$cache/serve.tar" "$out/part-"
echo "staged $(ls "$cache/wheels" | wc -l) wheels in $(ls "$out" | wc -l) parts under .device/serve/"
echo
echo "Device calls, back to back on one warm machine (after onnxruntime-gpu's, same pattern):"
for p in $(cd "$out" && ls); do
  echo "  run carry=[\".device/serve/$p\"]  command: mkdir -p /root/stage-serve && cp .device/serve/$p /root/stage-serve/"
done
echo "then start every command that needs Ray Serve with:"
echo "  test -d /opt/serve/ray || { cat /root/stage-serve/part-* | tar -x -C /root/stage-serve && python3 -m pip install -q --no-index --no-deps --target /opt/serve /root/stage-serve/wheels/*.whl; }; export PYTHONPATH=/opt/serve:\$PYTHONPATH PATH=/opt/serve/bin:\$PATH"
