"""`python -m ideogram4_engine.export` (what `make export` runs): checkpoint → engines/<name>/."""
from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    from ..runtime import errors
    from ..runtime.cli_args import HelpFormatter

    ap = argparse.ArgumentParser(prog="python -m ideogram4_engine.export",
                                 description="Export an Ideogram 4 checkpoint (official layout) to ONNX graphs with "
                                             "FP8 weights kept as FP8, plus manifest.json.",
                                 epilog=errors.epilog(), formatter_class=HelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint folder (the real ideogram-4-fp8 or synthetic)")
    ap.add_argument("--out", required=True, help="output folder, e.g. engines/tiny (replaced only when complete)")
    ap.add_argument("--attention", default="op", choices=["op", "matmul"],
                    help="attention form: opset-23 Attention operator (default) or MatMul→Softmax→MatMul")
    q = ap.add_mutually_exclusive_group()
    q.add_argument("--quantize", choices=["fp8"], default="fp8",
                   help="quantize unquantized (bf16/fp32) Linears to FP8 at export (default; FP8 ones are kept)")
    q.add_argument("--keep-dtype", action="store_true", help="export unquantized Linears as bf16 instead")
    ap.add_argument("--precision", default="faithful", choices=["faithful", "w8a8"],
                    help="w8a8: also write the opt-in cuda_w8a8 graphs (DiT block linears with FP8 activations on FP8 "
                         "tensor cores; numerics change, docs/export.md); the faithful graphs are always written")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars (they are off anyway when stderr is not a terminal)")
    args = ap.parse_args(argv)
    from .checkpoint import CheckpointError
    from .to_onnx import ExportOptions, export

    opts = ExportOptions(attention_form=args.attention, weights="keep" if args.keep_dtype else "fp8",
                         progress=not args.no_progress and sys.stderr.isatty(), precision=args.precision)
    t0 = time.perf_counter()
    restore = errors.install_signal_handlers()
    try:
        manifest = export(args.checkpoint, args.out, opts)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return errors.ARTIFACTS
    except OSError as e:     # the temporary folder is gone (export() removes it); the previous output is intact
        print(f"error: export to {args.out} failed: {errors.describe_os_error(e, with_file=True)}; nothing was "
              f"written ({args.out} is unchanged)", file=sys.stderr)
        return errors.WRITE
    except (ValueError, KeyboardInterrupt, errors.Terminated) as e:
        print(f"error: {errors.message(e)}", file=sys.stderr)
        return errors.exit_code(e)
    finally:
        restore()
    synthetic = manifest["source"]["synthetic"]
    print(f"exported {len(manifest['components'])} components to {args.out} in {time.perf_counter() - t0:.1f} s")
    if synthetic:
        print("note: SYNTHETIC checkpoint (random weights in the official layout): the graphs are real, the "
              "images are noise-like by design")
    return 0


if __name__ == "__main__":
    sys.exit(main())
