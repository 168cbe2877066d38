"""The lean pipeline: engines folder + prompt → images, over whichever backend runs here. No torch.

Data path (one request): prompts → chat template → ids → text_encoder → per step dit_cond, dit_uncond,
guided_step (all on the backend's device) → vae_decoder → uint8 pixels. Host work per request: the
schedule table, the MRoPE cos/sin tables and the initial noise.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from . import backends
from .manifest import Manifest, load_manifest, verify
from .packing import check_size, token_grid
from .rope import dit_rope_tables
from .schedule import check_guidance, plan, resolution_mu
from .tokenizer import PromptTokenizer

NOISE_SHAPE_TAIL = 128
MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class Sampling:
    """Resolved sampling parameters. `guidance[i]` belongs to loop index i, which counts down (0 = last step)."""
    preset: str | None
    steps: int
    mu: float
    std: float
    guidance: tuple[float, ...]


@dataclass
class GenerationResult:
    images: list[Image.Image]
    latents: np.ndarray                      # (B, N, 128) fp32 final sampler state
    token_ids: list[list[int]]
    sampling: Sampling
    seed: int | None
    timings: dict[str, float] = field(default_factory=dict)


class Pipeline:
    """Load once, generate many times. `generate` calls are serialised by a lock: one Pipeline runs one
    request at a time (the device buffers of a request are not shared); use one Pipeline per worker for
    concurrency."""

    def __init__(self, engines: Path | str, backend: str = "auto", verify_checksums: bool = True, **options):
        t0 = time.perf_counter()
        self.manifest: Manifest = load_manifest(engines)
        self.backend = backends.create(backend, self.manifest, **options)
        if verify_checksums:   # what this backend reads; a backend that checks its own files (TensorRT) says so
            own = getattr(self.backend, "verifies_own_files", False)
            verify(self.manifest, [] if own else self.manifest.files_for_variant(self.backend.graph_variant))
        self.tokenizer = PromptTokenizer.from_folder(self.manifest.tokenizer_folder,
                                                     max_tokens=self.manifest.limits["max_text_tokens"])
        self._lock = threading.Lock()
        self.load_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------------------------- validation

    def resolve_sampling(self, preset: str | None = None, steps: int | None = None, mu: float | None = None,
                         std: float | None = None, guidance: float | Sequence[float] | None = None) -> Sampling:
        """A preset (default: the manifest's) with optional overrides. Changing `steps` needs a `guidance`
        (a constant or one value per step, index 0 = last step): a preset's schedule never silently stretches."""
        presets = self.manifest.presets
        name = preset or self.manifest.default_preset
        if name not in presets:
            raise ValueError(f"unknown sampler preset {name!r}; allowed: {', '.join(presets)}")
        p = presets[name]
        n = p.steps if steps is None else steps
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"steps={n!r} must be an integer >= 1")
        if guidance is None:
            if n != p.steps:
                raise ValueError(f"steps={n} differs from preset {name} ({p.steps} steps): also give guidance "
                                 f"(a constant or {n} values, index 0 = last step)")
            g = p.guidance
        elif isinstance(guidance, (int, float)):
            g = (float(guidance),) * n
        else:
            g = tuple(float(x) for x in guidance)
        check_guidance(g, n)
        custom = steps is not None or mu is not None or std is not None or guidance is not None
        return Sampling(None if custom else name, n, p.mu if mu is None else float(mu),
                        p.std if std is None else float(std), g)

    def _check_size(self, height: int, width: int) -> None:
        check_size(height, width)
        profiles = getattr(self.backend, "check_size", None)
        if profiles:
            profiles(height, width)

    # ------------------------------------------------------------------------------------- generation

    def generate(self, prompts: str | Sequence[str], *, width: int = 1024, height: int = 1024,
                 preset: str | None = None, steps: int | None = None, mu: float | None = None,
                 std: float | None = None, guidance: float | Sequence[float] | None = None,
                 seed: int | None = 0, noise: np.ndarray | None = None,
                 progress: Callable[[int, int], None] | None = None) -> GenerationResult:
        """Generate one image per prompt. Everything is validated before any graph runs.

        seed: 0…2^64−1, drawn with numpy's PCG64 (not PyTorch's generator: seeds are not portable across
        implementations); `noise` (B, image tokens, 128) float32 replaces the seed for cross-implementation
        reproduction."""
        t0 = time.perf_counter()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        self._check_size(height, width)
        sampling = self.resolve_sampling(preset, steps, mu, std, guidance)
        ids = [self.tokenizer.encode(p) for p in prompts]
        gh, gw = token_grid(height, width)
        shape = (len(prompts), gh * gw, NOISE_SHAPE_TAIL)
        if noise is not None:
            noise = np.asarray(noise)
            if noise.shape != shape:
                raise ValueError(f"noise has shape {noise.shape}, expected {shape} (batch, image tokens, 128)")
            if not np.isfinite(noise).all():
                raise ValueError("noise contains NaN or Inf")
            z0 = noise.astype(np.float32)
            seed = None
        else:
            if not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
                raise ValueError(f"seed={seed!r} outside 0…2^64-1")
            z0 = np.random.default_rng(int(seed)).standard_normal(shape, dtype=np.float32)
        timings = {"tokenize_s": time.perf_counter() - t0}
        with self._lock:
            latents, pixels = self._run(ids, height, width, sampling, z0, progress, timings)
        timings["total_s"] = time.perf_counter() - t0
        return GenerationResult([Image.fromarray(p) for p in pixels], latents, ids, sampling, seed, timings)

    def _run(self, ids, height, width, sampling: Sampling, z0, progress, timings):
        """Prompts of equal length form one batch (the graphs have no padding mask); each batch runs the
        whole loop. Noise was drawn once for the full request, so batching never changes a sample's noise."""
        be = self.backend
        # cond and uncond are independent within a step: a backend that places them on two GPUs runs them
        # at the same time (CFG-parallel); others run them one after the other
        run_pair = getattr(be, "run_concurrently", None) or (lambda calls: [be.run(c, i) for c, i in calls])
        apart = getattr(be, "parallel", False)
        gh, gw = token_grid(height, width)
        steps = plan(sampling.steps, resolution_mu(sampling.mu, height, width), sampling.std, sampling.guidance)
        groups: dict[int, list[int]] = {}
        for i, t in enumerate(ids):
            groups.setdefault(len(t), []).append(i)
        latents = np.empty_like(z0)
        pixels = np.empty((len(ids), height, width, 3), np.uint8)
        for key in ("text_encoder_s", "denoise_s", "vae_s"):
            timings[key] = 0.0
        timings["step_s"] = [0.0] * len(steps)
        done, total = 0, len(steps) * len(groups)
        for n, rows in groups.items():
            B = len(rows)
            t = time.perf_counter()
            feats = be.run("text_encoder", {"input_ids": np.array([ids[r] for r in rows], np.int64)})["text_features"]
            timings["text_encoder_s"] += time.perf_counter() - t
            t = time.perf_counter()
            cos, sin = dit_rope_tables(n, gh, gw, self.manifest.inv_freq, self.manifest.mrope_section)
            cos_c, sin_c = (be.upload(np.ascontiguousarray(np.broadcast_to(a, (B, *a.shape)))) for a in (cos, sin))
            cos_u, sin_u = (be.upload(np.ascontiguousarray(np.broadcast_to(a[n:], (B, *a[n:].shape))),
                                      component="dit_uncond") for a in (cos, sin))
            z = be.upload(z0[rows])
            for k, st in enumerate(steps):
                ts = time.perf_counter()
                tau = np.full((B,), st.tau, np.float32)
                tau_c = be.upload(tau)
                tau_u = be.upload(tau, component="dit_uncond") if apart else tau_c
                out_c, out_u = run_pair([
                    ("dit_cond", {"latents": z, "tau": tau_c, "rope_cos": cos_c, "rope_sin": sin_c,
                                  "text_features": feats}),
                    ("dit_uncond", {"latents": z, "tau": tau_u, "rope_cos": cos_u, "rope_sin": sin_u})])
                v_c, v_u = out_c["velocity"], out_u["velocity"]
                z = be.run("guided_step", {
                    "latents": z, "velocity_cond": v_c, "velocity_uncond": v_u,
                    "guidance": np.array([st.guidance], np.float32),
                    "one_minus_guidance": np.array([1.0 - st.guidance], np.float32),
                    "dt": np.array([st.dt], np.float32)})["next_latents"]
                timings["step_s"][k] += time.perf_counter() - ts
                done += 1
                if progress:
                    progress(done, total)
            z_host = be.download(z)
            if not np.isfinite(z_host).all():     # a broken kernel must not turn into a silently black image
                raise FloatingPointError(f"{be.name}: the sampler state became non-finite "
                                         f"({int((~np.isfinite(z_host)).sum())} values) for prompt length {n}")
            timings["denoise_s"] += time.perf_counter() - t
            t = time.perf_counter()
            img = be.run("vae_decoder", {"latents": z_host.reshape(B, gh, gw, NOISE_SHAPE_TAIL)})["image"]
            pixels[rows] = be.download(img)
            latents[rows] = z_host
            timings["vae_s"] += time.perf_counter() - t
        return latents, pixels
