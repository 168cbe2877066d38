"""The backend interface: load the manifest's graphs, move arrays to and from the device, run a graph.

Values returned by `run` stay on the backend's device (an opaque handle), so the sampler loop can feed one
graph's output to the next without a host round trip; `upload`/`download` cross the boundary explicitly.

What a backend supports is declared, not probed: its options are the typed keyword parameters of its
`__init__` (`Backend.options(name)` lists them for one backend name), and its capabilities are the class
attributes below, which an instance may refine once it knows where it runs (`parallel`, `precision`).
"""
from __future__ import annotations

import inspect
from typing import Any, ClassVar

import numpy as np


class BackendUnavailable(RuntimeError):
    """This backend cannot run here (library missing, no suitable device); the message says why."""


class Backend:
    """Base class of every backend. Subclasses set NAMES and implement upload, download and run."""

    NAMES: ClassVar[tuple[str, ...]] = ()           # the backend names (`--backend`) this class serves
    FIXED: ClassVar[tuple[str, ...]] = ()           # __init__ parameters `backends.create` sets itself
    NAME_ONLY: ClassVar[dict[str, tuple[str, ...]]] = {}    # option -> the names (of NAMES) that take it

    name: str            # e.g. "onnxruntime-cpu"
    graph_variant: str   # which manifest graph file it runs: "bf16", "cuda", "cpu", "cuda_dql", "cpu_dql",
                         # "cuda_fused", "cuda_fused_dql", "cuda_w8a8" or "cuda_fused_w8a8"
    precision: str = "faithful"      # what runs: "faithful", or "w8a8" where that was asked for and runs
    parallel: bool = False           # cond and uncond run on two devices: run_concurrently overlaps them
    verifies_own_files: bool = False     # checks its files' sha256 itself, on the bytes it loads
    takes_before_load: ClassVar[bool] = False    # calls before_load(graph_variant) before reading graph files

    @classmethod
    def options(cls, name: str) -> dict[str, inspect.Parameter]:
        """The options backend `name` takes: keyword parameters of __init__ with their types and defaults."""
        params = list(inspect.signature(cls.__init__).parameters.values())[2:]      # self, manifest
        return {p.name: p for p in params if p.name not in cls.FIXED and p.name != "before_load"
                and name in cls.NAME_ONLY.get(p.name, (name,))}

    def upload(self, array: np.ndarray, *, component: str | None = None) -> Any:    # to that graph's device
        raise NotImplementedError

    def download(self, value: Any) -> np.ndarray:
        raise NotImplementedError

    def run(self, component: str, inputs: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def run_concurrently(self, calls: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        """Independent graphs (a step's cond and uncond); one after the other unless a backend overlaps them."""
        return [self.run(c, i) for c, i in calls]

    def check_size(self, height: int, width: int) -> None:
        """Refuse an image size this backend's graphs cannot run (ValueError); the default takes any size."""
