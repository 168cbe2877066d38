#!/usr/bin/env bash
# GPU benchmark in stages (one device call each, back to back on the same warm machine; see scripts/README.md):
#   (first: scripts/gpu_prepare.sh, which unpacks onnxruntime-gpu and the carried wheels and checks every import)
#   prepare : synthetic checkpoint (CONFIG, default full) written on the GPU + export
#   eager   : torch reference, eager           compiled : torch reference under torch.compile
#   runtime : lean runtime on onnxruntime CUDA (the cuda_fused graphs with the kernel library: the default)
#   runtime-stock: the same with the stock cuda graphs (fused_kernels=false); runtime-dqload[-stock] likewise
#   runtime-cudagraph: the default path with the DiT sessions replaying CUDA graphs (cuda_graph=true)
#   profile : onnxruntime profiler + CUPTI kernels, one dit_cond forward (profile-stock: the stock graphs,
#             profile-w8a8: the cuda_fused_w8a8 graphs, after PRECISION=w8a8 prepare)
#   kernels : scripts/gpu_kernel_check.py: each fused op (the quantizing *Fp8 ops too; KERNEL_CHECK_ARGS="--only OpA,OpB" for some) vs
#             the unfused subgraph on CUDA, tiny and full-width end to end (fused vs stock latents), CUDA-graph
#             capture of the stock and fused full-width dit_cond (bisection to the breaking node if it fails) and
#             cuda_graph=true end to end; needs build/kernels/libideogram4_kernels.so (carry build/kernels)
#   runtime-<variant>: the runtime with backend options (see the case list; docs/tuning.md says why each);
#   memory  : scripts/runtime_memory.py (memory after load and after a generation, per weight mode and arena)
#   w8a8    : scripts/gpu_w8a8_check.py kernels (~2 min): the W8A8 ops against fp64 references with stated bounds,
#             their speed against onnxruntime's and torch's GEMMs, the tiny model end to end (cuda_fused_w8a8 bit-
#             identical to cuda_w8a8); PRECISION=w8a8 makes `prepare` export the cuda_w8a8 and cuda_fused_w8a8
#             graphs, runtime-w8a8 runs them (cuda_fused_w8a8), runtime-w8a8-stock the cuda_w8a8 ones,
#             w8a8-deviation compares runtime-w8a8's latents and images with `runtime`'s
#   cache   : scripts/cache_bench.py (issue 21, ~4-5 min on the full model): a guidance-1 run in its own process
#             (dit_uncond never loaded: load time, memory), then ONE load with the first-block cache pieces and a
#             threshold sweep (CACHE_ARGS, default 0,0.05,0.08,0.12,0.2,0.7,10 and TaylorSeer at 0.12 and 10) on
#             1024x1024 V4_DEFAULT_20 and V4_QUALITY_48; writes cache_report.md. Run `runtime` with
#             CASES=1024x1024:V4_DEFAULT_20 before it to compare threshold 0 with the full graphs bit for bit
#   check   : scripts/gpu_dequant_check.py on the tiny model (seconds): the cuda twin's FP8 MatMuls, no Memcpy,
#             no weight Transpose left after onnxruntime's optimizations; latents vs dequantize_at_load
#   load-profile: export/load_profile.py via bench.py: cold start to ready in fresh processes (sequential load
#             without a digest cache, concurrent load with an empty then a filled cache, no checksums), per component
#             sha256 / session-creation / warm-up times -> $OUT/load_profile.jsonl (docs/tuning.md §23)
#   serve   : scripts/serve_bench.py on the prepared engines: in-process Pipeline.generate vs `ideogram4 serve` over
#             HTTP and gRPC at 1024², the server's cold start to /readyz (digest cache filled, then empty), memory
#             per replica -> $OUT/serve_bench.jsonl (+ server logs); Ray Serve from .device/serve/part-* (carried in
#             the same call; scripts/stage_serve_wheels.sh) or /root/stage-serve/part-* (staged earlier)
# Retired probes (their answers are in docs/tuning.md): scripts/README.md.
# Every stage copies results.jsonl and report.md to $OUT.
set -uo pipefail
ROOT=${ROOT:-/tmp/ideogram4_bench}
CONFIG=${CONFIG:-full}
CASES=${CASES:-1024x1024:V4_DEFAULT_20,1024x1024:V4_TURBO_12,1536x1024:V4_DEFAULT_20,2048x2048:V4_DEFAULT_20}
source scripts/device_env.sh          # onnxruntime-gpu and the carried wheels (scripts/gpu_prepare.sh checks them)
B="python3 scripts/bench.py"
rc=0
for stage in "$@"; do
  case $stage in
    prepare)  $B prepare --config "$CONFIG" --device cuda --root "$ROOT" --precision "${PRECISION:-faithful}" || rc=$? ;;
    eager)    $B reference --root "$ROOT" --device cuda --cases "$CASES" || rc=$? ;;
    compiled) $B reference --root "$ROOT" --device cuda --compile --cases "$CASES" || rc=$? ;;
    runtime)  $B runtime --root "$ROOT" --backend onnxruntime-cuda --cases "$CASES" || rc=$? ;;
    runtime-stock)   $B runtime --root "$ROOT" --backend onnxruntime-cuda --cases "$CASES" --option fused_kernels=false || rc=$? ;;
    runtime-dqload-stock) $B runtime --root "$ROOT" --backend onnxruntime-cuda --cases "$CASES" --option dequantize_at_load=true --option fused_kernels=false || rc=$? ;;
    kernels)  python3 scripts/gpu_kernel_check.py --out "${OUT:-/tmp}" ${KERNEL_CHECK_ARGS:-} || rc=$? ;;
    profile-stock) $B profile --root "$ROOT" --backend onnxruntime-cuda --size 1024x1024 --option fused_kernels=false || rc=$? ;;
    runtime-dqload)  $B runtime --root "$ROOT" --backend onnxruntime-cuda --cases "$CASES" --option dequantize_at_load=true || rc=$? ;;
    runtime-cfg)     $B runtime --root "$ROOT" --backend onnxruntime-cuda --cases "$CASES" --option uncond_device_id=1 || rc=$? ;;
    runtime-pow2)    $B runtime --root "$ROOT" --backend onnxruntime-cuda --cases "$CASES" --option arena_extend_strategy=kNextPowerOfTwo || rc=$? ;;
    runtime-own-arena) $B runtime --root "$ROOT" --backend onnxruntime-cuda --cases "$CASES" --option shared_arena=false || rc=$? ;;
    runtime-w8a8)    $B runtime --root "$ROOT" --backend onnxruntime-cuda --cases "$CASES" --option precision=w8a8 || rc=$? ;;
    runtime-w8a8-stock) $B runtime --root "$ROOT" --backend onnxruntime-cuda --cases "$CASES" --option precision=w8a8 --option fused_kernels=false || rc=$? ;;
    runtime-cudagraph) $B runtime --root "$ROOT" --backend onnxruntime-cuda --cases "$CASES" --option cuda_graph=true || rc=$? ;;
    w8a8)     python3 scripts/gpu_w8a8_check.py kernels --out "${OUT:-/tmp}" || rc=$? ;;
    w8a8-deviation) python3 scripts/gpu_w8a8_check.py deviation --root "$ROOT" --out "${OUT:-/tmp}" || rc=$? ;;
    check)    python3 scripts/gpu_dequant_check.py | tee "${OUT:-/tmp}/dequant_check.json" || rc=$? ;;
    memory)   python3 scripts/runtime_memory.py --engines "$ROOT/engines" | tee "${OUT:-/tmp}/memory.jsonl" || rc=$? ;;
    runtime-dqload-cfg) $B runtime --root "$ROOT" --backend onnxruntime-cuda --cases "$CASES" --option dequantize_at_load=true --option uncond_device_id=1 || rc=$? ;;
    cache)    python3 scripts/cache_bench.py guidance1 --root "$ROOT" || rc=$?
              python3 scripts/cache_bench.py sweep --root "$ROOT" ${CACHE_ARGS:-} || rc=$?
              python3 scripts/cache_bench.py report --root "$ROOT" > "${OUT:-/tmp}/cache_report.md" || rc=$? ;;
    profile)  $B profile --root "$ROOT" --backend onnxruntime-cuda --size 1024x1024 || rc=$? ;;
    profile-w8a8) $B profile --root "$ROOT" --backend onnxruntime-cuda --size 1024x1024 --option precision=w8a8 || rc=$? ;;
    load-profile) $B load-profile --root "$ROOT" --backend onnxruntime-cuda --out "${OUT:-/tmp}/load_profile.jsonl" || rc=$? ;;
    serve)    parts=$(ls .device/serve/part-* 2>/dev/null || ls /root/stage-serve/part-* 2>/dev/null)
              if ! test -d /opt/serve/ray; then
                { test -n "$parts" && mkdir -p /opt/serve && cat $parts | xz -dc | tar -x -C /opt/serve; } ||
                  { echo "serve: no Ray Serve parts (run scripts/stage_serve_wheels.sh, carry .device/serve/part-0)"; rc=1; continue; }
              fi
              PYTHONPATH=/opt/serve:$PYTHONPATH python3 scripts/serve_bench.py --engines "$ROOT/engines" \
                --backend onnxruntime-cuda --size 1024x1024 --preset V4_DEFAULT_20 --requests "${SERVE_REQUESTS:-3}" \
                --uncached-start --out "${OUT:-/tmp}/serve_bench.jsonl" || rc=$? ;;
  esac
done
$B report --root "$ROOT" > /dev/null 2>&1
cp "$ROOT"/results.jsonl "$ROOT"/report.md "${OUT:-/tmp}"/ 2>/dev/null
cat "$ROOT"/report.md 2>/dev/null
exit $rc
