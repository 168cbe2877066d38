"""Where a Pipeline's cold start goes: per component sha256 time, session-creation time and warm-up (issue 20).

`python scripts/bench.py load-profile --root R --backend onnxruntime-cuda` (gpu_bench.sh stage `load-profile`)
first reads every file of R/engines once (page cache primed; the read rate) and times sha256 of the largest
file alone (the hash rate), then runs each scenario in a fresh process, from interpreter start to the end of
the warm-up (the server's: one step at --warmup size; then the same call again, so first-run costs show):
  sequential        parallel_load=False, no digest cache: the earlier behaviour (every file hashed, then the sessions)
  parallel-uncached parallel_load (default), an empty digest cache: a first start after export or copy
  parallel-cached   the same cache, now filled: every later start
  noverify          verify_checksums=False: the floor without any hashing
  ort-phases        parallel-cached with onnxruntime's profiler on: each session's own phases (model_loading_uri:
                    parse + external data; session_initialization: graph transforms, kernels, initializers to the GPU)
Each record: process start to ready, imports, manifest + tokenizer, Pipeline (backend) time, events per file
(sha256: start, end, bytes, thread) and per component (session: start, end), the time inside the Pipeline not
covered by any of them, warm-up per component (first and second call), GPU memory and the host's peak RSS
during the load (sessions built side by side may hold more host memory at once). The real functions run;
they are wrapped only to be timed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from .devtools import gpu_memory_used_mib

SCENARIOS = {
    "sequential": ({"parallel_load": False}, "off"),
    "parallel-uncached": ({}, "fresh"),
    "parallel-cached": ({}, "keep"),
    "noverify": ({"verify_checksums": False}, "off"),
    "ort-phases": ({}, "keep"),         # parallel-cached with onnxruntime's profiler: each session's load phases
}


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _profile_sessions(Backend, phases: dict, lock) -> None:
    """onnxruntime's profiler on every session the backend creates; its Session events kept per graph file."""
    import tempfile
    folder = tempfile.mkdtemp(prefix="ort-load-profile-")
    real_options, real_session = Backend._options, Backend._session

    def options(self, *a, **k):
        o = real_options(self, *a, **k)
        o.enable_profiling, o.profile_file_prefix = True, os.path.join(folder, "ort")
        return o

    def session(self, path, *a, **k):
        sess = real_session(self, path, *a, **k)
        trace = sess.end_profiling()
        got = {e["name"]: e["dur"] / 1e6 for e in json.loads(Path(trace).read_text()) if e.get("cat") == "Session"}
        os.unlink(trace)
        with lock:
            phases[Path(path).name] = got
        return sess
    Backend._options, Backend._session = options, session


def child(engines: Path, backend: str, options: dict, warmup: tuple[int, int], spawned_at: float,
          ort_profile: bool = False) -> dict:
    """One cold start in this (fresh) process; returns its record."""
    t_import = time.perf_counter()
    from ideogram4_engine.runtime import kernels, verify as verify_mod
    from ideogram4_engine.runtime.backends import onnxruntime as ort_backend
    from ideogram4_engine.runtime.manifest import load_manifest
    from ideogram4_engine.runtime.pipeline import Pipeline
    from ideogram4_engine.runtime.tokenizer import PromptTokenizer
    import onnxruntime  # noqa: F401 -- imported by the backend anyway; timed here with the rest
    imports_s = time.perf_counter() - t_import

    events: list[dict] = []
    lock = threading.Lock()

    def timed(kind: str, name_of, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                with lock:
                    events.append({"kind": kind, "name": name_of(*a, **k), "start": t, "end": time.perf_counter(),
                                   "thread": threading.current_thread().name})
        return wrapper

    verify_mod._sha256 = timed("sha256", lambda p, *a: Path(p).name, verify_mod._sha256)
    Backend = ort_backend.OnnxRuntimeBackend
    phases: dict[str, dict] = {}
    if ort_profile:
        _profile_sessions(Backend, phases, lock)
    Backend._session = timed("session", lambda self, p, *a, **k: Path(p).name, Backend._session)
    kernels.check = timed("kernels_check", lambda *a, **k: "library", kernels.check)
    ort_backend._register_shared_arena = timed("shared_arena", lambda ort, dev, i, s: f"{dev}:{i}",
                                               ort_backend._register_shared_arena)
    t0 = time.perf_counter()
    manifest = load_manifest(engines)
    manifest_s = time.perf_counter() - t0
    t = time.perf_counter()
    tokenizer = PromptTokenizer.from_manifest(manifest)
    tokenizer_s = time.perf_counter() - t
    t_pipe = time.perf_counter()
    pipe = Pipeline(manifest, backend=backend, tokenizer=tokenizer, **options)
    pipeline_s = time.perf_counter() - t_pipe
    gpu_after_load = gpu_memory_used_mib()
    import resource
    host_peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # concurrent loads hold more at once

    warm = []
    run = pipe.backend.run
    for _ in range(2):
        per: dict[str, float] = {}

        def run_timed(c, inputs, per=per):
            t1 = time.perf_counter()
            out = run(c, inputs)
            per[c] = per.get(c, 0.0) + time.perf_counter() - t1
            return out
        pipe.backend.run = run_timed
        t = time.perf_counter()
        # as serve/worker.py: guidance != 1, so that both DiTs run
        pipe.generate("warm-up", width=warmup[0], height=warmup[1], steps=1, guidance=4.0, seed=0)
        pipe.backend.run = run
        warm.append({"total_s": time.perf_counter() - t, "per_component_s": per})
        if len(warm) == 1:
            ready_s = time.time() - spawned_at

    sizes = {Path(e["file"]).name: e["bytes"] for e in [*manifest.file_entries(), *manifest.tokenizer_entries]}
    for e in events:
        e["start"], e["end"] = e["start"] - t_pipe, e["end"] - t_pipe        # relative to the Pipeline's start
        if e["kind"] == "sha256":
            e["bytes"] = sizes.get(e["name"])
    components = {}
    variant = pipe.backend.graph_variant
    for c in pipe.backend.sessions:          # what this Pipeline loads (dit_uncond and the cache pieces vary)
        files = {Path(f).name for f in manifest.files_for_variant(variant, [c])}
        hashes = [e for e in events if e["kind"] == "sha256" and e["name"] in files]
        sess = [e for e in events if e["kind"] == "session" and e["name"] == manifest.graph_path(c, variant).name]
        components[c] = {"bytes": sum(sizes[f] for f in files if f in sizes),
                         "sha256_s": sum(e["end"] - e["start"] for e in hashes), "files_hashed": len(hashes),
                         "session_s": sum(e["end"] - e["start"] for e in sess),
                         "session_start_s": min((e["start"] for e in sess), default=None),
                         "session_end_s": max((e["end"] for e in sess), default=None)}
    inside = [(max(0.0, e["start"]), min(pipeline_s, e["end"])) for e in events]
    return {"backend": pipe.backend.name, "graph_variant": variant, "options": options,
            "ready_s": ready_s, "imports_s": imports_s, "manifest_s": manifest_s, "tokenizer_s": tokenizer_s,
            "pipeline_s": pipeline_s, "load_seconds": pipe.load_seconds,
            "sha256_total_s": sum(e["end"] - e["start"] for e in events if e["kind"] == "sha256"),
            "sha256_wall_s": _union([(e["start"], e["end"]) for e in events if e["kind"] == "sha256"]),
            "sha256_bytes": sum(e.get("bytes") or 0 for e in events if e["kind"] == "sha256"),
            "session_total_s": sum(e["end"] - e["start"] for e in events if e["kind"] == "session"),
            "session_wall_s": _union([(e["start"], e["end"]) for e in events if e["kind"] == "session"]),
            "uncovered_s": pipeline_s - _union(inside), "components": components,
            "warmup_first": warm[0], "warmup_second": warm[1], "gpu_mib_after_load": gpu_after_load,
            "host_peak_rss_mib_load": host_peak_mib,
            "gpu_mib_after_warmup": gpu_memory_used_mib(), "ort_session_phases_s": phases, "events": events}


def read_rates(engines: Path) -> dict:
    """Read every file once (primes the page cache, as the runs after `prepare` find it) and hash the largest."""
    import hashlib
    files = sorted(p for p in engines.rglob("*") if p.is_file())
    buf = bytearray(8 << 20)
    t, total = time.perf_counter(), 0
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    read_s = time.perf_counter() - t
    big = max(files, key=lambda p: p.stat().st_size)
    h, view = hashlib.sha256(), memoryview(buf)
    t = time.perf_counter()
    with open(big, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    hash_s = time.perf_counter() - t
    return {"read_bytes": total, "read_s": read_s, "read_gb_per_s": total / read_s / 1e9, "hash_file": big.name,
            "hash_bytes": big.stat().st_size, "hash_s": hash_s, "hash_gb_per_s": big.stat().st_size / hash_s / 1e9}


def run(root: Path, backend: str, options: dict, warmup: tuple[int, int], scenarios: list[str], emit) -> int:
    """The parent: read/hash rates, then one child process per scenario (see the module doc)."""
    engines = root / "engines"
    emit({"kind": "load-profile-io", **read_rates(engines)})
    cache = root / "load_profile_digests.json"
    rc = 0
    for name in scenarios:
        extra, mode = SCENARIOS[name]
        env = dict(os.environ)
        if mode == "fresh":
            cache.unlink(missing_ok=True)
        env["IDEOGRAM4_VERIFY_CACHE"] = "off" if mode == "off" else str(cache)
        spec = json.dumps({"engines": str(engines), "backend": backend, "options": {**options, **extra},
                           "warmup": list(warmup), "ort_profile": name == "ort-phases"})
        spawned = time.time()
        r = subprocess.run([sys.executable, "-m", "ideogram4_engine.export.load_profile", "--child", spec, repr(spawned)],
                           env=env, capture_output=True,
                           text=True)
        wall = time.time() - spawned
        if r.returncode:
            emit({"kind": "load-profile", "scenario": name, "error": (r.stderr.strip().splitlines() or ["?"])[-1],
                  "exit_code": r.returncode})
            rc = 1
            continue
        rec = json.loads(r.stdout.strip().splitlines()[-1])
        emit({"kind": "load-profile", "scenario": name, "process_wall_s": wall, **rec})
    return rc


def summary_line(r: dict) -> str:
    """One line of the report for a load-profile record."""
    if "error" in r:
        return f"load-profile {r['scenario']}: failed ({r['error']})"
    comp = ", ".join(f"{c} {v['sha256_s']:.1f}+{v['session_s']:.1f}" for c, v in r["components"].items())
    return (f"load-profile {r['scenario']}: ready {r['ready_s']:.1f} s = imports {r['imports_s']:.1f} + manifest/"
            f"tokenizer {r['manifest_s'] + r['tokenizer_s']:.1f} + Pipeline {r['pipeline_s']:.1f} (sha256 "
            f"{r['sha256_total_s']:.1f} s over {r['sha256_bytes'] / 1e9:.2f} GB, wall {r['sha256_wall_s']:.1f}; sessions "
            f"{r['session_total_s']:.1f}, wall {r['session_wall_s']:.1f}; other {r['uncovered_s']:.1f}) + warm-up "
            f"{r['warmup_first']['total_s']:.1f} (again: {r['warmup_second']['total_s']:.2f}); per component "
            f"sha256+session s: {comp}" + ("; onnxruntime phases s: " + ", ".join(
                f"{g} " + "/".join(f"{v:.1f}" for v in p.values()) for g, p in r["ort_session_phases_s"].items())
                if r.get("ort_session_phases_s") else ""))


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--child":
    spec = json.loads(sys.argv[2])
    rec = child(Path(spec["engines"]), spec["backend"], spec["options"], tuple(spec["warmup"]), float(sys.argv[3]),
                spec["ort_profile"])
    print(json.dumps(rec), flush=True)
