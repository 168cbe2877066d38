# Source on the GPU machine: makes this checkout importable as `ideogram4_engine` without pip (nothing can be
# installed there from a registry) and unpacks the pure-Python wheels carried in .device/wheels/.
# Usage: source scripts/device_env.sh
_repo=$(pwd)
_shim=/tmp/ideogram4_shim
mkdir -p "$_shim/ideogram4_engine"
ln -sfn "$_repo/export" "$_shim/ideogram4_engine/export"
ln -sfn "$_repo/runtime" "$_shim/ideogram4_engine/runtime"
ln -sfn "$_repo/serve" "$_shim/ideogram4_engine/serve"
if [ -d .device/wheels ]; then
  mkdir -p /tmp/ideogram4_wheels
  for w in .device/wheels/*.whl; do python3 -m zipfile -e "$w" /tmp/ideogram4_wheels >/dev/null; done
fi
export PYTHONPATH="$_shim:/tmp/ideogram4_wheels${PYTHONPATH:+:$PYTHONPATH}"
