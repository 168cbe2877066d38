"""Host-side MRoPE tables for the DiT graphs (spec §2.6): fp32 angles, accurate cos/sin, per request.

They depend only on the text length and the token grid, and image positions are offset by 65536, so the
angles reach ~6.6e4 rad: they are formed as one fp32 product (as the reference does) and their cos/sin
evaluated in float64 before rounding to fp32 -- full-range argument reduction on any backend.
"""
from __future__ import annotations

import numpy as np

from .packing import image_positions


def interleaved_axes(slots: int, mrope_section: tuple[int, int, int]) -> np.ndarray:
    """Axis (0 = t, 1 = h, 2 = w) of each frequency slot: h if i%3==1 and i<3·sec[1], w if i%3==2 and
    i<3·sec[2], else t (Qwen3-VL interleaving; sec[0] is unused, trap 8)."""
    axis = np.zeros(slots, np.int64)
    axis[1:3 * mrope_section[1]:3] = 1
    axis[2:3 * mrope_section[2]:3] = 2
    return axis


def mrope_cos_sin(positions: np.ndarray, inv_freq: np.ndarray,
                  mrope_section: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """positions (..., 3) int → cos, sin (..., 2·slots) fp32 in the rotate-half layout (angles duplicated).
    `inv_freq` is the manifest's table: bf16-rounded values held as fp32 (spec §2.6), used exactly as given."""
    inv = np.asarray(inv_freq, np.float32)
    axis = interleaved_axes(len(inv), mrope_section)
    pos = np.take(positions, axis, axis=-1).astype(np.float32)          # (..., slots): each slot's axis
    ang = (pos * inv).astype(np.float64)                                 # one fp32 product, then exact widen
    ang = np.concatenate([ang, ang], axis=-1)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def dit_rope_tables(text_length: int, grid_h: int, grid_w: int, inv_freq: np.ndarray,
                    mrope_section: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin (T+N, head_dim) of the conditional sequence [text (p,p,p); image]; the unconditional
    sequence uses the last N rows."""
    text = np.repeat(np.arange(text_length, dtype=np.int64)[:, None], 3, axis=1)
    pos = np.concatenate([text, image_positions(grid_h, grid_w)], axis=0)
    return mrope_cos_sin(pos, inv_freq, mrope_section)
