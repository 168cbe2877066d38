"""Where the onnxruntime backend's memory goes: memory in use after the load (weights held) and after one
generation (activations), for each way of holding the FP8 weights and each arena setting, one process each.
On CUDA it reads nvidia-smi's used MiB per GPU; on the CPU the process's resident and peak resident MiB.

    python scripts/runtime_memory.py --engines /tmp/ideogram4_bench/engines                 # GPU, 1024²
    python scripts/runtime_memory.py --engines engines/full-width --backend onnxruntime-cpu --size 512
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

VARIANTS = ({}, {"shared_arena": False}, {"dequantize_at_load": True}, {"dequantize_at_load": True, "shared_arena": False})


def used_mib(backend: str) -> dict:
    if backend == "onnxruntime-cuda":
        from ideogram4_engine.export.devtools import gpu_memory_used_mib
        return {"gpu_mib": gpu_memory_used_mib()}
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return {"rss_mib": rss // 1024, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def one(engines: str, backend: str, size: int, options: dict) -> dict:
    from ideogram4_engine.runtime.pipeline import Pipeline
    rec = {"backend": backend, "size": size, "options": options, "before": used_mib(backend)}
    p = Pipeline(engines, backend=backend, verify_checksums=False, **options)
    rec["after_load"] = used_mib(backend)
    rec["load_s"] = round(p.load_seconds, 2)
    r = p.generate("a lighthouse at dusk", width=size, height=size, steps=2, guidance=(3.0, 7.0), seed=1)
    rec["after_generate"] = used_mib(backend)
    rec["step_s"] = [round(t, 3) for t in r.timings["step_s"]]
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", required=True)
    ap.add_argument("--backend", default="onnxruntime-cuda")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--option", action="append", default=[], help="extra backend option key=value for every run")
    ap.add_argument("--json", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.json:
        print(json.dumps(one(a.engines, a.backend, a.size, json.loads(a.json))), flush=True)
        return
    extra = {k: v for k, v in (kv.split("=", 1) for kv in a.option)}
    for options in VARIANTS:
        r = subprocess.run([sys.executable, __file__, "--engines", a.engines, "--backend", a.backend,
                            "--size", str(a.size), "--json", json.dumps({**options, **extra})],
                           capture_output=True, text=True)
        print(r.stdout.strip() or r.stderr[-2000:], flush=True)


if __name__ == "__main__":
    main()
