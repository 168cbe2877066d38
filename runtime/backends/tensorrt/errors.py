"""Why engines cannot run here, and what to do about it: the error types and the advice for each cause (driver,
runtime, memory, architecture, version). Only a wrong engine file or version is told to rebuild."""
from __future__ import annotations

from ...manifest import ManifestError
from ..base import BackendUnavailable


class EngineMismatch(BackendUnavailable):
    """The engines cannot run here as built: another TensorRT version or module, another GPU architecture, too
    little GPU memory. The message says which and what to do."""


class DriverError(BackendUnavailable):
    """The NVIDIA driver or CUDA runtime here cannot run the installed TensorRT / cuda-bindings (not the engines'
    fault: rebuilding does not help)."""


class EngineChecksumError(ManifestError):
    """An engine file's sha256 differs from the manifest's."""


# cudaError_t (runtime) and CUresult (driver) use the same numbers for these.
CUDA_ERROR_ADVICE = {
    35: "the NVIDIA driver is older than the CUDA runtime in use: update the driver (the CUDA 13 wheels need an R580 "
        "or newer driver), or install the CUDA 12 builds of TensorRT and cuda-bindings 12.x",
    100: "no CUDA GPU is visible: check CUDA_VISIBLE_DEVICES and `nvidia-smi`",
    101: "the device ordinal does not exist: check CUDA_VISIBLE_DEVICES",
    803: "the NVIDIA kernel module and the user-space driver library are different versions: reboot, or reinstall "
         "the driver",
    804: "the CUDA forward-compatibility package in use does not support this GPU: remove it from LD_LIBRARY_PATH, or "
         "update the driver",
    2: "out of GPU memory",
}


def cuda_error_hint(code: int) -> str:
    """'; <advice>' for a CUDA error number with a known cause, else ''."""
    advice = CUDA_ERROR_ADVICE.get(int(code))
    return f"; {advice}" if advice else ""


def cuda_version(v: int) -> str:
    """12080 → '12.8' (the encoding of cudaDriverGetVersion / cudaRuntimeGetVersion)."""
    return f"{v // 1000}.{v % 1000 // 10}"


# TensorRT-RTX `get_engine_validity` diagnostics → (what it means, what to do).
VALIDITY_ADVICE = {
    "VERSION_MISMATCH": "built by another TensorRT-RTX version: rebuild with `make engines` (or install the version "
                        "the manifest records)",
    "MALFORMED_ENGINE": "the file is damaged: rebuild with `make engines`",
    "UNSUPPORTED_CC": "this GPU's compute capability is not one the engine runs on (FP8 engines need 8.9 or later; "
                      "TensorRT-RTX refuses data-center Hopper/Blackwell): use the onnxruntime-cuda backend, or full "
                      "TensorRT engines built on this GPU",
    "OLD_CUDA_DRIVER": "the NVIDIA driver is too old for this TensorRT-RTX: update the driver",
    "OLD_CUDA_RUNTIME": "the CUDA runtime TensorRT-RTX loads is too old: install the tensorrt-rtx build for your CUDA "
                        "version / update cuda-bindings",
    "INSUFFICIENT_GPU_MEMORY": "not enough free GPU memory: free the GPU, or use memory_mode='on_demand' or weight "
                               "streaming (docs/engines.md, 'Memory on consumer cards')",
    "CUDA_ERROR": "a CUDA error occurred while checking the engine: see the TensorRT log; check the driver with "
                  "`nvidia-smi`",
}


def validity_advice(reasons: list[str]) -> str:
    return "; ".join(f"{r}: {VALIDITY_ADVICE.get(r, 'see the TensorRT log')}" for r in reasons) or \
        "no diagnostic given: see the TensorRT log"


# Substrings of TensorRT's own error messages when deserialization fails → what to do. First match wins.
_LOG_CAUSES = (
    (("out of memory", "outofmemory", "cudaerrormemoryallocation", "insufficient memory"),
     "not enough GPU memory: free the GPU, or use memory_mode='on_demand' or weight streaming"),
    (("driver version", "insufficient driver", "cuda driver"), "update the NVIDIA driver"),
    (("compute capability", "incompatible device", "not supported on this gpu", "sm version"),
     "the engine was built for another GPU architecture: rebuild on this GPU (`make engines BUILDER=tensorrt`) or use "
     "onnxruntime-cuda"),
    (("version tag", "serialization", "magic", "plan file", "version mismatch", "deserialize"),
     "the engine file is from another TensorRT version or damaged: rebuild with `make engines`"),
)


def log_advice(messages: list[str]) -> str:
    """What TensorRT's logged errors suggest doing (a deserialization that returned None says no more than that)."""
    text = " ".join(messages).lower()
    for keys, advice in _LOG_CAUSES:
        if any(k in text for k in keys):
            return advice
    return "see the TensorRT error above"
