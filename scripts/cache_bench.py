"""Skipping work (issue 21) on the GPU: the first-block cache's threshold sweep and a guidance-1 run.

    python scripts/cache_bench.py sweep      --root /tmp/ideogram4_bench [--thresholds 0,0.05,...] [--cases ...]
    python scripts/cache_bench.py guidance1  --root /tmp/ideogram4_bench [--size 1024x1024]
    python scripts/cache_bench.py report     --root /tmp/ideogram4_bench        # markdown table

`sweep` loads the pipeline ONCE with the cache pieces (TaylorSeer's graph included) and changes only the
Pipeline's CacheOptions between runs; threshold 0 is the no-cache reference (bit-identical to the full graphs
on the CPU; compared here with the `runtime` stage's latents when that stage ran in the same root). `guidance1`
runs in its own process (onnxruntime's arena never shrinks): every step at guidance 1, dit_uncond never loaded.
Records go to <root>/results.jsonl (kinds "cache", "guidance1"). Random synthetic weights' residual statistics
are not a trained model's: the speed is measured, the quality impact cannot be judged from these runs.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench import PROMPT, _nvidia_smi_used, noise_for, parse_cases, record  # noqa: E402


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def cmd_sweep(a) -> None:
    from ideogram4_engine.runtime.cache import CacheOptions
    from ideogram4_engine.runtime.pipeline import Pipeline
    root = Path(a.root)
    t0 = time.perf_counter()
    pipe = Pipeline(root / "engines", backend=a.backend, cache=CacheOptions(0.0, taylor=True))
    load_s = time.perf_counter() - t0
    thresholds = [float(t) for t in a.thresholds.split(",")]
    runs = [(t, False) for t in thresholds] + [(float(t), True) for t in a.taylor.split(",") if t]
    for w, h, preset in parse_cases(a.cases):
        noise = noise_for(w, h)
        pipe.generate(PROMPT, width=w, height=h, steps=1, guidance=7.0, noise=noise)      # warm this shape
        base = None
        stock = root / f"latents_runtime_{w}x{h}_{preset}.npy"          # the `runtime` stage's full graphs
        for threshold, taylor in runs:
            pipe.cache = CacheOptions(threshold, a.warmup, a.max_consecutive, taylor)
            res = pipe.generate(PROMPT, width=w, height=h, preset=preset, noise=noise)
            t = res.timings
            if threshold == 0 and not taylor:
                base = (res.latents, t["denoise_s"], t["total_s"])
            rec = {"kind": "cache", "backend": pipe.backend.name, "graph_variant": pipe.backend.graph_variant,
                   "width": w, "height": h, "preset": preset, "steps": res.sampling.steps, "threshold": threshold,
                   "warmup": a.warmup, "max_consecutive": a.max_consecutive, "taylor": taylor,
                   "reused": len(res.reused_steps[0]), "reused_steps": res.reused_steps[0],
                   "changes": {str(k): round(v, 5) for k, v in res.cache_changes[0].items()},
                   "denoise_s": t["denoise_s"], "step_ms_mean": 1e3 * t["denoise_s"] / res.sampling.steps,
                   "step_ms_median": 1e3 * float(np.median(t["step_s"])), "image_s": t["total_s"],
                   "load_s": load_s, "gpu_mem_used_mib_all": _nvidia_smi_used()}
            if base is not None:
                rec.update(denoise_speedup=base[1] / t["denoise_s"], image_speedup=base[2] / t["total_s"],
                           latents_rel_dev=_rel(res.latents, base[0]))
            if threshold == 0 and not taylor and stock.exists():
                x = np.load(stock)
                rec.update(vs_full_graphs_bit_identical=bool(np.array_equal(res.latents, x)),
                           vs_full_graphs_rel=_rel(res.latents, x))
            record(root, rec)


def cmd_guidance1(a) -> None:
    from ideogram4_engine.runtime.pipeline import Pipeline
    root = Path(a.root)
    w, h = (int(x) for x in a.size.split("x"))
    t0 = time.perf_counter()
    pipe = Pipeline(root / "engines", backend=a.backend, load_uncond=False)
    load_s = time.perf_counter() - t0
    mem_load = _nvidia_smi_used()
    noise = noise_for(w, h)
    pipe.generate(PROMPT, width=w, height=h, steps=1, guidance=1.0, noise=noise)
    res = pipe.generate(PROMPT, width=w, height=h, preset=a.preset, guidance=1.0, noise=noise)
    t = res.timings
    record(root, {"kind": "guidance1", "backend": pipe.backend.name, "graph_variant": pipe.backend.graph_variant,
                  "width": w, "height": h, "preset": a.preset, "steps": res.sampling.steps,
                  "sessions": sorted(getattr(pipe.backend, "sessions", {})),
                  "uncond_loaded": "dit_uncond" in getattr(pipe.backend, "sessions", {}), "load_s": load_s,
                  "step_ms": 1e3 * float(np.median(t["step_s"])), "denoise_s": t["denoise_s"], "image_s": t["total_s"],
                  "gpu_mem_after_load_mib_all": mem_load, "gpu_mem_used_mib_all": _nvidia_smi_used()})


def cmd_report(a) -> None:
    """The sweep as a markdown table (<root>/cache_report.md)."""
    import json
    root = Path(a.root)
    recs = [json.loads(x) for x in (root / "results.jsonl").read_text().splitlines() if x.strip()]
    lines = ["| size | preset | threshold | taylor | reused | denoise s | speed-up | image s | latents rel dev |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in (r for r in recs if r["kind"] == "cache"):
        lines.append(f"| {r['width']}×{r['height']} | {r['preset']} | {r['threshold']:g} | {r['taylor']} | "
                     f"{r['reused']}/{r['steps']} | {r['denoise_s']:.2f} | {r.get('denoise_speedup', float('nan')):.2f} | "
                     f"{r['image_s']:.2f} | {r.get('latents_rel_dev', float('nan')):.2e} |")
    for r in (r for r in recs if r["kind"] == "cache" and "vs_full_graphs_bit_identical" in r):
        lines.append(f"\nthreshold 0 vs the full graphs ({r['preset']}): bit-identical {r['vs_full_graphs_bit_identical']}, "
                     f"rel {r['vs_full_graphs_rel']:.2e}")
    for r in (r for r in recs if r["kind"] == "guidance1"):
        lines.append(f"\nguidance 1 ({r['preset']}, {r['width']}×{r['height']}): uncond loaded {r['uncond_loaded']}, load "
                     f"{r['load_s']:.1f} s, step {r['step_ms']:.1f} ms, image {r['image_s']:.2f} s, GPU memory "
                     f"{r['gpu_mem_used_mib_all']} MiB")
    text = "\n".join(lines)
    (root / "cache_report.md").write_text(text + "\n")
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sweep")
    s.add_argument("--cases", default="1024x1024:V4_DEFAULT_20,1024x1024:V4_QUALITY_48")
    s.add_argument("--thresholds", default="0,0.05,0.08,0.12,0.2,0.7,10",
                   help="10 (the maximum) reuses every step the warm-up and the cap allow: the speed bound; 0.7 is about the median change on the tiny random model")
    s.add_argument("--taylor", default="0.12,10", help="thresholds also run with TaylorSeer (comma-separated; '' none)")
    s.add_argument("--warmup", type=int, default=2)
    s.add_argument("--max-consecutive", type=int, default=3)
    g = sub.add_parser("guidance1")
    g.add_argument("--size", default="1024x1024")
    g.add_argument("--preset", default="V4_DEFAULT_20")
    r = sub.add_parser("report")
    for p in (s, g, r):
        p.add_argument("--root", default="/tmp/ideogram4_bench")
        p.add_argument("--backend", default="onnxruntime-cuda")
    a = ap.parse_args()
    {"sweep": cmd_sweep, "guidance1": cmd_guidance1, "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    main()
