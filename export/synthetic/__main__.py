"""`python -m ideogram4_engine.export.synthetic --config tiny --out checkpoints/tiny` (also `make checkpoint`)."""
from __future__ import annotations

import argparse
import sys
import time

from .configs import CONFIGS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ideogram4_engine.export.synthetic",
                                 description="Write a SYNTHETIC Ideogram 4 checkpoint (random weights in the "
                                             "official FP8 layout; no real weights can be downloaded here).")
    ap.add_argument("--config", default="tiny", choices=list(CONFIGS),
                    help="tiny: CPU tests; full-width: real widths, few layers; full: real sizes (~27 GB)")
    ap.add_argument("--out", required=True, help="checkpoint folder to create")
    ap.add_argument("--seed", type=int, default=0, help="weight seed, 0…2^31-1 (default 0)")
    ap.add_argument("--device", default="cpu", help="where random weights are generated (cpu or cuda); "
                                                    "values differ between device types")
    ap.add_argument("--force", action="store_true", help="replace an existing folder")
    args = ap.parse_args(argv)
    from .writer import write_checkpoint
    from ..checkpoint import open_checkpoint

    start = time.perf_counter()
    try:
        out = write_checkpoint(args.out, args.config, seed=args.seed, device=args.device,
                               overwrite=args.force, progress=sys.stderr.isatty())
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ckpt = open_checkpoint(out)
    print(ckpt.describe())
    print(f"wrote in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
