"""The TensorRT backend object: load the engines (all at once, or a stage at a time), bind shapes and buffers, run,
and (full TensorRT) capture and replay CUDA graphs.

Execution order per engine context, following TensorRT's guidance for CUDA graphs: after the optimization profile
or an input shape changes, one plain `execute_async_v3` runs first (it flushes the deferred work a shape or profile
change enqueues, which must not end up inside a graph); only the next call with the same shapes is captured, and
the graph is replayed while the shapes stay. A capture that fails is abandoned for that shape (plain execution
from then on, a warning once); it never fails the call. Every TensorRT call that reports success is checked."""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..base import Backend, BackendUnavailable
from .checks import (MODULES, check_architecture, check_builder, engine_entries, engines_section, has_fp8,
                     verify_engine)
from .cuda import Cuda, DeviceArray
from .errors import DriverError, EngineChecksumError, EngineMismatch, log_advice, validity_advice
from .memory import check_memory, load_groups, streaming_shares
from .profiles import check_engine_size, select_profile

RTX_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ideogram4-engine" / "rtx-runtime-cache"
_DRIVER_REASONS = ("OLD_CUDA_DRIVER", "OLD_CUDA_RUNTIME")


def _logger(trt):
    """An ILogger that prints warnings and errors like TensorRT's default logger and keeps the last errors, so a
    failed call can say what TensorRT reported."""
    class Log(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if int(severity) <= int(trt.ILogger.ERROR):
                self.errors = [*self.errors[-19:], str(msg)]
            if int(severity) <= int(trt.ILogger.WARNING):
                print(f"[TensorRT] {msg}", file=sys.stderr)
    return Log()


@dataclass
class _Engine:
    name: str
    engine: Any
    context: Any
    inputs: list[str]
    outputs: list[str]
    dtypes: dict[str, np.dtype]
    profiles: list[dict]
    runtime_config: Any = None
    runtime_cache: Any = None
    cache_path: Path | None = None
    bound: tuple | None = None          # (profile, shapes) the context is set to; None: unknown
    flushed: bool = False               # a plain execute ran since the last profile/shape change
    graph: dict | None = None           # captured CUDA graph for `bound` (full TensorRT, cuda_graphs=True)
    uncapturable: dict = field(default_factory=dict)     # key -> why capture failed


class TensorRTBackend(Backend):
    NAMES = ("tensorrt", "tensorrt-rtx")
    FIXED = ("module",)
    graph_variant = "bf16"
    verifies_own_files = True      # engines are checked against the manifest's sha256 when loaded

    def __init__(self, manifest, module: str | None = None, device_id: int = 0,
                 components: tuple[str, ...] | None = None, cuda_graphs: bool = False, runtime_cache: str | Path | bool | None = None,
                 verify_engines: bool = True, memory_mode: str = "resident",
                 weight_streaming_budget: int | str | None = None):
        """module: None (the one that built the engines), "tensorrt" or "tensorrt-rtx" (refuse other engines).
        runtime_cache (TensorRT-RTX): file for JIT-compiled kernels; None = ~/.cache/ideogram4-engine/…, False = off.
        memory_mode: "resident" | "release_text_encoder" | "on_demand" (memory.py). weight_streaming_budget: bytes of
        streamable weights kept on the GPU in total, or "auto" (TensorRT's choice); engines built with
        `--weight-streaming`."""
        self.manifest = manifest
        self.engines: dict[str, _Engine] = {}
        self.stream = None
        section = engines_section(manifest)
        built = section["builder"]["name"]
        if module is not None and module not in MODULES:
            raise ValueError(f"unknown TensorRT module {module!r}; allowed: {', '.join(MODULES)}")
        if module is not None and module != built:
            raise BackendUnavailable(f"the engines in {getattr(manifest, 'root', '')} were built by {built}, not "
                                     f"{module}: use --backend {built} or rebuild with `make engines BUILDER={module}`")
        self.name = built
        self.rtx = MODULES[built] == "tensorrt_rtx"
        self.entries = engine_entries(manifest, components)
        self.groups = load_groups(memory_mode, self.entries)       # refuses an unknown mode
        self.memory_mode = memory_mode
        self.budget = self._check_budget(weight_streaming_budget)
        try:
            trt = importlib.import_module(MODULES[built])
            if not hasattr(trt, "Runtime"):
                raise ImportError(f"{MODULES[built]} has no Runtime (a placeholder package?)")
        except Exception as e:  # noqa: BLE001 -- ImportError, or a stub that raises on import
            raise BackendUnavailable(f"{MODULES[built]} is not installed ({str(e).splitlines()[0] if str(e) else e!r}); "
                                     f"the engines were built by {built} {section['builder']['version']}") from None
        self.trt = trt
        version = getattr(trt, "__version__", "unknown")
        for c, e in self.entries.items():
            check_builder(e, c, MODULES[built], version)
        self.cuda = Cuda()
        cc, gpu = self.cuda.device(device_id)
        self.gpu, self.compute_capability = gpu, cc
        for c, e in self.entries.items():
            check_architecture(e, c, cc, gpu, fp8=has_fp8(manifest, c, e))
        free, total = self.cuda.mem_info()
        check_memory(self.entries, free, total, gpu, memory_mode, 0 if self.budget == "auto" else self.budget)

        self.stream = self.cuda.stream()
        self.cuda_graphs = cuda_graphs
        self.manual_graphs = cuda_graphs and not self.rtx        # TensorRT-RTX captures by itself
        self.verify, self.runtime_cache = verify_engines, runtime_cache
        self.logger = _logger(trt)
        self.runtime = trt.Runtime(self.logger)
        self.root = Path(getattr(manifest, "root", "."))
        if memory_mode == "resident":
            try:
                self._swap_to(self.groups[0])
            except BaseException:
                self.close()
                raise

    def _check_budget(self, budget):
        if budget is None:
            return None
        if budget != "auto" and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 0):
            raise ValueError(f"weight_streaming_budget {budget!r} must be a number of bytes >= 0 or 'auto'")
        if not any(e.get("weight_streaming") for e in self.entries.values()):
            raise ValueError("weight_streaming_budget needs engines built for weight streaming: "
                             "`make engines ENGINE_FLAGS=--weight-streaming`")
        return budget

    # -------------------------------------------------------------------------------------- loading
    def _swap_to(self, group: tuple[str, ...]) -> None:
        """Make `group` the loaded engines: release the others first (their memory is what the group needs)."""
        if self.stream is not None:
            self.cuda.sync(self.stream)
        for c in [c for c in self.engines if c not in group]:
            self._release(self.engines.pop(c))
        shares = streaming_shares(self.entries, None if self.budget == "auto" else self.budget)
        for c in group:
            if c not in self.engines:
                self.engines[c] = self._load(c, self.entries[c], self.root / self.entries[c]["file"], shares.get(c))

    def _engine(self, component: str) -> _Engine:
        eng = self.engines.get(component)
        if eng is None:
            group = next((g for g in self.groups if component in g), None)
            if group is None:
                raise ValueError(f"no engine loaded for {component!r}; loaded: {', '.join(self.entries)}")
            self._swap_to(group)
            eng = self.engines[component]
        return eng

    def _errors(self) -> str:
        errs = self.logger.errors
        self.logger.errors = []
        return "; ".join(m.splitlines()[0] for m in errs[-3:])

    def _load(self, c: str, entry: dict, path: Path, share: int | None) -> _Engine:
        trt = self.trt
        data = path.read_bytes()
        if self.verify:
            verify_engine(entry, c, data, path)
        if self.rtx and hasattr(self.runtime, "get_engine_validity"):
            validity, diag = self.runtime.get_engine_validity(data[: max(self.runtime.engine_header_size, 64)])
            if validity == trt.EngineValidity.INVALID:
                reasons = [n for n, v in trt.EngineInvalidityDiagnostics.__members__.items() if int(diag) & int(v)]
                kind = DriverError if reasons and all(r in _DRIVER_REASONS for r in reasons) else EngineMismatch
                raise kind(f"{c}.engine is not valid on {self.gpu} according to TensorRT-RTX {trt.__version__}: "
                           f"{validity_advice(reasons)}")
        engine = self.runtime.deserialize_cuda_engine(data)
        del data
        if engine is None:
            errs = self._errors()
            free, _ = self.cuda.mem_info()
            raise EngineMismatch(f"{self.name} could not deserialize {path.name} on {self.gpu} ({free / 2**30:.2f} GiB "
                                 f"free; TensorRT: {errs or 'no error logged'}): {log_advice([errs])}")
        if engine.num_optimization_profiles != len(entry["profiles"]):
            raise EngineChecksumError(f"{path.name} has {engine.num_optimization_profiles} optimization profiles, the "
                                      f"manifest lists {len(entry['profiles'])}: re-run `make engines`")
        if share is not None or (self.budget == "auto" and entry.get("weight_streaming")):
            self._set_streaming_budget(c, engine, share)
        runtime_config = cache = cache_path = None
        if self.rtx:
            runtime_config = engine.create_runtime_config()
            if self.runtime_cache is not False:
                cache_path = Path(self.runtime_cache) if self.runtime_cache not in (None, True) else \
                    RTX_CACHE_DIR / f"{entry['sha256'][:24]}.bin"
                if cache_path.is_dir():
                    cache_path = cache_path / f"{entry['sha256'][:24]}.bin"
                cache = runtime_config.create_runtime_cache()
                if cache_path.is_file():
                    cache.deserialize(cache_path.read_bytes())
                runtime_config.set_runtime_cache(cache)
            if self.cuda_graphs:
                runtime_config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
            context = engine.create_execution_context(runtime_config)
        else:
            context = engine.create_execution_context()
        if context is None:
            free, total = self.cuda.mem_info()
            raise EngineMismatch(f"could not create an execution context for {path.name} on {self.gpu}: "
                                 f"{free / 2**30:.2f} of {total / 2**30:.2f} GiB free (TensorRT: "
                                 f"{self._errors() or 'no error logged'}); free the GPU or use memory_mode='on_demand'")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        return _Engine(c, engine, context, inputs, outputs, dtypes, entry["profiles"], runtime_config, cache,
                       cache_path)

    def _set_streaming_budget(self, c: str, engine, share: int | None) -> None:
        """Weight streaming: the budget must be set after deserialization and before the context is created."""
        if not int(getattr(engine, "streamable_weights_size", 0) or 0):
            raise EngineMismatch(f"{c}.engine has no streamable weights: rebuild it with "
                                 "`make engines ENGINE_FLAGS=--weight-streaming`")
        budget = int(engine.get_weight_streaming_automatic_budget()) if share is None else share
        engine.weight_streaming_budget_v2 = budget
        if int(engine.weight_streaming_budget_v2) != budget:
            raise EngineMismatch(f"{c}.engine refused the weight-streaming budget {budget} B (TensorRT: "
                                 f"{self._errors() or 'no error logged'})")

    def _release(self, eng: _Engine) -> None:
        """Drop an engine's graph, save its TensorRT-RTX runtime cache and let TensorRT free its memory."""
        self._drop_graph(eng)
        if eng.runtime_cache is not None and eng.cache_path is not None:
            try:
                blob = eng.runtime_cache.serialize()
                eng.cache_path.parent.mkdir(parents=True, exist_ok=True)
                tmp = eng.cache_path.with_name(f".{eng.cache_path.name}.tmp-{os.getpid()}")
                tmp.write_bytes(memoryview(blob))
                os.replace(tmp, eng.cache_path)
            except Exception:  # noqa: BLE001 -- a cache that cannot be saved only costs JIT time next run
                pass
        eng.context = eng.engine = eng.runtime_config = eng.runtime_cache = None

    # -------------------------------------------------------------------------------------- protocol
    def check_size(self, height: int, width: int) -> None:
        check_engine_size(self.manifest, self.entries, height, width)

    def upload(self, array: np.ndarray, dtype=None, *, component: str | None = None) -> DeviceArray:
        """One device for every engine: `component` does not change where the array goes."""
        self.cuda.bind()
        a = np.ascontiguousarray(array if dtype is None else np.asarray(array, dtype=dtype))
        out = DeviceArray(self.cuda, self.stream, a.shape, a.dtype)
        if a.nbytes:
            self.cuda.copy(out.ptr, a.ctypes.data, a.nbytes, "h2d", self.stream)
        return out

    def download(self, value) -> np.ndarray:
        if not isinstance(value, DeviceArray):
            return np.asarray(value)
        self.cuda.bind()
        out = np.empty(value.shape, value.dtype)
        if out.nbytes:
            self.cuda.copy(out.ctypes.data, value.ptr, out.nbytes, "d2h", self.stream)
        self.cuda.sync(self.stream)
        return out

    def run(self, component: str, inputs: dict[str, Any]) -> dict[str, DeviceArray]:
        self.cuda.bind()
        eng = self._engine(component)
        unknown = set(inputs) - set(eng.inputs)
        missing = set(eng.inputs) - set(inputs)
        if unknown or missing:
            raise ValueError(f"{component}: inputs {sorted(inputs)}; the engine takes {eng.inputs}")
        arrays = {}
        for n in eng.inputs:
            v = inputs[n]
            if isinstance(v, DeviceArray):
                if v.dtype != eng.dtypes[n]:
                    raise ValueError(f"{component}.{n}: device array of {v.dtype}, the engine takes {eng.dtypes[n]}")
                arrays[n] = v
            else:
                arrays[n] = self.upload(v, eng.dtypes[n])
        shapes = {n: a.shape for n, a in arrays.items()}
        idx = select_profile(component, eng.profiles, shapes)
        key = (idx, tuple(sorted(shapes.items())))
        if key != eng.bound:
            self._rebind(eng, idx, shapes, key)
        elif eng.graph is not None:
            return self._replay(eng, arrays)
        outs = self._bind_buffers(eng, arrays)
        if self.manual_graphs and eng.flushed and key not in eng.uncapturable and self._capture(eng, key, arrays, outs):
            return self._replay(eng, arrays)
        self._check(eng.context.execute_async_v3(self.cuda.stream_handle(self.stream)),
                    f"{component}: execute_async_v3")
        eng.flushed = True
        return outs

    def _check(self, ok, what: str) -> None:
        if not ok:
            raise RuntimeError(f"{what} failed (TensorRT: {self._errors() or 'no error logged'})")

    def _rebind(self, eng: _Engine, idx: int, shapes: dict, key: tuple) -> None:
        """Switch the context to profile `idx` and these input shapes. A captured graph is only valid while its
        context keeps the profile and shapes it was captured with, so it goes; the next execute is a plain one."""
        self._drop_graph(eng)
        eng.bound, eng.flushed = None, False
        ctx = eng.context
        if ctx.active_optimization_profile != idx:
            self._check(ctx.set_optimization_profile_async(idx, self.cuda.stream_handle(self.stream)),
                        f"{eng.name}: set_optimization_profile_async({idx})")
        for n, shape in shapes.items():
            self._check(ctx.set_input_shape(n, shape), f"{eng.name}: set_input_shape({n}, {shape})")
        eng.bound = key

    def _bind_buffers(self, eng: _Engine, arrays: dict[str, DeviceArray]) -> dict[str, DeviceArray]:
        ctx = eng.context
        for n, a in arrays.items():
            self._check(ctx.set_tensor_address(n, a.ptr), f"{eng.name}: set_tensor_address({n})")
        outs = {}
        for n in eng.outputs:
            shape = tuple(ctx.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"{eng.name}: output {n} has an unresolved shape {shape}")
            outs[n] = DeviceArray(self.cuda, self.stream, shape, eng.dtypes[n])
            self._check(ctx.set_tensor_address(n, outs[n].ptr), f"{eng.name}: set_tensor_address({n})")
        return outs

    # -------------------------------------------------------------------------------------- CUDA graphs
    def _capture(self, eng: _Engine, key, arrays, outs) -> bool:
        """Capture this (already flushed) shape into a CUDA graph that owns its input and output buffers. False,
        with the context pointed back at the caller's buffers, when TensorRT or CUDA refuses the capture."""
        ctx, stream = eng.context, self.stream
        g_in = {n: DeviceArray(self.cuda, stream, a.shape, a.dtype) for n, a in arrays.items()}
        try:
            if hasattr(ctx, "is_stream_capturable") and not ctx.is_stream_capturable(self.cuda.stream_handle(stream)):
                raise RuntimeError("the context says the stream is not capturable")
            for n in arrays:
                self._check(ctx.set_tensor_address(n, g_in[n].ptr), f"{eng.name}: set_tensor_address({n})")
            self.cuda.begin_capture(stream)
            try:
                ok = ctx.execute_async_v3(self.cuda.stream_handle(stream))
            finally:
                graph, exec_graph = self.cuda.end_capture(stream)
            if not ok:
                self.cuda.destroy_graph(graph, exec_graph)
                raise RuntimeError(f"execute_async_v3 failed during capture (TensorRT: {self._errors() or '-'})")
        except Exception as e:  # noqa: BLE001 -- capture is an optimisation: fall back to plain execution
            eng.uncapturable[key] = str(e)
            print(f"warning: {eng.name}: CUDA-graph capture failed for shapes {dict(key[1])} ({e}); running "
                  "without a graph for these shapes", file=sys.stderr)
            for n, a in arrays.items():
                self._check(ctx.set_tensor_address(n, a.ptr), f"{eng.name}: set_tensor_address({n})")
            return False
        eng.graph = {"graph": graph, "exec": exec_graph, "inputs": g_in, "outputs": outs}
        return True

    def _replay(self, eng: _Engine, arrays) -> dict[str, DeviceArray]:
        g = eng.graph
        for n, a in arrays.items():
            self.cuda.copy(g["inputs"][n].ptr, a.ptr, a.nbytes, "d2d", self.stream)
        self.cuda.launch(g["exec"], self.stream)
        outs = {}
        for n, buf in g["outputs"].items():        # fresh copies: callers may keep results across calls
            outs[n] = DeviceArray(self.cuda, self.stream, buf.shape, buf.dtype)
            self.cuda.copy(outs[n].ptr, buf.ptr, buf.nbytes, "d2d", self.stream)
        return outs

    def _drop_graph(self, eng: _Engine) -> None:
        if eng.graph is not None:
            g, eng.graph = eng.graph, None
            self.cuda.destroy_graph(g["graph"], g["exec"])

    # -------------------------------------------------------------------------------------- teardown
    def close(self) -> None:
        """Save the TensorRT-RTX runtime caches, release graphs, contexts and engines. The stream lives on until
        the last array allocated on it is freed (arrays the caller still holds stay valid to free)."""
        if self.stream is not None:
            try:
                self.cuda.sync(self.stream)
            except Exception:  # noqa: BLE001
                pass
        for eng in self.engines.values():
            self._release(eng)
        self.engines = {}
        self.stream = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
