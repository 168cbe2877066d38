"""Where the GPU memory of the onnxruntime backend goes: nvidia-smi's used MiB after the load (weights held)
and after one 1024² step (activations), for each way of holding the FP8 weights, one process each.

    python scripts/gpu_load_memory.py --engines /tmp/ideogram4_bench/engines [--option k=v ...]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys


def used_mib() -> list[int]:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return [int(x) for x in out.split()]


def one(engines: str, options: dict, components: list[str] | None) -> dict:
    from ideogram4_engine.runtime.pipeline import Pipeline
    rec = {"options": options, "components": components, "before": used_mib()}
    p = Pipeline(engines, backend="onnxruntime-cuda", verify_checksums=False, **options, **({"components": tuple(components)} if components else {}))
    rec["after_load"] = used_mib()
    rec["load_s"] = p.load_seconds
    if not components:
        p.generate("a lighthouse at dusk", width=1024, height=1024, steps=1, guidance=7.0)
        rec["after_one_step"] = used_mib()
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", required=True)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.json:
        spec = json.loads(a.json)
        print(json.dumps(one(a.engines, spec["options"], spec["components"])), flush=True)
        return
    for options in ({}, {"dequantize_at_load": True}):
        for components in (None, ["text_encoder"], ["dit_cond"]):
            r = subprocess.run([sys.executable, __file__, "--engines", a.engines, "--json",
                                json.dumps({"options": options, "components": components})],
                               capture_output=True, text=True)
            print(r.stdout.strip() or r.stderr[-2000:], flush=True)


if __name__ == "__main__":
    main()
