"""Which TensorRT module builds, whether it is new enough, and the few places where tensorrt and tensorrt_rtx differ
(target compute capabilities exist only in RTX, the timing cache only matters in full TensorRT, where an engine may
run is decided differently)."""
from __future__ import annotations

import ctypes
import importlib
import re
from pathlib import Path
from typing import Callable

from ...runtime.backends.tensorrt.errors import cuda_error_hint
from .common import BUILDER_ORDER, BUILDERS, EngineBuildError, atomic_write

# Compute capabilities a TensorRT-RTX engine targets when none are given (TensorRT-RTX documentation, "CPU-only
# AOT and TensorRT-RTX engines": 8.0, 8.6, 8.9, 12.0 "and later"); the builder drops those an engine's data types
# cannot run on (FP8 needs 8.9+) and says so in its log.
RTX_DEFAULT_TARGETS = ("8.0", "8.6", "8.9", "12.0")
# Full TensorRT: the ONNX parser reads opset-23 `Attention` from 10.14 and `RMSNormalization` from 10.15
# (onnx-tensorrt changelog); every graph here has RMSNormalization, whatever --attention says.
MIN_TENSORRT = (10, 15)
INSTALL_HINT = ("install one: TensorRT-RTX (`pip install tensorrt-rtx==1.7.1.116`, or `pip install -e '.[trt-rtx]'`; "
                "builds on the CPU, engines run on RTX-class GPUs of compute capability 8.0/8.6/8.9/12.x — FP8 "
                "engines 8.9/12.x) or full TensorRT >= 10.15 (`pip install 'tensorrt>=10.15'`; needs an NVIDIA GPU "
                "to build, engines run on that GPU's architecture)")


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", str(version))[:4])


class Toolkit:
    """The TensorRT module in use and the few places where tensorrt and tensorrt_rtx differ."""

    def __init__(self, name: str, module):
        self.name = name                     # "tensorrt" | "tensorrt-rtx"
        self.module_name = BUILDERS[name]
        self.trt = module
        self.version = getattr(module, "__version__", "unknown")

    @property
    def rtx(self) -> bool:
        return self.name == "tensorrt-rtx"

    def record(self) -> dict:
        return {"name": self.name, "module": self.module_name, "version": self.version}

    def check_version(self) -> None:
        """Refuse a full TensorRT whose ONNX parser cannot read the graphs' operators, before anything is parsed."""
        have = version_tuple(self.version)
        if not self.rtx and have and have[:2] < MIN_TENSORRT:
            raise EngineBuildError(
                f"tensorrt {self.version} is too old: the graphs use ONNX opset-23 RMSNormalization (parsed from "
                f"TensorRT 10.15) and Attention (10.14); `--attention matmul` does not avoid RMSNormalization. Install "
                f"tensorrt>={'.'.join(map(str, MIN_TENSORRT))}, or build with TensorRT-RTX")

    def network_flags(self) -> int:
        """A strongly typed network (FP8 initializers stay FP8). TensorRT 11 networks are strongly typed by default
        and may not have the flag any more."""
        flag = getattr(self.trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        return 0 if flag is None else 1 << int(flag)

    # -- targets
    def compute_capability_enum(self, cc: str):
        members = {k: v for k, v in self.trt.ComputeCapability.__members__.items() if k.startswith("SM")}
        key = "SM" + cc.replace(".", "")
        if key not in members:
            allowed = ", ".join(f"{k[2:-1]}.{k[-1]}" for k in members)
            raise EngineBuildError(f"compute capability {cc!r} is not one TensorRT-RTX {self.version} can target "
                                   f"(allowed: {allowed})")
        return members[key]

    def set_targets(self, config, ccs: tuple[str, ...] | None) -> dict:
        """Configure target architectures; returns the request as recorded before the build."""
        if not self.rtx:
            if ccs:
                raise EngineBuildError("--compute-capabilities is a TensorRT-RTX option: full TensorRT builds for the "
                                       "GPU it runs on (build on the target GPU's architecture)")
            return {"requested": None}
        if ccs:
            config.num_compute_capabilities = len(ccs)
            for i, cc in enumerate(ccs):
                config.set_compute_capability(self.compute_capability_enum(cc), i)
        return {"requested": list(ccs) if ccs else None}

    def effective_targets(self, requested: dict, log) -> dict:
        if not self.rtx:
            gpus, _ = cuda_devices()
            cc = gpus[0]["cc"] if gpus else None
            return {"requested": None, "compute_capabilities": [cc] if cc else [], "forward_compatible": False,
                    "note": "full TensorRT: an engine runs on the architecture of the GPU that built it"
                            + ("" if cc else " (not determined: no CUDA driver visible to the build)")}
        base = requested["requested"] or list(RTX_DEFAULT_TARGETS)
        removed = log.removed_targets()
        eff = [cc for cc in base if cc not in removed]
        note = ("builder default targets (TensorRT-RTX documentation: 8.0, 8.6, 8.9, 12.0 and later)"
                if requested["requested"] is None else "requested targets")
        if removed:
            note += f"; the builder dropped {', '.join(removed)}: {log.removed_reason()}"
        return {"requested": requested["requested"], "compute_capabilities": eff,
                "forward_compatible": requested["requested"] is None, "note": note}

    # -- operators
    def check_operators(self, ops: dict[str, set[str]]) -> None:
        """The parser knows every operator each graph uses (`OnnxParser.supports_operator`; `ops`: component → op
        types), checked before anything is parsed, so an old builder is refused naming the operators and the versions
        that parse them instead of failing deep in a parse."""
        trt = self.trt
        logger = trt.Logger(trt.Logger.ERROR)
        builder = trt.Builder(logger)
        parser = trt.OnnxParser(builder.create_network(self.network_flags()), logger)
        if not hasattr(parser, "supports_operator"):
            return
        for component, op_types in ops.items():
            missing = sorted(op for op in op_types if not parser.supports_operator(op))
            if missing:
                raise EngineBuildError(
                    f"{component}: {self.name} {self.version}'s ONNX parser does not support {', '.join(missing)} "
                    "(opset 23; full TensorRT parses Attention from 10.14 and RMSNormalization from 10.15, "
                    "TensorRT-RTX 1.7.1 parses both): install a newer builder")

    # -- timing cache
    def attach_timing_cache(self, config, path: Path | None, say: Callable[[str], None]):
        """Attach a timing cache (full TensorRT). The default file is per TensorRT version and GPU; a file that is
        corrupt or from another GPU/version is replaced by a fresh cache, with a note. Returns the path to save to."""
        if self.rtx:
            if path is not None:
                say("note: --timing-cache ignored: TensorRT-RTX's timing cache does not affect its engines and forces "
                    "a GPU query during the CPU-only build (TensorRT-RTX documentation, 'Timing Cache Migration'); "
                    "its runtime cache (JIT kernels) is used by the runtime backend instead")
            return None
        path = path or default_timing_cache(self.version)
        blob = path.read_bytes() if path.is_file() else b""
        try:
            cache = config.create_timing_cache(blob)
        except Exception:  # noqa: BLE001 -- a corrupt file: start over
            cache = None
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            if blob:
                say(f"note: timing cache {path} is unreadable or from another GPU / TensorRT version: building with a "
                    "fresh one (it replaces the file)")
            cache = config.create_timing_cache(b"")
            if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
                say("note: TensorRT refused an empty timing cache: building without one")
                return None
        return path

    def save_timing_cache(self, config, path: Path | None, say: Callable[[str], None]) -> None:
        if path is None:
            return
        cache = config.get_timing_cache()
        if cache is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, memoryview(cache.serialize()))
        except OSError as e:                # only costs tuning time next build
            say(f"note: timing cache not saved to {path}: {e}")


def default_timing_cache(version: str) -> Path:
    """~/.cache/ideogram4-engine/tensorrt-<version>-<GPU>-sm<cc>.timing-cache: tactic timings are per GPU model."""
    gpus, _ = cuda_devices()
    gpu = f"{re.sub(r'[^A-Za-z0-9]+', '-', gpus[0]['name']).strip('-')}-sm{gpus[0]['cc'].replace('.', '')}" \
        if gpus else "unknown-gpu"
    return Path.home() / ".cache" / "ideogram4-engine" / f"tensorrt-{version}-{gpu}.timing-cache"


def cuda_devices() -> tuple[list[dict], str]:
    """The visible CUDA GPUs ({cc, name}) through the driver library (ctypes: no torch, no cuda-bindings needed on
    the build side), and why there are none."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        return [], f"no CUDA driver here (libcuda.so.1: {e})"
    if (rc := lib.cuInit(0)) != 0:
        return [], f"cuInit failed (CUresult {rc}{cuda_error_hint(rc)})"
    n = ctypes.c_int(0)
    if (rc := lib.cuDeviceGetCount(ctypes.byref(n))) != 0 or n.value == 0:
        return [], f"no CUDA GPU visible (CUresult {rc}, {n.value} devices)"
    out = []
    for i in range(n.value):
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        lib.cuDeviceGetAttribute(ctypes.byref(major), 75, i)      # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
        lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, i)      # ..._MINOR
        name = ctypes.create_string_buffer(256)
        lib.cuDeviceGetName(name, 256, i)
        out.append({"cc": f"{major.value}.{minor.value}", "name": name.value.decode(errors="replace") or "GPU"})
    return out, ""


def load_toolkit(choice: str | None = None) -> Toolkit:
    """The builder module: `choice` ('tensorrt' or 'tensorrt-rtx') or the first of them that imports."""
    if choice is not None and choice not in BUILDERS:
        raise EngineBuildError(f"unknown builder {choice!r}; allowed: {', '.join(BUILDERS)}")
    reasons = []
    for name in (choice,) if choice else BUILDER_ORDER:
        try:
            module = importlib.import_module(BUILDERS[name])
            if not hasattr(module, "Builder"):
                raise ImportError(f"{BUILDERS[name]} has no Builder (a placeholder package?)")
            return Toolkit(name, module)
        except Exception as e:  # noqa: BLE001 -- ImportError, or a stub package that raises on import
            reasons.append(f"{BUILDERS[name]}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    what = f"the {choice} builder is not installed" if choice else "no TensorRT builder is installed"
    raise EngineBuildError(f"{what} ({'; '.join(reasons)}); {INSTALL_HINT}")
