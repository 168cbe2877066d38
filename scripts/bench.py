"""Benchmark harness: the lean runtime and the PyTorch reference on the same checkpoint, prompt and noise.

    python scripts/bench.py prepare   --config tiny --root /tmp/bench            # checkpoint + export
    python scripts/bench.py runtime   --root /tmp/bench --backend onnxruntime-cpu --cases 512x512:V4_TURBO_12
    python scripts/bench.py reference --root /tmp/bench --device cpu [--compile] --cases ...
    python scripts/bench.py report    --root /tmp/bench                          # table + ratios (markdown)

Each measuring command appends one JSON record per case to <root>/results.jsonl, so the GPU work can be split
over several calls (and processes: onnxruntime's CUDA arena never returns memory). `make bench` runs the
tiny CPU version of all of it.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ideogram4_engine.export.devtools import PROMPT, gpu_memory_used_mib, noise_for, parse_cases, record

DIT_MACS_PER_TOKEN_PER_BLOCK = 254_803_968   # spec §2.3 (real widths)


def dit_flops(cfg: dict, L: int, T: int) -> float:
    """Spec §10.2 per forward (1 MAC = 2 FLOPs), generalised to the config's widths and depth."""
    D, Fdim, C, I = cfg["emb_dim"], cfg["llm_features_dim"], cfg["in_channels"], cfg["intermediate_size"]
    A = cfg["adanln_dim"]
    per_token_block = 3 * D * D + D * D + 3 * D * I       # qkv + o + w1/w2/w3
    return (cfg["num_layers"] * (2 * L * per_token_block + 4 * L * L * D) + 2 * C * D * (L - T)
            + 2 * Fdim * D * T + 2 * D * C * L + 0 * A)


# ------------------------------------------------------------------------------------------------- prepare

def cmd_prepare(a) -> None:
    from ideogram4_engine.export.devtools import checkpoint_and_export
    from ideogram4_engine.export.synthetic.writer import write_checkpoint
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.jsonl").unlink(missing_ok=True)
    t = time.perf_counter()
    if not (root / "ckpt").exists():
        write_checkpoint(root / "ckpt", a.config, seed=0, device=a.device)
    write_s = time.perf_counter() - t
    t = time.perf_counter()
    checkpoint_and_export(root, a.config, device=a.device, precision=a.precision, export_again=True)
    record(root, {"kind": "prepare", "config": a.config, "checkpoint_write_s": write_s,
                  "export_s": time.perf_counter() - t})


# ------------------------------------------------------------------------------------------------- timers

class StageTimer:
    """Wall time per named call, synchronised by `sync` (CUDA: torch.cuda.synchronize)."""

    def __init__(self, sync=lambda: None):
        self.sync, self.times = sync, {}

    def wrap(self, name: str, fn):
        def timed(*args, **kw):
            self.sync()
            t = time.perf_counter()
            out = fn(*args, **kw)
            self.sync()
            self.times.setdefault(name, []).append(time.perf_counter() - t)
            return out
        return timed


def summarise(times: dict[str, list[float]]) -> dict[str, float]:
    return {f"{k}_ms": 1e3 * float(np.median(v)) for k, v in times.items()}


# ------------------------------------------------------------------------------------------------- runtime

def cmd_runtime(a) -> None:
    from ideogram4_engine.runtime.pipeline import Pipeline
    root = Path(a.root)
    t0 = time.perf_counter()
    options = _options(a.option)
    pipe = Pipeline(root / "engines", backend=a.backend, **options)
    manifest = json.loads((root / "engines" / "manifest.json").read_text())
    cfg = manifest["model"]["dit"]
    timer = StageTimer()
    run = pipe.backend.run
    pipe.backend.run = lambda c, inputs: timer.wrap(c, run)(c, inputs)
    first = True
    for w, h, preset in parse_cases(a.cases):
        noise = noise_for(w, h)
        pipe.generate(PROMPT, width=w, height=h, steps=1, guidance=7.0, noise=noise)      # warm this shape
        warm_mem = gpu_memory_used_mib()       # against the figure after the full run: does the arena keep growing?
        if first:
            cold = time.perf_counter() - t0
            first = False
        timer.times.clear()
        res = pipe.generate(PROMPT, width=w, height=h, preset=preset, noise=noise)
        T, N = len(res.token_ids[0]), (h // 16) * (w // 16)
        st = summarise(timer.times)
        mem = gpu_memory_used_mib()
        rec = {"kind": "runtime" + "".join(f" {k}={v}" for k, v in options.items()) + (f" {a.label}" if a.label else ""),
               "backend": pipe.backend.name, "graph_variant": pipe.backend.graph_variant,
               "width": w, "height": h, "preset": preset,
               "steps": res.sampling.steps, "text_tokens": T, **st,
               "step_ms": 1e3 * float(np.median(res.timings["step_s"])), "image_s": res.timings["total_s"],
               "text_encoder_s": res.timings["text_encoder_s"], "vae_s": res.timings["vae_s"],
               "load_s": pipe.load_seconds, "cold_start_s": cold,
               "flops_cond": dit_flops(cfg, T + N, T), "flops_uncond": dit_flops(cfg, N, 0),
               "gpu_mem_used_mib": (mem or [None])[0], "gpu_mem_used_mib_all": mem,
               "gpu_mem_after_warmup_mib_all": warm_mem, "precision": pipe.backend.precision}
        np.save(root / f"latents_{rec['kind'].replace(' ', '_')}_{w}x{h}_{preset}.npy", res.latents)
        np.save(root / f"image_{rec['kind'].replace(' ', '_')}_{w}x{h}_{preset}.npy", np.asarray(res.images[0]))
        record(root, rec)


def _options(pairs: list[str]) -> dict:
    options = dict(kv.split("=", 1) for kv in pairs)
    return {k: {"true": True, "false": False}.get(v.lower(), int(v) if v.isdigit() else v) for k, v in options.items()}


def cmd_profile(a) -> None:
    """In a process of its own: onnxruntime keeps every session's memory, so the profiled session must not
    share the GPU with a whole pipeline."""
    from ideogram4_engine.runtime.pipeline import Pipeline
    options = _options(a.option)
    pipe = Pipeline(Path(a.root) / "engines", backend=a.backend, components=("text_encoder",), **options)
    _profile_dit(pipe, Path(a.root), a.size)
    if pipe.backend.device == "cuda":
        del pipe
        pipe = Pipeline(Path(a.root) / "engines", backend=a.backend, components=("text_encoder", "dit_cond"),
                        **options)
        _profile_kernels(pipe, Path(a.root), a.size)


def _dit_feeds(pipe, w: int, h: int) -> dict:
    from ideogram4_engine.runtime.rope import dit_rope_tables
    m = pipe.manifest
    ids = pipe.tokenizer.encode(PROMPT)
    T, gh, gw = len(ids), h // 16, w // 16
    feats = pipe.backend.download(pipe.backend.run("text_encoder", {"input_ids": np.array([ids], np.int64)})["text_features"])
    cos, sin = dit_rope_tables(T, gh, gw, m.inv_freq, m.mrope_section)
    return {"latents": noise_for(w, h), "tau": np.array([0.5], np.float32), "rope_cos": cos[None],
            "rope_sin": sin[None], "text_features": feats}


def _profile_dit(pipe, root: Path, size: str) -> None:
    """One dit_cond forward under onnxruntime's profiler: time per op type. On the CUDA provider these are the
    host-side times of each node (launches, plus any wait for the GPU inside a node), not kernel times: see
    _profile_kernels."""
    import onnxruntime as ort
    w, h = (int(x) for x in size.split("x"))
    m = pipe.manifest
    comp = "dit_cond"
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(root / "ort_profile")
    if getattr(pipe.backend, "kernels_library", None):          # the cuda_fused graphs' ops
        opts.register_custom_ops_library(str(pipe.backend.kernels_library))
    dev = pipe.backend.device
    providers = [("CUDAExecutionProvider", {"device_id": 0})] if dev == "cuda" else ["CPUExecutionProvider"]
    sess = ort.InferenceSession(str(m.graph_path(comp, pipe.backend.graph_variant)), opts, providers=providers)
    feeds = _dit_feeds(pipe, w, h)
    sess.run(None, feeds)
    sess.run(None, feeds)
    path = sess.end_profiling()
    events = json.loads(Path(path).read_text())
    by_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + e["dur"] / 1e3 / 2          # ms per forward (2 runs)
    total = sum(by_op.values())
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:25]
    record(root, {"kind": "profile", "component": comp, "graph_variant": pipe.backend.graph_variant,
                  "width": w, "height": h, "total_kernel_ms": total,
                  "by_op_ms": dict(top)})


KERNEL_CLASSES = (        # (class, substrings of the kernel name), first match wins; lower-case
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
    ("fp8 dequantize", ("fp8", "dequant", "e4m3", "blockquant")),
    ("gemm", ("gemm", "nvjet", "sm90_xmma", "cutlass", "cublas", "matmul", "gemv")),
    ("norm", ("layernorm", "rmsnorm", "simplified", "reduce")),
    ("copy/split/gather", ("split", "transpose", "concat", "gather", "copy", "slice", "memcpy")),
    ("elementwise", ("elementwise", "unary", "binary", "cast", "quickgelu", "sigmoid", "tanh", "_kernel")),
)


def _profile_kernels(pipe, root: Path, size: str, runs: int = 3) -> None:
    """GPU time per kernel of one dit_cond forward on onnxruntime-CUDA, from torch's profiler: CUPTI records
    every kernel of the process, onnxruntime's included. Grouped by KERNEL_CLASSES (name patterns), with the
    GPU-busy time against the wall time per forward (the gap is launch overhead and host waits)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    w, h = (int(x) for x in size.split("x"))
    feeds = {k: pipe.backend.upload(v) for k, v in _dit_feeds(pipe, w, h).items()}
    for _ in range(2):
        pipe.backend.run("dit_cond", feeds)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in range(runs):
            pipe.backend.run("dit_cond", feeds)
        wall = (time.perf_counter() - t) / runs
    torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels.setdefault(e.name, [0.0, 0])
            k[0] += e.device_time_total / 1e3 / runs          # ms per forward
            k[1] += 1 / runs
    by_class: dict[str, float] = {}
    for name, (ms, _) in kernels.items():
        low = name.lower()
        cls = next((c for c, keys in KERNEL_CLASSES if any(x in low for x in keys)), "other")
        by_class[cls] = by_class.get(cls, 0.0) + ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:60]
    record(root, {"kind": "kernels", "component": "dit_cond", "graph_variant": pipe.backend.graph_variant,
                  "width": w, "height": h, "wall_ms": 1e3 * wall,
                  "gpu_busy_ms": sum(v[0] for v in kernels.values()),
                  "kernels_per_forward": sum(v[1] for v in kernels.values()),
                  "by_class_ms": dict(sorted(by_class.items(), key=lambda kv: -kv[1])),
                  "top_kernels": [{"name": n[:160], "ms": round(v[0], 3), "calls": round(v[1], 1)} for n, v in top]})


# ------------------------------------------------------------------------------------------------- reference

def cmd_reference(a) -> None:
    import torch
    from ideogram4_engine.export.reference.pipeline import ReferencePipeline, SamplingParams
    root = Path(a.root)
    cuda = a.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    pipe = ReferencePipeline.from_checkpoint(root / "ckpt", a.device)
    cfg = json.loads((root / "engines" / "manifest.json").read_text())["model"]["dit"]
    compile_s = None
    if a.compile:
        pipe.dit_cond = torch.compile(pipe.dit_cond, dynamic=False)
        pipe.dit_uncond = torch.compile(pipe.dit_uncond, dynamic=False)
    timer = StageTimer(sync)
    pipe.dit_cond = timer.wrap("dit_cond", pipe.dit_cond)
    pipe.dit_uncond = timer.wrap("dit_uncond", pipe.dit_uncond)
    pipe.decode = timer.wrap("vae_decoder", pipe.decode)
    first = True
    for w, h, preset in parse_cases(a.cases):
        noise = noise_for(w, h)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync()
        t = time.perf_counter()
        pipe(PROMPT, height=h, width=w, params=SamplingParams(1, 0.0, 1.75, (7.0,)), noise=noise)   # warm / compile
        sync()
        warm_s = time.perf_counter() - t
        if first:
            cold = time.perf_counter() - t0
            first = False
        timer.times.clear()
        res = pipe(PROMPT, height=h, width=w, params=SamplingParams.from_preset(preset), noise=noise)
        T, N = len(res.token_ids[0]), (h // 16) * (w // 16)
        st = summarise(timer.times)
        steps = len(timer.times["dit_cond"])
        rec = {"kind": "reference-compiled" if a.compile else "reference-eager", "device": a.device,
               "width": w, "height": h, "preset": preset, "steps": steps, "text_tokens": T, **st,
               "step_ms": st["dit_cond_ms"] + st["dit_uncond_ms"], "image_s": res.timings["total_s"],
               "text_encoder_s": res.timings["text_encoder_s"], "vae_s": res.timings["vae_s"],
               "warmup_or_compile_s": warm_s, "cold_start_s": cold,
               "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None,
               "flops_cond": dit_flops(cfg, T + N, T), "flops_uncond": dit_flops(cfg, N, 0)}
        if cuda and not a.compile:
            rec["bf16_matmul_tflops"] = _bf16_rate()
        np.save(root / f"latents_{rec['kind']}_{w}x{h}_{preset}.npy", res.latents)
        record(root, rec)
    del compile_s


def _bf16_rate() -> float:
    import torch
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    n = 20
    for _ in range(n):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * n / (time.perf_counter() - t) / 1e12


def cmd_load_profile(a) -> None:
    """Cold-start breakdown, one fresh process per scenario (export/load_profile.py)."""
    from ideogram4_engine.export import load_profile
    root = Path(a.root)
    out = Path(a.out) if a.out else None

    def emit(rec):
        record(root, rec)
        if out is not None:
            with open(out, "a") as f:
                f.write(json.dumps(rec) + "\n")
    w, h = (int(x) for x in a.warmup.lower().split("x"))
    rc = load_profile.run(root, a.backend, _options(a.option), (w, h), a.scenarios.split(","), emit)
    if rc:
        raise SystemExit(rc)


# ------------------------------------------------------------------------------------------------- report

def cmd_report(a) -> None:
    root = Path(a.root)
    recs = [json.loads(l) for l in (root / "results.jsonl").read_text().splitlines() if l.strip()]
    latest = {}
    for r in recs:
        if r["kind"].startswith("runtime") or r["kind"] in ("reference-eager", "reference-compiled"):
            latest[(r["kind"], r["width"], r["height"], r["preset"])] = r
    rows = list(latest.values())
    bf16 = next((r["bf16_matmul_tflops"] for r in rows if r.get("bf16_matmul_tflops")), None)
    lines = ["| path | size | preset | text tok | DiT cond ms | DiT uncond ms | step ms | TFLOP/s | text s | VAE s | image s | cold s | memory |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        name = f"{r['kind']} ({r['backend']})" if r["kind"].startswith("runtime") else r["kind"]
        tflops = (r["flops_cond"] + r["flops_uncond"]) / (r["step_ms"] / 1e3) / 1e12
        mem = (f"{r['peak_gpu_bytes'] / 2**30:.1f} GiB peak" if r.get("peak_gpu_bytes") else
               f"{r['gpu_mem_used_mib'] / 1024:.1f} GiB used" if r.get("gpu_mem_used_mib") else "–")
        lines.append(f"| {name} | {r['width']}×{r['height']} | {r['preset']} | {r['text_tokens']} | "
                     f"{r['dit_cond_ms']:.1f} | {r['dit_uncond_ms']:.1f} | {r['step_ms']:.1f} | {tflops:.3g} | "
                     f"{r['text_encoder_s']:.3f} | {r['vae_s']:.3f} | {r['image_s']:.2f} | {r['cold_start_s']:.1f} | {mem} |")
    ratio = ["", "| size | preset | step: runtime/eager | step: runtime/compiled | image: runtime/eager | latents rel err runtime vs eager |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in [r for r in rows if r["kind"].startswith("runtime")]:
        key = (r["width"], r["height"], r["preset"])
        e = next((x for x in rows if x["kind"] == "reference-eager" and (x["width"], x["height"], x["preset"]) == key), None)
        c = next((x for x in rows if x["kind"] == "reference-compiled" and (x["width"], x["height"], x["preset"]) == key), None)
        err = "–"
        le = root / f"latents_reference-eager_{key[0]}x{key[1]}_{key[2]}.npy"
        lr = root / f"latents_{r['kind'].replace(' ', '_')}_{key[0]}x{key[1]}_{key[2]}.npy"
        if le.exists() and lr.exists():
            x, y = np.load(lr), np.load(le)
            err = f"{np.linalg.norm(x - y) / np.linalg.norm(y):.2e}"
        vs_compiled = f"{r['step_ms'] / c['step_ms']:.2f}" if c else "–"
        ratio.append(f"| {r['kind']}: {key[0]}×{key[1]} | {key[2]} | {r['step_ms'] / e['step_ms']:.2f} | {vs_compiled} | "
                     f"{r['image_s'] / e['image_s']:.2f} | {err} |" if e else f"| {key[0]}×{key[1]} | {key[2]} | – | – | – | – |")
    extra = []
    for key in sorted({(r["width"], r["height"], r["preset"]) for r in rows}):
        le = root / f"latents_reference-eager_{key[0]}x{key[1]}_{key[2]}.npy"
        lc = root / f"latents_reference-compiled_{key[0]}x{key[1]}_{key[2]}.npy"
        ls = root / f"latents_runtime_fused_kernels=False_{key[0]}x{key[1]}_{key[2]}.npy"
        if le.exists() and lc.exists():     # the bar for the runtime: no farther from eager than compiled is
            y = np.load(le)
            extra.append(f"\nLatents rel err, reference-compiled vs eager, {key[0]}×{key[1]} {key[2]}: "
                         f"{np.linalg.norm(np.load(lc) - y) / np.linalg.norm(y):.2e}")
        if ls.exists():                     # fused (and other) runtime paths against the stock cuda graphs
            y = np.load(ls)
            for r in [r for r in rows if r["kind"].startswith("runtime") and (r["width"], r["height"], r["preset"]) == key]:
                lr = root / f"latents_{r['kind'].replace(' ', '_')}_{key[0]}x{key[1]}_{key[2]}.npy"
                if lr.exists() and lr != ls:
                    x = np.load(lr)
                    extra.append(f"\n{r['kind']} vs runtime stock graphs, {key[0]}×{key[1]} {key[2]}: "
                                 f"bit-identical {bool(np.array_equal(x, y))}, max abs {float(np.abs(x - y).max()):.3g}")
    if bf16:
        extra.append(f"\nMeasured bf16 GEMM rate on this card (torch, 8192³): {bf16:.0f} TFLOP/s; "
                     "bf16 floor per step = step FLOPs / that rate.")
    for r in recs:
        if r["kind"] == "kernels":
            extra.append(f"\nGPU kernels (CUPTI), one {r['component']} forward at {r['width']}×{r['height']}: "
                         f"{r['gpu_busy_ms']:.1f} ms busy of {r['wall_ms']:.1f} ms wall, "
                         f"{r['kernels_per_forward']:.0f} kernels; " +
                         ", ".join(f"{k} {v:.1f} ms" for k, v in r["by_class_ms"].items()))
        if r["kind"] == "load-profile":
            from ideogram4_engine.export.load_profile import summary_line
            extra.append("\n" + summary_line(r))
        if r["kind"] == "profile":
            extra.append(f"\nonnxruntime profile, one {r['component']} forward at {r['width']}×{r['height']}: "
                         f"{r['total_kernel_ms']:.1f} ms of kernels; by op: " +
                         ", ".join(f"{k} {v:.1f} ms" for k, v in r["by_op_ms"].items()))
    text = "\n".join(lines + ratio + extra)
    (root / "report.md").write_text(text + "\n")
    from ideogram4_engine.export.charts import chart_rows, svg_chart
    (root / "chart.svg").write_text(svg_chart(chart_rows(recs), a.title or f"bench: {root.name}"))
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--config", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="faithful", help="export --precision (w8a8: also the cuda_w8a8 graphs)")
    for name in ("runtime", "reference"):
        s = sub.add_parser(name)
        s.add_argument("--cases", default="1024x1024:V4_DEFAULT_20,1024x1024:V4_TURBO_12")
        if name == "runtime":
            s.add_argument("--backend", default="auto")
            s.add_argument("--option", action="append", default=[],
                           help="backend option key=value, e.g. dequantize_at_load=true or uncond_device_id=1")
            s.add_argument("--label", default="", help="appended to the record's kind (an environment-only variant)")
        else:
            s.add_argument("--device", default="cuda")
            s.add_argument("--compile", action="store_true")
    pr = sub.add_parser("profile")
    pr.add_argument("--backend", default="auto")
    pr.add_argument("--size", default="1024x1024")
    pr.add_argument("--option", action="append", default=[], help="backend option key=value (as for runtime)")
    lp = sub.add_parser("load-profile", help="cold-start breakdown (export/load_profile.py)")
    lp.add_argument("--backend", default="onnxruntime-cuda")
    lp.add_argument("--warmup", default="1024x1024", help="the warm-up size (the server's default size)")
    lp.add_argument("--scenarios", default="sequential,parallel-uncached,parallel-cached,noverify,ort-phases")
    lp.add_argument("--option", action="append", default=[], help="backend option key=value (as for runtime)")
    lp.add_argument("--out", default="", help="also append the records to this file")
    r = sub.add_parser("report", help="report.md (tables) and chart.svg (step, image time, memory per path)")
    r.add_argument("--title", default=None, help="the chart's title (default: the folder's name)")
    for s in sub.choices.values():
        s.add_argument("--root", default="/tmp/ideogram4_bench")
    a = ap.parse_args()
    {"prepare": cmd_prepare, "runtime": cmd_runtime, "reference": cmd_reference, "profile": cmd_profile,
     "report": cmd_report, "load-profile": cmd_load_profile}[a.cmd](a)


if __name__ == "__main__":
    main()
