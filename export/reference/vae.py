"""Flux2 KL autoencoder: config, checkpoint inventory, diffusers→native naming, PyTorch reference decoder (spec §6).

The checkpoint file uses diffusers names (`AutoencoderKLFlux2`); the official code renames them to the native
(BFL-style) names of §6.7 and loads strictly, so the decoder here carries the native names and the inventory
lists the complete autoencoder (encoder, decoder, quant convs, bn buffers).
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..inventory import TensorSpec

VAE_CLASS_NAME = "AutoencoderKLFlux2"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
NUM_LEVELS = 4      # the official up-block reversal is 3 − d: exactly four levels (§1.2a)
NUM_GROUPS = 32     # GroupNorm groups are hard-coded in the official blocks
LATENT_CHANNELS = 32
GN_EPS = 1e-6


@dataclass(frozen=True)
class VAEConfig:
    """The diffusers `AutoencoderKLFlux2` hyper-parameters, restricted to what the official code can run."""
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 32
    in_channels: int = 3
    out_channels: int = 3
    norm_num_groups: int = 32
    act_fn: str = "silu"
    sample_size: int = 1024
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    batch_norm_eps: float = 1e-4
    batch_norm_momentum: float = 0.1
    patch_size: tuple[int, int] = (2, 2)
    gn_eps: float = GN_EPS  # not a diffusers field: fixed in both implementations

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        _validate(self)

    @property
    def bn_channels(self) -> int:
        return self.patch_size[0] * self.patch_size[1] * self.latent_channels

    @classmethod
    def from_json(cls, path: str | Path) -> VAEConfig:
        """Read a diffusers-style `vae/config.json`; unknown extra fields (e.g. `force_upcast`) are ignored."""
        d = json.loads(Path(path).read_text())
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: dict) -> VAEConfig:
        name = d.get("_class_name", VAE_CLASS_NAME)
        if name != VAE_CLASS_NAME:
            raise ValueError(f"VAE _class_name {name!r} is not supported; expected {VAE_CLASS_NAME!r}")
        fields = cls.__dataclass_fields__
        cfg = cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()
                     if k in fields and k != "gn_eps"})
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = d.get(key)
            if types is not None and list(types) != [want] * NUM_LEVELS:
                raise ValueError(f"VAE {key} {list(types)} is not supported; expected {NUM_LEVELS}× {want!r}")
        dec = d.get("decoder_block_out_channels")
        if dec is not None and tuple(dec) != cfg.block_out_channels:
            raise ValueError(f"VAE decoder_block_out_channels {list(dec)} differs from block_out_channels "
                             f"{list(cfg.block_out_channels)}; the official decoder uses one set of widths")
        return cfg

    def to_json_dict(self) -> dict:
        """A diffusers-style config dict (field names of `AutoencoderKLFlux2.__init__`)."""
        d = asdict(self)
        del d["gn_eps"]
        d["block_out_channels"] = list(self.block_out_channels)
        d["patch_size"] = list(self.patch_size)
        d["down_block_types"] = ["DownEncoderBlock2D"] * NUM_LEVELS
        d["up_block_types"] = ["UpDecoderBlock2D"] * NUM_LEVELS
        d["decoder_block_out_channels"] = None
        return {"_class_name": VAE_CLASS_NAME, **dict(sorted(d.items()))}


def _validate(cfg: VAEConfig) -> None:
    """Refuse configs the official VAE code cannot build or load (§1.2a, §6.1)."""
    if len(cfg.block_out_channels) != NUM_LEVELS:
        raise ValueError(f"VAE block_out_channels {list(cfg.block_out_channels)} has "
                         f"{len(cfg.block_out_channels)} levels; exactly {NUM_LEVELS} are required")
    if cfg.norm_num_groups != NUM_GROUPS:
        raise ValueError(f"VAE norm_num_groups {cfg.norm_num_groups} is not supported; only {NUM_GROUPS}")
    bad = [c for c in cfg.block_out_channels if c <= 0 or c % cfg.norm_num_groups]
    if bad:
        raise ValueError(f"VAE block_out_channels {list(cfg.block_out_channels)}: {bad} not a positive multiple "
                         f"of norm_num_groups={cfg.norm_num_groups}")
    if cfg.latent_channels != LATENT_CHANNELS:
        raise ValueError(f"VAE latent_channels {cfg.latent_channels} is not supported; only {LATENT_CHANNELS}")
    if cfg.layers_per_block < 1:
        raise ValueError(f"VAE layers_per_block {cfg.layers_per_block} must be >= 1")
    if (cfg.in_channels, cfg.out_channels) != (3, 3):
        raise ValueError(f"VAE in/out channels {cfg.in_channels}/{cfg.out_channels}: only RGB (3/3)")
    if cfg.patch_size != (2, 2):
        raise ValueError(f"VAE patch_size {list(cfg.patch_size)}: only [2, 2] (128 token channels)")
    if cfg.act_fn != "silu":
        raise ValueError(f"VAE act_fn {cfg.act_fn!r}: only 'silu' (swish)")
    flags = {k: getattr(cfg, k) for k in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention")}
    off = [k for k, v in flags.items() if v is not True]
    if off:
        raise ValueError(f"VAE {off} must be true: the official autoencoder always has these modules")


# ----------------------------------------------------------------------------------------- inventory

def _conv(p: str, cout: int, cin: int, k: int) -> dict[str, TensorSpec]:
    return {f"{p}.weight": TensorSpec((cout, cin, k, k)), f"{p}.bias": TensorSpec((cout,))}


def _norm(p: str, c: int) -> dict[str, TensorSpec]:
    return {f"{p}.weight": TensorSpec((c,)), f"{p}.bias": TensorSpec((c,))}


def _resnet(p: str, cin: int, cout: int) -> dict[str, TensorSpec]:
    d = {**_norm(f"{p}.norm1", cin), **_conv(f"{p}.conv1", cout, cin, 3),
         **_norm(f"{p}.norm2", cout), **_conv(f"{p}.conv2", cout, cout, 3)}
    if cin != cout:
        d |= _conv(f"{p}.conv_shortcut", cout, cin, 1)
    return d


def _mid(p: str, c: int) -> dict[str, TensorSpec]:
    """Res, single-head attention (2-D linear q/k/v/out in the diffusers file, §6.7), Res."""
    a = f"{p}.mid_block.attentions.0"
    d = {**_resnet(f"{p}.mid_block.resnets.0", c, c), **_norm(f"{a}.group_norm", c)}
    for n in ("to_q", "to_k", "to_v", "to_out.0"):
        d[f"{a}.{n}.weight"] = TensorSpec((c, c), "linear")
        d[f"{a}.{n}.bias"] = TensorSpec((c,))
    return d | _resnet(f"{p}.mid_block.resnets.1", c, c)


def encoder_inventory(cfg: VAEConfig) -> dict[str, TensorSpec]:
    """encoder.* + quant_conv.* in diffusers names."""
    ch, z = cfg.block_out_channels, cfg.latent_channels
    d = _conv("encoder.conv_in", ch[0], cfg.in_channels, 3)
    cin = ch[0]
    for lvl, cout in enumerate(ch):
        for r in range(cfg.layers_per_block):
            d |= _resnet(f"encoder.down_blocks.{lvl}.resnets.{r}", cin, cout)
            cin = cout
        if lvl != NUM_LEVELS - 1:
            d |= _conv(f"encoder.down_blocks.{lvl}.downsamplers.0.conv", cout, cout, 3)
    d |= _mid("encoder", ch[-1])
    d |= _norm("encoder.conv_norm_out", ch[-1]) | _conv("encoder.conv_out", 2 * z, ch[-1], 3)
    return d | _conv("quant_conv", 2 * z, 2 * z, 1)


def decoder_inventory(cfg: VAEConfig) -> dict[str, TensorSpec]:
    """decoder.* + post_quant_conv.* in diffusers names (up_blocks.0 = coarsest level)."""
    ch, z = cfg.block_out_channels, cfg.latent_channels
    d = _conv("post_quant_conv", z, z, 1) | _conv("decoder.conv_in", ch[-1], z, 3)
    d |= _mid("decoder", ch[-1])
    cin = ch[-1]
    for i, cout in enumerate(reversed(ch)):
        for r in range(cfg.layers_per_block + 1):
            d |= _resnet(f"decoder.up_blocks.{i}.resnets.{r}", cin, cout)
            cin = cout
        if i != NUM_LEVELS - 1:
            d |= _conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", cout, cout, 3)
    return d | _norm("decoder.conv_norm_out", ch[0]) | _conv("decoder.conv_out", cfg.out_channels, ch[0], 3)


def vae_inventory(cfg: VAEConfig) -> dict[str, TensorSpec]:
    """The complete autoencoder file in diffusers names: exactly what the official strict load requires."""
    c = cfg.bn_channels
    bn = {"bn.running_mean": TensorSpec((c,), "buffer"), "bn.running_var": TensorSpec((c,), "buffer"),
          "bn.num_batches_tracked": TensorSpec((), "buffer", optional=True)}   # PyTorch's BatchNorm fills it in
    return encoder_inventory(cfg) | decoder_inventory(cfg) | bn


# ------------------------------------------------------------------------------------ naming (§6.7)

_LEAF = r"(weight|bias)"
_RES_PART = r"(norm1|conv1|norm2|conv2|conv_shortcut)"
_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_RULES: list[tuple[re.Pattern, object]] = [
    (re.compile(r"bn\.(running_mean|running_var|num_batches_tracked)"), lambda m: m.group(0)),
    (re.compile(rf"quant_conv\.{_LEAF}"), lambda m: f"encoder.{m.group(0)}"),
    (re.compile(rf"post_quant_conv\.{_LEAF}"), lambda m: f"decoder.{m.group(0)}"),
    (re.compile(rf"(encoder|decoder)\.conv_norm_out\.{_LEAF}"), lambda m: f"{m[1]}.norm_out.{m[2]}"),
    (re.compile(rf"(encoder|decoder)\.(conv_in|conv_out)\.{_LEAF}"), lambda m: m.group(0)),
    (re.compile(rf"(encoder|decoder)\.mid_block\.resnets\.([01])\.{_RES_PART}\.{_LEAF}"),
     lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{_res(m[3])}.{m[4]}"),
    (re.compile(rf"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.{_LEAF}"),
     lambda m: f"{m[1]}.mid.attn_1.{_ATTN[m[2]]}.{m[3]}"),
    (re.compile(rf"encoder\.down_blocks\.([0-3])\.resnets\.(\d+)\.{_RES_PART}\.{_LEAF}"),
     lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{_res(m[3])}.{m[4]}"),
    (re.compile(rf"encoder\.down_blocks\.([0-3])\.downsamplers\.0\.conv\.{_LEAF}"),
     lambda m: f"encoder.down.{m[1]}.downsample.conv.{m[2]}"),
    (re.compile(rf"decoder\.up_blocks\.([0-3])\.resnets\.(\d+)\.{_RES_PART}\.{_LEAF}"),
     lambda m: f"decoder.up.{3 - int(m[1])}.block.{m[2]}.{_res(m[3])}.{m[4]}"),
    (re.compile(rf"decoder\.up_blocks\.([0-3])\.upsamplers\.0\.conv\.{_LEAF}"),
     lambda m: f"decoder.up.{3 - int(m[1])}.upsample.conv.{m[2]}"),
]


def _res(part: str) -> str:
    return "nin_shortcut" if part == "conv_shortcut" else part


def diffusers_to_native(name: str) -> str:
    """Map one diffusers VAE key to its native name (§6.7); the official loader rejects unknown keys, so do we."""
    for pat, fn in _RULES:
        m = pat.fullmatch(name)
        if m:
            return fn(m)  # type: ignore[operator]
    raise KeyError(f"unknown VAE checkpoint key {name!r}: not an AutoencoderKLFlux2 (diffusers) name")


_MID_ATTN_W = re.compile(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight")


def native_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a diffusers VAE state dict to native names; 2-D mid-attention weights become (C, C, 1, 1) kernels."""
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        n = diffusers_to_native(k)
        if n in out:
            raise ValueError(f"VAE keys collide on native name {n!r} (second source {k!r})")
        if _MID_ATTN_W.fullmatch(n) and v.ndim == 2:
            v = v.reshape(*v.shape, 1, 1)
        out[n] = v
    return out


# --------------------------------------------------------------------------------- decoder (§6.1–6.2)

def swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


def _gn(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(NUM_GROUPS, c, eps=GN_EPS, affine=True)


class ResnetBlock(nn.Module):
    """shortcut(x) + conv2(swish(GN2(conv1(swish(GN1(x)))))); 1×1 `nin_shortcut` only when widths differ."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _gn(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _gn(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(swish(self.norm2(self.conv1(swish(self.norm1(x))))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention of width C over all H·W pixels, scale 1/√C (trap 19)."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _gn(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3) for t in (self.q(y), self.k(y), self.v(y)))
        o = F.scaled_dot_product_attention(q, k, v)  # default scale = 1/sqrt(C)
        return x + self.proj_out(o.transpose(2, 3).reshape(b, c, h, w))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """Native-named Flux2 decoder, `post_quant_conv` included: (B, 32, h, w) latent → (B, 3, 8h, 8w)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, z, top = cfg.block_out_channels, cfg.latent_channels, cfg.block_out_channels[-1]
        self.post_quant_conv = nn.Conv2d(z, z, 1)
        self.conv_in = nn.Conv2d(z, top, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = ResnetBlock(top, top), AttnBlock(top), ResnetBlock(top, top)
        levels: list[nn.Module] = []
        cin = top
        for lvl in reversed(range(NUM_LEVELS)):  # built coarse → fine, stored by level index
            m = nn.Module()
            m.block = nn.ModuleList()
            for _ in range(cfg.layers_per_block + 1):
                m.block.append(ResnetBlock(cin, ch[lvl]))
                cin = ch[lvl]
            if lvl != 0:
                m.upsample = Upsample(cin)
            levels.insert(0, m)
        self.up = nn.ModuleList(levels)
        self.norm_out = _gn(ch[0])
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(self.post_quant_conv(z.to(self.post_quant_conv.weight.dtype)))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        h = h.to(self.up[0].block[0].conv1.weight.dtype)  # OFF casts to the up-path dtype here
        for lvl in reversed(range(NUM_LEVELS)):
            for blk in self.up[lvl].block:
                h = blk(h)
            if lvl != 0:
                h = self.up[lvl].upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


def load_decoder(vae_folder: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.bfloat16) -> Decoder:
    """Build the decoder from `vae/config.json` and the single-file diffusers checkpoint, strictly (§1.2, §6.7)."""
    from safetensors import safe_open

    folder = Path(vae_folder)
    cfg = VAEConfig.from_json(folder / "config.json")
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        if (folder / f"{WEIGHTS_FILE}.index.json").exists():
            raise ValueError(f"{folder}: sharded VAE (index.json) is not supported; the official loader reads "
                             f"only the single file {WEIGHTS_FILE}")
        raise FileNotFoundError(f"VAE weights not found: {path}")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        names = {diffusers_to_native(k): k for k in f.keys()}  # unknown keys raise, as in OFF
        sd = native_state_dict({names[n]: f.get_tensor(names[n]) for n in names if n.startswith("decoder.")})
    sd = {n.removeprefix("decoder."): t for n, t in sd.items()}
    with torch.device("meta"):
        dec = Decoder(cfg)
    want = set(dec.state_dict())
    missing, unexpected = sorted(want - sd.keys()), sorted(sd.keys() - want)
    if missing or unexpected:
        raise ValueError(f"{path}: decoder keys do not match the config (native names, prefix 'decoder.'): "
                         f"missing {missing}, unexpected {unexpected}")
    dec.load_state_dict(sd, strict=True, assign=True)
    return dec.to(device=device, dtype=dtype).eval()


def postprocess(x: Tensor) -> np.ndarray:
    """Decoder output (B, 3, H, W) → uint8 (B, H, W, 3) RGB; torch.round is half-to-even like OFF (§6.8)."""
    y = ((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return y.permute(0, 2, 3, 1).contiguous().cpu().numpy()
