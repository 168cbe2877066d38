# Source on the GPU machine (scripts/gpu_prepare.sh and gpu_bench.sh do): this checkout importable as
# `ideogram4_engine` without pip (no registry can be reached there), the carried wheels (.device/wheels/, from
# scripts/stage_device_wheels.sh) and onnxruntime-gpu (parts in /root/stage/) unpacked once, all on PYTHONPATH.
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
if [ ! -d /opt/ort/onnxruntime ] && ls /root/stage/part-* >/dev/null 2>&1; then
  mkdir -p /opt/ort.tmp && cat /root/stage/part-* | xz -d -T0 | tar -x -C /opt/ort.tmp && mv /opt/ort.tmp /opt/ort
fi
export PYTHONPATH="$_shim:/tmp/ideogram4_wheels:/opt/ort${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
