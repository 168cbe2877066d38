"""The Ideogram 4 DiT (`Ideogram4Transformer`), PyTorch reference with the official parameter names (spec §2).

Written to follow the official forward literally -- masks applied by multiplication, every position run
through every projection -- because this module is the oracle the exported graphs are checked against.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

from ...runtime.contract import TOKEN_CHANNELS
from .fp8 import swap_linears
from ..inventory import TensorSpec
from ..safetensors_files import load_tensors

COMPUTE_DTYPE = torch.bfloat16
TEXT_INDICATOR, IMAGE_INDICATOR, REFERENCE_INDICATOR = 3, 2, 4
LLM_NORM_EPS = 1e-6
FINAL_NORM_EPS = 1e-6
QK_NORM_EPS = 1e-5
TIME_SCALE = 1e4          # τ ∈ (0, 1) is multiplied by 1e4 before the sinusoid
MAX_PERIOD = 1e4


@dataclass(frozen=True)
class DiTConfig:
    """Hyper-parameters under the official field names; the defaults are the released model's (§2.1)."""
    emb_dim: int = 4608
    num_layers: int = 34
    num_heads: int = 18
    intermediate_size: int = 12288
    adanln_dim: int = 512
    in_channels: int = TOKEN_CHANNELS
    llm_features_dim: int = 53248
    rope_theta: float = 5_000_000.0
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        object.__setattr__(self, "mrope_section", tuple(self.mrope_section))
        if self.emb_dim % self.num_heads:
            raise ValueError(f"emb_dim={self.emb_dim} is not divisible by num_heads={self.num_heads}")
        slots = self.head_dim // 2
        if 3 * max(self.mrope_section[1:]) > slots:
            raise ValueError(f"mrope_section={self.mrope_section} needs {3 * max(self.mrope_section[1:])} "
                             f"frequency slots, head_dim={self.head_dim} has {slots}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.num_heads

    @classmethod
    def from_json(cls, path: Path) -> "DiTConfig":
        """Official loaders never read transformer/config.json (the values are hard-coded), so a missing file
        or missing fields fall back to the released model's values; unknown fields are ignored."""
        if not Path(path).exists():
            return cls()
        raw = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def to_json_dict(self) -> dict:
        d = asdict(self)
        d["mrope_section"] = list(self.mrope_section)
        return {"_class_name": "Ideogram4Transformer", **d}


def quantized_linears(cfg: DiTConfig) -> dict[str, tuple[int, int, bool]]:
    """Every Linear of the DiT: name -> (out, in, has_bias). The FP8 release quantizes all 7 + 6·L of them (211 at 34 layers)."""
    D, A = cfg.emb_dim, cfg.adanln_dim
    lin = {
        "input_proj": (D, cfg.in_channels, True),
        "llm_cond_proj": (D, cfg.llm_features_dim, True),
        "t_embedding.mlp_in": (D, D, True),
        "t_embedding.mlp_out": (D, D, True),
        "adaln_proj": (A, D, True),
        "final_layer.linear": (cfg.in_channels, D, True),
        "final_layer.adaln_modulation": (D, A, True),
    }
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        lin[p + "attention.qkv"] = (3 * D, D, False)
        lin[p + "attention.o"] = (D, D, False)
        lin[p + "feed_forward.w1"] = (cfg.intermediate_size, D, False)
        lin[p + "feed_forward.w2"] = (D, cfg.intermediate_size, False)
        lin[p + "feed_forward.w3"] = (cfg.intermediate_size, D, False)
        lin[p + "adaln_modulation"] = (4 * D, A, True)
    return lin


def dit_inventory(cfg: DiTConfig) -> dict[str, TensorSpec]:
    """State-dict inventory (§2.2): 19·L + 23 tensors in the FP8 layout (scales implied by kind 'linear')."""
    inv: dict[str, TensorSpec] = {}
    for name, (out_f, in_f, bias) in quantized_linears(cfg).items():
        inv[f"{name}.weight"] = TensorSpec((out_f, in_f), "linear")
        if bias:
            inv[f"{name}.bias"] = TensorSpec((out_f,))
    inv["llm_cond_norm.weight"] = TensorSpec((cfg.llm_features_dim,))
    inv["embed_image_indicator.weight"] = TensorSpec((2, cfg.emb_dim))
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        for n in ("attention.norm_q", "attention.norm_k"):
            inv[f"{p}{n}.weight"] = TensorSpec((cfg.head_dim,))
        for n in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2"):
            inv[f"{p}{n}.weight"] = TensorSpec((cfg.emb_dim,))
    return inv


# ---------------------------------------------------------------------------------------------- math


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def timestep_sinusoid(tau: torch.Tensor, dim: int) -> torch.Tensor:
    """fp32 [sin | cos] embedding of 1e4·τ with frequencies exp(−k·ln(1e4)/(half−1)) (§2.5, trap 4).
    τ arrives already rounded to bf16 (trap 3)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=tau.device)
                      * torch.tensor(-math.log(MAX_PERIOD) / (half - 1), dtype=torch.float32))
    args = (tau.to(torch.float32) * TIME_SCALE)[..., None] * freqs
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


def rope_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """inv_freq[i] = 1 / θ^(2i/head_dim), i < head_dim/2: formed in fp32, rounded to bf16, promoted back to fp32
    (§2.6). The official loader's `model.to(bf16)` casts this non-persistent buffer too and its forward promotes
    it back; image positions sit at ≥ 65536, so the rounding moves the angles a lot and must be reproduced."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).to(torch.float32) / head_dim
    return (1.0 / (theta ** exponent)).to(torch.bfloat16).to(torch.float32)


def mrope_angles(positions: torch.Tensor, head_dim: int, theta: float,
                 mrope_section: tuple[int, int, int]) -> torch.Tensor:
    """Per-slot fp32 angles (..., head_dim/2) = fp32(pos) · bf16-rounded inv_freq, with Qwen3-VL interleaved
    axis selection (§2.6, trap 8):
    slot i takes the h angle if i%3==1 and i<3·sec[1], the w angle if i%3==2 and i<3·sec[2], else t."""
    inv = rope_inv_freq(head_dim, theta, positions.device)
    theta_axes = positions.to(torch.float32)[..., None] * inv        # (..., 3, slots), one fp32 product
    sel = theta_axes[..., 0, :].clone()
    for axis in (1, 2):
        idx = slice(axis, 3 * mrope_section[axis], 3)
        sel[..., idx] = theta_axes[..., axis, idx]
    return sel


def mrope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                  mrope_section: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin of the duplicated angles (rotate-half layout, trap 9), shape (..., head_dim)."""
    ang = mrope_angles(positions, head_dim, theta, mrope_section)
    phi = torch.cat([ang, ang], dim=-1)
    return torch.cos(phi), torch.sin(phi)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def segment_mask(segments: torch.Tensor) -> torch.Tensor | None:
    """None when every row holds one segment id (always for B=1 and the unconditional branch); else the
    boolean (B, 1, L, L) segment-equality mask (pads see pads, trap 16)."""
    if bool((segments == segments[:, :1]).all()):
        return None
    return (segments[:, :, None] == segments[:, None, :])[:, None]


# ---------------------------------------------------------------------------------------------- modules


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.mlp_in = nn.Linear(dim, dim)
        self.mlp_out = nn.Linear(dim, dim)

    def forward(self, tau: torch.Tensor) -> torch.Tensor:
        e = timestep_sinusoid(tau, self.dim).to(COMPUTE_DTYPE)
        return self.mlp_out(F.silu(self.mlp_in(e)))


class Attention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=False)
        self.o = nn.Linear(cfg.emb_dim, cfg.emb_dim, bias=False)
        self.norm_q = nn.Module()
        self.norm_q.weight = nn.Parameter(torch.ones(cfg.head_dim))
        self.norm_k = nn.Module()
        self.norm_k.weight = nn.Parameter(torch.ones(cfg.head_dim))

    def forward(self, x, cos, sin, mask):
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, self.head_dim).unbind(2)
        q = rms_norm(q, self.norm_q.weight, QK_NORM_EPS)
        k = rms_norm(k, self.norm_k.weight, QK_NORM_EPS)
        cos, sin = cos[:, :, None], sin[:, :, None]                      # (B, L, 1, hd) over heads
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask)
        return self.o(out.transpose(1, 2).reshape(B, L, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.emb_dim, cfg.intermediate_size, bias=False)   # gate (SiLU)
        self.w3 = nn.Linear(cfg.emb_dim, cfg.intermediate_size, bias=False)   # up
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.emb_dim, bias=False)   # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _gain(dim: int) -> nn.Module:
    m = nn.Module()
    m.weight = nn.Parameter(torch.ones(dim))
    return m


class Block(nn.Module):
    """Sandwich-norm single-stream block with scale/gate AdaLN and no shifts (§2.8, trap 6)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.eps = cfg.norm_eps
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm1, self.attention_norm2 = _gain(cfg.emb_dim), _gain(cfg.emb_dim)
        self.ffn_norm1, self.ffn_norm2 = _gain(cfg.emb_dim), _gain(cfg.emb_dim)
        self.adaln_modulation = nn.Linear(cfg.adanln_dim, 4 * cfg.emb_dim)

    def forward(self, x, a, cos, sin, mask):
        s1, g1, s2, g2 = self.adaln_modulation(a).chunk(4, dim=-1)
        n = lambda t, m: rms_norm(t, m.weight, self.eps)  # noqa: E731
        x = x + torch.tanh(g1) * n(self.attention(n(x, self.attention_norm1) * (1 + s1), cos, sin, mask),
                                   self.attention_norm2)
        x = x + torch.tanh(g2) * n(self.feed_forward(n(x, self.ffn_norm1) * (1 + s2)), self.ffn_norm2)
        return x


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.linear = nn.Linear(cfg.emb_dim, cfg.in_channels)
        self.adaln_modulation = nn.Linear(cfg.adanln_dim, cfg.emb_dim)

    def forward(self, h, a):
        scale = self.adaln_modulation(F.silu(a))                       # second SiLU (trap 5)
        return self.linear(F.layer_norm(h, (h.shape[-1],), eps=FINAL_NORM_EPS) * (1 + scale))


class Ideogram4Transformer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.emb_dim
        self.input_proj = nn.Linear(cfg.in_channels, D)
        self.llm_cond_norm = _gain(cfg.llm_features_dim)
        self.llm_cond_proj = nn.Linear(cfg.llm_features_dim, D)
        self.t_embedding = TimestepEmbedding(D)
        self.adaln_proj = nn.Linear(D, cfg.adanln_dim)
        self.embed_image_indicator = nn.Embedding(2, D)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.final_layer = FinalLayer(cfg)

    def forward(self, llm_features: torch.Tensor | None, latents: torch.Tensor, tau: torch.Tensor,
                positions: torch.Tensor, segments: torch.Tensor, indicators: torch.Tensor) -> torch.Tensor:
        """llm_features (B, L, F) fp32 or None (= all zeros: the unconditional branch, whose text path then
        contributes exact zeros and is skipped); latents (B, L, 128) fp32; tau (B,) fp32; positions
        (B, L, 3), segments (B, L), indicators (B, L) int64. Returns (B, L, 128) fp32, valid at image tokens."""
        dt = COMPUTE_DTYPE
        cfg = self.cfg
        x = latents.to(dt)
        tau = tau.to(dt)                                                  # trap 3
        m_txt = (indicators == TEXT_INDICATOR).to(dt)[..., None]
        is_img = (indicators == IMAGE_INDICATOR) | (indicators == REFERENCE_INDICATOR)
        m_img = is_img.to(dt)[..., None]
        x = x * m_img
        h = self.input_proj(x) * m_img
        if llm_features is not None:
            f = llm_features.to(dt) * m_txt
            h = h + self.llm_cond_proj(rms_norm(f, self.llm_cond_norm.weight, LLM_NORM_EPS)) * m_txt
        c = self.t_embedding(tau)[:, None, :]
        a = F.silu(self.adaln_proj(c))
        h = h + self.embed_image_indicator(is_img.long())
        cos, sin = mrope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
        cos, sin = cos.to(dt), sin.to(dt)
        mask = segment_mask(segments)
        for block in self.layers:
            h = block(h, a, cos, sin, mask)
        return self.final_layer(h, a).to(torch.float32)


def load_dit(component, device: str = "cpu") -> Ideogram4Transformer:
    """Build the DiT for a validated checkpoint component (see checkpoint.open_checkpoint) and load its
    weights: FP8 Linears where the checkpoint has scales (any subset, like the official loader), bf16
    everything else. Built on the meta device, so the weights are allocated once, where they are loaded."""
    with torch.device("meta"):
        model = Ideogram4Transformer(component.config)
    swap_linears(model, {n[: -len(".weight")] for n in component.quantized})
    sd = load_tensors(component.files, device)
    for k, t in sd.items():
        if k.endswith(".weight_scale"):
            sd[k] = t.to(torch.float32)
        elif t.dtype != torch.float8_e4m3fn:
            sd[k] = t.to(COMPUTE_DTYPE)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)
