"""argparse pieces shared by `ideogram4 generate` and the reference CLI.

Prompts come from `--prompt TEXT`, `--prompt-env NAME` (an environment variable) or `--prompt-file PATH`, in the
order given; each is passed on byte for byte. `make run` uses `--prompt-env`: the Makefile hands PROMPT over
through the environment, so no shell ever parses a prompt (quotes, `$`, backticks, newlines, JSON).
Numbers are checked by argparse itself: a non-number or NaN/Inf is a usage error (exit code 2).
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path


class PromptSourceError(ValueError):
    """A --prompt-env variable is unset or a --prompt-file unreadable, or either is not UTF-8."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's layout and appends `(default: X)` to every option whose default is a value."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "%(default)" not in text and action.option_strings and not (
                default is None or default is False or default == argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def guidance_values(text: str) -> float | tuple[float, ...]:
    """`7` (a constant) or `3,7,7` (one value per step, index 0 = last step)."""
    parts = text.split(",")
    try:
        values = tuple(finite_float(p.strip()) for p in parts)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}; expected a number or comma-separated numbers") from None
    return values[0] if len(values) == 1 else values


class _PromptSource(argparse.Action):
    """Collects (kind, value) pairs of all three prompt options into one list, in command-line order."""

    def __call__(self, parser, namespace, values, option_string=None):
        sources = list(getattr(namespace, self.dest, None) or [])
        sources.append((self.const, values))
        setattr(namespace, self.dest, sources)


def add_prompt_arguments(parser: argparse.ArgumentParser, repeat: bool = True) -> None:
    more = "; repeat (any mix of the three) for a batch" if repeat else ""
    parser.add_argument("--prompt", dest="prompt_sources", action=_PromptSource, const="text", metavar="TEXT",
                        help=f"text or JSON caption, passed through unchanged{more}")
    parser.add_argument("--prompt-env", dest="prompt_sources", action=_PromptSource, const="env", metavar="NAME",
                        help="read the prompt from environment variable NAME, byte for byte (what `make run` uses)")
    parser.add_argument("--prompt-file", dest="prompt_sources", action=_PromptSource, const="file", metavar="PATH",
                        help="read the prompt from a UTF-8 file, byte for byte (a trailing newline is kept)")


def read_prompts(sources: list[tuple[str, str]] | None, repeat: bool = True) -> list[str]:
    """The prompts named by `add_prompt_arguments`' options, exactly as given."""
    if not sources:
        raise PromptSourceError("no prompt given: pass --prompt TEXT, --prompt-env NAME or --prompt-file PATH")
    if not repeat and len(sources) > 1:
        raise PromptSourceError("give exactly one of --prompt, --prompt-env, --prompt-file")
    prompts = []
    for kind, value in sources:
        if kind == "text":
            prompts.append(value)
            continue
        if kind == "env":
            raw = os.environb.get(os.fsencode(value))
            if raw is None:
                raise PromptSourceError(f"--prompt-env {value}: the environment variable {value} is not set")
            where = f"environment variable {value}"
        else:
            try:
                raw = Path(value).read_bytes()
            except OSError as e:
                raise PromptSourceError(f"--prompt-file {value}: cannot read it ({e.strerror or e})") from None
            where = f"file {value}"
        try:
            prompts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise PromptSourceError(f"the prompt in {where} is not valid UTF-8 (byte {raw[e.start]:#04x} at offset "
                                    f"{e.start}); allowed: UTF-8 text") from None
    return prompts


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """The first-block cache's options (runtime/cache.py), shared by `generate` and `serve`."""
    from .cache import THRESHOLD_MAX, CacheOptions
    d = CacheOptions()
    parser.add_argument("--cache-threshold", type=finite_float, default=None, metavar="T",
                        help=f"first-block cache (onnxruntime; opt-in, numbers change): reuse the DiT bodies' residual "
                             f"when block 0's residual changed by less than T (relative L1) since the last computed step, "
                             f"T in [0, {THRESHOLD_MAX:g}]; 0 computes every step through the cache graphs (bit-identical "
                             "to no cache); docs/runtime.md (default: off)")
    parser.add_argument("--cache-warmup", type=int, default=d.warmup, metavar="N",
                        help="first-block cache: the first N steps are always computed")
    parser.add_argument("--cache-max-consecutive", type=int, default=d.max_consecutive, metavar="N",
                        help="first-block cache: at most N reused steps in a row")
    parser.add_argument("--cache-taylor", action="store_true",
                        help="first-block cache: extrapolate the reused residual to first order (TaylorSeer)")


def cache_options(args):
    """CacheOptions from the parsed flags, or None when --cache-threshold is not given (ValueError if bad)."""
    from .cache import CacheOptions
    if args.cache_threshold is None:
        if args.cache_taylor:
            raise ValueError("--cache-taylor needs --cache-threshold")
        return None
    return CacheOptions(args.cache_threshold, args.cache_warmup, args.cache_max_consecutive, args.cache_taylor)
