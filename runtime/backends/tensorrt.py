"""TensorRT backend: runs the engines that `make engines` recorded in the manifest's `engines` section, with full
TensorRT (`tensorrt`) or TensorRT for RTX (`tensorrt_rtx`) — one code path, the module that built the engines.

No torch: device memory, copies, the CUDA stream and CUDA graphs go through cuda-bindings (`cuda.bindings.runtime`).
Before anything is loaded onto the GPU the backend checks, and refuses with a message that says what to do:
  * the manifest has engines for the components (else: run `make engines`),
  * the installed TensorRT module and version are the ones that built them (engines are not portable across
    versions, and TensorRT-RTX engines do not load in full TensorRT or vice versa),
  * a CUDA GPU is present and its compute capability is one the engines target (TensorRT-RTX: the capabilities
    recorded at build time, plus the runtime's own header check `get_engine_validity`; full TensorRT: the
    architecture of the GPU that built them),
  * enough GPU memory is free for the engines and their activations,
  * each engine file's sha256 matches the manifest (checked on the bytes that are deserialized).
`BackendUnavailable` (so `auto` falls back) for the first four; a checksum mismatch is a `ManifestError`: a corrupt
engines folder is an error to fix, not a reason to silently run something slower.

Each component has one engine with one optimization profile per resolution bucket (per distinct image shape);
`run` picks the profile that admits the inputs' shapes, `check_size` refuses a resolution outside every
profile and lists the buckets. Values stay on the GPU between calls (`DeviceArray`); numpy inputs are uploaded.
Optional CUDA graphs: TensorRT-RTX's own whole-graph capture, or (full TensorRT) one captured graph per
component and input shapes, replayed for a static bucket.

Where this has run: nowhere yet. Full TensorRT is not installable on this project's machines and TensorRT-RTX
refuses their Hopper GPUs (compute capability 9.0); the CPU tests cover everything up to the GPU (manifest
reading, profile selection, version/architecture/checksum/memory refusals).
"""
from __future__ import annotations

import hashlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..manifest import ManifestError
from .base import BackendUnavailable

MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}       # builder name -> Python module
IMAGE_SYMBOLS = ("image_tokens", "grid_h", "grid_w")
PIXELS_PER_TOKEN = 16
MEMORY_MARGIN = 1.05            # free GPU memory must exceed the estimate by this factor
RTX_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ideogram4-engine" / "rtx-runtime-cache"


class EngineMismatch(BackendUnavailable):
    """The engines cannot run here as built: another TensorRT version or module, another GPU architecture, too
    little GPU memory. The message says which and how to rebuild."""


class EngineChecksumError(ManifestError):
    """An engine file's sha256 differs from the manifest's."""


# ------------------------------------------------------------------------------------------------ manifest

def engines_section(manifest) -> dict:
    raw = getattr(manifest, "raw", manifest)
    section = raw.get("engines")
    root = getattr(manifest, "root", "the engines folder")
    if not section or not section.get("components"):
        raise BackendUnavailable(f"{root} has no TensorRT engines (manifest.json has no `engines` section): "
                                 "run `make engines` (python -m ideogram4_engine.export.engines --engines <folder>)")
    return section


def engine_entries(manifest, components=None) -> dict[str, dict]:
    section = engines_section(manifest)
    raw = getattr(manifest, "raw", manifest)
    names = list(components) if components else list(raw["components"])
    missing = [c for c in names if c not in section["components"]]
    if missing:
        raise BackendUnavailable(f"no engine for {', '.join(missing)} (built: {', '.join(section['components'])}); "
                                 "run `make engines`")
    return {c: section["components"][c] for c in names}


def parse_cc(cc: str) -> tuple[int, int]:
    major, _, minor = str(cc).partition(".")
    return int(major), int(minor or 0)


def check_builder(entry: dict, component: str, module_name: str, version: str) -> None:
    """The engine was built by this module and version (engines are not portable across either)."""
    b = entry["builder"]
    if b["module"] != module_name:
        raise EngineMismatch(f"{component}.engine was built by {b['name']} ({b['module']} {b['version']}) and cannot "
                             f"be loaded by {module_name}: use the backend of that module, or rebuild with "
                             f"`make engines BUILDER={'tensorrt-rtx' if module_name == 'tensorrt_rtx' else 'tensorrt'}`")
    if b["version"] != version:
        raise EngineMismatch(f"{component}.engine was built by {b['name']} {b['version']}; the installed {module_name} "
                             f"is {version}. TensorRT engines only load in the version that built them: rebuild with "
                             f"`make engines` (or install {b['name']}=={b['version']})")


def check_architecture(entry: dict, component: str, cc: tuple[int, int], gpu: str = "this GPU") -> None:
    """The GPU's compute capability is one the engine targets. TensorRT-RTX engines built for the builder's default
    targets are also meant for later capabilities (`forward_compatible`); the runtime's header check decides those."""
    t = entry["targets"]
    targets = [parse_cc(x) for x in t["compute_capabilities"]]
    have = f"{cc[0]}.{cc[1]}"
    listed = ", ".join(t["compute_capabilities"]) or "none recorded"
    rtx = entry["builder"]["module"] == "tensorrt_rtx"
    if cc in targets:
        return
    if rtx and cc[0] in (9, 10):
        raise EngineMismatch(f"{gpu} has compute capability {have} (data-center {'Hopper' if cc[0] == 9 else 'Blackwell'}"
                             f"); TensorRT-RTX runs only on RTX-class architectures (7.5, 8.x, 12.x) and these engines "
                             f"target {listed}. Use full TensorRT engines (`make engines BUILDER=tensorrt` on this GPU) "
                             "or the onnxruntime-cuda backend")
    if t.get("forward_compatible") and targets and cc > max(targets):
        return
    if not targets:
        return          # nothing recorded (full TensorRT built where the GPU was unknown): the runtime decides
    raise EngineMismatch(f"{component}.engine targets compute capability {listed}; {gpu} is {have}. Rebuild for it: "
                         + (f"`make engines ENGINE_FLAGS=--compute-capabilities={have}`" if rtx else
                            "`make engines BUILDER=tensorrt` on this GPU"))


def memory_estimate(entries: dict[str, dict]) -> tuple[int, str]:
    """Bytes the loaded engines need on the GPU: each engine file (weights + code) plus its activations."""
    parts, total = [], 0
    for c, e in entries.items():
        need = int(e["bytes"]) + int(e.get("activation_bytes") or 0)
        total += need
        parts.append(f"{c} {need / 2**30:.2f}")
    return total, ", ".join(parts)


def check_memory(entries: dict[str, dict], free: int, total: int, gpu: str = "this GPU") -> None:
    need, parts = memory_estimate(entries)
    if need * MEMORY_MARGIN > free:
        raise EngineMismatch(f"insufficient GPU memory on {gpu}: the engines need about {need / 2**30:.2f} GiB "
                             f"({parts} GiB, weights + code + activations), {free / 2**30:.2f} GiB of "
                             f"{total / 2**30:.2f} GiB are free. Free the GPU, load fewer components, or rebuild "
                             "with fewer/smaller buckets (`make engines BUCKETS=...`)")


def verify_engine(entry: dict, component: str, data, path: Path) -> None:
    if len(data) != entry["bytes"]:
        raise EngineChecksumError(f"{path}: {len(data)} bytes, the manifest says {entry['bytes']} (truncated or "
                                  "replaced; re-run `make engines`)")
    actual = hashlib.sha256(data).hexdigest()
    if actual != entry["sha256"]:
        raise EngineChecksumError(f"{path}: sha256 mismatch: expected {entry['sha256']}, actual {actual}; the engine "
                                  "was modified after `make engines` (re-run it)")


# ------------------------------------------------------------------------------------------------ profiles

def _fmt(lo, hi) -> str:
    return str(lo) if lo == hi else f"{lo}…{hi}"


def describe_profile(profile: dict) -> str:
    shapes = "; ".join(f"{n} ({', '.join(_fmt(a, b) for a, b in zip(s['min'], s['max']))})"
                       for n, s in profile["shapes"].items())
    return f"[{', '.join(profile['buckets']) or 'any size'}] {shapes}"


def select_profile(component: str, profiles: list[dict], shapes: dict[str, tuple[int, ...]]) -> int:
    """Index of the first profile whose min…max admits every input shape."""
    for i, p in enumerate(profiles):
        if set(p["shapes"]) != set(shapes):
            missing = set(p["shapes"]) - set(shapes)
            extra = set(shapes) - set(p["shapes"])
            raise ValueError(f"{component}: inputs {sorted(shapes)} do not match the engine's {sorted(p['shapes'])}"
                             + (f" (missing {sorted(missing)})" if missing else "")
                             + (f" (unexpected {sorted(extra)})" if extra else ""))
        if all(len(shapes[n]) == len(s["min"]) and
               all(lo <= d <= hi for d, lo, hi in zip(shapes[n], s["min"], s["max"]))
               for n, s in p["shapes"].items()):
            return i
    got = ", ".join(f"{n} {tuple(v)}" for n, v in shapes.items())
    raise ValueError(f"{component}: no optimization profile admits {got}; the engine has: "
                     + " | ".join(describe_profile(p) for p in profiles)
                     + ". Rebuild with other buckets / --max-text-tokens / --max-batch (`make engines`)")


def image_dims(height: int, width: int) -> dict[str, int]:
    gh, gw = height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN
    return {"image_tokens": gh * gw, "grid_h": gh, "grid_w": gw}


def size_fits(component_inputs: list[dict], profiles: list[dict], height: int, width: int) -> bool:
    """Does some profile admit the image-dependent axes of (height, width)? Other axes are not looked at."""
    dims = image_dims(height, width)
    axes = [(io["name"], k, dims[d]) for io in component_inputs for k, d in enumerate(io["shape"]) if d in dims]
    if not axes:
        return True
    return any(all(p["shapes"][n]["min"][k] <= v <= p["shapes"][n]["max"][k] for n, k, v in axes) for p in profiles)


def check_engine_size(manifest, entries: dict[str, dict], height: int, width: int) -> None:
    raw = getattr(manifest, "raw", manifest)
    bad = [c for c, e in entries.items() if not size_fits(raw["components"][c]["inputs"], e["profiles"], height, width)]
    if bad:
        buckets = engines_section(manifest).get("buckets") or sorted({b for e in entries.values()
                                                                      for p in e["profiles"] for b in p["buckets"]})
        raise ValueError(f"{width}x{height} (WxH) is outside every engine profile ({', '.join(bad)}); the engines were "
                         f"built for the buckets {', '.join(buckets)}. Pick one of them, or rebuild with it: "
                         f"`make engines BUCKETS={','.join([*buckets, f'{width}x{height}'])}`")


# ------------------------------------------------------------------------------------------------ CUDA

class CudaError(RuntimeError):
    pass


class _Cuda:
    """The few CUDA runtime calls the backend needs, through cuda-bindings (no torch)."""

    def __init__(self):
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            try:
                from cuda import cudart          # cuda-python < 12.6 layout
            except ImportError as e:
                raise BackendUnavailable(f"cuda-bindings is not installed ({e}); the TensorRT backend moves memory "
                                         "through it: pip install cuda-bindings (or '.[trt]')") from None
        self.rt = cudart
        self.ok = cudart.cudaError_t.cudaSuccess

    def call(self, what: str, result):
        err, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
        if err != self.ok:
            name = getattr(err, "name", str(err))
            try:
                desc = self.rt.cudaGetErrorString(err)[1].decode()
            except Exception:  # noqa: BLE001
                desc = ""
            raise CudaError(f"{what}: {name}" + (f" ({desc})" if desc else ""))
        return rest[0] if len(rest) == 1 else (rest or None)

    def device(self, device_id: int) -> tuple[tuple[int, int], str]:
        rt = self.rt
        try:
            count = self.call("cudaGetDeviceCount", rt.cudaGetDeviceCount())
        except CudaError as e:
            raise BackendUnavailable(f"no usable CUDA GPU: {e}") from None
        if count == 0:
            raise BackendUnavailable("no CUDA GPU is visible")
        if not 0 <= device_id < count:
            raise BackendUnavailable(f"device {device_id} does not exist ({count} GPU(s) visible)")
        self.call("cudaSetDevice", rt.cudaSetDevice(device_id))
        attr = rt.cudaDeviceAttr
        major = self.call("cudaDeviceGetAttribute", rt.cudaDeviceGetAttribute(
            attr.cudaDevAttrComputeCapabilityMajor, device_id))
        minor = self.call("cudaDeviceGetAttribute", rt.cudaDeviceGetAttribute(
            attr.cudaDevAttrComputeCapabilityMinor, device_id))
        try:
            name = self.call("cudaGetDeviceProperties", rt.cudaGetDeviceProperties(device_id)).name
            name = name.decode(errors="replace").rstrip("\0") if isinstance(name, bytes) else str(name)
        except CudaError:
            name = "GPU"
        return (int(major), int(minor)), f"GPU {device_id} ({name}, compute capability {major}.{minor})"

    def mem_info(self) -> tuple[int, int]:
        free, total = self.call("cudaMemGetInfo", self.rt.cudaMemGetInfo())
        return int(free), int(total)

    def stream(self):
        return self.call("cudaStreamCreateWithFlags",
                         self.rt.cudaStreamCreateWithFlags(self.rt.cudaStreamNonBlocking))

    def malloc(self, nbytes: int, stream) -> int:
        return int(self.call("cudaMallocAsync", self.rt.cudaMallocAsync(max(int(nbytes), 256), stream)))

    def free(self, ptr: int, stream) -> None:
        self.call("cudaFreeAsync", self.rt.cudaFreeAsync(ptr, stream))

    def copy(self, dst: int, src: int, nbytes: int, kind: str, stream) -> None:
        k = {"h2d": self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, "d2h": self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
             "d2d": self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice}[kind]
        self.call(f"cudaMemcpyAsync({kind})", self.rt.cudaMemcpyAsync(dst, src, nbytes, k, stream))

    def sync(self, stream) -> None:
        self.call("cudaStreamSynchronize", self.rt.cudaStreamSynchronize(stream))

    def stream_handle(self, stream) -> int:
        return int(stream)

    # CUDA graphs (full TensorRT path)
    def begin_capture(self, stream) -> None:
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self.call("cudaStreamBeginCapture", self.rt.cudaStreamBeginCapture(stream, mode))

    def end_capture(self, stream):
        graph = self.call("cudaStreamEndCapture", self.rt.cudaStreamEndCapture(stream))
        return graph, self.call("cudaGraphInstantiate", self.rt.cudaGraphInstantiate(graph, 0))

    def launch(self, exec_graph, stream) -> None:
        self.call("cudaGraphLaunch", self.rt.cudaGraphLaunch(exec_graph, stream))

    def destroy_graph(self, graph, exec_graph) -> None:
        self.rt.cudaGraphExecDestroy(exec_graph)
        self.rt.cudaGraphDestroy(graph)


class DeviceArray:
    """A dense array in GPU memory (stream-ordered allocation, freed when dropped)."""

    __slots__ = ("ptr", "shape", "dtype", "nbytes", "_cuda", "_stream", "__weakref__")

    def __init__(self, cuda: _Cuda, stream, shape, dtype):
        self.shape, self.dtype = tuple(int(d) for d in shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self._cuda, self._stream = cuda, stream
        self.ptr = cuda.malloc(self.nbytes, stream)

    def __del__(self):
        try:
            self._cuda.free(self.ptr, self._stream)
        except Exception:  # noqa: BLE001 -- interpreter shutdown or a dead context: nothing left to free
            pass

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype}, ptr=0x{self.ptr:x})"


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


# ------------------------------------------------------------------------------------------------ backend

class TensorRTBackend:
    graph_variant = "bf16"
    verifies_own_files = True      # engines are checked against the manifest's sha256 when loaded

    def __init__(self, manifest, module: str | None = None, device_id: int = 0, components=None,
                 cuda_graphs: bool = False, runtime_cache: str | Path | bool | None = None,
                 verify_engines: bool = True, threads: int | None = None):
        """module: None (the one that built the engines), "tensorrt" or "tensorrt-rtx" (refuse other engines).
        runtime_cache (TensorRT-RTX): file for JIT-compiled kernels; None = ~/.cache/ideogram4-engine/…,
        False = off. `threads` is accepted for signature compatibility with the other backends and unused."""
        del threads
        self.manifest = manifest
        section = engines_section(manifest)
        built = section["builder"]["name"]
        if module is not None and module not in MODULES:
            raise ValueError(f"unknown TensorRT module {module!r}; allowed: {', '.join(MODULES)}")
        if module is not None and module != built:
            raise BackendUnavailable(f"the engines in {getattr(manifest, 'root', '')} were built by {built}, not "
                                     f"{module}: use --backend {built} or rebuild with `make engines BUILDER={module}`")
        self.name = built
        self.entries = engine_entries(manifest, components)
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
        self.cuda = _Cuda()
        cc, gpu = self.cuda.device(device_id)
        self.gpu, self.compute_capability = gpu, cc
        for c, e in self.entries.items():
            check_architecture(e, c, cc, gpu)
        free, total = self.cuda.mem_info()
        check_memory(self.entries, free, total, gpu)

        self.stream = self.cuda.stream()
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple, dict] = {}
        self._seen: set[tuple] = set()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engines: dict[str, _Engine] = {}
        root = Path(getattr(manifest, "root", "."))
        try:
            for c, e in self.entries.items():
                self.engines[c] = self._load(c, e, root / e["file"], verify_engines, runtime_cache)
        except BaseException:
            self.close()
            raise

    # -------------------------------------------------------------------------------------- loading
    def _load(self, c: str, entry: dict, path: Path, verify: bool, runtime_cache) -> _Engine:
        trt = self.trt
        data = path.read_bytes()
        if verify:
            verify_engine(entry, c, data, path)
        rtx = MODULES[self.name] == "tensorrt_rtx"
        if rtx and hasattr(self.runtime, "get_engine_validity"):
            validity, diag = self.runtime.get_engine_validity(data[: max(self.runtime.engine_header_size, 64)])
            if validity == trt.EngineValidity.INVALID:
                reasons = [n for n, v in trt.EngineInvalidityDiagnostics.__members__.items() if int(diag) & int(v)]
                raise EngineMismatch(f"{c}.engine is not valid on {self.gpu} according to TensorRT-RTX "
                                     f"{trt.__version__} ({', '.join(reasons) or 'no diagnostic'}): rebuild with "
                                     "`make engines`")
        engine = self.runtime.deserialize_cuda_engine(data)
        del data
        if engine is None:
            free, total = self.cuda.mem_info()
            raise EngineMismatch(f"{self.name} could not deserialize {path.name} on {self.gpu} ({free / 2**30:.2f} GiB "
                                 "free); the TensorRT log above says why (version, architecture or memory)")
        runtime_config = cache = cache_path = None
        if rtx:
            runtime_config = engine.create_runtime_config()
            if runtime_cache is not False:
                cache_path = Path(runtime_cache) if runtime_cache not in (None, True) else \
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
                                 f"{free / 2**30:.2f} of {total / 2**30:.2f} GiB free (insufficient GPU memory?)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        if engine.num_optimization_profiles != len(entry["profiles"]):
            raise EngineChecksumError(f"{path.name} has {engine.num_optimization_profiles} optimization profiles, the "
                                      f"manifest lists {len(entry['profiles'])}: re-run `make engines`")
        return _Engine(c, engine, context, inputs, outputs, dtypes, entry["profiles"], runtime_config, cache,
                       cache_path)

    # -------------------------------------------------------------------------------------- protocol
    def check_size(self, height: int, width: int) -> None:
        check_engine_size(self.manifest, self.entries, height, width)

    def upload(self, array: np.ndarray, dtype=None, *, component: str | None = None) -> DeviceArray:
        """One device for every engine: `component` does not change where the array goes."""
        a = np.ascontiguousarray(array if dtype is None else np.asarray(array, dtype=dtype))
        out = DeviceArray(self.cuda, self.stream, a.shape, a.dtype)
        if a.nbytes:
            self.cuda.copy(out.ptr, a.ctypes.data, a.nbytes, "h2d", self.stream)
        return out

    def download(self, value) -> np.ndarray:
        if not isinstance(value, DeviceArray):
            return np.asarray(value)
        out = np.empty(value.shape, value.dtype)
        if out.nbytes:
            self.cuda.copy(out.ctypes.data, value.ptr, out.nbytes, "d2h", self.stream)
        self.cuda.sync(self.stream)
        return out

    def run(self, component: str, inputs: dict[str, Any]) -> dict[str, DeviceArray]:
        eng = self.engines.get(component)
        if eng is None:
            raise ValueError(f"no engine loaded for {component!r}; loaded: {', '.join(self.engines)}")
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
        ctx = eng.context
        key = (component, idx, tuple(sorted(shapes.items())))
        if self.cuda_graphs and MODULES[self.name] == "tensorrt" and key in self._graphs:
            return self._replay(eng, key, arrays)
        # a captured graph is only valid while its context keeps the shapes it was captured with
        self._drop_graphs(component)
        if ctx.active_optimization_profile != idx:
            ctx.set_optimization_profile_async(idx, self.cuda.stream_handle(self.stream))
        for n, a in arrays.items():
            ctx.set_input_shape(n, a.shape)
            ctx.set_tensor_address(n, a.ptr)
        outs = {}
        for n in eng.outputs:
            shape = tuple(ctx.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"{component}: output {n} has an unresolved shape {shape}")
            outs[n] = DeviceArray(self.cuda, self.stream, shape, eng.dtypes[n])
            ctx.set_tensor_address(n, outs[n].ptr)
        if self.cuda_graphs and MODULES[self.name] == "tensorrt" and key in self._seen:
            return self._capture(eng, key, arrays, outs)
        if not ctx.execute_async_v3(self.cuda.stream_handle(self.stream)):
            raise RuntimeError(f"{component}: execute_async_v3 failed (see the TensorRT log)")
        self._seen.add(key)
        return outs

    # -------------------------------------------------------------------------------------- CUDA graphs
    def _capture(self, eng: _Engine, key, arrays, outs) -> dict[str, DeviceArray]:
        """Second run with these shapes: capture it into a CUDA graph that owns its input/output buffers."""
        g_in = {n: DeviceArray(self.cuda, self.stream, a.shape, a.dtype) for n, a in arrays.items()}
        for n, a in arrays.items():
            eng.context.set_tensor_address(n, g_in[n].ptr)
        g_out = outs
        self.cuda.begin_capture(self.stream)
        try:
            ok = eng.context.execute_async_v3(self.cuda.stream_handle(self.stream))
        finally:
            graph, exec_graph = self.cuda.end_capture(self.stream)
        if not ok:
            self.cuda.destroy_graph(graph, exec_graph)
            raise RuntimeError(f"{eng.name}: execute_async_v3 failed during CUDA-graph capture")
        self._graphs[key] = {"graph": graph, "exec": exec_graph, "inputs": g_in, "outputs": g_out}
        return self._replay(eng, key, arrays)

    def _replay(self, eng: _Engine, key, arrays) -> dict[str, DeviceArray]:
        g = self._graphs[key]
        for n, a in arrays.items():
            self.cuda.copy(g["inputs"][n].ptr, a.ptr, a.nbytes, "d2d", self.stream)
        self.cuda.launch(g["exec"], self.stream)
        outs = {}
        for n, buf in g["outputs"].items():        # fresh copies: callers may keep results across calls
            outs[n] = DeviceArray(self.cuda, self.stream, buf.shape, buf.dtype)
            self.cuda.copy(outs[n].ptr, buf.ptr, buf.nbytes, "d2d", self.stream)
        return outs

    def _drop_graphs(self, component: str) -> None:
        for key in [k for k in self._graphs if k[0] == component]:
            g = self._graphs.pop(key)
            self.cuda.destroy_graph(g["graph"], g["exec"])

    # -------------------------------------------------------------------------------------- teardown
    def close(self) -> None:
        """Save the TensorRT-RTX runtime caches, release graphs, contexts and engines."""
        for c in list(self._graphs):
            self._drop_graphs(c[0])
        for eng in getattr(self, "engines", {}).values():
            if eng.runtime_cache is not None and eng.cache_path is not None:
                try:
                    blob = eng.runtime_cache.serialize()
                    eng.cache_path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = eng.cache_path.with_name(f".{eng.cache_path.name}.tmp-{os.getpid()}")
                    tmp.write_bytes(memoryview(blob))
                    os.replace(tmp, eng.cache_path)
                except Exception:  # noqa: BLE001 -- a cache that cannot be saved only costs JIT time next run
                    pass
        self.engines = {}
        if getattr(self, "stream", None) is not None:
            try:
                self.cuda.sync(self.stream)
                self.cuda.rt.cudaStreamDestroy(self.stream)
            except Exception:  # noqa: BLE001
                pass
            self.stream = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
