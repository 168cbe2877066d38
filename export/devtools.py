"""Helpers the scripts share (scripts/README.md): a synthetic checkpoint written and exported in one call, the
GPU memory in use as nvidia-smi reports it, and the benchmarks' prompt, noise, case list and result records."""
from __future__ import annotations

import shutil
import subprocess
import json
import sys
from pathlib import Path

import numpy as np

PROMPT = ("A lighthouse on a rocky coast at dusk, long exposure, waves crashing on the rocks, warm light in the "
          "window, dramatic clouds, a small boat in the bay, seagulls, 35mm photograph, high detail, natural colours, "
          "soft haze over the sea, wet stones in the foreground reflecting the sky.")


def checkpoint_and_export(root: Path, config: str, *, device: str = "cpu", precision: str = "faithful",
                          seed: int = 0, export_again: bool = False) -> Path:
    """`<root>/ckpt` (the synthetic `config` checkpoint, written unless there) exported to `<root>/engines`
    unless that already has a manifest (export_again: always; unchanged components are reused); returns the
    engines folder. The export runs as `python -m
    ideogram4_engine.export` (its own process: its memory is returned); its stderr ends a failure."""
    from .synthetic.writer import write_checkpoint

    root = Path(root)
    ckpt, engines = root / "ckpt", root / "engines"
    if not (ckpt / "synthetic.json").exists():
        write_checkpoint(ckpt, config, seed=seed, device=device)
    if export_again or not (engines / "manifest.json").exists():
        r = subprocess.run([sys.executable, "-m", "ideogram4_engine.export", "--checkpoint", str(ckpt), "--out",
                            str(engines), "--no-progress", "--precision", precision], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(r.stderr)
    return engines


def gpu_memory_used_mib() -> list[int] | None:
    """MiB in use on each GPU (nvidia-smi), or None where there is no GPU or no nvidia-smi."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    return [int(x) for x in out.split()]


def parse_cases(spec: str) -> list[tuple[int, int, str]]:
    out = []
    for item in spec.split(","):
        size, preset = item.split(":")
        w, h = (int(x) for x in size.lower().split("x"))
        out.append((w, h, preset))
    return out


def record(root: Path, rec: dict) -> None:
    with open(root / "results.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec), flush=True)


def noise_for(w: int, h: int) -> np.ndarray:
    return np.random.default_rng(1234).standard_normal((1, (h // 16) * (w // 16), 128), dtype=np.float32)
