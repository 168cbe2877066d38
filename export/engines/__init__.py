"""`make engines`: the exported canonical graphs (`<c>.onnx`) → TensorRT / TensorRT-RTX engines, one per component,
plus the manifest's `engines` section and a layer report per engine.

One build path serves both builders: `tensorrt` (full TensorRT >= 10.15; builds only where an NVIDIA GPU is present)
and `tensorrt_rtx` (TensorRT for RTX; builds ahead of time on the CPU). Their Python APIs are the same family; the
few differences live in `toolkit.Toolkit`.

Per component: a strongly typed network parsed from the graph's file path (so the external `.onnx.data` weights
are read by the parser, FP8 initializers stay FP8), one optimization profile per distinct image shape of the
resolution buckets (the DiTs depend only on the token count, the VAE on the token grid; the text encoder has one
profile over the text-length range), a text-length range for the text encoder and dit_cond, and a batch range.
One engine file per component holds all of its profiles: the weights are stored once (measured: a profile adds
only its compiled code), whereas one engine per bucket would repeat the 8 GB of DiT weights per bucket.

Inspection: the engine inspector (`IEngineInspector`) needs a deserialized `ICudaEngine`, i.e. a CUDA driver and
a GPU the engine supports. Where that is missing (always for TensorRT-RTX on this project's machines: CPU-only
builders, Hopper GPUs), the builder's own verbose log is the source: with `ProfilingVerbosity.DETAILED` it prints
the engine's final layer list plus the weight and activation memory totals. That is parsed into `<c>.layers.json`
beside the engine, and the checks (FP8 weights kept; attention fused into one kernel per block) read that file.
Nothing here executes an engine.

Modules, in build order: profiles (buckets, options, profiles), toolkit (builder module, version and operator
checks, targets, timing cache), log (the builder's log), build (one engine, all engines), inspection (layer lists,
graph facts), checks (the checks of a layer report), records (manifest read/write, reuse, re-checks), cli.
"""
from .build import build_engine, build_engines
from .checks import FP8_WEIGHT_BOUND, layer_profile, run_checks
from .cli import main
from .common import (BUILDER_ORDER, BUILDERS, ENGINE_COMPONENTS, ENGINES_FORMAT_VERSION, LAYERS_FORMAT, LAYERS_SUFFIX,
                     EngineBuildError)
from .inspection import graph_facts, inspector_layers, normalize_dtype, parse_layer_dump
from .profiles import (BUCKET_RULE, DEFAULT_BUCKETS, DEFAULT_OPT_TEXT_TOKENS, Bucket, BuildOptions,
                       component_profiles, parse_bucket, parse_buckets)
from .records import SCHEMA, check_engines, validate, write_manifest
from .toolkit import MIN_TENSORRT, RTX_DEFAULT_TARGETS, Toolkit, cuda_devices, load_toolkit

__all__ = ["build_engine", "build_engines", "FP8_WEIGHT_BOUND", "layer_profile", "run_checks", "main", "BUILDER_ORDER",
           "BUILDERS", "ENGINE_COMPONENTS", "ENGINES_FORMAT_VERSION", "LAYERS_FORMAT", "LAYERS_SUFFIX",
           "EngineBuildError", "graph_facts", "inspector_layers", "normalize_dtype", "parse_layer_dump", "BUCKET_RULE",
           "DEFAULT_BUCKETS", "DEFAULT_OPT_TEXT_TOKENS", "Bucket", "BuildOptions", "component_profiles",
           "parse_bucket", "parse_buckets", "SCHEMA", "check_engines", "validate", "write_manifest", "MIN_TENSORRT",
           "RTX_DEFAULT_TARGETS", "Toolkit", "cuda_devices", "load_toolkit"]
