"""`ideogram4` command: `generate` (prompt → PNG) and `info` (what an engines folder holds).

Flags follow the official run_inference.py in spirit: --prompt, --sampler-preset, --seed, --width, --height,
--output; plus --engines, --backend and --json (machine-readable timings on stdout). Failures are one `error:`
line and an exit code from errors.EXIT_CODES (the --help epilog lists them).
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from . import errors
from .cache import cache_label
from .cli_args import (HelpFormatter, add_cache_arguments, add_prompt_arguments, cache_options, finite_float,
                       guidance_values, read_prompts)
from .image import check_writable, save_pngs

MODEL_ID = "ideogram-4-fp8"


class _ProgressBar:
    """`denoising [####....] k/n` on stderr; `open` while a line is unfinished (an error then starts a new one)."""

    def __init__(self, stream=sys.stderr):
        self.stream, self.open = stream, False

    def __call__(self, done: int, total: int) -> None:
        width = 30
        fill = int(width * done / total)
        self.open = True                 # before printing: a signal may arrive right after
        print(f"\r  denoising [{'#' * fill}{'.' * (width - fill)}] {done}/{total}", end="", file=self.stream,
              flush=True)
        if done == total:
            print(file=self.stream)
            self.open = False


def output_paths(output: str, n: int) -> list[Path]:
    """`--output` for one prompt; `<stem>-<i>.png` beside it for a batch."""
    out = Path(output)
    return [out] if n == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]


FLAGS = {"uncond_device_id": "--uncond-device", "dequantize_at_load": "--dequantize-at-load",
         "precision": "--precision"}        # backend option -> the generate flag that sets it


def _backend_options(args) -> dict:
    """The backend options the flags ask for; one the chosen backend does not take is refused before loading
    (backends declare their options; with `auto` the chosen backend says which it ignored)."""
    from . import backends

    if args.uncond_device is not None and args.uncond_device < 0:
        raise ValueError(f"--uncond-device {args.uncond_device}: a GPU index must be >= 0")
    given = {"uncond_device_id": args.uncond_device, "dequantize_at_load": args.dequantize_at_load,
             "precision": args.precision}
    options = {k: v for k, v in given.items() if v not in (None, False, "faithful")}
    for option, value in options.items():
        where = backends.taking(option)
        if args.backend != "auto" and args.backend not in where:
            shown = FLAGS[option] + (f" {value}" if isinstance(value, str) else "")
            raise ValueError(f"{shown} needs --backend {' or '.join(where)} (got --backend {args.backend})")
    return options


def png_metadata(request, index: int, backend: str, synthetic: bool, precision: str = "faithful",
                 cache=None) -> dict[str, str]:
    """What reproduces image `index` of a request (docs/runtime.md, "Reproducing an image")."""
    s = request.sampling
    return {"prompt": request.prompts[index], "seed": str(request.seed), "batch_index": str(request.batch_index + index),
            "batch_size": str(len(request.prompts)), "preset": s.preset or "custom", "steps": str(s.steps),
            "mu": repr(s.mu), "std": repr(s.std), "guidance": ",".join(map(repr, s.guidance)),
            "size": f"{request.width}x{request.height}", "model": MODEL_ID + (" SYNTHETIC weights" if synthetic else ""),
            "backend": backend, "precision": precision, "first_block_cache": cache_label(cache),
            "seed_generator": "numpy PCG64 standard_normal, row batch_index of the seed's stream"}


def cmd_generate(args) -> int:
    """Every argument is checked (manifest JSON and tokenizer read, nothing hashed or loaded) before the
    backend loads; then generate, then write every PNG atomically."""
    from .manifest import load_manifest
    from .pipeline import Pipeline
    from .request import check_arguments, prepare
    from .schedule import needs_uncond
    from .tokenizer import PromptTokenizer

    prompts = read_prompts(args.prompt_sources)
    outputs = output_paths(args.output, len(prompts))
    for o in outputs:
        check_writable(o)
    options = _backend_options(args)
    cache = cache_options(args)
    if cache is not None and not args.backend.startswith(("onnxruntime-", "auto")):
        raise ValueError(f"--cache-threshold needs an onnxruntime backend (got --backend {args.backend})")
    manifest = load_manifest(args.engines)
    arguments = check_arguments(manifest, prompts, width=args.width, height=args.height, preset=args.sampler_preset,
                                steps=args.steps, mu=args.mu, std=args.std, guidance=args.guidance, seed=args.seed,
                                batch_index=args.batch_index)
    tokenizer = PromptTokenizer.from_manifest(manifest)        # sha256-checked, then the prompts tokenised
    request = prepare(manifest, tokenizer, arguments)
    synthetic = manifest.synthetic
    if synthetic:
        print(f"note: SYNTHETIC weights (config {synthetic.get('config')!r}): random weights in the official "
              "layout, not the real model -- the image is noise-like by design", file=sys.stderr)
    uncond = any(needs_uncond(g) for g in request.sampling.guidance)
    if not uncond:
        print("note: guidance 1 on every step: the unconditional DiT is not loaded", file=sys.stderr)
    pipe = Pipeline(manifest, backend=args.backend, tokenizer=tokenizer, load_uncond=uncond, cache=cache, **options)
    show = not args.json and (sys.stderr.isatty() or args.progress)
    args.bar = _ProgressBar() if show else None
    result = pipe.run(request, args.bar)
    s = result.sampling
    precision = pipe.backend.precision      # what ran (w8a8 may have fallen back)
    errors.check_interrupted()
    save_pngs([(image, out, png_metadata(request, i, pipe.backend.name, bool(synthetic), precision, cache))
               for i, (image, out) in enumerate(zip(result.images, outputs))])
    report = {"outputs": [str(o) for o in outputs], "backend": pipe.backend.name, "precision": precision,
              "width": request.width,
              "height": request.height, "preset": s.preset, "steps": s.steps, "seed": request.seed,
              "batch_index": request.batch_index, "text_tokens": [len(t) for t in result.token_ids],
              "synthetic": bool(synthetic), "uncond_loaded": uncond, "first_block_cache": cache_label(cache),
              "reused_steps": result.reused_steps, "timings": {"load_s": pipe.load_seconds, **result.timings}}
    if args.json:
        print(json.dumps(report))
    else:
        t = result.timings
        print(f"wrote {', '.join(map(str, outputs))} with {pipe.backend.name}: load {pipe.load_seconds:.2f} s, "
              f"text {t['text_encoder_s']:.2f} s, denoise {t['denoise_s']:.2f} s "
              f"({t['denoise_s'] / s.steps:.3f} s/step), vae {t['vae_s']:.2f} s, total {t['total_s']:.2f} s"
              + ("" if uncond else "; unconditional DiT not loaded")
              + ("" if cache is None else f"; first-block cache reused {sum(map(len, result.reused_steps))} of "
                 f"{s.steps * len(result.reused_steps)} steps"))
    return 0


def cmd_info(args) -> int:
    from . import backends
    from .manifest import load_manifest

    m = load_manifest(args.engines)
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
    ones = [n for n, p in m.presets.items() if all(g == 1.0 for g in p.guidance)]
    lines.append(f"presets: {', '.join(m.presets)} (default {m.default_preset})")
    lines.append("guidance 1 on every step (" + (", ".join(ones) + ", or " if ones else "") + "e.g. --guidance 1): "
                 "the unconditional DiT is not loaded; a step at guidance 1 skips it")
    pieces = m.component("dit_cond")["first_block_cache"]["head"]["graphs"] if m.has_cache_pieces else None
    lines.append("first-block cache (--cache-threshold): " + (f"head/body/tail graphs for {', '.join(pieces)}, "
                 "sharing the DiTs' weight files" if pieces else "not in this export (exporter < 11: re-run `make export`)"))
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


def build_parser() -> argparse.ArgumentParser:
    from .packing import MAX_SIDE, MIN_SIDE, PIXELS_PER_TOKEN
    from .request import MAX_BATCH_INDEX
    from .schedule import DEFAULT_PRESET, GUIDANCE_LIMIT, MAX_STEPS, MU_LIMIT, PRESETS, STD_MAX

    epilog = errors.epilog()
    ap = argparse.ArgumentParser(prog="ideogram4", description="Ideogram 4 lean runtime (engines folder → PNG)",
                                 epilog=epilog, formatter_class=HelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="prompt → PNG", epilog=epilog, formatter_class=HelpFormatter,
                       description="Every argument is checked before anything is loaded; the PNG is written\n"
                                   "atomically with the metadata that reproduces it.")
    g.add_argument("--engines", required=True, help="engines folder written by `make export`")
    add_prompt_arguments(g)
    g.add_argument("--sampler-preset", default=None,
                   help=f"{', '.join(PRESETS)} (default: the manifest's, {DEFAULT_PRESET} as exported)")
    g.add_argument("--steps", type=int, default=None,
                   help=f"override the preset's step count, 1…{MAX_STEPS} (needs --guidance; default: the preset's)")
    g.add_argument("--mu", type=finite_float, default=None,
                   help=f"override the preset's logit-normal mean before the resolution shift, in [-{MU_LIMIT:g}, "
                        f"{MU_LIMIT:g}] (default: the preset's)")
    g.add_argument("--std", type=finite_float, default=None,
                   help=f"override the preset's logit-normal std, in (0, {STD_MAX:g}] (default: the preset's)")
    g.add_argument("--guidance", type=guidance_values, default=None,
                   help=f"a constant, or comma-separated values (one per step, index 0 = last step), each in "
                        f"[-{GUIDANCE_LIMIT:g}, {GUIDANCE_LIMIT:g}] (default: the preset's)")
    g.add_argument("--seed", type=int, default=0, help="0…2^64-1; numpy PCG64 noise")
    g.add_argument("--batch-index", type=int, default=0,
                   help=f"noise row of the first prompt in the seed's stream, 0…{MAX_BATCH_INDEX}: image i of a batch "
                        "is reproduced alone with the same --seed and --batch-index i (its PNG records both)")
    side = f"a multiple of {PIXELS_PER_TOKEN} in {MIN_SIDE}…{MAX_SIDE}, aspect ≤ 6:1"
    g.add_argument("--width", type=int, default=1024, help=f"image width in pixels: {side}")
    g.add_argument("--height", type=int, default=1024, help=f"image height in pixels: {side}")
    g.add_argument("--output", default="out.png", help="PNG path, must end in .png (with several prompts: "
                                                       "<stem>-<i>.png)")
    g.add_argument("--backend", default="auto", choices=["auto", "tensorrt", "tensorrt-rtx", "onnxruntime-cuda",
                                                          "onnxruntime-cpu"],
                   help="auto: the fastest that works here (TensorRT, then onnxruntime CUDA, then CPU)")
    g.add_argument("--uncond-device", type=int, default=None,
                   help="onnxruntime-cuda: run the unconditional DiT on this GPU, concurrently (CFG-parallel)")
    g.add_argument("--dequantize-at-load", action="store_true",
                   help="onnxruntime: dequantize the FP8 weights once at load, on the device (faster steps, about twice "
                        "the weight memory: docs/figures.md; the CPU results are bit for bit the default's)")
    g.add_argument("--precision", default="faithful", choices=["faithful", "w8a8"],
                   help="onnxruntime-cuda: w8a8 runs the DiT blocks' linears with FP8 activations on FP8 tensor cores "
                        "(opt-in: the numbers change; needs an export with --precision w8a8; docs/runtime.md); "
                        "recorded in the PNG metadata")
    add_cache_arguments(g)
    g.add_argument("--json", action="store_true", help="print timings and outputs as one JSON object")
    g.add_argument("--progress", action="store_true", help="show the step progress bar even when not a TTY")
    g.set_defaults(func=cmd_generate)
    i = sub.add_parser("info", help="summary of an engines folder and the backends available here", epilog=epilog,
                       formatter_class=HelpFormatter)
    i.add_argument("--engines", required=True, help="engines folder written by `make export`")
    i.set_defaults(func=cmd_info)
    from ..serve.cli import add_parser as add_serve     # `ideogram4 serve` (serve/cli.py: ray only when it runs)
    add_serve(sub)
    return ap


def run_command(func, args) -> int:
    """Run a command; every expected failure becomes one `error:` line and its documented exit code."""
    restore = errors.install_signal_handlers()
    try:
        return func(args)
    except BaseException as e:           # noqa: BLE001 -- KeyboardInterrupt and SIGTERM included
        if isinstance(e, SystemExit):
            raise
        code = errors.exit_code(e)
        bar = getattr(args, "bar", None)
        if bar is not None and bar.open:
            print(file=sys.stderr)
        if code == errors.INTERNAL:
            traceback.print_exc()
        print(f"error: {errors.message(e)}", file=sys.stderr)
        return code
    finally:
        restore()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
