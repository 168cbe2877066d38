"""Prometheus metrics of the ingress (every request passes through it): GET /metrics.

Per-stage times come back from the replica with each result; GPU memory is sampled on the replica. Ray
Serve's own metrics (ray_serve_*) are exported separately by Ray's metrics agent on every node.
"""
from __future__ import annotations

import collections
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401 -- re-exported for the app

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
STAGES = ("queue", "tokenize", "text_encoder", "denoise", "step", "vae", "encode", "total")
ERROR_KINDS = ("invalid", "queue_full", "deadline", "cancelled", "replica_crashed", "draining", "internal")
RATE_WINDOW_S = 60.0
disable_created_metrics()          # no *_created series: scrapers do not need them


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("ideogram4_requests", "Requests by protocol and outcome (ok or an error kind)",
                                ["protocol", "outcome"], registry=r)
        self.errors = Counter("ideogram4_errors", "Failed requests by kind", ["kind"], registry=r)
        self.admitted = Counter("ideogram4_admitted", "Requests that passed every check and were queued",
                                registry=r)
        self.queued = Gauge("ideogram4_queue_depth", "Requests accepted and waiting for a replica", registry=r)
        self.running = Gauge("ideogram4_running", "Requests running on a replica", registry=r)
        self.stage = Histogram("ideogram4_stage_seconds", "Time per stage: queue (arrival to start), the "
                               "Pipeline's tokenize / text_encoder / denoise / vae, each denoising step, "
                               "image encoding, total (arrival to answer)", ["stage"], buckets=BUCKETS,
                               registry=r)
        self.images = Counter("ideogram4_images", "Images returned", registry=r)
        self.images_rate = Gauge("ideogram4_images_per_second", f"Images returned per second over the last "
                                 f"{RATE_WINDOW_S:g} s", registry=r)
        self.gpu_memory = Gauge("ideogram4_gpu_memory_bytes", "Used memory of each replica's GPUs (nvidia-smi)",
                                ["replica", "gpu"], registry=r)
        self.ready = Gauge("ideogram4_ready", "1 when at least one replica is loaded and warmed", registry=r)
        for kind in ERROR_KINDS:
            self.errors.labels(kind)
        for stage in STAGES:
            self.stage.labels(stage)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    def error(self, protocol: str, kind: str) -> None:
        self.errors.labels(kind).inc()
        self.requests.labels(protocol, kind).inc()

    def result(self, protocol: str, result: dict, queue_s: float, total_s: float) -> None:
        self.requests.labels(protocol, "ok").inc()
        t = result["timings"]
        self.stage.labels("queue").observe(queue_s)
        for name in ("tokenize", "text_encoder", "denoise", "vae", "encode"):
            self.stage.labels(name).observe(t[f"{name}_s"])
        for s in result["step_s"]:
            self.stage.labels("step").observe(s)
        self.stage.labels("total").observe(total_s)
        n = len(result["images"])
        self.images.inc(n)
        now = time.monotonic()
        self._recent.append((now, n))
        for gpu, used in result.get("gpu_memory", {}).items():
            self.gpu_memory.labels(result["replica"], gpu).set(used)

    def render(self) -> bytes:
        now = time.monotonic()
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()
        self.images_rate.set(sum(n for _, n in self._recent) / RATE_WINDOW_S)
        return generate_latest(self.registry)
