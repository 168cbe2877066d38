"""GPU-machine check of the lean runtime: synthetic checkpoint → export → `Pipeline(backend=onnxruntime-cuda)`
generates an image; the torch reference on the same GPU runs the same request (same prompt, size, preset and
initial noise) for parity. Writes a JSON report and both PNGs under --out.

    source scripts/device_env.sh   # + onnxruntime-gpu on PYTHONPATH (shared/device/stage-ort-gpu.sh)
    python3 scripts/gpu_runtime_check.py --config full-width --out $OUT
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="full-width")
    ap.add_argument("--root", default="/tmp/ideogram4_runtime_check")
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--preset", default="V4_DEFAULT_20")
    args = ap.parse_args()
    out, root = Path(args.out), Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    ck, eng = root / "ckpt", root / "engines"
    from ideogram4_engine.export.devtools import checkpoint_and_export
    checkpoint_and_export(root, args.config, device="cuda")
    prompt = "A lighthouse on a rocky coast at dusk, long exposure, waves crashing on the rocks."
    from ideogram4_engine.runtime.image import save_png
    from ideogram4_engine.runtime.packing import token_grid
    gh, gw = token_grid(args.size, args.size)
    noise = np.random.default_rng(0).standard_normal((1, gh * gw, 128), dtype=np.float32)
    manifest = json.loads((eng / "manifest.json").read_text())
    report = {"config": args.config, "size": args.size, "preset": args.preset,
              "exporter_version": manifest["exporter"]["version"], "manifest_format": manifest["format_version"]}

    # the torch reference first (then freed): onnxruntime's CUDA arena does not give memory back
    import torch
    from ideogram4_engine.export.reference.pipeline import ReferencePipeline, SamplingParams
    report["device"] = torch.cuda.get_device_name(0)
    ref = ReferencePipeline.from_checkpoint(ck, "cuda")
    ref(prompt, height=512, width=512, params=SamplingParams(1, 0.0, 1.75, (7.0,)), noise=None)   # warm-up
    torch.cuda.reset_peak_memory_stats()
    ref_res = ref(prompt, height=args.size, width=args.size, params=SamplingParams.from_preset(args.preset), noise=noise)
    report["reference_timings"] = ref_res.timings
    report["reference_peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    save_png(ref_res.images[0], out / "reference.png", {"prompt": prompt, "backend": "torch-reference"})
    ref_latents, ref_image = ref_res.latents, ref_res.images[0]
    del ref, ref_res
    torch.cuda.empty_cache()

    from ideogram4_engine.runtime.pipeline import Pipeline
    pipe = Pipeline(eng, backend="onnxruntime-cuda")
    pipe.generate(prompt, width=512, height=512, steps=1, guidance=7.0, seed=0)          # warm-up
    t = time.perf_counter()
    res = pipe.generate(prompt, width=args.size, height=args.size, preset=args.preset, noise=noise)
    wall = time.perf_counter() - t
    from ideogram4_engine.export.devtools import gpu_memory_used_mib
    used = " ".join(map(str, gpu_memory_used_mib() or []))
    save_png(res.images[0], out / "runtime.png", {"prompt": prompt, "backend": pipe.backend.name})
    report.update({"backend": pipe.backend.name, "load_s": pipe.load_seconds, "wall_s": wall,
                   "timings": {k: v for k, v in res.timings.items() if k != "step_s"},
                   "step_s_mean": float(np.mean(res.timings["step_s"])), "text_tokens": len(res.token_ids[0]),
                   "gpu_memory_used_mib_after_runtime": used})
    d = np.abs(np.asarray(res.images[0], int) - ref_image.astype(int))
    report["parity"] = {"latents_rel_err": float(np.linalg.norm(res.latents - ref_latents) /
                                                 np.linalg.norm(ref_latents)),
                        "pixels_within_2": float((d <= 2).mean()), "pixels_mean_abs": float(d.mean())}
    (out / "gpu_runtime_check.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
