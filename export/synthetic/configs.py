"""The synthetic checkpoint configurations of the test ladder (ARCHITECTURE.md): tiny, full-width, full."""
from __future__ import annotations

from dataclasses import dataclass

from ..reference.dit import DiTConfig
from ..reference.text_encoder import tap_layers

MIB = 1024**2


@dataclass(frozen=True)
class TextEncoderShape:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    mrope_section: tuple[int, int, int]


@dataclass(frozen=True)
class SyntheticConfig:
    name: str
    dit: DiTConfig
    text_encoder: TextEncoderShape
    vae_block_out_channels: tuple[int, int, int, int]
    max_shard_bytes: int          # DiT / text-encoder shard size (the VAE is always one file)
    note: str

    def __post_init__(self) -> None:
        te = self.text_encoder
        expected = te.hidden_size * len(tap_layers(te.num_layers))
        if self.dit.llm_features_dim != expected:
            raise ValueError(f"{self.name}: llm_features_dim {self.dit.llm_features_dim} != {expected}")


REAL_TE = TextEncoderShape(4096, 36, 32, 8, 128, 12288, (24, 20, 20))
TINY_TE = TextEncoderShape(64, 36, 4, 2, 16, 128, (4, 2, 2))   # the official 36 layers: official taps

CONFIGS: dict[str, SyntheticConfig] = {c.name: c for c in (
    SyntheticConfig(
        "tiny",
        DiTConfig(emb_dim=512, num_layers=2, num_heads=2, intermediate_size=1024, adanln_dim=64,
                  llm_features_dim=13 * TINY_TE.hidden_size),
        TINY_TE, (32, 32, 64, 64), 4 * MIB,
        "CPU tests: head_dim 256, the real vocabulary and 36 text layers (official taps), widths shrunk; sharded DiTs"),
    SyntheticConfig(
        "full-width",
        DiTConfig(num_layers=2),
        REAL_TE.__class__(**{**REAL_TE.__dict__, "num_layers": 4}),
        (128, 256, 512, 512), 5 * 1024 * MIB,
        "real widths and heads, 2 DiT and 4 text-encoder layers: GPU numerics and per-layer timing"),
    SyntheticConfig(
        "full", DiTConfig(), REAL_TE, (128, 256, 512, 512), 5 * 1024 * MIB,
        "real everything (about 27 GB): end-to-end GPU benchmarks"),
)}


def get_config(name: str) -> SyntheticConfig:
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown synthetic config {name!r}; allowed: {', '.join(CONFIGS)}") from None
