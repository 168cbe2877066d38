"""TensorRT backend: runs the engines that `make engines` recorded in the manifest's `engines` section, with full
TensorRT (`tensorrt`) or TensorRT for RTX (`tensorrt_rtx`) — one code path, the module that built the engines.

No torch: device memory, copies, the CUDA stream and CUDA graphs go through cuda-bindings (`cuda.bindings.runtime`).
Before anything is loaded onto the GPU the backend checks, and refuses with a message that says what to do:
  * the manifest has engines for the components (else: run `make engines`),
  * the installed TensorRT module and version are the ones that built them (engines are not portable across
    versions, and TensorRT-RTX engines do not load in full TensorRT or vice versa),
  * the driver can run the installed CUDA runtime (else: update the driver — `DriverError`, not "rebuild"),
  * a CUDA GPU is present and its compute capability is one the engines target (FP8 engines: 8.9 or later, no
    rebuild helps below; TensorRT-RTX: the capabilities recorded at build time, plus the runtime's own header check
    `get_engine_validity`, whose diagnostics are told apart; full TensorRT: the architecture that built them),
  * enough GPU memory is free for the engines and their activations in the chosen `memory_mode`,
  * each engine file's sha256 matches the manifest (checked on the bytes that are deserialized).
`BackendUnavailable` (so `auto` falls back) for all but the last; a checksum mismatch is a `ManifestError`: a corrupt
engines folder is an error to fix, not a reason to silently run something slower.

Modules: checks (manifest facts and refusals), profiles (profile and size selection), cuda (cuda-bindings calls,
streams, device arrays), memory (loading modes and their memory), errors (causes and advice), backend (the backend).

Where this has run: nowhere yet. Full TensorRT is not installable on this project's machines and TensorRT-RTX
refuses their Hopper GPUs (compute capability 9.0); the CPU tests cover everything up to the GPU (manifest
reading, profile selection, refusals) and the execution order of `run` against a recording TensorRT/CUDA double.
"""
from .backend import RTX_CACHE_DIR, TensorRTBackend
from .checks import (MODULES, check_architecture, check_builder, engine_entries, engines_section, has_fp8, parse_cc,
                     verify_engine)
from .cuda import Cuda, CudaError, DeviceArray, Stream, _Cuda
from .errors import DriverError, EngineChecksumError, EngineMismatch
from .memory import MEMORY_MARGIN, MEMORY_MODES, check_memory, memory_estimate, memory_report
from .profiles import check_engine_size, describe_profile, image_dims, select_profile, size_fits

__all__ = ["RTX_CACHE_DIR", "TensorRTBackend", "MODULES", "check_architecture", "check_builder", "engine_entries",
           "engines_section", "has_fp8", "parse_cc", "verify_engine", "Cuda", "CudaError", "DeviceArray", "Stream",
           "_Cuda", "DriverError", "EngineChecksumError", "EngineMismatch", "MEMORY_MARGIN", "MEMORY_MODES",
           "check_memory", "memory_estimate", "memory_report", "check_engine_size", "describe_profile", "image_dims",
           "select_profile", "size_fits"]
