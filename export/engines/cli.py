"""`python -m ideogram4_engine.export.engines`: build, or only re-check, the engines of an exported folder."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .build import build_engines
from .common import BUILDERS, ENGINE_COMPONENTS, EngineBuildError
from .profiles import DEFAULT_BUCKETS, DEFAULT_OPT_TEXT_TOKENS, BuildOptions, parse_buckets
from .records import check_engines
from .toolkit import load_toolkit


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ideogram4_engine.export.engines",
                                 description="Build TensorRT / TensorRT-RTX engines from an exported engines folder "
                                             "and record them in its manifest.json.")
    ap.add_argument("--engines", required=True, help="exported folder, e.g. engines/tiny (from `make export`)")
    ap.add_argument("--builder", choices=list(BUILDERS), help="default: the first installed of tensorrt, tensorrt-rtx")
    ap.add_argument("--buckets", default=DEFAULT_BUCKETS,
                    help=f"comma-separated WIDTHxHEIGHT resolution buckets (default: {DEFAULT_BUCKETS})")
    ap.add_argument("--max-batch", type=int, default=1, help="batch range 1…N of every profile (default 1)")
    ap.add_argument("--max-text-tokens", type=int, help="text-length range 1…N (default: the manifest's limit, 2048)")
    ap.add_argument("--opt-text-tokens", type=int, default=DEFAULT_OPT_TEXT_TOKENS,
                    help=f"text length the profiles are tuned for (default {DEFAULT_OPT_TEXT_TOKENS}, capped at the max)")
    ap.add_argument("--compute-capabilities",
                    help="TensorRT-RTX targets, e.g. 8.9,12.0 (default: the builder's; FP8 engines need 8.9+)")
    ap.add_argument("--timing-cache", type=Path,
                    help="full TensorRT timing cache file (default: one per TensorRT version and GPU under "
                         "~/.cache/ideogram4-engine; ignored by TensorRT-RTX)")
    ap.add_argument("--weight-streaming", action="store_true",
                    help="build streamable engines: the runtime may then keep only part of the weights on the GPU "
                         "(backend option weight_streaming_budget; docs/engines.md)")
    ap.add_argument("--optimization-level", type=int, choices=range(0, 6), metavar="0-5")
    ap.add_argument("--components", help=f"comma-separated subset of {', '.join(ENGINE_COMPONENTS)}")
    ap.add_argument("--force", action="store_true", help="rebuild engines that are up to date")
    ap.add_argument("--if-available", action="store_true",
                    help="exit 0 with a note when no usable builder is installed (what `make export` uses)")
    ap.add_argument("--check", action="store_true", help="only re-run the checks on the existing layer reports")
    ap.add_argument("--verbose", action="store_true", help="echo the builder's log")
    args = ap.parse_args(argv)
    try:
        if args.check:
            failed = 0
            for c, checks in check_engines(args.engines).items():
                for name, r in checks.items():
                    print(f"{c:13s} {name:12s} {r['status']:10s} {r.get('detail', '')}")
                    failed += r["status"] == "fail"
            return 1 if failed else 0
        opts = BuildOptions(
            buckets=parse_buckets(args.buckets), max_batch=args.max_batch, max_text_tokens=args.max_text_tokens,
            opt_text_tokens=args.opt_text_tokens,
            compute_capabilities=tuple(s.strip() for s in args.compute_capabilities.split(",") if s.strip())
            if args.compute_capabilities else None,
            timing_cache=args.timing_cache, optimization_level=args.optimization_level,
            components=tuple(s.strip() for s in args.components.split(",") if s.strip()) if args.components else None,
            force=args.force, weight_streaming=args.weight_streaming)
        if args.if_available:
            try:
                load_toolkit(args.builder).check_version()
            except EngineBuildError as e:
                print(f"note: engines not built: {e}", file=sys.stderr)
                return 0
        t0 = time.perf_counter()
        section = build_engines(args.engines, args.builder, opts, verbose=args.verbose)
    except EngineBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(section['components'])} engine(s) in {args.engines} ({section['builder']['name']} "
          f"{section['builder']['version']}, targets {', '.join(section['compute_capabilities']) or '?'}) "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0
