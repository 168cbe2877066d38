"""Synthetic Qwen3-VL text encoder: a transformers-loadable config.json and streamed random weights.

Weights follow `text_encoder_inventory` (Qwen3VLModel names) so the official loader would accept them
(spec §1.2a): projections e4m3 + fp32 per-row scale, embeddings and norm gains bf16. Scales are chosen so
the residual stream stays realistic through every layer (pre-norm blocks with unit-gain projections add
O(1) per layer; token identity survives because the first block sees normalised embeddings).
"""
from __future__ import annotations

from typing import Any, Iterator

import torch

from ..reference.text_encoder import FP8_FLAG, PREFIX, text_dims
from .common import linear_tensors, norm_gain, randn

EMBED_STD = 0.03   # Qwen-like embedding scale; RMSNorm removes it before every block
PROJ_GAIN = 1.0    # unit-RMS in -> unit-RMS out (q/k/v/gate/up)
OUT_GAIN = 0.5     # o_proj / down_proj: keeps per-layer residual increments moderate


def text_encoder_config_json(*, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
                             head_dim: int, intermediate_size: int, vocab_size: int = 151936,
                             rope_theta: float = 5_000_000,
                             mrope_section: tuple[int, int, int] = (24, 20, 20)) -> dict[str, Any]:
    """A Qwen3-VL `config.json` (upstream Qwen3-VL-8B-Instruct layout) plus the FP8 marker.

    mrope_section must sum to head_dim/2 (e.g. head_dim 16 -> (4, 2, 2)). The vision tower is described
    with small valid values only: it is never stored or run.
    """
    if sum(mrope_section) != head_dim // 2:
        raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        "torch_dtype": "bfloat16",
        "text_config": {
            "model_type": "qwen3_vl_text",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "dtype": "bfloat16",
            "head_dim": head_dim,
            "hidden_act": "silu",
            "hidden_size": hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": intermediate_size,
            "max_position_embeddings": 262144,
            "num_attention_heads": num_heads,
            "num_hidden_layers": num_layers,
            "num_key_value_heads": num_kv_heads,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta,
                                "mrope_section": list(mrope_section), "mrope_interleaved": True},
            "use_cache": True,
            "vocab_size": vocab_size,
        },
        "vision_config": {
            "model_type": "qwen3_vl",
            "deepstack_visual_indexes": [0],
            "depth": 1,
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": 32,
            "in_channels": 3,
            "initializer_range": 0.02,
            "intermediate_size": 64,
            "num_heads": 2,
            "num_position_embeddings": 64,
            "out_hidden_size": hidden_size,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        FP8_FLAG: True,
    }


def text_encoder_tensors(text_config: Any, *, seed: int, device: str = "cpu",
                         fp8: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Every inventory tensor in checkpoint form, deterministic per name, one layer at a time."""
    vocab, hidden, layers, heads, kv, head_dim, inter = text_dims(text_config)
    name = f"{PREFIX}embed_tokens.weight"
    yield name, randn(name, (vocab, hidden), EMBED_STD, seed, device).to(torch.bfloat16)

    def lin(prefix: str, out_f: int, in_f: int, gain: float) -> Iterator[tuple[str, torch.Tensor]]:
        yield from linear_tensors(prefix, out_f, in_f, seed=seed, device=device, bias=False, quantize=fp8,
                                  gain=gain)

    for i in range(layers):
        p = f"{PREFIX}layers.{i}."
        yield from lin(f"{p}self_attn.q_proj", heads * head_dim, hidden, PROJ_GAIN)
        yield from lin(f"{p}self_attn.k_proj", kv * head_dim, hidden, PROJ_GAIN)
        yield from lin(f"{p}self_attn.v_proj", kv * head_dim, hidden, PROJ_GAIN)
        yield from lin(f"{p}self_attn.o_proj", hidden, heads * head_dim, OUT_GAIN)
        for n in ("q_norm", "k_norm"):
            yield f"{p}self_attn.{n}.weight", norm_gain(f"{p}self_attn.{n}.weight", head_dim, seed=seed,
                                                        device=device)
        yield from lin(f"{p}mlp.gate_proj", inter, hidden, PROJ_GAIN)
        yield from lin(f"{p}mlp.up_proj", inter, hidden, PROJ_GAIN)
        yield from lin(f"{p}mlp.down_proj", hidden, inter, OUT_GAIN)
        for n in ("input_layernorm", "post_attention_layernorm"):
            yield f"{p}{n}.weight", norm_gain(f"{p}{n}.weight", hidden, seed=seed, device=device)
    yield f"{PREFIX}norm.weight", norm_gain(f"{PREFIX}norm.weight", hidden, seed=seed, device=device)
