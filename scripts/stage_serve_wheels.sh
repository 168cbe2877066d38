#!/usr/bin/env bash
# Stage Ray Serve and its dependencies (the `serve` extra, Python 3.12 manylinux wheels) for the GPU machine, which
# cannot reach a package registry. The 73 wheels are 118 MB; installed (unzipped) and without the parts of Ray a
# server never loads (Java jars 33 MB, the dashboard's web client, rllib/tune/train/llm) they pack with xz into
# one ~52 MB archive: one part under .device/serve/ (git-ignored via .git/info/exclude) that one device call
# carries next to the project (64 MiB in all), so the `serve` stage of gpu_bench.sh needs no staging call of its
# own. numpy is left out: the image's numpy stays in charge. Nothing is pip-installed on the device: the archive
# is the installed tree, put first on PYTHONPATH.
# Checked here: Ray Serve (same version, cp311 build) trimmed the same way passes tests/test_serve.py.
set -euo pipefail
PART_MIB=${PART_MIB:-56}            # one part; the call also carries the project (~2 MB) and .device/wheels (~4 MB)
root=$(git rev-parse --show-toplevel)
out="$root/.device/serve"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/device-stage/serve-wheels"
mkdir -p "$out" "$cache/wheels"
exclude=$(git rev-parse --path-format=absolute --git-path info/exclude)      # a worktree's .git is a file
mkdir -p "$(dirname "$exclude")"
grep -qxF "/.device/" "$exclude" 2>/dev/null || echo "/.device/" >> "$exclude"
if [ -z "$(ls "$cache"/wheels/ray-*.whl 2>/dev/null)" ]; then
  python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$cache/wheels" \
    "ray[serve]==2.60.0" fastapi==0.165.0 grpcio==1.85.3 prometheus-client==0.26.0
  rm -f "$cache"/wheels/numpy-*.whl
fi
if [ ! -s "$cache/serve-tree.tar.xz" ]; then
  tree=$(mktemp -d)
  # unzip keeping the mode bits (python -m zipfile -e drops them: raylet, gcs_server and haproxy must stay executable)
  python3 - "$tree" "$cache"/wheels/*.whl <<'PY'
import os, sys, zipfile
for wheel in sys.argv[2:]:
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            path = z.extract(info, sys.argv[1])
            if not info.is_dir() and (info.external_attr >> 16) & 0o777:
                os.chmod(path, (info.external_attr >> 16) & 0o777)
PY
  rm -rf "$tree"/*.data "$tree"/ray/jars "$tree"/ray/dashboard/client "$tree"/ray/rllib "$tree"/ray/tune \
         "$tree"/ray/train "$tree"/ray/llm
  find "$tree" -name __pycache__ -type d -prune -exec rm -rf {} +
  test -x "$tree/ray/core/src/ray/raylet/raylet" -a -x "$tree/ray/core/src/ray/gcs/gcs_server" ||
    { echo "error: Ray's binaries lost their executable bit"; exit 1; }
  tar -cf - -C "$tree" . | xz -9 -T0 > "$cache/serve-tree.tar.xz.tmp"
  mv "$cache/serve-tree.tar.xz.tmp" "$cache/serve-tree.tar.xz"
  rm -rf "$tree"
fi
rm -f "$out"/part-*
split -b $((PART_MIB * 1024 * 1024)) -d -a 1 "$cache/serve-tree.tar.xz" "$out/part-"
n=$(ls "$out" | wc -l)
echo "staged $(ls "$cache/wheels" | wc -l) wheels as $(du -h "$cache/serve-tree.tar.xz" | cut -f1) in $n part(s) under .device/serve/"
if [ "$n" = 1 ]; then
  echo "carry .device/serve/part-0 (and .device/wheels) in the call that runs \`bash scripts/gpu_bench.sh serve\`:"
  echo "the stage unpacks it to /opt/serve itself."
else
  echo "more than one part: stage them first, one call each, then run the serve stage in the same warm machine:"
  for p in $(cd "$out" && ls); do
    echo "  run carry=[\".device/serve/$p\"]  command: mkdir -p /root/stage-serve && cp .device/serve/$p /root/stage-serve/"
  done
fi
