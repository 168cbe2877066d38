"""Qwen3-VL text encoder with 13 interleaved taps: the PyTorch reference (spec §1.2, §1.4, §3).

Only the language model of Qwen3-VL-8B runs. It is driven layer by layer on the text tokens alone
(positions 0..n-1 on all three MRoPE axes, causal mask), the residual stream is captured after the decoder
layers in `tap_layers(num_layers)`, and the 13 captures are laid out hidden-major / tap-minor
(feature f = d*13 + j) in fp32. Checkpoint keys are transformers' `Qwen3VLModel` names
(`language_model.*`); FP8 projections carry an e4m3 weight plus an fp32 per-row `weight_scale`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedConfig
from transformers.masking_utils import create_causal_mask
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel, Qwen3VLTextRotaryEmbedding

from .fp8 import COMPUTE_DTYPE, FP8_DTYPE, swap_linears
from ..inventory import TensorSpec
from ..safetensors_files import COMPONENTS, component_files, load_tensors

OFFICIAL_TAPS = (0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 35)
NUM_TAPS = len(OFFICIAL_TAPS)
PREFIX = "language_model."
FP8_FLAG = "ideogram_fp8_weight_only"
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


def tap_layers(num_layers: int) -> tuple[int, ...]:
    """Decoder layers whose outputs are captured, always 13 of them.

    36 layers (the release) give the official list exactly. The rescaling t -> round(t*(L-1)/35) only exists
    so that small synthetic checkpoints keep 13 taps (the DiT's llm_features_dim = 13*hidden); repeats are
    allowed and the last tap is always the last layer. (2*t*(L-1) is even, so no .5 ties occur.)
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    return tuple(round(t * (num_layers - 1) / 35) for t in OFFICIAL_TAPS)


# ----------------------------------------------------------------------------------------------- config

def _config_dict(config: Mapping[str, Any] | PreTrainedConfig) -> dict[str, Any]:
    return dict(config) if isinstance(config, Mapping) else config.to_dict()


def check_not_nf4(config: Mapping[str, Any] | PreTrainedConfig) -> None:
    """Refuse a bitsandbytes (NF4) text encoder: this project only runs the weight-only FP8 release."""
    qc = _config_dict(config).get("quantization_config")
    if qc is not None:
        method = qc.get("quant_method", "?") if isinstance(qc, Mapping) else type(qc).__name__
        raise ValueError(
            f"text_encoder/config.json carries quantization_config (quant_method={method!r}, e.g. "
            "bitsandbytes NF4 from ideogram-ai/ideogram-4-nf4); such text encoders are not supported by this "
            "project -- use the ideogram-ai/ideogram-4-fp8 release (weight-only FP8, "
            f"'{FP8_FLAG}': true).")


def is_fp8_weight_only(config: Mapping[str, Any] | PreTrainedConfig) -> bool:
    """The release's marker (spec §1.4): top-level boolean `ideogram_fp8_weight_only`."""
    return _config_dict(config).get(FP8_FLAG, False) is True


def load_text_encoder_config(folder: str | Path) -> PreTrainedConfig:
    """Load `<folder>/config.json` of a `text_encoder/` folder (offline, no remote code).

    transformers 5.23 normalises both RoPE spellings (`rope_parameters`, and the
    legacy `rope_scaling` + `rope_theta`) into `text_config.rope_parameters`.
    """
    folder = Path(folder)
    raw = json.loads((folder / "config.json").read_text())
    check_not_nf4(raw)
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)
    if config.model_type != "qwen3_vl":
        raise ValueError(f"{folder}/config.json: model_type {config.model_type!r}, expected 'qwen3_vl'")
    # transformers silently substitutes its default theta (5e5) when none is given; the model needs 5e6
    tc = raw.get("text_config", {})
    if "rope_theta" not in tc and "rope_theta" not in (tc.get("rope_parameters") or {}):
        raise ValueError(f"{folder}/config.json: text_config has no rope_theta "
                         "(neither rope_parameters.rope_theta nor legacy rope_theta)")
    return config


def text_dims(text_config: Any) -> tuple[int, int, int, int, int, int, int]:
    """(vocab, hidden, layers, heads, kv_heads, head_dim, intermediate) from a text config or its dict."""
    get = text_config.get if isinstance(text_config, Mapping) else lambda k: getattr(text_config, k)
    heads = get("num_attention_heads")
    kv = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or get("hidden_size") // heads
    return (get("vocab_size"), get("hidden_size"), get("num_hidden_layers"), heads, kv, head_dim,
            get("intermediate_size"))


def text_encoder_inventory(text_config: Any, fp8: bool) -> dict[str, TensorSpec]:
    """Checkpoint tensors of the language model (Qwen3VLModel names, no biases, no LM head).

    fp8=True: projections are kind "linear" (e4m3 + `.weight_scale`, or float for an unquantized subset, as
    the official loader tolerates). fp8=False (a bf16 checkpoint): every tensor is plain float.
    """
    vocab, hidden, layers, heads, kv, head_dim, inter = text_dims(text_config)
    lin = "linear" if fp8 else "float"
    inv = {f"{PREFIX}embed_tokens.weight": TensorSpec((vocab, hidden))}
    for i in range(layers):
        p = f"{PREFIX}layers.{i}."
        for name, shape in (("q_proj", (heads * head_dim, hidden)), ("k_proj", (kv * head_dim, hidden)),
                            ("v_proj", (kv * head_dim, hidden)), ("o_proj", (hidden, heads * head_dim))):
            inv[f"{p}self_attn.{name}.weight"] = TensorSpec(shape, lin)
        inv[f"{p}self_attn.q_norm.weight"] = TensorSpec((head_dim,))
        inv[f"{p}self_attn.k_norm.weight"] = TensorSpec((head_dim,))
        for name, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                            ("down_proj", (hidden, inter))):
            inv[f"{p}mlp.{name}.weight"] = TensorSpec(shape, lin)
        inv[f"{p}input_layernorm.weight"] = TensorSpec((hidden,))
        inv[f"{p}post_attention_layernorm.weight"] = TensorSpec((hidden,))
    inv[f"{PREFIX}norm.weight"] = TensorSpec((hidden,))
    return inv


# ----------------------------------------------------------------------------------------------- model

class TextEncoder(nn.Module):
    """Qwen3-VL language model run by hand, returning the 13-tap features (spec §3.3)."""

    def __init__(self, language_model: Qwen3VLTextModel):
        super().__init__()
        self.language_model = language_model
        self.taps = tap_layers(language_model.config.num_hidden_layers)
        self.hidden_size = language_model.config.hidden_size
        self.feature_dim = NUM_TAPS * self.hidden_size

    @torch.inference_mode()
    def encode(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, n) [or (n,)] -> fp32 features (B, n, 13*hidden) [or (n, 13*hidden)].

        With an attention mask (1 = real token) each row's real tokens are encoded alone (positions restart
        at 0, as in the official packed layout) and padding rows get exact zeros: never computing pads avoids
        NaN from fully masked rows (trap 14) and wasted work (trap 28).
        """
        if ids.dim() == 1:
            return self.encode(ids[None], None if attention_mask is None else attention_mask[None])[0]
        ids = ids.to(self.language_model.embed_tokens.weight.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(ids.device)
        if attention_mask is None or bool(attention_mask.bool().all()):
            return self._run(ids)
        out = torch.zeros(*ids.shape, self.feature_dim, dtype=torch.float32, device=ids.device)
        for b in range(ids.shape[0]):
            keep = attention_mask[b].bool()
            if bool(keep.any()):
                out[b, keep] = self._run(ids[b, keep][None])[0]
        return out

    def encode_prompt(self, ids: torch.Tensor) -> torch.Tensor:
        """One unpadded prompt: ids (n,) -> (n, 13*hidden) fp32."""
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(f"encode_prompt wants a non-empty 1-D id tensor, got shape {tuple(ids.shape)}")
        return self.encode(ids)

    def _run(self, ids: torch.Tensor) -> torch.Tensor:
        lm = self.language_model
        b, n = ids.shape
        h = lm.embed_tokens(ids)  # bf16
        pos = torch.arange(n, device=h.device).expand(b, n)
        # rotary: cos/sin in fp32, interleaved MRoPE over 3 identical axes, cast to bf16
        cos_sin = lm.rotary_emb(h, pos[None].expand(3, b, n))
        # None under sdpa (is_causal path), an explicit causal mask otherwise
        mask = create_causal_mask(config=lm.config, inputs_embeds=h, attention_mask=None,
                                  past_key_values=None, position_ids=pos)
        caps: list[torch.Tensor] = []
        for i in range(max(self.taps) + 1):  # the final norm is never applied
            h = lm.layers[i](h, position_embeddings=cos_sin, attention_mask=mask, position_ids=pos)
            caps.extend([h] * self.taps.count(i))
        # (13, B, n, d) -> (B, n, d, 13) -> (B, n, d*13): f = d*13 + j
        return torch.stack(caps).movedim(0, -1).reshape(b, n, self.feature_dim).float()


def is_ignored_key(name: str) -> bool:
    """Vision tower and rotary buffers may be stored; they are never used."""
    return name.startswith("visual.") or name.endswith(".inv_freq")


def build_text_encoder(config: PreTrainedConfig, tensors: Iterable[tuple[str, torch.Tensor]],
                       device: str | torch.device = "cpu", attn_implementation: str = "sdpa") -> TextEncoder:
    """Build the text model without initialisation, swap Linears that have a scale to FP8Linear, load strictly.

    `tensors` are checkpoint (Qwen3VLModel) names. Unknown keys, missing keys, an e4m3 tensor without its
    `weight_scale`: all errors naming the tensors.
    """
    text_config = config.text_config if hasattr(config, "text_config") else config
    sd: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for name, t in tensors:
        if is_ignored_key(name):
            continue
        if not name.startswith(PREFIX):
            unexpected.append(name)
            continue
        key = name[len(PREFIX):]
        if key in sd:
            raise ValueError(f"text encoder checkpoint: duplicate tensor {name!r}")
        sd[key] = t
    quantized = {k[: -len(".weight_scale")] for k in sd if k.endswith(".weight_scale")}
    for k, t in sd.items():
        if t.dtype == FP8_DTYPE and not (k.endswith(".weight") and k[: -len(".weight")] in quantized):
            raise ValueError(f"text encoder checkpoint: {PREFIX}{k} is float8_e4m3fn but "
                             f"{PREFIX}{k}_scale is missing (FP8 weights need their per-row weight_scale)")

    with torch.device("meta"):
        lm = Qwen3VLTextModel(text_config)
    swap_linears(lm, quantized)
    expected = set(lm.state_dict())
    unexpected += [PREFIX + k for k in sorted(set(sd) - expected)]
    if unexpected:
        raise ValueError(f"text encoder checkpoint: unexpected tensors {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)} in all)")
    missing = sorted(expected - set(sd))
    if missing:
        raise ValueError(f"text encoder checkpoint: missing tensors {[PREFIX + k for k in missing[:8]]}"
                         f"{' ...' if len(missing) > 8 else ''} ({len(missing)} in all)")
    for k, t in sd.items():  # scales stay fp32; e4m3 as stored; everything else to the bf16 compute dtype
        dtype = torch.float32 if k.endswith(".weight_scale") else t.dtype if t.dtype == FP8_DTYPE else COMPUTE_DTYPE
        sd[k] = t.to(device=device, dtype=dtype)
    lm.load_state_dict(sd, strict=True, assign=True)
    lm.rotary_emb = Qwen3VLTextRotaryEmbedding(text_config).to(device)  # non-persistent buffers: rebuild
    lm.set_attn_implementation(attn_implementation)
    lm.requires_grad_(False).eval()
    leftover = [n for n, p in [*lm.named_parameters(), *lm.named_buffers()] if p.is_meta]
    assert not leftover, leftover
    return TextEncoder(lm)


def load_text_encoder(te_folder: str | Path, device: str = "cpu", attn_implementation: str = "sdpa") -> TextEncoder:
    """Load `text_encoder/` (config.json + model.safetensors or sharded index) via safetensors only.

    sdpa (transformers' default, what the official GPU path runs) or eager; both are deterministic on CPU.
    Eager features of a prefix equal the full prompt's bit for bit; sdpa's CPU kernel blocks by sequence
    length, so those differ by bf16 rounding.
    """
    te_folder = Path(te_folder)
    config = load_text_encoder_config(te_folder)
    files = component_files(te_folder, COMPONENTS["text_encoder"])
    # FP8: every key goes to the model (unexpected ones are errors, as in the official load); a bf16 encoder's
    # unknown keys are skipped, as transformers' from_pretrained skips them (docs/checkpoint.md)
    fp8 = is_fp8_weight_only(json.loads((te_folder / "config.json").read_text()))
    names = text_encoder_inventory(config.text_config, fp8=True)     # names only: the same for a bf16 encoder
    wanted = [k for k in files.header if not is_ignored_key(k) and (fp8 or k in names)]
    return build_text_encoder(config, load_tensors(files, str(device), wanted).items(), device,
                              attn_implementation)
