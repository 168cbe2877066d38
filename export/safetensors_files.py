"""The files of one checkpoint component: safetensors headers (read without touching tensor data) and the
tensors themselves, read with safetensors only (never pickle). No model knowledge: the model modules
(dit, text_encoder, vae) load their weights through this, and checkpoint.py validates a folder with both."""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

COMPONENTS = {  # folder -> weight file stem (§1.1)
    "transformer": "diffusion_pytorch_model",
    "unconditional_transformer": "diffusion_pytorch_model",
    "text_encoder": "model",
    "tokenizer": None,
    "vae": "diffusion_pytorch_model",
}
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U8": 1, "BOOL": 1}


class CheckpointError(ValueError):
    """The folder is not a usable Ideogram 4 checkpoint; the message says what and where."""


@dataclass(frozen=True)
class HeaderEntry:
    dtype: str               # safetensors dtype string, e.g. "F8_E4M3", "BF16"
    shape: tuple[int, ...]
    file: Path


@dataclass
class ComponentFiles:
    """Where one component's tensors live: a single file, or shards listed by an index."""
    folder: Path
    files: list[Path]
    index: Path | None
    header: dict[str, HeaderEntry] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Parse a safetensors header (8-byte little-endian length + JSON) without reading tensor data, and check
    that the file holds exactly the bytes the header describes (a truncated copy fails here, not mid-export)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 * 1024**2:
                raise CheckpointError(f"{path}: implausible safetensors header size {n}")
            raw = json.loads(f.read(n))
            size = os.fstat(f.fileno()).st_size
        entries = {k: (v["dtype"], tuple(v["shape"]), tuple(v["data_offsets"])) for k, v in raw.items()
                   if k != "__metadata__"}
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError,
            AttributeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    for k, (dt, shape, (start, end)) in entries.items():
        if dt in DTYPE_BYTES and end - start != DTYPE_BYTES[dt] * math.prod(shape):
            raise CheckpointError(f"{path}: tensor {k!r} ({dt}, shape {shape}) has {end - start} bytes in the "
                                  f"header, expected {DTYPE_BYTES[dt] * math.prod(shape)}: corrupt header")
    data = max((end for _, _, (_, end) in entries.values()), default=0)
    if size != 8 + n + data:
        what = "truncated" if size < 8 + n + data else "longer than its header says"
        raise CheckpointError(f"{path}: file is {what}: {size} bytes, the header describes {8 + n + data} "
                              "(re-download or re-copy it)")
    return {k: (dt, shape) for k, (dt, shape, _) in entries.items()}


def component_files(folder: Path, stem: str, allow_index: bool = True) -> ComponentFiles:
    """Resolve `<stem>.safetensors.index.json` (shards relative to the index's folder) or the single file
    `<stem>.safetensors`, the order the official loader tries them in (§1.2)."""
    index = folder / f"{stem}.safetensors.index.json"
    single = folder / f"{stem}.safetensors"
    if index.exists():
        if not allow_index:
            if single.exists():
                index = None
            else:
                raise CheckpointError(f"{folder}: only the single file {single.name} is supported for this "
                                      f"component (found {index.name}; the official VAE loader has no "
                                      "index fallback)")
    if index is not None and index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, KeyError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index}: shard(s) missing: {', '.join(missing)}")
        cf = ComponentFiles(folder, files, index)
        for f in files:
            for k, (dt, shape) in read_safetensors_header(f).items():
                if weight_map.get(k) == f.name:
                    cf.header[k] = HeaderEntry(dt, shape, f)
                elif k not in weight_map:   # the official loaders go by the index: such a tensor would be dropped
                    raise CheckpointError(f"{index}: tensor {k!r} is in {f.name} but not in the index "
                                          "(the index must list every tensor of its shards)")
                else:
                    raise CheckpointError(f"{index}: tensor {k!r} is in {f.name} but the index places it in "
                                          f"{weight_map[k]} (a tensor must be stored once, where the index says)")
        absent = sorted(k for k in weight_map if k not in cf.header)
        if absent:
            raise CheckpointError(f"{index}: {len(absent)} tensor(s) listed but not in their shard, "
                                  f"e.g. {absent[0]!r}")
        return cf
    if not single.exists():
        raise CheckpointError(f"{folder}: no {single.name} and no {stem}.safetensors.index.json")
    cf = ComponentFiles(folder, [single], None)
    cf.header = {k: HeaderEntry(dt, s, single) for k, (dt, s) in read_safetensors_header(single).items()}
    return cf


def load_tensors(files: ComponentFiles, device: str = "cpu", names: Iterable[str] | None = None,
                 rename: Callable[[str], str | None] = lambda k: k) -> dict:
    """Load tensors (torch) with safetensors only -- never pickle. `rename` maps or drops (None) keys."""
    from safetensors import safe_open
    wanted = set(files.header) if names is None else set(names)
    by_file: dict[Path, list[str]] = {}
    for k in sorted(wanted):
        by_file.setdefault(files.header[k].file, []).append(k)
    out = {}
    for f in sorted(by_file):
        with safe_open(str(f), framework="pt", device=device) as sf:
            for k in by_file[f]:
                new = rename(k)
                if new is not None:
                    out[new] = sf.get_tensor(k)
    return out


class TensorSource:
    """On-demand tensor access by checkpoint name (one tensor in memory at a time: exports of the 9 GB DiTs
    stream weight by weight)."""

    def __init__(self, files: ComponentFiles, rename: Callable[[str], str] = lambda k: k):
        self.files = files
        self._names = {rename(k): k for k in files.header}
        self._handles: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def keys(self):
        return self._names.keys()

    def get(self, name: str):
        from safetensors import safe_open
        key = self._names[name]
        f = self.files.header[key].file
        if f not in self._handles:
            self._handles[f] = safe_open(str(f), framework="pt", device="cpu")
        return self._handles[f].get_tensor(key)
