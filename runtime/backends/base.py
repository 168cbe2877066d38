"""The backend protocol: load the manifest's graphs, move arrays to and from the device, run a graph.

Values returned by `run` stay on the backend's device (an opaque handle), so the sampler loop can feed one
graph's output to the next without a host round trip; `upload`/`download` cross the boundary explicitly.
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class BackendUnavailable(RuntimeError):
    """This backend cannot run here (library missing, no suitable device); the message says why."""


class Backend(Protocol):
    name: str            # e.g. "onnxruntime-cpu"
    graph_variant: str   # which manifest graph file it runs: "bf16", "cuda", "cpu", "cuda_dql", "cpu_dql",
                         # "cuda_fused" or "cuda_fused_dql"

    def upload(self, array: np.ndarray, *, component: str | None = None) -> Any: ...   # to that graph's device

    def download(self, value: Any) -> np.ndarray: ...

    def run(self, component: str, inputs: dict[str, Any]) -> dict[str, Any]: ...
