"""`python -m ideogram4_engine.export.reference`: prompt → PNG through the PyTorch reference pipeline.

The oracle as a command: what the exported graphs and the lean runtime are compared against. Flags follow
the official `run_inference.py` in spirit (--prompt, --sampler-preset, --seed, --width, --height, --output).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ...runtime import errors
from ...runtime.cli_args import HelpFormatter, PromptSourceError, add_prompt_arguments, read_prompts
from ...runtime.image import check_writable, save_png
from ...runtime.packing import check_size
from ...runtime.schedule import DEFAULT_PRESET, PRESETS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ideogram4_engine.export.reference", description=__doc__,
                                 epilog=errors.epilog(), formatter_class=HelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint folder in the official layout")
    add_prompt_arguments(ap, repeat=False)
    ap.add_argument("--sampler-preset", default=DEFAULT_PRESET, choices=list(PRESETS))
    ap.add_argument("--seed", type=int, default=0, help="0…2^64-1 (default 0)")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--output", default="out.png")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    out = Path(args.output)
    try:                                   # cheap checks first: no model is loaded for a bad request
        args.prompt = read_prompts(args.prompt_sources, repeat=False)[0]
        check_size(args.height, args.width)
        if not 0 <= args.seed < 2**64:
            raise ValueError(f"seed={args.seed} outside 0…2^64-1")
        check_writable(out)
    except (PromptSourceError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return errors.USAGE
    from ..checkpoint import CheckpointError, open_checkpoint
    from .pipeline import ReferencePipeline, SamplingParams

    try:
        ckpt = open_checkpoint(args.checkpoint)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return errors.ARTIFACTS
    print(ckpt.describe(), file=sys.stderr)
    t0 = time.perf_counter()
    pipe = ReferencePipeline.from_checkpoint(args.checkpoint, args.device)
    load_s = time.perf_counter() - t0
    params = SamplingParams.from_preset(args.sampler_preset)
    try:
        result = pipe(args.prompt, height=args.height, width=args.width, params=params, seed=args.seed,
                      callback=lambda k, n: print(f"\rstep {k}/{n}", end="", file=sys.stderr, flush=True))
    except ValueError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    print(file=sys.stderr)
    save_png(result.images[0], out, {
        "prompt": args.prompt, "seed": str(args.seed), "preset": args.sampler_preset,
        "size": f"{args.width}x{args.height}", "backend": "torch-reference",
        "model": "ideogram-4 SYNTHETIC weights" if ckpt.synthetic else "ideogram-4",
    })
    t = result.timings
    print(f"wrote {out} ({args.width}x{args.height}, {args.sampler_preset}, seed {args.seed}); load {load_s:.2f} s, "
          f"text {t['text_encoder_s']:.2f} s, denoise {t['denoise_s']:.2f} s, vae {t['vae_s']:.2f} s", file=sys.stderr)
    if ckpt.synthetic:
        print("note: SYNTHETIC checkpoint (random weights): the image is noise-like by design", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
