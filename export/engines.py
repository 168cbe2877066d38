"""`make engines`: the exported canonical graphs (`<c>.onnx`) → TensorRT / TensorRT-RTX engines, one per component,
plus the manifest's `engines` section and a layer report per engine.

One build path serves both builders: `tensorrt` (full TensorRT; builds only where an NVIDIA GPU is present) and
`tensorrt_rtx` (TensorRT for RTX; builds ahead of time on the CPU). Their Python APIs are the same family; the
few differences live in `Toolkit` (target compute capabilities exist only in RTX, the timing cache only matters
in full TensorRT, where an engine may run is decided differently).

Per component: a strongly typed network parsed from the graph's file path (so the external `.onnx.data` weights
are read by the parser, FP8 initializers stay FP8), one optimization profile per distinct image shape of the
resolution buckets (the DiTs depend only on the token count, the VAE on the token grid; the text encoder has one
profile over the text-length range), a text-length range for the text encoder and dit_cond, and a batch range.
One engine file per component holds all of its profiles: the weights are stored once (measured: a profile adds
only its compiled code), whereas one engine per bucket would repeat the 8 GB of DiT weights per bucket.

Inspection: the engine inspector (`IEngineInspector`) needs a deserialized `ICudaEngine`, i.e. a CUDA driver and
a GPU the engine supports. Where that is missing (always for TensorRT-RTX on this project's machines: CPU-only
builders, Hopper GPUs), the builder's own verbose log is the source: with `ProfilingVerbosity.DETAILED` it prints
the engine's final layer list (name, kernel type, inputs/constants/outputs with dtypes, tactic, and the ONNX
nodes each layer implements) plus the weight and activation memory totals. That is parsed into
`<c>.layers.json` beside the engine, and the checks (FP8 weights kept; attention fused into one kernel per block)
read that file. Nothing here executes an engine.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib
import json
import os
import re
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from ..runtime.packing import MAX_ASPECT, MAX_SIDE, MIN_SIDE, PIXELS_PER_TOKEN
from .files import sha256_file as _sha256_file

ENGINES_FORMAT_VERSION = 1
BUILDERS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}   # --builder name -> Python module
BUILDER_ORDER = ("tensorrt", "tensorrt-rtx")                           # tried in this order when not chosen
ENGINE_COMPONENTS = ("text_encoder", "dit_cond", "dit_uncond", "vae_decoder", "guided_step")
# The official resolution table (spec §7, W x H) plus 512² and 768².
DEFAULT_BUCKETS = "1024x1024,1536x1024,1024x1536,1920x1088,2048x768,1024x1792,1600x400,512x512,768x768"
DEFAULT_OPT_TEXT_TOKENS = 512
# Compute capabilities a TensorRT-RTX engine targets when none are given (TensorRT-RTX documentation, "CPU-only
# AOT and TensorRT-RTX engines": 8.0, 8.6, 8.9, 12.0 "and later"); the builder drops those an engine's data types
# cannot run on (FP8 needs 8.9+) and says so in its log.
RTX_DEFAULT_TARGETS = ("8.0", "8.6", "8.9", "12.0")
SCHEMA = Path(__file__).with_name("manifest.schema.json")
LAYERS_SUFFIX = ".layers.json"
LAYERS_FORMAT = "ideogram4-engine/engine-layers"
FP8_WEIGHT_BOUND = 1.10       # engine weight bytes / graph initializer bytes
ATTENTION_KERNEL = re.compile(r"mha|fmha|flash|attention", re.IGNORECASE)

IMAGE_SYMBOLS = ("image_tokens", "grid_h", "grid_w")
INSTALL_HINT = ("install one: TensorRT-RTX (`pip install tensorrt-rtx==1.7.1.116`, or `pip install -e '.[trt-rtx]'`; "
                "builds on the CPU, engines run on RTX-class GPUs of compute capability 7.5/8.x/12.x) or full "
                "TensorRT (`pip install tensorrt`; needs an NVIDIA GPU to build, engines run on that GPU's "
                "architecture)")


class EngineBuildError(ValueError):
    """A refusal or a failed build; the message says what and why."""


# ---------------------------------------------------------------------------------------------- buckets

@dataclass(frozen=True, order=True)
class Bucket:
    width: int
    height: int

    @property
    def label(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def grid(self) -> tuple[int, int]:
        return self.height // PIXELS_PER_TOKEN, self.width // PIXELS_PER_TOKEN

    @property
    def tokens(self) -> int:
        gh, gw = self.grid
        return gh * gw


BUCKET_RULE = (f"WIDTHxHEIGHT in pixels, each a multiple of {PIXELS_PER_TOKEN} in {MIN_SIDE}…{MAX_SIDE}, "
               f"aspect ratio at most {MAX_ASPECT:g}:1")


def parse_bucket(text: str) -> Bucket:
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not m:
        raise EngineBuildError(f"bucket {text!r} is not WIDTHxHEIGHT; expected {BUCKET_RULE}, e.g. 1024x1024")
    w, h = int(m.group(1)), int(m.group(2))
    for name, v in (("width", w), ("height", h)):
        if v % PIXELS_PER_TOKEN or not MIN_SIDE <= v <= MAX_SIDE:
            raise EngineBuildError(f"bucket {text.strip()!r}: {name} {v} is not a multiple of {PIXELS_PER_TOKEN} in "
                                   f"{MIN_SIDE}…{MAX_SIDE} (buckets are {BUCKET_RULE})")
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise EngineBuildError(f"bucket {text.strip()!r}: aspect ratio {max(w, h) / min(w, h):.2f}:1 exceeds "
                               f"{MAX_ASPECT:g}:1 (buckets are {BUCKET_RULE})")
    return Bucket(w, h)


def parse_buckets(text: str | Iterable[str]) -> tuple[Bucket, ...]:
    """'1024x1024,512x512' (W x H, like the spec's resolution table) → buckets, duplicates dropped, order kept."""
    items = text.split(",") if isinstance(text, str) else list(text)
    items = [s for s in items if s.strip()]
    if not items:
        raise EngineBuildError(f"no buckets given; expected a comma-separated list of {BUCKET_RULE}")
    out: dict[Bucket, None] = {}
    for s in items:
        out[parse_bucket(s)] = None
    return tuple(out)


# ---------------------------------------------------------------------------------------------- options

@dataclass(frozen=True)
class BuildOptions:
    buckets: tuple[Bucket, ...] = field(default_factory=lambda: parse_buckets(DEFAULT_BUCKETS))
    max_batch: int = 1
    max_text_tokens: int | None = None            # None: the manifest's limit (2048)
    opt_text_tokens: int = DEFAULT_OPT_TEXT_TOKENS
    compute_capabilities: tuple[str, ...] | None = None   # TensorRT-RTX only; None: the builder's default
    timing_cache: Path | None = None               # full TensorRT only; None: ~/.cache/ideogram4-engine/...
    optimization_level: int | None = None          # builder_optimization_level; None: the builder's default (3)
    components: tuple[str, ...] | None = None      # None: every component with a graph
    force: bool = False                            # rebuild even if an up-to-date engine exists


def _ranges(opts: BuildOptions, limit: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    if not isinstance(opts.max_batch, int) or opts.max_batch < 1:
        raise EngineBuildError(f"max batch {opts.max_batch!r} must be an integer >= 1")
    max_text = limit if opts.max_text_tokens is None else opts.max_text_tokens
    if not isinstance(max_text, int) or not 1 <= max_text <= limit:
        raise EngineBuildError(f"max text tokens {max_text!r} must be an integer in 1…{limit} (the manifest's limit)")
    if not isinstance(opts.opt_text_tokens, int) or opts.opt_text_tokens < 1:
        raise EngineBuildError(f"opt text tokens {opts.opt_text_tokens!r} must be an integer >= 1")
    return (1, 1, opts.max_batch), (1, min(opts.opt_text_tokens, max_text), max_text)


# ---------------------------------------------------------------------------------------------- profiles

def _dim(d, sym: dict[str, tuple[int, int, int]], where: str) -> tuple[int, int, int]:
    if isinstance(d, int):
        return d, d, d
    if d == "sequence":          # dit_cond: [text tokens; image tokens]
        t, n = sym["text_tokens"], sym["image_tokens"]
        return t[0] + n[0], t[1] + n[1], t[2] + n[2]
    if d not in sym:
        raise EngineBuildError(f"{where}: dimension {d!r} has no rule in the engine builder "
                               f"(known: {', '.join([*sym, 'sequence'])}); is the manifest from a newer exporter?")
    return sym[d]


def component_profiles(component: str, inputs: list[dict], buckets: tuple[Bucket, ...],
                       batch: tuple[int, int, int], text: tuple[int, int, int]) -> list[dict]:
    """Optimization profiles of one component from its manifest inputs' symbolic shapes. A component whose shapes
    depend on the image gets one profile per distinct image shape (buckets with equal token counts share a DiT
    profile; the VAE distinguishes orientations); others get one profile. Each profile lists the buckets it
    serves and, per input, min/opt/max shapes."""
    uses_image = any(d in IMAGE_SYMBOLS or d == "sequence" for io in inputs for d in io["shape"])
    profiles: dict[str, dict] = {}
    for bucket in buckets if uses_image else (None,):
        sym = {"batch": batch, "text_tokens": text}
        if bucket is not None:
            gh, gw = bucket.grid
            sym.update(image_tokens=(bucket.tokens,) * 3, grid_h=(gh,) * 3, grid_w=(gw,) * 3)
        shapes = {}
        for io in inputs:
            dims = [_dim(d, sym, f"{component}.{io['name']}") for d in io["shape"]]
            shapes[io["name"]] = {k: [d[i] for d in dims] for i, k in enumerate(("min", "opt", "max"))}
        key = json.dumps(shapes, sort_keys=True)
        prof = profiles.setdefault(key, {"buckets": [], "shapes": shapes})
        if bucket is not None:
            prof["buckets"].append(bucket.label)
    return list(profiles.values())


# ---------------------------------------------------------------------------------------------- toolkit

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

    def effective_targets(self, requested: dict, log: "CapturedLog") -> dict:
        if not self.rtx:
            cc = _build_gpu_capability()
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

    # -- timing cache
    def attach_timing_cache(self, config, path: Path | None, say: Callable[[str], None]):
        if self.rtx:
            if path is not None:
                say("note: --timing-cache ignored: TensorRT-RTX's timing cache does not affect its engines and forces "
                    "a GPU query during the CPU-only build (TensorRT-RTX documentation, 'Timing Cache Migration'); "
                    "its runtime cache (JIT kernels) is used by the runtime backend instead")
            return None
        path = path or Path.home() / ".cache" / "ideogram4-engine" / f"tensorrt-{self.version}.timing-cache"
        blob = path.read_bytes() if path.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
        return path

    def save_timing_cache(self, config, path: Path | None) -> None:
        if path is None:
            return
        cache = config.get_timing_cache()
        if cache is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(path, memoryview(cache.serialize()))


def cuda_devices() -> tuple[list[str], str]:
    """Compute capabilities of the visible CUDA GPUs through the driver library (ctypes: no torch, no cuda-bindings
    needed on the build side), and why there are none."""
    import ctypes
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        return [], f"no CUDA driver here (libcuda.so.1: {e})"
    if (rc := lib.cuInit(0)) != 0:
        return [], f"cuInit failed (CUresult {rc})"
    n = ctypes.c_int(0)
    if (rc := lib.cuDeviceGetCount(ctypes.byref(n))) != 0 or n.value == 0:
        return [], f"no CUDA GPU visible (CUresult {rc}, {n.value} devices)"
    out = []
    for i in range(n.value):
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        lib.cuDeviceGetAttribute(ctypes.byref(major), 75, i)      # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
        lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, i)      # ..._MINOR
        out.append(f"{major.value}.{minor.value}")
    return out, ""


def _build_gpu_capability() -> str | None:
    ccs, _ = cuda_devices()
    return ccs[0] if ccs else None


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


# ---------------------------------------------------------------------------------------------- logger

class CapturedLog:
    """An ILogger that keeps what the build records need (the verbose layer list and memory totals, warnings,
    errors) and forwards warnings and errors to `say`."""

    KEEP = ("Layers:", "Total Weights Memory", "Total Activation Memory", "Max Scratch Memory",
            "will not be able to run on target", "Engine generation completed", "After Myelin optimization",
            "Engine Layer Information")

    def __init__(self, trt, say: Callable[[str], None], verbose: bool = False):
        outer = self

        class _Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)

            def log(self, severity, msg):
                outer._log(int(severity), msg)

        self.trt = trt
        self.logger = _Logger()
        self.say, self.verbose = say, verbose
        self.kept: list[tuple[int, str]] = []
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self._warning = int(trt.ILogger.WARNING)
        self._error = int(trt.ILogger.ERROR)
        self.muted = False          # while probing for a GPU (engine inspector): expected errors are not echoed

    def _log(self, severity: int, msg: str) -> None:
        if severity <= self._error:
            self.errors.append(msg)
            if not self.muted:
                self.say(f"  [TensorRT error] {msg}")
        elif severity <= self._warning:
            self.warnings.append(msg)
            if self.verbose:
                self.say(f"  [TensorRT warning] {msg}")
        if any(k in msg for k in self.KEEP):
            self.kept.append((severity, msg))
        elif self.verbose and severity > self._warning:
            self.say(f"  [TensorRT] {msg[:300]}")

    def find(self, key: str) -> str | None:
        for _, m in self.kept:
            if key in m:
                return m
        return None

    def number(self, key: str) -> int | None:
        m = self.find(key)
        hit = re.search(re.escape(key) + r":\s*(\d+)", m or "")
        return int(hit.group(1)) if hit else None

    def removed_targets(self) -> list[str]:
        out: list[str] = []
        for _, m in self.kept:
            hit = re.search(r"will not be able to run on target\(s\):\s*([^,]*(?:,\s*sm\d+)*)", m)
            if hit:
                for sm in re.findall(r"sm(\d+)", hit.group(1)):
                    cc = f"{sm[:-1]}.{sm[-1]}"
                    if cc not in out:
                        out.append(cc)
        return out

    def removed_reason(self) -> str:
        m = self.find("will not be able to run on target") or ""
        hit = re.search(r"because (.*?)\.?$", m.strip())
        return hit.group(1) if hit else "see the builder log"

    def layer_dump(self) -> str | None:
        return self.find("Layers:")


# ---------------------------------------------------------------------------------------------- layer reports

_DTYPE_BYTES = {"FP8": 1.0, "Int8": 1.0, "UInt8": 1.0, "Bool": 1.0, "BFloat16": 2.0, "Half": 2.0, "Float": 4.0,
                "Int32": 4.0, "Int64": 8.0, "FP4": 0.5, "Int4": 0.5, "E8M0": 1.0}


def _split_tensors(text: str) -> list[dict]:
    out = []
    for body in re.findall(r"\{(.*?)\}", text):
        name = re.search(r"Name:\s*([^,]+)", body)
        dims = re.search(r"Dimensions:\s*\[([^\]]*)\]", body)
        dtype = re.search(r"Datatype:\s*(\w+)", body)
        shape = [int(x) for x in dims.group(1).split(",") if x.strip()] if dims else []
        out.append({"name": name.group(1).strip() if name else "", "shape": shape,
                    "dtype": dtype.group(1) if dtype else ""})
    return out


def parse_layer_dump(text: str) -> list[dict]:
    """The builder's verbose 'Layers:' message (ProfilingVerbosity.DETAILED) → one dict per engine layer:
    name, type, tactic, inputs/constants/outputs ({name, shape, dtype}), metadata (the ONNX nodes it implements).
    Lines that do not follow the format are kept verbatim under `raw`."""
    layers = []
    for line in text.splitlines():
        if not line.startswith("Name: "):
            continue
        try:
            name = line[len("Name: "):line.index(", LayerType: ")]
            rest = line[line.index(", LayerType: ") + len(", LayerType: "):]
            ltype = rest[:rest.index(",")]
            ins = rest[rest.index("Inputs: [") + 9:rest.index("], Constants: [")]
            consts = rest[rest.index("], Constants: [") + 15:rest.index("], Outputs: [")]
            outs = rest[rest.index("], Outputs: [") + 13:rest.index("], TacticName: ")]
            tail = rest[rest.index("], TacticName: ") + 15:]
            tactic = tail[:tail.index(",")] if "," in tail else tail
            meta = re.findall(r"\[ONNX Layer: ([^\]]+)\]", tail)
            layers.append({"name": name, "type": ltype, "tactic": tactic.strip(), "inputs": _split_tensors(ins),
                           "constants": _split_tensors(consts), "outputs": _split_tensors(outs), "metadata": meta})
        except ValueError:
            layers.append({"raw": line})
    return layers


def inspector_layers(info_json: str) -> list[dict]:
    """IEngineInspector JSON (DETAILED) → the same per-layer dicts as `parse_layer_dump` (best effort: field names
    of the inspector's JSON)."""
    data = json.loads(info_json)
    out = []
    for layer in data.get("Layers", []):
        if isinstance(layer, str):
            out.append({"name": layer, "type": "", "tactic": "", "inputs": [], "constants": [], "outputs": [],
                        "metadata": []})
            continue
        meta = layer.get("Metadata", "")
        tensors = lambda key: [{"name": t.get("Name", ""), "shape": t.get("Dimensions", []),  # noqa: E731
                                "dtype": str(t.get("Format/Datatype", t.get("Datatype", "")))}
                               for t in layer.get(key, []) if isinstance(t, dict)]
        out.append({"name": layer.get("Name", ""), "type": layer.get("LayerType", ""),
                    "tactic": str(layer.get("TacticName", layer.get("TacticValue", ""))),
                    "inputs": tensors("Inputs"), "constants": tensors("Constants"), "outputs": tensors("Outputs"),
                    "metadata": re.findall(r"\[ONNX Layer: ([^\]]+)\]", meta) if isinstance(meta, str) else []})
    return out


def graph_facts(graph_path: Path) -> dict:
    """What the checks compare an engine with, read from the ONNX graph alone (no weights loaded): initializer
    bytes by dtype and the attention blocks (each `Attention` node, or each softmax between two MatMuls)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(graph_path), load_external_data=False)
    g = model.graph
    by_dtype: dict[str, int] = {}
    fp8_count = 0
    for init in g.initializer:
        n = 1
        for d in init.dims:
            n *= d
        size = n * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize \
            if init.data_type not in (TensorProto.BFLOAT16, TensorProto.FLOAT8E4M3FN) else \
            n * (2 if init.data_type == TensorProto.BFLOAT16 else 1)
        key = TensorProto.DataType.Name(init.data_type)
        by_dtype[key] = by_dtype.get(key, 0) + size
        fp8_count += init.data_type == TensorProto.FLOAT8E4M3FN
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def walk(start, step, depth=5):
        frontier, seen = [start], set()
        for _ in range(depth):
            nxt = []
            for node in frontier:
                for m in step(node):
                    if m.name in seen:
                        continue
                    seen.add(m.name)
                    if m.op_type == "MatMul":
                        return m
                    nxt.append(m)
            frontier = nxt
        return None

    up = lambda node: [producer[i] for i in node.input if i in producer]  # noqa: E731
    down = lambda node: [m for o in node.output for m in consumers.get(o, [])]  # noqa: E731
    groups = []
    for n in g.node:
        if n.op_type == "Attention":
            groups.append({"form": "op", "anchor": n.name, "core": [n.name]})
        elif n.op_type in ("Softmax", "Exp"):
            qk, pv = walk(n, up), walk(n, down)
            if qk is not None and pv is not None:
                groups.append({"form": "matmul", "anchor": n.name, "core": [qk.name, n.name, pv.name]})
    total = sum(by_dtype.values())
    return {"graph": graph_path.name, "initializer_bytes": total, "initializer_bytes_by_dtype": by_dtype,
            "fp8_initializers": fp8_count, "fp8_initializer_bytes": by_dtype.get("FLOAT8E4M3FN", 0),
            "attention_blocks": groups}


def layer_profile(layer: dict) -> int:
    """Which optimization profile a layer belongs to: each profile is compiled into its own region, whose layer
    names end in `_myl<profile>_<index>` (TensorRT-RTX 1.7); 0 when the name does not say."""
    hit = re.search(r"_myl(\d+)_\d+$", layer.get("name", ""))
    return int(hit.group(1)) if hit else 0


def run_checks(report: dict) -> dict:
    """The checks, computed from a layer report (`<c>.layers.json`) alone. Each optimization profile is compiled
    into its own set of layers; every check must hold in every profile.

    fp8_weights: the engine's weight memory (the builder's 'Total Weights Memory', weights stored once for all
    profiles) is at most 1.1x the graph's initializer bytes, and in each profile the FP8 constants of the layer
    list add up to the graph's FP8 initializer bytes (FP8 weights were neither expanded to bf16 nor dropped).
    The engine file's size is reported beside it: on tiny graphs the compiled code is a large fixed share.
    attention: every attention block of the graph (an ONNX Attention node, or MatMul→softmax→MatMul) is computed,
    in each profile, by exactly one fused attention kernel (a layer whose name or tactic is an MHA/flash kernel
    and that implements all of the block's core nodes). Layers that only move the block's inputs or outputs
    are allowed beside it."""
    graph, summary, layers = report["graph"], report["summary"], report["layers"]
    parsed = [la for la in layers if "raw" not in la]
    by_profile: dict[int, list[dict]] = {}
    for la in parsed:
        by_profile.setdefault(layer_profile(la), []).append(la)
    checks: dict[str, dict] = {}
    init = graph["initializer_bytes"]
    weights = summary.get("weights_memory_bytes")
    fp8_per_profile = {}
    for prof, lays in sorted(by_profile.items()):
        seen, total = set(), 0.0
        for la in lays:
            for c in la["constants"]:
                if c["dtype"] != "FP8" or c["name"] in seen:
                    continue
                seen.add(c["name"])
                n = 1
                for d in c["shape"]:
                    n *= max(d, 0)
                total += n * _DTYPE_BYTES["FP8"]
        fp8_per_profile[prof] = int(total)
    fp8_graph = graph["fp8_initializer_bytes"]
    engine_bytes = summary["engine_bytes"]
    fp8 = {"initializer_bytes": init, "fp8_initializer_bytes": fp8_graph, "engine_weights_bytes": weights,
           "engine_fp8_constant_bytes_per_profile": list(fp8_per_profile.values()), "engine_bytes": engine_bytes,
           "engine_bytes_ratio": round(engine_bytes / init, 4) if init else None,
           "weights_ratio": round(weights / init, 4) if weights and init else None,
           "bound": FP8_WEIGHT_BOUND, "profiles": len(by_profile)}
    if not init:
        fp8.update(status="n/a", detail="the graph has no weights")
    elif weights is None or not parsed:
        fp8.update(status="unverified", detail="the layer report has no weight total / layer list")
    else:
        ok_total = weights <= FP8_WEIGHT_BOUND * init
        ok_fp8 = all(abs(v - fp8_graph) <= 0.01 * fp8_graph for v in fp8_per_profile.values())
        fp8["status"] = "pass" if ok_total and ok_fp8 else "fail"
        per = sorted(set(fp8_per_profile.values()))
        fp8["detail"] = (f"engine weights {weights} B = {weights / init:.3f}x the graph's initializers "
                         f"(bound {FP8_WEIGHT_BOUND}x); FP8 constants per profile {'/'.join(map(str, per))} B vs "
                         f"FP8 initializers {fp8_graph} B ({len(by_profile)} profile(s)); engine file {engine_bytes} B "
                         f"= {engine_bytes / init:.2f}x the initializers (includes the compiled code of every profile)")
    checks["fp8_weights"] = fp8

    blocks = graph["attention_blocks"]
    results = []
    for b in blocks:
        core = set(b["core"])
        per_profile = {}
        for prof, lays in sorted(by_profile.items()):
            touching = [la for la in lays if core & set(la["metadata"])]
            kernels = [la for la in touching if ATTENTION_KERNEL.search(la["name"] + " " + la["tactic"])
                       and core <= set(la["metadata"])]
            per_profile[prof] = {"fused": len(kernels) == 1, "kernel": kernels[0]["name"] if len(kernels) == 1 else None,
                                 "layers": [la["name"] for la in touching]}
        fused = bool(per_profile) and all(r["fused"] for r in per_profile.values())
        first = per_profile.get(min(per_profile)) if per_profile else {"kernel": None, "layers": []}
        results.append({"block": b["anchor"], "form": b["form"], "fused": fused, "kernel": first["kernel"],
                        "layers": first["layers"],
                        "fused_profiles": sum(r["fused"] for r in per_profile.values()),
                        "profiles": len(per_profile)})
    att = {"blocks": len(blocks), "fused": sum(r["fused"] for r in results), "per_block": results}
    if not blocks:
        att.update(status="n/a", detail="the graph has no attention block")
    elif not parsed:
        att.update(status="unverified", detail="the layer report has no layer list")
    elif all(r["fused"] for r in results):
        att.update(status="pass", detail=f"{len(blocks)} attention block(s), each one fused kernel "
                                         f"({results[0]['kernel']}, …) in each of {len(by_profile)} profile(s)")
    else:
        unfused = [r for r in results if not r["fused"]]
        att.update(status="fail", detail="; ".join(
            f"{r['block']} is one fused kernel in {r['fused_profiles']} of {r['profiles']} profile(s); profile 0 "
            f"computes it with {len(r['layers'])} layer(s): {', '.join(r['layers'][:6])}" for r in unfused))
    checks["attention"] = att
    return checks


def layer_report(component: str, engine_path: Path, engine_sha: str, engine_bytes: int, facts: dict,
                 log: CapturedLog, inspected: tuple[str, list[dict]] | None, inspector_gap: str,
                 toolkit: Toolkit) -> dict:
    if inspected is not None:
        source, layers = inspected
        note = "IEngineInspector.get_engine_information(JSON) on the deserialized engine"
    else:
        dump = log.layer_dump()
        layers = parse_layer_dump(dump) if dump else []
        source = "builder-log" if dump else "none"
        note = ("the builder's verbose 'Layers:' message (ProfilingVerbosity.DETAILED): the engine's final layer "
                "list as compiled; the engine inspector could not run here: " + inspector_gap)
    types: dict[str, int] = {}
    for la in layers:
        types[la.get("type", "raw")] = types.get(la.get("type", "raw"), 0) + 1
    report = {
        "format": LAYERS_FORMAT, "version": ENGINES_FORMAT_VERSION, "component": component,
        "engine": {"file": engine_path.name, "sha256": engine_sha, "bytes": engine_bytes},
        "builder": toolkit.record(), "source": source, "source_note": note,
        "summary": {"engine_bytes": engine_bytes, "layers": len(layers), "layer_types": types,
                    "weights_memory_bytes": log.number("Total Weights Memory"),
                    "activation_memory_bytes": log.number("Total Activation Memory"),
                    "myelin": (log.find("After Myelin optimization") or "").strip() or None},
        "graph": facts,
        "layers": layers,
    }
    report["checks"] = run_checks(report)
    return report


def _inspect_engine(toolkit: Toolkit, blob, log: CapturedLog) -> tuple[tuple[str, list[dict]] | None, str]:
    """Try the real engine inspector; returns (layers or None, why not)."""
    trt = toolkit.trt
    n_err = len(log.errors)
    log.muted = True
    try:
        runtime = trt.Runtime(log.logger)
        engine = runtime.deserialize_cuda_engine(blob)
    except Exception as e:  # noqa: BLE001
        return None, f"deserialize_cuda_engine raised {type(e).__name__}: {e}"
    finally:
        log.muted = False
    if engine is None:
        why = "; ".join(m.splitlines()[0] for m in log.errors[n_err:]) or "no reason logged"
        del log.errors[n_err:]          # expected on a machine without a usable GPU: not a build error
        return None, f"deserialize_cuda_engine returned None ({why[:300]})"
    inspector = engine.create_engine_inspector()
    info = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    return ("engine-inspector", inspector_layers(info)), ""


# ---------------------------------------------------------------------------------------------- build

class _HashingWriter:
    """IStreamWriter that writes the engine to a file while hashing it (the engine is never held in memory)."""

    def __new__(cls, trt, f):
        class Writer(trt.IStreamWriter):
            def __init__(self):
                trt.IStreamWriter.__init__(self)
                self.f, self.sha, self.nbytes, self.error = f, hashlib.sha256(), 0, None

            def write(self, data, *_):
                try:
                    view = memoryview(data)
                    self.f.write(view)
                    self.sha.update(view)
                    self.nbytes += view.nbytes
                    return view.nbytes
                except Exception as e:  # noqa: BLE001 -- reported after the build returns
                    self.error = e
                    return 0
        return Writer()


def _atomic_write(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _source_fingerprint() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def _build_key(toolkit: Toolkit, comp: dict, profiles: list[dict], opts: BuildOptions) -> str:
    graph = comp["graphs"]["bf16"]
    blob = json.dumps({"format": ENGINES_FORMAT_VERSION, "source": _source_fingerprint(), "builder": toolkit.record(),
                       "graph": graph["sha256"], "data": (comp.get("data") or {}).get("sha256"),
                       "profiles": profiles, "targets": opts.compute_capabilities,
                       "optimization_level": opts.optimization_level}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def build_engine(toolkit: Toolkit, folder: Path, component: str, comp: dict, profiles: list[dict],
                 opts: BuildOptions, say: Callable[[str], None], verbose: bool = False) -> dict:
    """Build one component's engine from `<folder>/<c>.onnx`; writes `<c>.engine` and `<c>.layers.json`
    atomically and returns the manifest entry."""
    trt = toolkit.trt
    graph_path = folder / comp["graphs"]["bf16"]["file"]
    log = CapturedLog(trt, say, verbose)
    t0 = time.perf_counter()
    builder = trt.Builder(log.logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, log.logger)
    if not parser.parse_from_file(str(graph_path)):
        errs = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise EngineBuildError(f"{component}: {toolkit.name} {toolkit.version} cannot parse {graph_path.name}: {errs}")
    net_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    prof_inputs = set(profiles[0]["shapes"])
    if net_inputs != prof_inputs:
        raise EngineBuildError(f"{component}: the graph's inputs {sorted(net_inputs)} differ from the manifest's "
                               f"{sorted(prof_inputs)}; re-run `make export`")
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if opts.optimization_level is not None:
        config.builder_optimization_level = opts.optimization_level
    requested = toolkit.set_targets(config, opts.compute_capabilities)
    cache_path = toolkit.attach_timing_cache(config, opts.timing_cache, say)
    for prof in profiles:
        p = builder.create_optimization_profile()
        for name, s in prof["shapes"].items():
            p.set_shape(name, s["min"], s["opt"], s["max"])
        config.add_optimization_profile(p)
    engine_path = folder / f"{component}.engine"
    tmp = engine_path.with_name(f".{engine_path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(trt, f)
            if hasattr(builder, "build_serialized_network_to_stream"):     # no in-memory copy of the engine
                ok = builder.build_serialized_network_to_stream(network, config, writer)
            else:
                blob = builder.build_serialized_network(network, config)
                ok = blob is not None and writer.write(memoryview(blob)) >= 0
                del blob
            f.flush()
            os.fsync(f.fileno())
        build_s = time.perf_counter() - t0
        if not ok or writer.error is not None:
            errs = "; ".join(m.splitlines()[0] for m in log.errors) or str(writer.error or "no error logged")
            raise EngineBuildError(f"{component}: {toolkit.name} {toolkit.version} failed to build "
                                   f"{graph_path.name}: {errs}")
        os.replace(tmp, engine_path)
    finally:
        tmp.unlink(missing_ok=True)
    toolkit.save_timing_cache(config, cache_path)
    del parser, network, config, builder
    sha, nbytes = writer.sha.hexdigest(), writer.nbytes
    facts = graph_facts(graph_path)
    gpus, why_not = cuda_devices()
    if gpus:
        inspected, gap = _inspect_engine(toolkit, engine_path.read_bytes(), log)
    else:
        inspected, gap = None, why_not
    report = layer_report(component, engine_path, sha, nbytes, facts, log, inspected, gap, toolkit)
    targets = toolkit.effective_targets(requested, log)
    layers_path = folder / f"{component}{LAYERS_SUFFIX}"
    _atomic_write(layers_path, (json.dumps(report, indent=1) + "\n").encode())
    checks = report["checks"]
    entry = {
        "file": engine_path.name, "sha256": sha, "bytes": nbytes,
        "graph": {"file": graph_path.name, "sha256": comp["graphs"]["bf16"]["sha256"]},
        "builder": toolkit.record(), "targets": targets, "profiles": profiles,
        "build_seconds": round(build_s, 3),
        "peak_host_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "weights_bytes": report["summary"]["weights_memory_bytes"],
        "activation_bytes": report["summary"]["activation_memory_bytes"],
        "initializer_bytes": facts["initializer_bytes"],
        "inspection": {"file": layers_path.name, "sha256": _sha256_file(layers_path),
                       "bytes": layers_path.stat().st_size, "source": report["source"],
                       "checks": {k: v["status"] for k, v in checks.items()}},
        "build_key": _build_key(toolkit, comp, profiles, opts),
    }
    return entry


# ---------------------------------------------------------------------------------------------- manifest

def _load(folder: Path) -> dict:
    from ..runtime.manifest import ManifestError, load_manifest
    try:
        return load_manifest(folder).raw
    except ManifestError as e:
        raise EngineBuildError(f"{e} (engines are built from an export: run `make export` first)") from None


def validate(manifest: dict) -> None:
    import jsonschema
    try:
        jsonschema.validate(manifest, json.loads(SCHEMA.read_text()))
    except jsonschema.ValidationError as e:
        raise EngineBuildError(f"the manifest with the engines section fails its schema: {e.message} at "
                               f"{'/'.join(map(str, e.absolute_path))}") from None


def write_manifest(folder: Path, manifest: dict) -> None:
    validate(manifest)
    _atomic_write(folder / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())


def _reusable(folder: Path, old: dict | None, key: str) -> bool:
    if not old or old.get("build_key") != key:
        return False
    for entry in (old, old.get("inspection") or {}):
        p = folder / entry.get("file", "")
        if not p.is_file() or p.stat().st_size != entry.get("bytes") or _sha256_file(p) != entry.get("sha256"):
            return False
    return True


def build_engines(folder: Path | str, builder: str | None = None, opts: BuildOptions = BuildOptions(),
                  say: Callable[[str], None] = lambda s: print(s, file=sys.stderr), verbose: bool = False) -> dict:
    """Build the engines of an exported folder and record them in its manifest; returns the `engines` section.
    Refuses before building anything when the builder, the folder or the options are wrong."""
    folder = Path(folder).expanduser().absolute()
    toolkit = load_toolkit(builder)
    manifest = _load(folder)
    limit = int(manifest["limits"]["max_text_tokens"])
    batch, text = _ranges(opts, limit)
    if opts.compute_capabilities:
        if not toolkit.rtx:
            toolkit.set_targets(None, opts.compute_capabilities)      # raises the clear message
        for cc in opts.compute_capabilities:
            toolkit.compute_capability_enum(cc)
    available = [c for c in ENGINE_COMPONENTS if c in manifest["components"]]
    names = list(opts.components) if opts.components else available
    unknown = [c for c in names if c not in available]
    if unknown:
        raise EngineBuildError(f"component(s) {', '.join(unknown)} not in {folder}; available: {', '.join(available)}")
    old = manifest.get("engines") or {}
    if old and old.get("builder", {}).get("name") not in (None, toolkit.name):
        say(f"note: replacing {old['builder']['name']} engines with {toolkit.name} ones")
        old = {}
    entries = dict(old.get("components", {})) if old else {}
    plans = {c: component_profiles(c, manifest["components"][c]["inputs"], opts.buckets, batch, text) for c in names}
    say(f"building {len(names)} engine(s) in {folder} with {toolkit.name} {toolkit.version}: "
        f"buckets {', '.join(b.label for b in opts.buckets)}; batch {batch[0]}…{batch[2]}; "
        f"text tokens {text[0]}…{text[2]} (opt {text[1]})")
    for c in names:
        comp, profiles = manifest["components"][c], plans[c]
        key = _build_key(toolkit, comp, profiles, opts)
        if not opts.force and _reusable(folder, entries.get(c), key):
            say(f"{c}: unchanged, engine reused")
            continue
        entry = build_engine(toolkit, folder, c, comp, profiles, opts, say, verbose)
        entries[c] = entry
        chk = entry["inspection"]["checks"]
        say(f"{c}: {len(profiles)} profile(s), {entry['build_seconds']:.1f} s, {entry['bytes'] / 1e6:.1f} MB "
            f"(weights {(entry['weights_bytes'] or 0) / 1e6:.1f} MB vs {entry['initializer_bytes'] / 1e6:.1f} MB "
            f"of graph initializers), targets {', '.join(entry['targets']['compute_capabilities']) or '?'}; "
            f"checks: fp8_weights {chk['fp8_weights']}, attention {chk['attention']}")
        section = _section(toolkit, opts, batch, text, entries)
        manifest["engines"] = section
        write_manifest(folder, manifest)        # after every engine: a later failure keeps the finished ones
    section = _section(toolkit, opts, batch, text, entries)
    manifest["engines"] = section
    write_manifest(folder, manifest)
    return section


def _section(toolkit: Toolkit, opts: BuildOptions, batch, text, entries: dict) -> dict:
    ccs = [set(e["targets"]["compute_capabilities"]) for e in entries.values()]
    common = sorted(set.intersection(*ccs), key=lambda s: tuple(map(int, s.split(".")))) if ccs else []
    return {
        "format_version": ENGINES_FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "builder": toolkit.record(),
        "buckets": [b.label for b in opts.buckets],
        "batch": dict(zip(("min", "opt", "max"), batch)),
        "text_tokens": dict(zip(("min", "opt", "max"), text)),
        "compute_capabilities": common,
        "components": {c: entries[c] for c in ENGINE_COMPONENTS if c in entries},
    }


def check_engines(folder: Path | str) -> dict[str, dict]:
    """Re-read every engine's layer report and recompute its checks (what CI asserts). Also verifies that each
    report belongs to the engine file now on disk."""
    folder = Path(folder).expanduser().absolute()
    manifest = _load(folder)
    section = manifest.get("engines")
    if not section:
        raise EngineBuildError(f"{folder}/manifest.json has no engines section: run `make engines`")
    out = {}
    for c, entry in section["components"].items():
        report = json.loads((folder / entry["inspection"]["file"]).read_text())
        if report["engine"]["sha256"] != entry["sha256"]:
            raise EngineBuildError(f"{c}: {entry['inspection']['file']} describes another engine than {entry['file']}")
        out[c] = run_checks(report)
    return out


# ---------------------------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ideogram4_engine.export.engines",
                                 description="Build TensorRT / TensorRT-RTX engines from an exported engines folder "
                                             "and record them in its manifest.json.")
    ap.add_argument("--engines", required=True, help="exported folder, e.g. engines/tiny (from `make export`)")
    ap.add_argument("--builder", choices=list(BUILDERS), help="default: the first installed of tensorrt, tensorrt-rtx")
    ap.add_argument("--buckets", default=DEFAULT_BUCKETS,
                    help=f"comma-separated WIDTHxHEIGHT resolution buckets (default: {DEFAULT_BUCKETS})")
    ap.add_argument("--max-batch", type=int, default=1, help="batch range 1…N of every profile (default 1)")
    ap.add_argument("--max-text-tokens", type=int, help="text-length range 1…N (default: the manifest's limit, 2048)")
    ap.add_argument("--opt-text-tokens", type=int, default=DEFAULT_OPT_TEXT_TOKENS,
                    help=f"text length the profiles are tuned for (default {DEFAULT_OPT_TEXT_TOKENS}, capped at the max)")
    ap.add_argument("--compute-capabilities",
                    help="TensorRT-RTX targets, e.g. 8.9,12.0 (default: the builder's; FP8 engines need 8.9+)")
    ap.add_argument("--timing-cache", type=Path, help="full TensorRT timing cache file (ignored by TensorRT-RTX)")
    ap.add_argument("--optimization-level", type=int, choices=range(0, 6), metavar="0-5")
    ap.add_argument("--components", help=f"comma-separated subset of {', '.join(ENGINE_COMPONENTS)}")
    ap.add_argument("--force", action="store_true", help="rebuild engines that are up to date")
    ap.add_argument("--if-available", action="store_true",
                    help="exit 0 with a note when no builder is installed (what `make export` uses)")
    ap.add_argument("--check", action="store_true", help="only re-run the checks on the existing layer reports")
    ap.add_argument("--verbose", action="store_true", help="echo the builder's log")
    args = ap.parse_args(argv)
    try:
        if args.check:
            failed = 0
            for c, checks in check_engines(args.engines).items():
                for name, r in checks.items():
                    print(f"{c:13s} {name:12s} {r['status']:10s} {r.get('detail', '')}")
                    failed += r["status"] == "fail"
            return 1 if failed else 0
        opts = BuildOptions(
            buckets=parse_buckets(args.buckets), max_batch=args.max_batch, max_text_tokens=args.max_text_tokens,
            opt_text_tokens=args.opt_text_tokens,
            compute_capabilities=tuple(s.strip() for s in args.compute_capabilities.split(",") if s.strip())
            if args.compute_capabilities else None,
            timing_cache=args.timing_cache, optimization_level=args.optimization_level,
            components=tuple(s.strip() for s in args.components.split(",") if s.strip()) if args.components else None,
            force=args.force)
        if args.if_available:
            try:
                load_toolkit(args.builder)
            except EngineBuildError as e:
                print(f"note: engines not built: {e}", file=sys.stderr)
                return 0
        t0 = time.perf_counter()
        section = build_engines(args.engines, args.builder, opts, verbose=args.verbose)
    except EngineBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(section['components'])} engine(s) in {args.engines} ({section['builder']['name']} "
          f"{section['builder']['version']}, targets {', '.join(section['compute_capabilities']) or '?'}) "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
