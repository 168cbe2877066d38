"""The replica: one Pipeline (one GPU, or a GPU pair for CFG-parallel), loaded and warmed before it takes work.

Ray Serve gives each replica one request at a time (max_ongoing_requests=1: one Pipeline runs one request at
a time) and queues the rest at the caller. A request runs in a worker thread so that the replica's event loop
stays free for Ray's health checks and for cancellation: the Pipeline's `progress` callback, called after
every denoising step, raises when the client went away or the deadline passed, so a run stops between steps.
"""
from __future__ import annotations

import asyncio
import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

from PIL import Image, PngImagePlugin

from ..runtime.cache import cache_label
from ..runtime.pipeline import Pipeline
from .request import MODEL_ID, OUTPUT_FORMATS, Request

WARMUP_PROMPT = "warm-up"
WARMUP_GUIDANCE = 4.0
GPU_SAMPLE_S = 5.0


class Cancelled(Exception):
    """The client went away; the run stopped between two steps."""


class DeadlineExceeded(Exception):
    """The request's deadline passed while it was queued or running."""


def encode_image(image: Image.Image, fmt: str, meta: dict[str, str]) -> bytes:
    """PNG (with the same text metadata as `ideogram4 generate`), JPEG or WebP bytes."""
    buf = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        for k, v in meta.items():
            info.add_text(k, v)
        image.save(buf, format="PNG", pnginfo=info, compress_level=1)   # speed over size; see docs/serving.md
    elif fmt == "jpeg":
        image.save(buf, format="JPEG", quality=95)
    else:
        image.save(buf, format="WEBP", quality=95)
    return buf.getvalue()


class GpuMemory:
    """Used memory of this replica's GPUs (nvidia-smi, sampled in the background; empty without a GPU)."""

    def __init__(self):
        self.used: dict[str, int] = {}
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        self._ids = [d for d in visible.split(",") if d.strip()]
        if shutil.which("nvidia-smi") and self._ids:
            threading.Thread(target=self._loop, daemon=True, name="gpu-memory").start()

    def _loop(self) -> None:
        while True:
            try:
                out = subprocess.run(["nvidia-smi", "-i", ",".join(self._ids), "--query-gpu=index,memory.used",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                     timeout=10).stdout
                self.used = {i.strip(): int(m) << 20 for i, m in (line.split(",") for line in out.splitlines())}
            except (OSError, ValueError, subprocess.SubprocessError):
                self.used = {}
            time.sleep(GPU_SAMPLE_S)


class Worker:
    """Ray Serve deployment class (decorated in app.py). Constructed = loaded and warmed: Ray routes nothing
    to a replica before its constructor returns, which is what /readyz reports."""

    def __init__(self, engines: str, backend: str = "auto", options: dict | None = None,
                 warmup: tuple[int, int] = (1024, 1024)):
        t0 = time.perf_counter()
        self.pipe = Pipeline(engines, backend=backend, **(options or {}))
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self.synthetic = bool(self.pipe.manifest.synthetic)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="generate")
        # guidance != 1: a guidance-1 step skips dit_uncond, which would then pay its first run in a request
        self.pipe.generate(WARMUP_PROMPT, width=warmup[0], height=warmup[1], steps=1, guidance=WARMUP_GUIDANCE, seed=0)
        self.gpu = GpuMemory()
        self.ready_s = time.perf_counter() - t0
        print(f"ideogram4 replica {self.replica}: loaded in {self.pipe.load_seconds:.2f} s, warmed up in "
              f"{self.ready_s - self.pipe.load_seconds:.2f} s ({self.pipe.backend.name})", file=sys.stderr, flush=True)

    def info(self) -> dict:
        return {"replica": self.replica, "backend": self.pipe.backend.name, "load_s": self.pipe.load_seconds,
                "ready_s": self.ready_s, "synthetic": self.synthetic}

    def _run(self, req: Request, on_step) -> dict:
        r = self.pipe.generate([req.prompt] * req.n, progress=on_step, **req.generate_kwargs())
        t = time.perf_counter()
        s = r.sampling
        meta = {"prompt": req.prompt, "seed": str(req.seed), "preset": s.preset or "custom", "steps": str(s.steps),
                "mu": str(s.mu), "std": str(s.std), "guidance": ",".join(map(str, s.guidance)),
                "size": f"{req.width}x{req.height}", "backend": self.pipe.backend.name,
                "model": MODEL_ID + (" SYNTHETIC weights" if self.synthetic else ""),
                "first_block_cache": cache_label(self.pipe.cache), "seed_generator": "numpy PCG64 standard_normal"}
        images = [encode_image(img, req.output_format, meta) for img in r.images]
        timings = {k: v for k, v in r.timings.items() if k != "step_s"}
        timings["encode_s"] = time.perf_counter() - t
        return {"type": "result", "images": images, "mime_type": OUTPUT_FORMATS[req.output_format],
                "seed": req.seed, "preset": s.preset or "", "steps": s.steps, "guidance": list(s.guidance),
                "width": req.width, "height": req.height, "synthetic": self.synthetic, "timings": timings,
                "step_s": list(r.timings["step_s"]),
                "replica": self.replica, "gpu_memory": dict(self.gpu.used)}

    async def generate(self, req: Request, deadline: float, progress: bool = False) -> AsyncIterator[dict]:
        """Events: {"type": "started"}, then {"type": "progress", step, total} after each step (when `progress`),
        then one {"type": "result", ...}. `deadline` is wall-clock (time.time()). Raises Cancelled,
        DeadlineExceeded, or what Pipeline.generate raised."""
        if time.time() > deadline:
            raise DeadlineExceeded(f"the deadline ({req.timeout_s:g} s) passed while the request was queued")
        yield {"type": "started", "replica": self.replica}
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        put = lambda item: loop.call_soon_threadsafe(events.put_nowait, item)  # noqa: E731

        def on_step(done: int, total: int) -> None:      # in the worker thread, between two steps
            if stop.is_set():
                raise Cancelled(f"cancelled after step {done} of {total}: the client went away")
            if time.time() > deadline:
                raise DeadlineExceeded(f"the deadline ({req.timeout_s:g} s) passed after step {done} of {total}")
            if progress:
                put({"type": "progress", "step": done, "total": total})

        def work() -> None:
            try:
                put(self._run(req, on_step))
            except BaseException as e:                    # noqa: BLE001 -- handed to the event loop
                put(e)

        running = loop.run_in_executor(self._executor, work)
        try:
            while True:
                item = await events.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item["type"] == "result":
                    return
        except (asyncio.CancelledError, GeneratorExit):
            stop.set()                     # the run stops after its current step; the replica is free after it
            while not running.done():
                try:
                    await asyncio.shield(running)
                except asyncio.CancelledError:
                    pass
            raise
