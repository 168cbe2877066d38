"""The PyTorch reference pipeline: prompt → uint8 image, step for step as the official code runs it.

It is the oracle for the exported graphs and the lean runtime, so it favours the literal official
computation over speed: both DiTs every step (even where guidance is 1), fp32 sampler state, the DiT's own
bf16 rounding of τ, guidance indexed by the down-counting loop index, multiply-then-add de-normalisation.
Two documented, bit-identical simplifications (spec §2.4, §3.4): the text encoder runs on text tokens only,
and the unconditional branch skips its all-zero text path.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ...runtime import latents as latent_math
from ...runtime.contract import TOKEN_CHANNELS
from ...runtime.packing import MAX_TEXT_TOKENS, check_size, pack, token_grid
from ...runtime.schedule import DEFAULT_PRESET, get_preset, plan, resolution_mu
from ..checkpoint import open_checkpoint
from .dit import Ideogram4Transformer, load_dit
from .text_encoder import TextEncoder, load_text_encoder
from .vae import Decoder, load_decoder, postprocess

NOISE_CHANNELS = TOKEN_CHANNELS


def chat_messages(prompt: str) -> list[dict]:
    """The one-message chat the official pipeline renders (§3.2): the prompt is passed through unchanged,
    plain text or a JSON caption alike."""
    return [{"role": "user", "content": [{"type": "text", "text": prompt}]}]


@dataclass
class SamplingParams:
    steps: int
    mu: float                  # μ_base, before the resolution shift
    std: float
    guidance: tuple[float, ...]  # index 0 = last step executed

    @classmethod
    def from_preset(cls, name: str = DEFAULT_PRESET) -> "SamplingParams":
        p = get_preset(name)
        return cls(p.steps, p.mu, p.std, p.guidance)


@dataclass
class Result:
    images: np.ndarray                   # (B, H, W, 3) uint8
    latents: np.ndarray                  # (B, N, 128) fp32, final sampler state (normalised token space)
    token_ids: list[list[int]]
    timings: dict[str, float] = field(default_factory=dict)


def torch_unpatchify(z_raw: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """(B, N, 128) → (B, 32, 2gh, 2gw); token channel order (ph, pw, c) (§6.6)."""
    B = z_raw.shape[0]
    return z_raw.view(B, gh, gw, 2, 2, 32).permute(0, 5, 1, 3, 2, 4).reshape(B, 32, 2 * gh, 2 * gw)


class ReferencePipeline:
    def __init__(self, tokenizer, text_encoder: TextEncoder, dit_cond: Ideogram4Transformer,
                 dit_uncond: Ideogram4Transformer, decoder: Decoder, device: str = "cpu"):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.dit_cond, self.dit_uncond, self.decoder = dit_cond, dit_uncond, decoder
        self.device = torch.device(device)

    @classmethod
    def from_checkpoint(cls, root: Path | str, device: str = "cpu") -> "ReferencePipeline":
        from transformers import AutoTokenizer

        ckpt = open_checkpoint(root)
        tok = AutoTokenizer.from_pretrained(str(Path(root) / "tokenizer"), local_files_only=True)
        return cls(tok, load_text_encoder(Path(root) / "text_encoder", device),
                   load_dit(ckpt.components["transformer"], device),
                   load_dit(ckpt.components["unconditional_transformer"], device),
                   load_decoder(Path(root) / "vae", device), device)

    # ------------------------------------------------------------------------------------------ stages

    def tokenize(self, prompt: str) -> list[int]:
        """Chat template with the generation prompt, then ids without extra special tokens (trap 25)."""
        text = self.tokenizer.apply_chat_template(chat_messages(prompt), tokenize=False,
                                                  add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > MAX_TEXT_TOKENS:
            raise ValueError(f"prompt is {len(ids)} tokens after the chat template; the limit is "
                             f"{MAX_TEXT_TOKENS}")
        return ids

    @torch.inference_mode()
    def encode(self, ids: list[int]) -> torch.Tensor:
        return self.text_encoder.encode_prompt(torch.tensor(ids, dtype=torch.long, device=self.device))

    def noise(self, batch: int, n_tokens: int, seed: int) -> torch.Tensor:
        """z₀ ~ N(0, I) (B, N, 128) fp32 in one call from a generator on the target device (§5.7)."""
        if not 0 <= seed < 2**64:
            raise ValueError(f"seed={seed} outside 0…2^64-1")
        g = torch.Generator(device=self.device).manual_seed(seed)
        return torch.randn((batch, n_tokens, NOISE_CHANNELS), generator=g, device=self.device,
                           dtype=torch.float32)

    @torch.inference_mode()
    def sample(self, features: list[torch.Tensor], height: int, width: int, params: SamplingParams,
               z: torch.Tensor, callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """The Euler loop with asymmetric CFG (§5.3). `features[b]` is prompt b's (n_b, F) text features."""
        dev = self.device
        lengths = [f.shape[0] for f in features]
        p = pack(lengths, height, width)
        B, T, N = len(lengths), p.T, p.N
        F_dim = features[0].shape[1]
        llm = torch.zeros(B, T + N, F_dim, dtype=torch.float32, device=dev)
        for b, f in enumerate(features):
            llm[b, T - f.shape[0]:T] = f
        pos, seg, ind = (torch.from_numpy(a).to(dev) for a in (p.positions, p.segments, p.indicators))
        x_text = torch.zeros(B, T, NOISE_CHANNELS, dtype=torch.float32, device=dev)
        steps = plan(params.steps, resolution_mu(params.mu, height, width), params.std, params.guidance)
        z = z.to(dev, torch.float32).clone()
        for k, st in enumerate(steps):
            tau = torch.full((B,), float(st.tau), dtype=torch.float32, device=dev)
            v_c = self.dit_cond(llm, torch.cat([x_text, z], 1), tau, pos, seg, ind)[:, T:]
            v_u = self.dit_uncond(None, z, tau, pos[:, T:], seg[:, T:], ind[:, T:])
            g = st.guidance
            v = g * v_c + (1.0 - g) * v_u
            z = z + v * float(st.dt)
            if callback:
                callback(k + 1, len(steps))
        return z

    @torch.inference_mode()
    def decode(self, z: torch.Tensor, height: int, width: int) -> np.ndarray:
        """De-normalise (multiply then add, fp32), unpatchify, bf16 decoder, uint8 (§6.5–6.8)."""
        gh, gw = token_grid(height, width)
        scale = torch.from_numpy(latent_math.LATENT_SCALE).to(z.device)
        shift = torch.from_numpy(latent_math.LATENT_SHIFT).to(z.device)
        latent = torch_unpatchify(z * scale + shift, gh, gw)
        dtype = next(self.decoder.parameters()).dtype
        return postprocess(self.decoder(latent.to(dtype)))

    # ------------------------------------------------------------------------------------------ all

    def __call__(self, prompts: str | Sequence[str], *, height: int = 1024, width: int = 1024,
                 params: SamplingParams | None = None, seed: int = 0, noise: np.ndarray | None = None,
                 callback: Callable[[int, int], None] | None = None) -> Result:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        params = params or SamplingParams.from_preset()
        check_size(height, width)
        gh, gw = token_grid(height, width)
        shape = (len(prompts), gh * gw, NOISE_CHANNELS)
        if noise is not None and tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
        t: dict[str, float] = {}
        t0 = time.perf_counter()
        ids = [self.tokenize(p) for p in prompts]
        feats = [self.encode(i) for i in ids]
        t["text_encoder_s"] = time.perf_counter() - t0
        z0 = torch.from_numpy(np.asarray(noise, np.float32)) if noise is not None \
            else self.noise(len(prompts), gh * gw, seed)
        t1 = time.perf_counter()
        z = self.sample(feats, height, width, params, z0, callback)
        t["denoise_s"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        images = self.decode(z, height, width)
        t["vae_s"] = time.perf_counter() - t2
        t["total_s"] = time.perf_counter() - t0
        return Result(images, z.float().cpu().numpy(), ids, t)
