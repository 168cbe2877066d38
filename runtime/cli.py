"""`ideogram4` command: `generate` (prompt → PNG) and `info` (what an engines folder holds).

Flags follow the official run_inference.py in spirit: --prompt, --sampler-preset, --seed, --width, --height,
--output; plus --engines, --backend and --json (machine-readable timings on stdout).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .image import check_writable, save_png

MODEL_ID = "ideogram-4-fp8"


def _progress_bar(stream=sys.stderr):
    def show(done: int, total: int) -> None:
        width = 30
        fill = int(width * done / total)
        print(f"\r  denoising [{'#' * fill}{'.' * (width - fill)}] {done}/{total}", end="", file=stream, flush=True)
        if done == total:
            print(file=stream)
    return show


def cmd_generate(args) -> int:
    from .manifest import ManifestError
    from .pipeline import Pipeline

    outputs = [Path(args.output)] if len(args.prompt) == 1 else \
        [Path(args.output).with_name(f"{Path(args.output).stem}-{i}{Path(args.output).suffix or '.png'}")
         for i in range(len(args.prompt))]
    try:
        for o in outputs:
            check_writable(o)
        options = {}
        if args.uncond_device is not None:
            if args.backend != "onnxruntime-cuda":
                raise ValueError(f"--uncond-device needs --backend onnxruntime-cuda (got --backend {args.backend})")
            options["uncond_device_id"] = args.uncond_device
        if args.dequantize_at_load:
            if not args.backend.startswith("onnxruntime-"):
                raise ValueError(f"--dequantize-at-load needs --backend onnxruntime-cuda or onnxruntime-cpu "
                                 f"(got --backend {args.backend})")
            options["dequantize_at_load"] = True
        if args.precision != "faithful":
            if args.backend != "onnxruntime-cuda":
                raise ValueError(f"--precision {args.precision} needs --backend onnxruntime-cuda (got --backend {args.backend})")
            options["precision"] = args.precision
        pipe = Pipeline(args.engines, backend=args.backend, **options)
    except (ValueError, ManifestError, RuntimeError, MemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    synthetic = pipe.manifest.synthetic
    if synthetic:
        print(f"note: SYNTHETIC weights (config {synthetic.get('config')!r}): random weights in the official "
              "layout, not the real model -- the image is noise-like by design", file=sys.stderr)
    guidance = None
    if args.guidance:
        guidance = [float(x) for x in args.guidance.split(",")]
        guidance = guidance[0] if len(guidance) == 1 else guidance
    try:
        result = pipe.generate(args.prompt, width=args.width, height=args.height, preset=args.sampler_preset,
                               steps=args.steps, mu=args.mu, std=args.std, guidance=guidance, seed=args.seed,
                               progress=None if args.json or not sys.stderr.isatty() and not args.progress
                               else _progress_bar())
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = result.sampling
    precision = getattr(pipe.backend, "precision", "faithful")      # what ran (w8a8 may have fallen back)
    for prompt, image, out in zip(args.prompt, result.images, outputs):
        save_png(image, out, {"prompt": prompt, "seed": str(args.seed), "preset": s.preset or "custom",
                              "steps": str(s.steps), "mu": str(s.mu), "std": str(s.std),
                              "guidance": ",".join(map(str, s.guidance)), "size": f"{args.width}x{args.height}",
                              "model": MODEL_ID + (" SYNTHETIC weights" if synthetic else ""),
                              "backend": pipe.backend.name, "precision": precision,
                              "seed_generator": "numpy PCG64 standard_normal"})
    report = {"outputs": [str(o) for o in outputs], "backend": pipe.backend.name, "precision": precision,
              "width": args.width,
              "height": args.height, "preset": s.preset, "steps": s.steps, "seed": args.seed,
              "text_tokens": [len(t) for t in result.token_ids], "synthetic": bool(synthetic),
              "timings": {"load_s": pipe.load_seconds, **result.timings}}
    if args.json:
        print(json.dumps(report))
    else:
        t = result.timings
        print(f"wrote {', '.join(map(str, outputs))} with {pipe.backend.name}: load {pipe.load_seconds:.2f} s, "
              f"text {t['text_encoder_s']:.2f} s, denoise {t['denoise_s']:.2f} s "
              f"({t['denoise_s'] / s.steps:.3f} s/step), vae {t['vae_s']:.2f} s, total {t['total_s']:.2f} s")
    return 0


def cmd_info(args) -> int:
    from . import backends
    from .manifest import ManifestError, load_manifest

    try:
        m = load_manifest(args.engines)
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    raw = m.raw
    lines = [f"engines: {m.root}",
             f"source: {raw['source']['checkpoint']}" + (" (SYNTHETIC weights)" if m.synthetic else ""),
             f"exporter v{raw['exporter']['version']}, opset {raw['exporter']['opset']}, attention "
             f"{raw['exporter']['attention_form']}, weights {raw['exporter']['weights']}, precision "
             f"{', '.join(m.precisions)}"]
    for name, c in m.components.items():
        size = sum(e["bytes"] for e in {e["file"]: e for e in [*c["graphs"].values(), *([c["data"]] if "data" in c else [])]}.values())
        lines.append(f"  {name:13s} {size / 1e6:10.1f} MB   inputs: {', '.join(i['name'] for i in c['inputs'])}")
    lim = m.limits
    lines.append(f"sizes: multiples of {lim['multiple']} in {lim['min_side']}…{lim['max_side']} px, aspect ≤ "
                 f"{lim['max_aspect']}:1; prompts ≤ {lim['max_text_tokens']} tokens (template included)")
    lines.append(f"presets: {', '.join(m.presets)} (default {m.default_preset})")
    avail = []
    for b in ("tensorrt", "onnxruntime-cuda", "onnxruntime-cpu"):
        try:
            backends.create(b, m, components=("guided_step",))
            avail.append(f"{b}: available")
        except backends.BackendUnavailable as e:
            avail.append(f"{b}: unavailable ({str(e).splitlines()[0]})")
    lines.append("backends here:\n  " + "\n  ".join(avail))
    from .backends.tensorrt.memory import memory_report
    lines += memory_report(m)          # GPU memory per TensorRT memory_mode (an estimate)
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ideogram4", description="Ideogram 4 lean runtime (engines folder → PNG)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="prompt → PNG")
    g.add_argument("--engines", required=True, help="engines folder written by `make export`")
    g.add_argument("--prompt", required=True, action="append",
                   help="text or JSON caption, passed through unchanged; repeat for a batch")
    g.add_argument("--sampler-preset", default=None, help="V4_QUALITY_48, V4_DEFAULT_20 (default), V4_TURBO_12")
    g.add_argument("--steps", type=int, default=None, help="override the preset's step count (needs --guidance)")
    g.add_argument("--mu", type=float, default=None, help="override the preset's logit-normal mean (before the "
                                                         "resolution shift)")
    g.add_argument("--std", type=float, default=None, help="override the preset's logit-normal std")
    g.add_argument("--guidance", default=None, help="a constant, or comma-separated values, index 0 = last step")
    g.add_argument("--seed", type=int, default=0, help="0…2^64-1 (default 0); numpy PCG64 noise")
    g.add_argument("--width", type=int, default=1024)
    g.add_argument("--height", type=int, default=1024)
    g.add_argument("--output", default="out.png", help="PNG path (with several prompts: <stem>-<i>.png)")
    g.add_argument("--backend", default="auto", help="auto, tensorrt, tensorrt-rtx, onnxruntime-cuda, onnxruntime-cpu")
    g.add_argument("--uncond-device", type=int, default=None,
                   help="onnxruntime-cuda: run the unconditional DiT on this GPU, concurrently (CFG-parallel)")
    g.add_argument("--dequantize-at-load", action="store_true",
                   help="onnxruntime: dequantize the FP8 weights once at load, on the device (H100, 1024²: -4%% step "
                        "time, 58.5 instead of 32.5 GiB; the CPU results are bit for bit the default's)")
    g.add_argument("--precision", default="faithful", choices=["faithful", "w8a8"],
                   help="onnxruntime-cuda: w8a8 runs the DiT blocks' linears with FP8 activations on FP8 tensor cores "
                        "(opt-in: the numbers change; needs an export with --precision w8a8; docs/runtime.md); "
                        "recorded in the PNG metadata")
    g.add_argument("--json", action="store_true", help="print timings and outputs as one JSON object")
    g.add_argument("--progress", action="store_true", help="show the step progress bar even when not a TTY")
    g.set_defaults(func=cmd_generate)
    i = sub.add_parser("info", help="summary of an engines folder and the backends available here")
    i.add_argument("--engines", required=True)
    i.set_defaults(func=cmd_info)
    from ..serve.cli import add_parser as add_serve     # `ideogram4 serve` (serve/cli.py: ray only when it runs)
    add_serve(sub)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
