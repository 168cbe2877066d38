"""Sequence packing for the DiTs (spec §4): left pads, text, then image tokens in raster order."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .contract import MAX_TEXT_TOKENS  # noqa: F401 -- per prompt, chat template included

PAD_SEGMENT = -1
IMAGE_INDICATOR = 2
TEXT_INDICATOR = 3
PAD_INDICATOR = 0
IMAGE_POSITION_OFFSET = 65536
PIXELS_PER_TOKEN = 16          # VAE factor 8 × patch 2
MIN_SIDE, MAX_SIDE, MAX_ASPECT = 256, 2048, 6.0


def check_size(height: int, width: int) -> None:
    """Refuse sizes the model does not support (multiples of 16 in 256…2048, aspect ≤ 6:1)."""
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, (int, np.integer)) or v % PIXELS_PER_TOKEN:
            raise ValueError(f"{name}={v!r} must be a multiple of {PIXELS_PER_TOKEN}")
        if not MIN_SIDE <= v <= MAX_SIDE:
            raise ValueError(f"{name}={v} outside the supported range {MIN_SIDE}…{MAX_SIDE}")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ValueError(f"aspect ratio {width}x{height} exceeds {MAX_ASPECT:g}:1")


def token_grid(height: int, width: int) -> tuple[int, int]:
    return height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN


def image_positions(gh: int, gw: int) -> np.ndarray:
    """(N, 3) int64 (t, h, w) of image tokens, raster order, all axes offset by 65536 (trap 10)."""
    r, c = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    pos = np.stack([np.zeros_like(r), r, c], axis=-1).reshape(-1, 3)
    return (pos + IMAGE_POSITION_OFFSET).astype(np.int64)


@dataclass(frozen=True)
class Packed:
    """One batch's DiT sequences. Conditional: (B, T+N); unconditional: the last N entries (§4.3)."""
    text_lengths: tuple[int, ...]
    T: int
    N: int
    indicators: np.ndarray   # (B, L) int64
    segments: np.ndarray     # (B, L) int64
    positions: np.ndarray    # (B, L, 3) int64

    @property
    def needs_mask(self) -> bool:
        """A segment mask is needed only if some row has more than one segment id (unequal text lengths)."""
        return bool((self.segments != self.segments[:, :1]).any())


def pack(text_lengths: list[int] | tuple[int, ...], height: int, width: int) -> Packed:
    """Indicators, segment ids and MRoPE positions of the conditional sequences (table in §4.2)."""
    gh, gw = token_grid(height, width)
    N, T = gh * gw, max(text_lengths)
    B, L = len(text_lengths), T + N
    ind = np.zeros((B, L), np.int64)
    seg = np.full((B, L), PAD_SEGMENT, np.int64)
    pos = np.zeros((B, L, 3), np.int64)
    img = image_positions(gh, gw)
    for b, n in enumerate(text_lengths):
        pad = T - n
        ind[b, pad:T], seg[b, pad:] = TEXT_INDICATOR, 1
        pos[b, pad:T] = np.arange(n)[:, None]
        ind[b, T:] = IMAGE_INDICATOR
        pos[b, T:] = img
    return Packed(tuple(text_lengths), T, N, ind, seg, pos)
