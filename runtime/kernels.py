"""The fused-kernel library for onnxruntime's CUDA provider (kernels/, built by `make kernels`): where it is and
whether it can run on the GPUs at hand, checked before onnxruntime is asked to load it. ctypes and the CUDA
driver only (no torch, no CUDA runtime): a missing or wrong-architecture library must cost one clear warning,
not a failed session."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

LIBRARY_NAME = "libideogram4_kernels.so"
LIBRARY_ENV = "IDEOGRAM4_KERNELS_LIBRARY"     # path of the library (default: the checkout's build/kernels/)
SWITCH_ENV = "IDEOGRAM4_FUSED_KERNELS"        # "0": stock CUDA graphs (the backend option fused_kernels=False)
_CU_ATTR_CC = (75, 76)                        # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR


class KernelsUnavailable(RuntimeError):
    """The library cannot serve these GPUs; the message names the file and the compute capability."""


def default_library() -> Path:
    env = os.environ.get(LIBRARY_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[1] / "build" / "kernels" / LIBRARY_NAME


def switched_off() -> bool:
    return os.environ.get(SWITCH_ENV, "").strip().lower() in ("0", "false", "off", "no")


def compute_capability(device_id: int) -> tuple[int, int] | None:
    """(major, minor) of CUDA device `device_id` from the driver, None when there is no driver or device."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    if cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(dev), device_id):
        return None
    if cuda.cuDeviceGetAttribute(ctypes.byref(major), _CU_ATTR_CC[0], dev) or \
            cuda.cuDeviceGetAttribute(ctypes.byref(minor), _CU_ATTR_CC[1], dev):
        return None
    return major.value, minor.value


def library_arches(path: Path) -> list[tuple[int, int]]:
    """The compute capabilities the library has machine code for (e.g. [(8, 9), (9, 0), (10, 0), (12, 0)])."""
    lib = ctypes.CDLL(str(path))
    fn = lib.ideogram4_kernels_arches
    fn.restype = ctypes.c_char_p
    out = []
    for a in fn().decode().split(","):
        if a.strip().isdigit():
            out.append((int(a) // 10, int(a) % 10))
    return out


def runs_on(arches: list[tuple[int, int]], cc: tuple[int, int]) -> bool:
    """Machine code for sm_XY runs on compute capability X.Z with Z >= Y (same major)."""
    return any(major == cc[0] and minor <= cc[1] for major, minor in arches)


def _cc(cc: tuple[int, int] | None) -> str:
    return "unknown (no CUDA driver answered)" if cc is None else f"{cc[0]}.{cc[1]}"


def check(path: Path | str | None, device_ids) -> Path:
    """`path` (default: default_library()) if the library loads and has machine code for every GPU in
    `device_ids`; KernelsUnavailable naming the file and the GPU's compute capability otherwise."""
    path = Path(path) if path else default_library()
    ids = sorted(set(device_ids))
    ccs = {d: compute_capability(d) for d in ids}
    first = ", ".join(f"GPU {d}: compute capability {_cc(c)}" for d, c in ccs.items())
    if not path.is_file():
        raise KernelsUnavailable(f"fused-kernel library {path} not found (build it with `make kernels`, or set "
                                 f"{LIBRARY_ENV}; {first})")
    try:
        arches = library_arches(path)
    except (OSError, AttributeError) as e:
        raise KernelsUnavailable(f"fused-kernel library {path} cannot be loaded ({str(e).splitlines()[0]}; "
                                 f"{first})") from None
    for d, cc in ccs.items():
        if cc is None or not runs_on(arches, cc):
            built = ",".join(f"{a}{b}" for a, b in arches) or "none"
            raise KernelsUnavailable(f"fused-kernel library {path} has machine code for sm {built}, but GPU {d} is "
                                     f"compute capability {_cc(cc)} (rebuild with ARCHES=\"{cc[0]}{cc[1]}\" make "
                                     "kernels)" if cc else
                                     f"fused-kernel library {path}: GPU {d} compute capability {_cc(cc)}")
    return path
