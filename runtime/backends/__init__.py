"""Execution backends behind one small protocol (see base.py); `create("auto")` picks the best that works here."""
from __future__ import annotations

from .base import Backend, BackendUnavailable

BACKENDS = ("onnxruntime-cuda", "onnxruntime-cpu", "tensorrt", "tensorrt-rtx")


def create(name: str, manifest, before_load=None, **options) -> Backend:
    """Instantiate a backend by name; "auto" tries the fastest first and says why each one was skipped.
    before_load(graph_variant, components), if given, runs once the backend knows it can run here and which graph
    files it will read, before it reads any of those components' files (components None: all; the Pipeline checks
    their sha256 there; it may be called from several threads at once). TensorRT checks its engines' sha256
    on the bytes it deserializes and reads no graph files, so it does not call it."""
    if name == "auto":
        reasons = []
        for candidate in ("tensorrt", "onnxruntime-cuda", "onnxruntime-cpu"):
            try:
                return create(candidate, manifest, before_load, **options)
            except BackendUnavailable as e:
                reasons.append(f"{candidate}: {e}")
        raise BackendUnavailable("no backend works here:\n  " + "\n  ".join(reasons))
    if name in ("onnxruntime-cuda", "onnxruntime-cpu"):
        from .onnxruntime import OnnxRuntimeBackend
        return OnnxRuntimeBackend(manifest, device=name.split("-")[1], before_load=before_load, **options)
    if name in ("tensorrt", "tensorrt-rtx"):
        # "tensorrt": the engines of the manifest with the module that built them (tensorrt or tensorrt_rtx);
        # "tensorrt-rtx": only TensorRT-RTX engines. BackendUnavailable says why when they cannot run here.
        from .tensorrt import TensorRTBackend
        return TensorRTBackend(manifest, module=None if name == "tensorrt" else name, **options)
    raise ValueError(f"unknown backend {name!r}; allowed: auto, {', '.join(BACKENDS)}")
