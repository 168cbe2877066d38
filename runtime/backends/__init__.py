"""Execution backends behind one small protocol (see base.py); `create("auto")` picks the best that works here."""
from __future__ import annotations

from .base import Backend, BackendUnavailable

BACKENDS = ("onnxruntime-cuda", "onnxruntime-cpu", "tensorrt", "tensorrt-rtx")


def create(name: str, manifest, **options) -> Backend:
    """Instantiate a backend by name; "auto" tries the fastest first and says why each one was skipped."""
    if name == "auto":
        reasons = []
        for candidate in ("tensorrt", "onnxruntime-cuda", "onnxruntime-cpu"):
            try:
                return create(candidate, manifest, **options)
            except BackendUnavailable as e:
                reasons.append(f"{candidate}: {e}")
        raise BackendUnavailable("no backend works here:\n  " + "\n  ".join(reasons))
    if name in ("onnxruntime-cuda", "onnxruntime-cpu"):
        from .onnxruntime import OnnxRuntimeBackend
        return OnnxRuntimeBackend(manifest, device=name.split("-")[1], **options)
    if name in ("tensorrt", "tensorrt-rtx"):
        # "tensorrt": the engines of the manifest with the module that built them (tensorrt or tensorrt_rtx);
        # "tensorrt-rtx": only TensorRT-RTX engines. BackendUnavailable says why when they cannot run here.
        from .tensorrt import TensorRTBackend
        return TensorRTBackend(manifest, module=None if name == "tensorrt" else name, **options)
    raise ValueError(f"unknown backend {name!r}; allowed: auto, {', '.join(BACKENDS)}")
