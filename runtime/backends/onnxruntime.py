"""onnxruntime backend: CPU (`*.cpu.onnx`) or CUDA (`*.cuda_fused.onnx` with the project's fused-kernel library,
else `*.cuda.onnx`) execution provider, through IO binding.

Inputs and outputs are OrtValues on the provider's device: static inputs (text features, RoPE tables) are
uploaded once per request and the sampler state never leaves the GPU between steps.

Two ways to hold the FP8 weights (docs/tuning.md):
* default: FP8 in memory, each weight dequantized right before its MatMul on every run (least memory); on
  CUDA through onnxruntime's fused `MatMulBlockQuantizedFp8Weight` (onnxruntime-gpu >= 1.31) on the (out, in)
  e4m3 bytes as stored, whose fp32 row scales onnxruntime's constant folding computes at session creation;
* `dequantize_at_load`: the `*_dql` graphs take the bf16 weights as inputs; each weight is read from the
  weight file, dequantized once on its device by the `dequantize` graph (the twins' own ops, so the numbers
  are bit-identical) and stays bound to the component's IO binding (2x the FP8 weight memory, no per-run
  dequantization).
"""
from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .. import kernels
from ..manifest import LOAD_DEQUANTIZED
from .base import Backend, BackendUnavailable
from .cuda_graphs import GraphRunner

VARIANT = {"cpu": "cpu", "cuda": "cuda"}
FP8_MATMUL = "MatMulBlockQuantizedFp8Weight"     # the contrib op of the cuda graphs (export/graphs/rewrite.py)
PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
GRAPH_COMPONENTS = ("dit_cond", "dit_uncond")     # captured with cuda_graph=True (one call per step each)


class OnnxRuntimeBackend(Backend):
    NAMES = ("onnxruntime-cuda", "onnxruntime-cpu")
    FIXED = ("device",)
    NAME_ONLY = {o: ("onnxruntime-cuda",) for o in ("uncond_device_id", "fused_kernels", "kernels_library",
                                                    "precision", "cuda_graph")}
    takes_before_load = True

    def __init__(self, manifest, device: str = "cpu", device_id: int = 0, threads: int | None = None,
                 components: tuple[str, ...] | None = None,
                 arena_extend_strategy: str | None = None, dequantize_at_load: bool = False,
                 uncond_device_id: int | None = None, shared_arena: bool = True,
                 fused_kernels: bool | None = None, kernels_library: str | None = None,
                 precision: str = "faithful", cuda_graph: bool = False, parallel_load: bool = True,
                 before_load=None):
        """Constant folding is on for CUDA (it computes the FP8 MatMuls' fp32 row scales once; no DequantizeLinear
        of an initializer is left in those graphs) and off for the CPU, whose twin dequantizes every e4m3 weight
        per run and would otherwise hold them all as fp32.
        arena_extend_strategy: how an arena grows, "kNextPowerOfTwo" (onnxruntime's default) or
        "kSameAsRequested" (by exactly what is asked). None: kSameAsRequested for the shared arena (less memory at
        the same speed, docs/tuning.md §14), onnxruntime's default for per-session arenas.
        dequantize_at_load=True: bf16 weights computed once at load on their device (see the module doc).
        uncond_device_id (CUDA): run dit_uncond on this GPU, concurrently with dit_cond ("CFG-parallel").
        shared_arena=True (default): the graphs on one device draw their activations from one arena registered
        with onnxruntime's environment, instead of one arena each that keeps its own peak: the components run
        one after the other, so the memory held is the largest peak rather than the sum of them (docs/tuning.md §9).
        The arena is per process: the first backend's arena_extend_strategy stays.
        CUDA sessions run without onnxruntime's memory pattern (it added a block per session on the second run, at
        no speed, §14) and with the heuristic cuDNN convolution search (the exhaustive one slows the VAE's first
        decode and no later one).
        fused_kernels (CUDA): None (default) runs the `cuda_fused` graphs — the elementwise chains as the project's
        fused CUDA ops (kernels/, runtime/kernels.py) — when the export has them and the library loads and has
        code for the GPU, else the stock cuda graphs with one FusedKernelsOff warning saying why (the environment
        variable IDEOGRAM4_FUSED_KERNELS=0 also turns them off); True requires them (BackendUnavailable
        otherwise); False runs the stock graphs (A/B). kernels_library: the library's path (default:
        $IDEOGRAM4_KERNELS_LIBRARY, else the checkout's build/kernels/libideogram4_kernels.so).
        precision="w8a8" (CUDA, opt-in; numerics change): the DiT block linears run with FP8 activations through
        the W8A8 ops of the same library — the cuda_fused_w8a8 graphs (fused ops, the quantization inside the
        producing kernels) when the fused graphs would run, else cuda_w8a8. If the library cannot run here, one
        warning says why and the faithful graphs run; `self.precision` and `self.graph_variant` say what did.
        Graphs are tried in that order of preference; one the library fails to load (warning) gives way to the
        next, down to the stock cuda graphs.
        cuda_graph=True (CUDA, opt-in): the DiT sessions replay onnxruntime CUDA graphs, one per input-shape set
        (backends/cuda_graphs.py: fixed-address IO buffers, their own arenas, so more memory); a capture that fails
        costs one CudaGraphOff warning and that DiT runs without capture.
        parallel_load=True (default): the components load side by side, one thread each: a component's files are
        hashed (before_load), then its session is created, so hashing overlaps session creation and the sessions
        are built at the same time (hashlib and onnxruntime's session creation release the GIL; docs/tuning.md
        §23). False: every file hashed first, then the sessions one after the other (the earlier behaviour)."""
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendUnavailable(f"onnxruntime is not installed ({e})") from None
        if PROVIDER[device] not in ort.get_available_providers():
            raise BackendUnavailable(f"{PROVIDER[device]} is not available in this onnxruntime build "
                                     f"(available: {', '.join(ort.get_available_providers())})")
        if uncond_device_id is not None and device != "cuda":
            raise ValueError("uncond_device_id needs the CUDA provider (onnxruntime-cuda)")
        if precision not in kernels.PRECISIONS:
            raise ValueError(f"precision={precision!r}; allowed: {', '.join(kernels.PRECISIONS)}")
        if precision == "w8a8" and (device != "cuda" or dequantize_at_load or "w8a8" not in manifest.precisions):
            raise ValueError("precision='w8a8' " + ("needs the CUDA provider (onnxruntime-cuda)" if device != "cuda" else
                             "multiplies the stored e4m3 weights: it cannot be combined with dequantize_at_load"
                             if dequantize_at_load else f"needs W8A8 graphs, which {manifest.path} lacks: re-export "
                             "with `--precision w8a8`"))
        if cuda_graph and (device != "cuda" or dequantize_at_load):
            raise ValueError("cuda_graph=True " + ("needs the CUDA provider (onnxruntime-cuda)" if device != "cuda" else
                             "cannot be combined with dequantize_at_load (its weights are bound per session)"))
        if arena_extend_strategy is not None and arena_extend_strategy not in _STRATEGY:
            raise ValueError(f"arena_extend_strategy={arena_extend_strategy!r}; allowed: kNextPowerOfTwo, "
                             "kSameAsRequested")
        self.ort = ort
        self.name = f"onnxruntime-{device}"
        self.graph_variant = VARIANT[device] + (LOAD_DEQUANTIZED if dequantize_at_load else "")
        self._before_load = before_load     # e.g. the Pipeline's sha256 check: graphs are hashed before parsing
        self._parallel_load = parallel_load
        self.device, self.device_id = device, device_id
        self.manifest = manifest
        self._threads, self._arena = threads, arena_extend_strategy
        names = components or tuple(manifest.components)
        self.devices = {c: uncond_device_id if c.partition(".")[0] == "dit_uncond" and uncond_device_id is not None
                        else device_id for c in names}     # "dit_uncond.head" …: the first-block cache's pieces
        if shared_arena:
            for dev in sorted(set(self.devices.values())):
                _register_shared_arena(ort, device, dev, arena_extend_strategy or "kSameAsRequested")
        self.precision, self.kernels_library = "faithful", None
        self._graph_components = GRAPH_COMPONENTS if cuda_graph else ()
        self._shared_arena = shared_arena
        self._runners: dict[str, GraphRunner] = {}
        plan = self._plan(fused_kernels, kernels_library, precision) if device == "cuda" else \
            [(self.graph_variant, "faithful", None)]
        for i, (variant, prec, lib) in enumerate(plan):
            self.graph_variant, self.precision, self.kernels_library = variant, prec, lib
            self._opts = self._options(shared_arena)
            try:
                self.sessions = self._sessions(names)
                break
            except BackendUnavailable as e:
                if lib is None or i + 1 == len(plan):
                    raise
                _warn(f"the {variant} graphs did not load ({e}); running the {plan[i + 1][0]} graphs instead")
        self._outputs = {c: [o.name for o in s.get_outputs()] for c, s in self.sessions.items()}
        self._weights: dict[str, Any] = {}      # component -> IO binding holding its bf16 weights
        self._keep: list = []                   # dequantization sessions: their arenas hold the weights
        if dequantize_at_load:
            for c in names:
                if manifest.dequantize(c) is not None:
                    self._weights[c] = self._bind_weights(c)
        self.parallel = len(set(self.devices.values())) > 1      # CFG-parallel: graphs on two GPUs
        self._pool = None
        if self.parallel:
            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ort-cfg")

    def _plan(self, wanted: bool | None, library: str | None, precision: str) -> list[tuple[str, str, Any]]:
        """The graphs to try, best first, as (variant, precision, library path or None); one warning when the
        library cannot serve these GPUs and graphs that need it were asked for or would be the default."""
        base, m = self.graph_variant, self.manifest
        fused_ok = wanted is not False and not (wanted is None and kernels.switched_off())
        fused, fused_w8a8 = m.fused_variant(base), m.fused_variant(kernels.W8A8_VARIANT)
        if wanted and (fused_w8a8 if precision == "w8a8" else fused) is None:
            raise BackendUnavailable(f"{m.path} has no fused CUDA graphs{' for precision w8a8' if precision == 'w8a8' else ''}"
                                     " (exported before they existed): re-run `make export`")
        lib, problem = None, None
        if precision == "w8a8" or (fused_ok and fused is not None):
            try:
                lib = kernels.check(library, self.devices.values())
            except kernels.KernelsUnavailable as e:
                if wanted:
                    raise BackendUnavailable(str(e)) from None
                problem = str(e)
        plan = []
        if lib is not None:
            if precision == "w8a8":
                plan += [(fused_w8a8, "w8a8", lib)] if fused_ok and fused_w8a8 else []
                plan += [] if wanted else [(kernels.W8A8_VARIANT, "w8a8", lib)]
            if fused_ok and fused is not None:
                plan.append((fused, "faithful", lib))
        if problem is not None:
            _warn(f"fused CUDA kernels off: {problem}; running the stock CUDA graphs" if precision == "faithful" else
                  f"precision w8a8 is unavailable here: {problem}; running the faithful stock CUDA graphs")
        return plan if wanted else plan + [(base, "faithful", None)]

    def _sessions(self, names) -> dict:
        """One session per component, each component's files hashed (before_load) before its graph is parsed:
        the variant is final here. See parallel_load."""
        self._runners = {}
        check = self._before_load or (lambda variant, components: None)
        # options made here, in this thread: registering the op library is not thread-safe the first time
        opts = {c: self._options(self._shared_arena and c not in self._graph_components) for c in names}
        if not self._parallel_load:
            check(self.graph_variant, None)
            return {c: self._component_session(c, opts[c]) for c in names}

        def load(c: str):
            check(self.graph_variant, (c,))
            return self._component_session(c, opts[c])

        with ThreadPoolExecutor(max_workers=len(names), thread_name_prefix="ort-load") as pool:
            futures = {c: pool.submit(load, c) for c in names}
        failed = [f.exception() for f in futures.values() if f.exception() is not None]
        if failed:
            raise failed[0]
        return {c: f.result() for c, f in futures.items()}

    def _component_session(self, c: str, opts):
        path, dev = self.manifest.graph_path(c, self.graph_variant), self.devices[c]
        if c not in self._graph_components:
            return self._session(path, dev, opts=opts)

        def make(graph: bool):      # captured: its own arena (cuda_graphs.py); the plain fallback: the shared one
            return self._session(path, dev, cuda_graph=graph, opts=opts if graph else self._options(self._shared_arena))
        runner = GraphRunner(self.ort, c, dev, make, lambda sess, inputs: self._run(c, sess, inputs))
        self._runners[c] = runner
        return runner.session

    def _options(self, shared_arena: bool):
        opts = self.ort.SessionOptions()
        if getattr(self, "kernels_library", None):
            opts.register_custom_ops_library(str(self.kernels_library))
        if self._threads:
            opts.intra_op_num_threads = self._threads
        opts.log_severity_level = 3
        if self.device != "cuda":       # the CPU twin's DequantizeLinear of every e4m3 weight would fold to fp32
            opts.add_session_config_entry("optimization.disable_specified_optimizers", "ConstantFolding")
        else:   # the memory pattern adds a block per session on the second run, at no speed (tuning §14)
            opts.enable_mem_pattern = False
        if shared_arena:
            opts.add_session_config_entry("session.use_env_allocators", "1")
        return opts

    def _session(self, path, device_id: int, arena: str | None = None, opts=None, cuda_graph: bool = False):
        ort = self.ort
        cuda_opts = {"device_id": device_id, "cudnn_conv_algo_search": "HEURISTIC",
                     **({"enable_cuda_graph": "1"} if cuda_graph else {})}
        if arena or self._arena:
            cuda_opts["arena_extend_strategy"] = arena or self._arena
        providers = [(PROVIDER[self.device], cuda_opts)] if self.device == "cuda" else [PROVIDER[self.device]]
        try:
            sess = ort.InferenceSession(str(path), opts or self._opts, providers=providers)
        except Exception as e:  # noqa: BLE001 -- surface which graph failed and why
            hint = (f"; the cuda graphs need onnxruntime-gpu >= 1.31 for {FP8_MATMUL} (or pass "
                    "dequantize_at_load=True)") if FP8_MATMUL in str(e) else ""
            raise BackendUnavailable(f"{self.name} cannot load {path.name}: {str(e).splitlines()[0]}{hint}") from None
        if self.device == "cuda" and sess.get_providers()[0] != PROVIDER[self.device]:
            raise BackendUnavailable(f"{path.name} did not get the CUDA provider")
        return sess

    def _bind_weights(self, component: str):
        """An IO binding of `component`'s session with every FP8 weight bound as its bf16 dequantization,
        computed on the component's device one weight at a time.

        Memory: the dequantization session's arena grows by exactly what is asked and is shrunk after every
        weight, so each bf16 weight sits in an allocation of its own size and the temporaries (the e4m3
        copy and the fp32 product, 5 bytes per parameter) are returned at once. The two earlier layouts —
        temporaries left in the weights' arena, and one buffer for all weights from onnxruntime's default
        power-of-two arena — held more in total (docs/tuning.md §8).
        The e4m3 copy is made when the host tensor is bound, so it is released and the arena shrunk by an empty
        run before the next weight; kept, its freed region took later bf16 weights and stayed pinned (an H100 ran
        out of memory; §16)."""
        ort, dq = self.ort, self.manifest.dequantize(component, self.graph_variant)
        dev = self.devices[component]
        graph = self.manifest.root / dq["graph"]["file"]
        expected = {i.name for i in self.sessions[component].get_inputs()}
        missing = [w["input"] for w in dq["weights"] if w["input"] not in expected]
        if missing:
            raise BackendUnavailable(f"{graph.name} weights {missing[:3]} are not inputs of the "
                                     f"{component} {self.graph_variant} graph; re-run `make export`")
        for w in dq["weights"]:
            kinds = (w["weight"]["dtype"], w["scale"]["dtype"], w["axis"])
            if kinds != ("float8e4m3fn", "bfloat16", 0):
                raise BackendUnavailable(f"{component}: weight {w['input']} is (dtype, scale dtype, axis) = {kinds}; "
                                         f"{graph.name} takes ('float8e4m3fn', 'bfloat16', 0); re-run `make export`")
        sess = self._session(graph, dev, arena="kSameAsRequested", opts=self._options(shared_arena=False))
        self._keep.append(sess)                 # its allocator owns the weights' memory
        shrink, empty = shrinking_runs(ort, sess, self.device, dev)
        binding = self.sessions[component].io_binding()
        with open(self.manifest.data_path(component), "rb") as f:
            for w in dq["weights"]:
                run = sess.io_binding()
                for name, part in (("weight", w["weight"]), ("scale", w["scale"])):
                    run.bind_ortvalue_input(name, _read_tensor(f, part, ort))
                run.bind_output("dequantized", self.device, dev)
                try:
                    sess.run_with_iobinding(run, shrink)
                except Exception as e:  # noqa: BLE001 -- onnxruntime raises RuntimeError/Fail for an arena that cannot grow
                    if "Failed to allocate" not in str(e):
                        raise
                    raise MemoryError(self._out_of_memory(component, w["input"])) from None
                binding.bind_ortvalue_input(w["input"], run.get_outputs()[0])
                run.clear_binding_inputs()      # frees the device copy of the e4m3 bytes made when they were bound
                sess.run_with_iobinding(empty, shrink)      # ... and gives its region back before the next weight
        return binding

    def _out_of_memory(self, component: str, weight: str) -> str:
        """Why `dequantize_at_load` stopped, with what it needs on the device, so the user can choose."""
        dev = self.devices[component]
        on_dev = [c for c, d in self.devices.items() if d == dev and self.manifest.dequantize(c) is not None]
        need = sum(2 * int(np.prod(w["weight"]["shape"], dtype=np.int64))
                   for c in on_dev for w in self.manifest.dequantize(c, self.graph_variant)["weights"])
        return (f"dequantize_at_load: {self.device}:{dev} is out of memory at {component} weight {weight}. This mode "
                f"holds every FP8 weight of {', '.join(on_dev)} as bf16 on that device ({need / 2**30:.1f} GiB of "
                "weights alone; the full model at 1024² used 58.5 GiB of an H100, docs/tuning.md §16). Use the "
                "default (FP8 weights resident: 32.5 GiB there) or put dit_uncond on a second GPU with "
                "uncond_device_id")

    def upload(self, array: np.ndarray, *, component: str | None = None) -> Any:
        """To the device of `component` (default: the main device)."""
        dev = self.devices.get(component, self.device_id)
        return self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, dev)

    def download(self, value: Any) -> np.ndarray:
        return value.numpy() if hasattr(value, "numpy") else np.asarray(value)

    def _on(self, value: Any, component: str) -> Any:
        """`value` as an OrtValue on `component`'s device; crossing GPUs goes through the host (a few MB of
        latents and velocities per step)."""
        if not isinstance(value, self.ort.OrtValue):
            return self.upload(value, component=component)
        if self.parallel and value.device_name() == "cuda":
            dev = self.devices.get(component, self.device_id)
            if value._ortvalue.__dlpack_device__()[1] != dev:     # (DLPack device type, device id)
                return self.upload(value.numpy(), component=component)
        return value

    def run(self, component: str, inputs: dict[str, Any]) -> dict[str, Any]:
        runner = self._runners.get(component)
        if runner is not None:
            out = runner.run({k: self._on(v, component) for k, v in inputs.items()})
            self.sessions[component] = runner.session        # a new one after a failed capture
            return out
        return self._run(component, self.sessions[component], inputs)

    def _run(self, component: str, sess, inputs: dict[str, Any]) -> dict[str, Any]:
        dev = self.devices.get(component, self.device_id)
        binding = self._weights.get(component) or sess.io_binding()
        binding.clear_binding_outputs()        # a kept binding would otherwise write into the last outputs
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, self._on(value, component))
        for name in self._outputs[component]:
            binding.bind_output(name, self.device, dev)
        sess.run_with_iobinding(binding)
        return dict(zip(self._outputs[component], binding.get_outputs()))

    def run_concurrently(self, calls: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        """Several independent graphs; on different GPUs they run at the same time (onnxruntime releases
        the GIL while it runs), otherwise one after the other."""
        if not self.parallel:
            return [self.run(c, i) for c, i in calls]
        futures = [self._pool.submit(self.run, c, i) for c, i in calls]
        return [f.result() for f in futures]


class FusedKernelsOff(RuntimeWarning):
    """The op library's graphs (fused, W8A8) could not be used; the message says why and what runs instead."""


def _warn(message: str) -> None:
    warnings.warn(message, FusedKernelsOff, stacklevel=4)


_SHARED_ARENAS: set[tuple[str, int]] = set()     # (provider device, device id) registered in this process
_STRATEGY = {"kNextPowerOfTwo": 0, "kSameAsRequested": 1}


def _register_shared_arena(ort, device: str, device_id: int, strategy: str) -> None:
    """One arena per device in onnxruntime's environment, used by sessions with session.use_env_allocators.
    Registered once per process: the first configuration stays."""
    if (device, device_id) in _SHARED_ARENAS:
        return
    cfg = ort.OrtArenaCfg(0, _STRATEGY[strategy], -1, -1)      # max_mem 0 = no limit; -1: onnxruntime's defaults
    kind = "Cuda" if device == "cuda" else "Cpu"
    info = ort.OrtMemoryInfo(kind, ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, device_id, ort.OrtMemType.DEFAULT)
    if device == "cuda":
        ort.create_and_register_allocator_v2(PROVIDER[device], info, {"device_id": str(device_id)}, cfg)
    else:
        ort.create_and_register_allocator(info, cfg)
    _SHARED_ARENAS.add((device, device_id))


_ONNX_TYPES = {"float8e4m3fn": (np.uint8, 17), "bfloat16": (np.uint16, 16)}      # numpy carrier, onnx type


def shrinking_runs(ort, sess, device: str, device_id: int) -> tuple[Any, Any]:
    """For the `dequantize` session: run options that shrink its arena after a run, and a binding of a 1×1
    weight whose run does nothing else (it returns freed regions between two weights)."""
    shrink = ort.RunOptions()
    shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage",
                                f"{'gpu' if device == 'cuda' else 'cpu'}:{device_id}")
    empty = sess.io_binding()
    for name, dtype, shape in (("weight", "float8e4m3fn", (1, 1)), ("scale", "bfloat16", (1,))):
        np_type, onnx_type = _ONNX_TYPES[dtype]
        empty.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy_with_onnx_type(np.zeros(shape, np_type), onnx_type))
    empty.bind_output("dequantized", device, device_id)
    return shrink, empty


def _read_tensor(f, loc: dict, ort) -> Any:
    """One tensor of the weight file as a host OrtValue (dtypes numpy lacks are carried by their bits)."""
    np_type, onnx_type = _ONNX_TYPES[loc["dtype"]]
    buf = bytearray(loc["bytes"])
    f.seek(loc["offset"])
    raw = np.frombuffer(buf[:f.readinto(buf)], np_type)
    if raw.size != int(np.prod(loc["shape"], dtype=np.int64)):
        raise BackendUnavailable(f"weight file {f.name}: {loc} is truncated or does not match its shape")
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(raw.reshape(loc["shape"]), onnx_type)
