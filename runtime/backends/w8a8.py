"""The W8A8 op library for the onnxruntime CUDA backend (`precision="w8a8"`, opt-in): where it is, how it is
registered, and how its failures are told apart, so the backend can fall back to the faithful graphs with a
warning (a missing library, a GPU it has no kernels for, no usable cuBLASLt)."""
from __future__ import annotations

import os
from pathlib import Path

PRECISIONS = ("faithful", "w8a8")
VARIANT = "cuda_w8a8"                       # the manifest's graphs for precision w8a8 (export/graphs/w8a8.py)
LIBRARY_ENV = "IDEOGRAM4_W8A8_LIBRARY"      # overrides the library's path
OPS = ("Fp8QuantizeRows", "Fp8RowScaledMatMul")


def library_path() -> Path:
    """$IDEOGRAM4_W8A8_LIBRARY, else build/kernels/libideogram4_w8a8.so of this checkout (`make w8a8-lib`)."""
    env = os.environ.get(LIBRARY_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "build" / "kernels" / "libideogram4_w8a8.so"


def register(session_options) -> str | None:
    """Register the library with onnxruntime session options; None on success, else the reason (one line)."""
    path = library_path()
    if not path.is_file():
        return f"the W8A8 op library {path} is missing (build it with `make w8a8-lib`, or set {LIBRARY_ENV})"
    try:
        session_options.register_custom_ops_library(str(path))
    except Exception as e:  # noqa: BLE001 -- onnxruntime raises its own error types for a library it cannot load
        return f"the W8A8 op library {path} does not load: {str(e).splitlines()[0]}"
    return None


def is_library_failure(message: str) -> bool:
    """Whether a session-creation error came from the library's ops (their kernels refuse this GPU)."""
    return any(op in message for op in OPS)
