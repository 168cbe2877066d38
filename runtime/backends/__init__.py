"""Execution backends behind one interface (base.py); `create("auto")` picks the best that works here.

Each backend declares the options it takes (base.Backend.options); `create` refuses an option the named backend
does not take before anything loads, and "auto" hands each candidate only its own options and says, in one
warning, which of the given ones the chosen backend ignored."""
from __future__ import annotations

import inspect
import warnings

from .base import Backend, BackendUnavailable

BACKENDS = ("onnxruntime-cuda", "onnxruntime-cpu", "tensorrt", "tensorrt-rtx")
AUTO = ("tensorrt", "onnxruntime-cuda", "onnxruntime-cpu")      # what "auto" tries, fastest first


class OptionsIgnored(RuntimeWarning):
    """`auto` chose a backend that does not take some of the options given; the message names them."""


def backend_class(name: str) -> type[Backend]:
    """The class serving backend `name` (imported on demand: neither module imports its library at import)."""
    if name in ("onnxruntime-cuda", "onnxruntime-cpu"):
        from .onnxruntime import OnnxRuntimeBackend
        return OnnxRuntimeBackend
    if name in ("tensorrt", "tensorrt-rtx"):
        from .tensorrt import TensorRTBackend
        return TensorRTBackend
    raise ValueError(f"unknown backend {name!r}; allowed: auto, {', '.join(BACKENDS)}")


def options(name: str) -> dict[str, inspect.Parameter]:
    """The options backend `name` takes ("auto": those any of its candidates takes)."""
    if name == "auto":
        return {k: v for c in AUTO for k, v in options(c).items()}
    return backend_class(name).options(name)


def taking(option: str) -> list[str]:
    """The backend names that take `option`, in BACKENDS order."""
    return [b for b in BACKENDS if option in options(b)]


def _matters(option: str, value) -> bool:
    """False when `value` is the default of every backend that takes `option` (leaving it out is the same)."""
    return any(p.default is inspect.Parameter.empty or p.default != value
               for b in taking(option) for k, p in options(b).items() if k == option)


def check_options(name: str, given: dict) -> None:
    """Refuse (ValueError, one line) an option no backend takes, or one backend `name` does not take."""
    for option, value in given.items():
        where = taking(option)
        if not where:
            raise ValueError(f"unknown backend option {option!r}; allowed: {', '.join(sorted(options('auto')))}")
        if name != "auto" and option not in options(name) and _matters(option, value):
            raise ValueError(f"{option}={value!r} needs backend {' or '.join(where)} (not {name})")


def create(name: str, manifest, before_load=None, **given) -> Backend:
    """Instantiate a backend by name; "auto" tries the fastest first and says why each one was skipped.
    before_load(graph_variant, components), if given, runs once the backend knows it can run here and which graph
    files it will read, before it reads any of those components' files (components None: all; the Pipeline checks
    their sha256 there; it may be called from several threads at once). TensorRT checks its engines' sha256
    on the bytes it deserializes and reads no graph files, so it does not call it."""
    if name == "auto":
        check_options(name, given)
        reasons = []
        for candidate in AUTO:
            taken = options(candidate)
            try:
                backend = create(candidate, manifest, before_load, **{k: v for k, v in given.items() if k in taken})
            except BackendUnavailable as e:
                reasons.append(f"{candidate}: {e}")
                continue
            ignored = [k for k, v in given.items() if k not in taken and _matters(k, v)]
            if ignored:
                warnings.warn(f"backend auto chose {backend.name}, which does not take {', '.join(ignored)}: "
                              "ignored", OptionsIgnored, stacklevel=2)
            return backend
        raise BackendUnavailable("no backend works here:\n  " + "\n  ".join(reasons))
    cls = backend_class(name)
    # a named backend gets every option its class takes (its own checks explain a misplaced one, e.g.
    # uncond_device_id on the CPU); one its class does not take at all is refused here
    taken = cls.options(name) | {k: v for c in cls.NAMES for k, v in cls.options(c).items()}
    check_options("auto", given)
    refused = [k for k, v in given.items() if k not in taken and _matters(k, v)]
    if refused:
        check_options(name, {refused[0]: given[refused[0]]})
    given = {k: v for k, v in given.items() if k in taken}        # defaults of options it does not take
    extra = {"before_load": before_load} if cls.takes_before_load else {}
    # "tensorrt": the engines of the manifest with the module that built them (tensorrt or tensorrt_rtx);
    # "tensorrt-rtx": only TensorRT-RTX engines. BackendUnavailable says why when they cannot run here.
    fixed = {"device": name.split("-")[1]} if "device" in cls.FIXED else \
        {"module": None if name == "tensorrt" else name}
    return cls(manifest, **fixed, **extra, **given)
