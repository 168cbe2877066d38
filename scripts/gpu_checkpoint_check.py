"""GPU-machine check of the foundation: write synthetic checkpoints with the project's writer, load them with
the project's reader, run the reference pipeline once, and record size / write / load / stage timings.

    source scripts/device_env.sh && python3 scripts/gpu_checkpoint_check.py --configs full-width full --out $OUT
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

import torch

from ideogram4_engine.export.checkpoint import open_checkpoint
from ideogram4_engine.export.reference.dit import load_dit
from ideogram4_engine.export.reference.pipeline import ReferencePipeline, SamplingParams
from ideogram4_engine.export.synthetic.writer import write_checkpoint
from ideogram4_engine.export.reference.text_encoder import load_text_encoder
from ideogram4_engine.export.reference.vae import load_decoder


DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


def check(config: str, root: Path, size: int, steps: int) -> dict:
    rec: dict = {"config": config}
    path = root / config
    shutil.rmtree(path, ignore_errors=True)
    _, rec["write_s"] = timed(lambda: write_checkpoint(path, config, seed=0, device=DEVICE))
    rec["bytes"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    subprocess.run(["sync"], check=False)
    ckpt, rec["validate_s"] = timed(lambda: open_checkpoint(path))
    print(ckpt.describe(), flush=True)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    comps = {}
    for name in ("transformer", "unconditional_transformer"):
        comps[name], rec[f"load_{name}_s"] = timed(lambda n=name: load_dit(ckpt.components[n], DEVICE))
    comps["text_encoder"], rec["load_text_encoder_s"] = timed(lambda: load_text_encoder(path / "text_encoder", DEVICE))
    comps["vae"], rec["load_vae_s"] = timed(lambda: load_decoder(path / "vae", DEVICE))
    rec["load_total_s"] = sum(v for k, v in rec.items() if k.startswith("load_"))
    rec["gpu_bytes_after_load"] = torch.cuda.memory_allocated() if DEVICE == "cuda" else None
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(path / "tokenizer"), local_files_only=True)
    pipe = ReferencePipeline(tok, comps["text_encoder"], comps["transformer"], comps["unconditional_transformer"],
                             comps["vae"], DEVICE)
    params = SamplingParams(steps, 0.0, 1.75, (3.0,) + (7.0,) * (steps - 1))
    prompt = "A lighthouse on a rocky coast at dusk, long exposure, waves crashing."
    pipe(prompt, height=256, width=256, params=SamplingParams(1, 0.0, 1.75, (7.0,)), seed=0)   # warm-up
    result, rec["generate_s"] = timed(lambda: pipe(prompt, height=size, width=size, params=params, seed=0))
    rec["generate_stages_s"] = result.timings
    rec["image"] = {"shape": list(result.images.shape), "mean": float(result.images.mean()),
                    "std": float(result.images.std())}
    rec["latents_std"] = float(result.latents.std())
    rec["finite"] = bool(torch.isfinite(torch.from_numpy(result.latents)).all())
    rec["peak_gpu_bytes"] = torch.cuda.max_memory_allocated() if DEVICE == "cuda" else None
    rec["size"], rec["steps"], rec["text_tokens"] = size, steps, len(result.token_ids[0])
    del pipe, comps
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=["full-width", "full"])
    ap.add_argument("--root", default="/tmp/ideogram4_ckpts")
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else DEVICE, "torch": torch.__version__, "results": []}
    for config in args.configs:
        rec = check(config, Path(args.root), args.size, args.steps)
        report["results"].append(rec)
        print(json.dumps(rec, indent=1), flush=True)
        (out / "gpu_checkpoint_check.json").write_text(json.dumps(report, indent=1))
        shutil.rmtree(Path(args.root) / config, ignore_errors=True)


if __name__ == "__main__":
    main()
