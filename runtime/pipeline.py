"""The lean pipeline: engines folder + prompt → images, over whichever backend runs here. No torch.

Data path (one request): prompts → chat template → ids → text_encoder → per step dit_cond, dit_uncond,
guided_step (all on the backend's device) → vae_decoder → uint8 pixels. Host work per request: the
schedule table, the MRoPE cos/sin tables and the initial noise. A step whose guidance is exactly 1 skips
dit_uncond (its term is multiplied by 0); with `cache` the DiTs run as first-block cache pieces (cache.py).
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
from .cache import DITS, CacheOptions, FirstBlockCache
from .manifest import Manifest, load_manifest
from .verify import verify
from .packing import token_grid
from .request import MAX_SEED, NOISE_SHAPE_TAIL, Request, Sampling, prepare, resolve_sampling  # noqa: F401
from .rope import dit_rope_tables
from .schedule import needs_uncond, plan, resolution_mu
from .tokenizer import PromptTokenizer


@dataclass
class GenerationResult:
    images: list[Image.Image]
    latents: np.ndarray                      # (B, N, 128) fp32 final sampler state
    token_ids: list[list[int]]
    sampling: Sampling
    seed: int | None
    timings: dict[str, float] = field(default_factory=dict)
    batch_index: int = 0                     # image i drew row batch_index + i of the seed's noise stream
    reused_steps: list[list[int]] = field(default_factory=list)   # first-block cache: per batch, steps reused
    cache_changes: list[dict[int, float]] = field(default_factory=list)   # … and the relative changes compared


class Pipeline:
    """Load once, generate many times. `generate` calls are serialised by a lock: one Pipeline runs one
    request at a time (the device buffers of a request are not shared); use one Pipeline per worker for
    concurrency.

    engines: the folder, or a Manifest already loaded from it. tokenizer: a PromptTokenizer already loaded from
    that manifest (`PromptTokenizer.from_manifest`), so a caller that validated a request first loads it once.
    The sha256 of every graph and weight file the backend reads is checked before the backend parses it.

    load_uncond=False: dit_uncond is never loaded (half the DiT memory and load time); every request must then
    have guidance 1 on every step. cache: the first-block cache (CacheOptions; onnxruntime backends, exports
    with the cache graphs): the DiTs are loaded as head/body/tail pieces, which share the DiTs' weight files."""

    def __init__(self, engines: Path | str | Manifest, backend: str = "auto", verify_checksums: bool = True,
                 tokenizer: PromptTokenizer | None = None, load_uncond: bool = True,
                 cache: CacheOptions | None = None, **options):
        t0 = time.perf_counter()
        self.manifest: Manifest = engines if isinstance(engines, Manifest) else load_manifest(engines)
        self.tokenizer = tokenizer or PromptTokenizer.from_manifest(self.manifest)
        self.load_uncond, self.cache = bool(load_uncond), cache
        names = tuple(options.pop("components", None) or self._components())    # a subset: scripts/bench.py
        if verify_checksums:   # what this backend reads; a backend that checks its own files (TensorRT) says so
            def before_load(variant: str, components=None) -> None:      # called from loading threads too
                verify(self.manifest, self.manifest.files_for_variant(variant, components or names))
            options["before_load"] = before_load
        self.backend = backends.create(backend, self.manifest, components=names, **options)
        if verify_checksums:   # a no-op for files hashed above (unchanged since): the guarantee, not the work
            own = self.backend.verifies_own_files
            verify(self.manifest, [] if own else self.manifest.files_for_variant(self.backend.graph_variant, names))
        self._lock = threading.Lock()
        self.load_seconds = time.perf_counter() - t0

    def _components(self) -> tuple[str, ...]:
        """What the backend loads: every component, less dit_uncond when not wanted, the DiTs as cache pieces."""
        if self.cache is not None and not isinstance(self.cache, CacheOptions):
            raise ValueError(f"cache={self.cache!r}; allowed: None (off) or a CacheOptions")
        if self.cache is not None and not self.manifest.has_cache_pieces:
            raise ValueError(f"cache: {self.manifest.root} has no first-block cache graphs (exported before "
                             "exporter 11): re-run `make export`")
        names = []
        for c in self.manifest.components:
            if c == "dit_uncond" and not self.load_uncond:
                continue
            names += [f"{c}.{p}" for p in self.cache.pieces()] if self.cache and c in DITS else [c]
        return tuple(names)

    # ------------------------------------------------------------------------------------- validation

    def resolve_sampling(self, preset: str | None = None, steps: int | None = None, mu: float | None = None,
                         std: float | None = None, guidance: float | Sequence[float] | None = None) -> Sampling:
        """A preset (default: the manifest's) with optional overrides (see request.resolve_sampling)."""
        return resolve_sampling(self.manifest.presets, self.manifest.default_preset, preset, steps, mu, std,
                                guidance)

    def prepare(self, prompts: str | Sequence[str], **kwargs) -> Request:
        """Check a request completely (request.prepare) without running anything."""
        return prepare(self.manifest, self.tokenizer, prompts, **kwargs)

    def _check_size(self, height: int, width: int) -> None:
        self.backend.check_size(height, width)

    # ------------------------------------------------------------------------------------- generation

    def generate(self, prompts: str | Sequence[str], *, width: int = 1024, height: int = 1024,
                 preset: str | None = None, steps: int | None = None, mu: float | None = None,
                 std: float | None = None, guidance: float | Sequence[float] | None = None,
                 seed: int | None = 0, noise: np.ndarray | None = None, batch_index: int = 0,
                 progress: Callable[[int, int], None] | None = None) -> GenerationResult:
        """Generate one image per prompt. Everything is validated before any graph runs.

        seed: 0…2^64−1, drawn with numpy's PCG64 (not PyTorch's generator: seeds are not portable across
        implementations); image i takes row batch_index + i of the seed's noise stream, so image i of a batch is
        reproduced alone with the same seed and batch_index=i. `noise` (B, image tokens, 128) float32 replaces
        the seed for cross-implementation reproduction."""
        t0 = time.perf_counter()
        request = self.prepare(prompts, width=width, height=height, preset=preset, steps=steps, mu=mu, std=std,
                               guidance=guidance, seed=seed, noise=noise, batch_index=batch_index)
        return self.run(request, progress, t0)

    def run(self, request: Request, progress: Callable[[int, int], None] | None = None,
            t0: float | None = None) -> GenerationResult:
        """Run a request checked by `prepare` (the backend's own size limits are checked here)."""
        t0 = time.perf_counter() if t0 is None else t0
        self._check_size(request.height, request.width)
        if not self.load_uncond:
            bad = next((i for i, g in enumerate(request.sampling.guidance) if needs_uncond(g)), None)
            if bad is not None:
                raise ValueError(f"guidance[{bad}]={request.sampling.guidance[bad]!r} needs the unconditional DiT, "
                                 "which this Pipeline did not load (load_uncond=False); allowed: guidance 1 on every step")
        ids = [list(t) for t in request.ids]
        timings = {"tokenize_s": time.perf_counter() - t0}
        with self._lock:
            latents, pixels, fbc = self._run(ids, request.height, request.width, request.sampling, request.z0,
                                                progress, timings)
        timings["total_s"] = time.perf_counter() - t0
        return GenerationResult([Image.fromarray(p) for p in pixels], latents, ids, request.sampling, request.seed,
                                timings, request.batch_index, [f.reused if f else [] for f in fbc],
                                [f.changes if f else {} for f in fbc])

    def _run(self, ids, height, width, sampling: Sampling, z0, progress, timings):
        """Prompts of equal length form one batch (the graphs have no padding mask); each batch runs the
        whole loop. Noise was drawn once for the full request, so batching never changes a sample's noise."""
        be = self.backend
        # cond and uncond are independent within a step: a backend that places them on two GPUs runs them
        # at the same time (CFG-parallel); others run them one after the other
        run_pair, apart = be.run_concurrently, be.parallel
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
        uncond = any(needs_uncond(st.guidance) for st in steps)
        uc = "dit_uncond.head" if self.cache else "dit_uncond"      # the device of the uncond graphs
        caches = []
        for n, rows in groups.items():
            B = len(rows)
            t = time.perf_counter()
            feats = be.run("text_encoder", {"input_ids": np.array([ids[r] for r in rows], np.int64)})["text_features"]
            timings["text_encoder_s"] += time.perf_counter() - t
            t = time.perf_counter()
            cos, sin = dit_rope_tables(n, gh, gw, self.manifest.inv_freq, self.manifest.mrope_section)
            cos_c, sin_c = (be.upload(np.ascontiguousarray(np.broadcast_to(a, (B, *a.shape)))) for a in (cos, sin))
            if uncond:
                cos_u, sin_u = (be.upload(np.ascontiguousarray(np.broadcast_to(a[n:], (B, *a[n:].shape))),
                                          component=uc) for a in (cos, sin))
            z = be.upload(z0[rows])
            fbc = FirstBlockCache(be, self.cache, run_pair) if self.cache else None
            for k, st in enumerate(steps):
                ts = time.perf_counter()
                tau = np.full((B,), st.tau, np.float32)
                tau_c = be.upload(tau)
                calls = [("dit_cond", {"latents": z, "tau": tau_c, "rope_cos": cos_c, "rope_sin": sin_c,
                                       "text_features": feats})]
                if needs_uncond(st.guidance):     # else g·v_c + 0·v_c: exactly v_c, as g·v_c + 0·v_u is
                    tau_u = be.upload(tau, component=uc) if apart else tau_c
                    calls.append(("dit_uncond", {"latents": z, "tau": tau_u, "rope_cos": cos_u, "rope_sin": sin_u}))
                if fbc:
                    v = fbc.velocities(k, calls)
                else:
                    v = [out["velocity"] for out in run_pair(calls)]
                v_c, v_u = v[0], v[-1]
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
            caches.append(fbc)
        return latents, pixels, caches
