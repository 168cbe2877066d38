"""Write a complete synthetic checkpoint in the official layout, atomically (temporary folder, then rename)."""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterable, Iterator

import torch
from tqdm import tqdm

from ..files import replace_dir
from ..checkpoint import COMPONENTS, DIT_FOLDERS, SYNTHETIC_MARKER, open_checkpoint
from ..reference.dit import dit_inventory
from ..reference.text_encoder import text_encoder_inventory
from ..reference.vae import VAEConfig, vae_inventory
from .common import Correlated, write_sharded
from .configs import SyntheticConfig, get_config
from .dit import dit_tensors
from .text_encoder import text_encoder_config_json, text_encoder_tensors
from .tokenizer import write_tokenizer
from .vae import vae_config_json, vae_tensors

WRITER_VERSION = 1   # bump when the same (config, seed) would produce different tensors
UNCOND_CORRELATION = 0.9   # the unconditional DiT's weights: 81 % shared variance with the conditional one


def dit_seed(folder: str, seed: int) -> int | Correlated:
    """Two different weight sets, the unconditional one correlated with the conditional one."""
    return 2 * seed if folder == "transformer" else Correlated(2 * seed + 1, 2 * seed, UNCOND_CORRELATION)


def _progress(tensors: Iterable[tuple[str, torch.Tensor]], total: int, desc: str,
              enabled: bool) -> Iterator[tuple[str, torch.Tensor]]:
    with tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, leave=False) as bar:
        for item in tensors:
            yield item
            bar.update(1)


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _write_into(root: Path, cfg: SyntheticConfig, seed: int, device: str, progress: bool) -> None:
    from transformers import AutoConfig

    for name in DIT_FOLDERS:
        folder = root / name
        _write_json(folder / "config.json", cfg.dit.to_json_dict())
        n = len(dit_inventory(cfg.dit)) + sum(1 for s in dit_inventory(cfg.dit).values() if s.kind == "linear")
        write_sharded(folder, COMPONENTS[name],
                      _progress(dit_tensors(cfg.dit, seed=dit_seed(name, seed), device=device), n, name, progress),
                      cfg.max_shard_bytes)

    te = cfg.text_encoder
    te_json = text_encoder_config_json(hidden_size=te.hidden_size, num_layers=te.num_layers,
                                       num_heads=te.num_heads, num_kv_heads=te.num_kv_heads,
                                       head_dim=te.head_dim, intermediate_size=te.intermediate_size,
                                       mrope_section=te.mrope_section)
    _write_json(root / "text_encoder" / "config.json", te_json)
    text_config = AutoConfig.from_pretrained(root / "text_encoder").text_config
    inv = text_encoder_inventory(text_config, True)
    n = len(inv) + sum(1 for s in inv.values() if s.kind == "linear")
    write_sharded(root / "text_encoder", COMPONENTS["text_encoder"],
                  _progress(text_encoder_tensors(text_config, seed=seed, device=device), n, "text_encoder",
                            progress), cfg.max_shard_bytes)

    write_tokenizer(root / "tokenizer")

    vae_json = vae_config_json(cfg.vae_block_out_channels)
    _write_json(root / "vae" / "config.json", vae_json)
    vcfg = VAEConfig.from_json(root / "vae" / "config.json")
    write_sharded(root / "vae", COMPONENTS["vae"],
                  _progress(vae_tensors(vcfg, seed=seed, device=device), len(vae_inventory(vcfg)), "vae",
                            progress), max_shard_bytes=1 << 62)


def write_checkpoint(out: Path | str, config: str | SyntheticConfig = "tiny", *, seed: int = 0,
                     device: str = "cpu", overwrite: bool = False, progress: bool = False) -> Path:
    """Write a synthetic checkpoint to `out`. Nothing appears at `out` unless the whole checkpoint was written
    and validated by the same reader that loads real checkpoints. Deterministic for (config, seed, device
    type): every tensor has its own generator seeded from (seed, tensor name)."""
    cfg = get_config(config) if isinstance(config, str) else config
    if not 0 <= seed < 2**31:
        raise ValueError(f"seed={seed} outside 0…{2**31 - 1}")
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True / --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    try:
        tmp.mkdir()
        _write_into(tmp, cfg, seed, device, progress)
        _write_json(tmp / SYNTHETIC_MARKER, {
            "synthetic": True,
            "warning": "random weights in the official Ideogram 4 layout; not the real model, images are noise-like",
            "config": cfg.name,
            "config_note": cfg.note,
            "seed": seed,
            "generator": "ideogram4_engine.export.synthetic",
            "generator_version": WRITER_VERSION,
            "device_type": torch.device(device).type,
            "torch": torch.__version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "write_seconds": round(time.perf_counter() - start, 3),
        })
        open_checkpoint(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
