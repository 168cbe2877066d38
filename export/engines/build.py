"""Build one engine per component and record it: the strongly typed network parsed from the graph's path (the
parser reads the external `.onnx.data`; FP8 initializers stay FP8), the profiles, the engine streamed to a
temporary file while it is hashed, the layer report, the manifest entry; and the loop over components with reuse."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Callable

from ..files import sha256_file
from .common import ENGINE_COMPONENTS, ENGINES_FORMAT_VERSION, LAYERS_SUFFIX, EngineBuildError, atomic_write
from .inspection import graph_facts, graph_ops, inspect_engine, layer_report
from .log import CapturedLog
from .profiles import BuildOptions, component_profiles, ranges
from .records import load, reusable, write_manifest
from .toolkit import Toolkit, cuda_devices, load_toolkit


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


def _source_fingerprint() -> str:
    """sha256 over this package's source: an edited builder invalidates the recorded engines."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _build_key(toolkit: Toolkit, comp: dict, profiles: list[dict], opts: BuildOptions) -> str:
    graph = comp["graphs"]["bf16"]
    blob = json.dumps({"format": ENGINES_FORMAT_VERSION, "source": _source_fingerprint(), "builder": toolkit.record(),
                       "graph": graph["sha256"], "data": (comp.get("data") or {}).get("sha256"),
                       "profiles": profiles, "targets": opts.compute_capabilities,
                       "optimization_level": opts.optimization_level,
                       "weight_streaming": opts.weight_streaming}, sort_keys=True)
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
    network = builder.create_network(toolkit.network_flags())
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
    if opts.weight_streaming:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
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
            writer = _HashingWriter(trt, f)         # no in-memory copy of the engine (TensorRT >= 10.15, RTX 1.3+)
            ok = builder.build_serialized_network_to_stream(network, config, writer)
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
    toolkit.save_timing_cache(config, cache_path, say)
    del parser, network, config, builder
    sha, nbytes = writer.sha.hexdigest(), writer.nbytes
    facts = graph_facts(graph_path)
    gpus, why_not = cuda_devices()
    if gpus:
        inspected, note = inspect_engine(toolkit, engine_path.read_bytes(), log, len(profiles))
    else:
        inspected, note = None, why_not
    report = layer_report(component, engine_path, sha, nbytes, facts, log, inspected, note, toolkit, len(profiles))
    targets = toolkit.effective_targets(requested, log)
    layers_path = folder / f"{component}{LAYERS_SUFFIX}"
    atomic_write(layers_path, (json.dumps(report, indent=1) + "\n").encode())
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
        "inspection": {"file": layers_path.name, "sha256": sha256_file(layers_path),
                       "bytes": layers_path.stat().st_size, "source": report["source"],
                       "checks": {k: v["status"] for k, v in checks.items()}},
        "build_key": _build_key(toolkit, comp, profiles, opts),
    }
    if opts.weight_streaming:
        entry["weight_streaming"] = True
    return entry


def build_engines(folder: Path | str, builder: str | None = None, opts: BuildOptions = BuildOptions(),
                  say: Callable[[str], None] = lambda s: print(s, file=sys.stderr), verbose: bool = False) -> dict:
    """Build the engines of an exported folder and record them in its manifest; returns the `engines` section.
    Refuses before building anything when the builder (missing, too old, lacking an operator), the folder or the
    options are wrong."""
    folder = Path(folder).expanduser().absolute()
    toolkit = load_toolkit(builder)
    toolkit.check_version()
    manifest = load(folder)
    limit = int(manifest["limits"]["max_text_tokens"])
    batch, text = ranges(opts, limit)
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
    toolkit.check_operators({c: graph_ops(folder / manifest["components"][c]["graphs"]["bf16"]["file"])
                             for c in names})
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
        if not opts.force and reusable(folder, entries.get(c), key):
            say(f"{c}: unchanged, engine reused")
            continue
        entry = build_engine(toolkit, folder, c, comp, profiles, opts, say, verbose)
        entries[c] = entry
        chk = entry["inspection"]["checks"]
        say(f"{c}: {len(profiles)} profile(s), {entry['build_seconds']:.1f} s, {entry['bytes'] / 1e6:.1f} MB "
            f"(weights {(entry['weights_bytes'] or 0) / 1e6:.1f} MB vs {entry['initializer_bytes'] / 1e6:.1f} MB "
            f"of graph initializers), targets {', '.join(entry['targets']['compute_capabilities']) or '?'}; "
            f"checks: fp8_weights {chk['fp8_weights']}, attention {chk['attention']}")
        manifest["engines"] = _section(toolkit, opts, batch, text, entries)
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
