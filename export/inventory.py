"""Expected tensor inventories: what each component folder of a checkpoint must contain (spec §1.2a).

Each component module (dit, text_encoder, vae) describes its state dict as {name: TensorSpec}; the
checkpoint reader checks a folder against it from the safetensors headers alone (no tensor data read).
"""
from __future__ import annotations

from dataclasses import dataclass

# Kinds of tensors and the on-disk dtypes (safetensors dtype strings) accepted for each (docs/checkpoint.md):
# what the official loaders load and cast to bf16; None = any dtype.
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")
KIND_DTYPES: dict[str, tuple[str, ...] | None] = {
    # weight of a Linear that may be FP8 (then `<prefix>.weight_scale` is required) or unquantized float
    "linear": ("F8_E4M3",) + FLOAT_DTYPES,
    # norm gains, biases, embeddings, conv kernels: floating, never FP8
    "float": FLOAT_DTYPES,
    # buffers the official strict load copies (casting any dtype) and the pipeline never reads: the VAE's
    # BatchNorm running statistics and counter
    "buffer": None,
}
FP8_DTYPE = "F8_E4M3"
SCALE_DTYPES = FLOAT_DTYPES  # the release stores fp32; the official dequantization uses bf16(s) of any float


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    kind: str = "float"  # one of KIND_DTYPES
    optional: bool = False  # missing is a warning, not an error (the official load fills it in)


def scale_name(weight_name: str) -> str:
    """`a.b.weight` -> `a.b.weight_scale` (the official FP8 naming)."""
    assert weight_name.endswith(".weight"), weight_name
    return weight_name + "_scale"
