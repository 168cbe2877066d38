"""Resolution buckets, build options and the optimization profiles they give each component."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ...runtime.packing import MAX_ASPECT, MAX_SIDE, MIN_SIDE, PIXELS_PER_TOKEN
from .common import EngineBuildError

# The official resolution table (spec §7, W x H) plus 512² and 768².
DEFAULT_BUCKETS = "1024x1024,1536x1024,1024x1536,1920x1088,2048x768,1024x1792,1600x400,512x512,768x768"
DEFAULT_OPT_TEXT_TOKENS = 512
IMAGE_SYMBOLS = ("image_tokens", "grid_h", "grid_w")


@dataclass(frozen=True, order=True)
class Bucket:
    width: int
    height: int

    @property
    def label(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def grid(self) -> tuple[int, int]:
        return self.height // PIXELS_PER_TOKEN, self.width // PIXELS_PER_TOKEN

    @property
    def tokens(self) -> int:
        gh, gw = self.grid
        return gh * gw


BUCKET_RULE = (f"WIDTHxHEIGHT in pixels, each a multiple of {PIXELS_PER_TOKEN} in {MIN_SIDE}…{MAX_SIDE}, "
               f"aspect ratio at most {MAX_ASPECT:g}:1")


def parse_bucket(text: str) -> Bucket:
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not m:
        raise EngineBuildError(f"bucket {text!r} is not WIDTHxHEIGHT; expected {BUCKET_RULE}, e.g. 1024x1024")
    w, h = int(m.group(1)), int(m.group(2))
    for name, v in (("width", w), ("height", h)):
        if v % PIXELS_PER_TOKEN or not MIN_SIDE <= v <= MAX_SIDE:
            raise EngineBuildError(f"bucket {text.strip()!r}: {name} {v} is not a multiple of {PIXELS_PER_TOKEN} in "
                                   f"{MIN_SIDE}…{MAX_SIDE} (buckets are {BUCKET_RULE})")
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise EngineBuildError(f"bucket {text.strip()!r}: aspect ratio {max(w, h) / min(w, h):.2f}:1 exceeds "
                               f"{MAX_ASPECT:g}:1 (buckets are {BUCKET_RULE})")
    return Bucket(w, h)


def parse_buckets(text: str | Iterable[str]) -> tuple[Bucket, ...]:
    """'1024x1024,512x512' (W x H, like the spec's resolution table) → buckets, duplicates dropped, order kept."""
    items = text.split(",") if isinstance(text, str) else list(text)
    items = [s for s in items if s.strip()]
    if not items:
        raise EngineBuildError(f"no buckets given; expected a comma-separated list of {BUCKET_RULE}")
    out: dict[Bucket, None] = {}
    for s in items:
        out[parse_bucket(s)] = None
    return tuple(out)


@dataclass(frozen=True)
class BuildOptions:
    buckets: tuple[Bucket, ...] = field(default_factory=lambda: parse_buckets(DEFAULT_BUCKETS))
    max_batch: int = 1
    max_text_tokens: int | None = None            # None: the manifest's limit (2048)
    opt_text_tokens: int = DEFAULT_OPT_TEXT_TOKENS
    compute_capabilities: tuple[str, ...] | None = None   # TensorRT-RTX only; None: the builder's default
    timing_cache: Path | None = None               # full TensorRT only; None: ~/.cache/ideogram4-engine/... per GPU
    optimization_level: int | None = None          # builder_optimization_level; None: the builder's default (3)
    components: tuple[str, ...] | None = None      # None: every component with a graph
    force: bool = False                            # rebuild even if an up-to-date engine exists
    weight_streaming: bool = False                 # BuilderFlag.WEIGHT_STREAMING: the runtime may keep part of the
    #                                                weights in host memory (backend option weight_streaming_budget)


def ranges(opts: BuildOptions, limit: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(batch, text tokens) min/opt/max of every profile, refused with the allowed range when out of it."""
    if not isinstance(opts.max_batch, int) or opts.max_batch < 1:
        raise EngineBuildError(f"max batch {opts.max_batch!r} must be an integer >= 1")
    max_text = limit if opts.max_text_tokens is None else opts.max_text_tokens
    if not isinstance(max_text, int) or not 1 <= max_text <= limit:
        raise EngineBuildError(f"max text tokens {max_text!r} must be an integer in 1…{limit} (the manifest's limit)")
    if not isinstance(opts.opt_text_tokens, int) or opts.opt_text_tokens < 1:
        raise EngineBuildError(f"opt text tokens {opts.opt_text_tokens!r} must be an integer >= 1")
    return (1, 1, opts.max_batch), (1, min(opts.opt_text_tokens, max_text), max_text)


def _dim(d, sym: dict[str, tuple[int, int, int]], where: str) -> tuple[int, int, int]:
    if isinstance(d, int):
        return d, d, d
    if d == "sequence":          # dit_cond: [text tokens; image tokens]
        t, n = sym["text_tokens"], sym["image_tokens"]
        return t[0] + n[0], t[1] + n[1], t[2] + n[2]
    if d not in sym:
        raise EngineBuildError(f"{where}: dimension {d!r} has no rule in the engine builder "
                               f"(known: {', '.join([*sym, 'sequence'])}); is the manifest from a newer exporter?")
    return sym[d]


def component_profiles(component: str, inputs: list[dict], buckets: tuple[Bucket, ...],
                       batch: tuple[int, int, int], text: tuple[int, int, int]) -> list[dict]:
    """Optimization profiles of one component from its manifest inputs' symbolic shapes. A component whose shapes
    depend on the image gets one profile per distinct image shape (buckets with equal token counts share a DiT
    profile; the VAE distinguishes orientations); others get one profile. Each profile lists the buckets it
    serves and, per input, min/opt/max shapes."""
    uses_image = any(d in IMAGE_SYMBOLS or d == "sequence" for io in inputs for d in io["shape"])
    profiles: dict[str, dict] = {}
    for bucket in buckets if uses_image else (None,):
        sym = {"batch": batch, "text_tokens": text}
        if bucket is not None:
            gh, gw = bucket.grid
            sym.update(image_tokens=(bucket.tokens,) * 3, grid_h=(gh,) * 3, grid_w=(gw,) * 3)
        shapes = {}
        for io in inputs:
            dims = [_dim(d, sym, f"{component}.{io['name']}") for d in io["shape"]]
            shapes[io["name"]] = {k: [d[i] for d in dims] for i, k in enumerate(("min", "opt", "max"))}
        key = json.dumps(shapes, sort_keys=True)
        prof = profiles.setdefault(key, {"buckets": [], "shapes": shapes})
        if bucket is not None:
            prof["buckets"].append(bucket.label)
    return list(profiles.values())
