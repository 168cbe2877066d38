"""Reading a checkpoint folder in the official Ideogram 4 layout (spec §1).

Everything here works from safetensors headers first: a folder is checked completely (components, files,
key inventory, dtypes, shapes, FP8 scales) before a single weight is read, so a bad checkpoint fails in
seconds with a message naming the tensor, not minutes later inside a model load.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .inventory import FP8_DTYPE, KIND_DTYPES, SCALE_DTYPES, TensorSpec, scale_name

DIT_FOLDERS = ("transformer", "unconditional_transformer")
COMPONENTS = {  # folder -> weight file stem (§1.1)
    "transformer": "diffusion_pytorch_model",
    "unconditional_transformer": "diffusion_pytorch_model",
    "text_encoder": "model",
    "tokenizer": None,
    "vae": "diffusion_pytorch_model",
}
SYNTHETIC_MARKER = "synthetic.json"
NF4_KEY_MARKERS = (".quant_state.bitsandbytes__", ".absmax", ".quant_map")


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
    """Parse a safetensors header (8-byte little-endian length + JSON) without reading tensor data."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 * 1024**2:
                raise CheckpointError(f"{path}: implausible safetensors header size {n}")
            raw = json.loads(f.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in raw.items() if k != "__metadata__"}


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


def refuse_nf4(where: str, keys: Iterable[str]) -> None:
    for k in keys:
        if any(m in k for m in NF4_KEY_MARKERS):
            raise CheckpointError(f"{where}: bitsandbytes NF4 checkpoint (key {k!r}); this project serves the "
                                  "FP8 weight-only release (ideogram-ai/ideogram-4-fp8) only")


def is_fp8(header: dict[str, HeaderEntry]) -> bool:
    """Official detection: any `.weight_scale` key or any e4m3 tensor (§1.4)."""
    return any(k.endswith(".weight_scale") or e.dtype == FP8_DTYPE for k, e in header.items())


def _examples(names: list[str]) -> str:
    more = f" (and {len(names) - 5} more)" if len(names) > 5 else ""
    return ", ".join(map(repr, names[:5])) + more


def check_inventory(where: str, header: dict[str, HeaderEntry], inventory: dict[str, TensorSpec],
                    ignore: Callable[[str], bool] = lambda k: False,
                    drop_unexpected: bool = False) -> tuple[list[str], list[str]]:
    """Compare a component's header with its expected inventory (policy: docs/checkpoint.md); raise
    CheckpointError listing every problem (missing/unexpected keys, dtypes, shapes, FP8 weights without
    scales). `ignore`: keys the official code loads but text-to-image never uses; `drop_unexpected`: unknown
    keys are skipped as the official loader of this component skips them. Returns (FP8-quantized Linear
    weights, warnings: what was accepted but is skipped or filled in)."""
    problems: list[str] = []
    warnings: list[str] = []
    quantized: list[str] = []
    expected_scales = {scale_name(k): k for k, s in inventory.items() if s.kind == "linear"}
    for name, spec in inventory.items():
        entry = header.get(name)
        if entry is None:
            if spec.optional:
                warnings.append(f"{where}: {name!r} is missing; accepted, as the official load fills it in "
                                "(never used)")
            else:
                problems.append(f"missing tensor {name!r} (expected shape {spec.shape})")
            continue
        accepted = KIND_DTYPES[spec.kind]
        if accepted is not None and entry.dtype not in accepted:
            problems.append(f"tensor {name!r} has dtype {entry.dtype}, expected one of {', '.join(accepted)}")
        scalar_as_1d = spec.shape == () and entry.shape == (1,)        # PyTorch's load takes it for a 0-dim
        if entry.shape != spec.shape and not scalar_as_1d:
            problems.append(f"tensor {name!r} has shape {entry.shape}, expected {spec.shape}")
        if spec.kind != "linear":
            continue
        sname = scale_name(name)
        scale = header.get(sname)
        if entry.dtype == FP8_DTYPE:
            if scale is None:
                problems.append(f"FP8 weight {name!r} has no scale {sname!r}")
                continue
            quantized.append(name)
        elif scale is not None:
            problems.append(f"{sname!r} present but {name!r} is {entry.dtype}, not FP8 e4m3")
        if scale is not None:
            if scale.dtype not in SCALE_DTYPES:
                problems.append(f"scale {sname!r} has dtype {scale.dtype}, expected one of "
                                f"{', '.join(SCALE_DTYPES)} (the release stores F32)")
            if scale.shape != spec.shape[:1]:
                problems.append(f"scale {sname!r} has shape {scale.shape}, expected {spec.shape[:1]} "
                                "(one per output row)")
    unknown = sorted(k for k in header if k not in inventory and k not in expected_scales)
    skipped = [k for k in unknown if ignore(k)]
    unexpected = [k for k in unknown if not ignore(k)]
    if skipped:
        warnings.append(f"{where}: {len(skipped)} tensor(s) that text-to-image never uses, skipped: "
                        f"{_examples(skipped)}")
    if unexpected and drop_unexpected:
        warnings.append(f"{where}: {len(unexpected)} unexpected tensor(s) skipped, as the official loader "
                        f"drops them: {_examples(unexpected)}")
    elif unexpected:
        problems.append(f"unexpected tensor(s): {_examples(unexpected)}")
    if problems:
        head = problems[:12]
        more = f"\n  … and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise CheckpointError(f"{where}: checkpoint does not match the expected layout:\n  "
                              + "\n  ".join(head) + more)
    return quantized, warnings


@dataclass
class Component:
    name: str
    files: ComponentFiles
    quantized: list[str]        # FP8 Linear weights
    config: object              # DiTConfig / transformers config / VAEConfig
    warnings: list[str] = field(default_factory=list)   # accepted, but skipped or filled in (docs/checkpoint.md)


@dataclass
class Checkpoint:
    """A validated checkpoint folder. Configs and file maps are read; weights are not loaded."""
    root: Path
    components: dict[str, Component]
    synthetic: dict | None      # provenance when the project wrote this checkpoint itself

    @property
    def nbytes(self) -> int:
        return sum(c.files.nbytes for c in self.components.values())

    @property
    def warnings(self) -> list[str]:
        return [w for c in self.components.values() for w in c.warnings]

    def describe(self) -> str:
        kind = (f"SYNTHETIC checkpoint (config {self.synthetic.get('config')!r}, seed {self.synthetic.get('seed')}): "
                "random weights in the official layout, not the real model" if self.synthetic
                else "checkpoint (no synthetic marker: treated as the real release)")
        parts = [f"{self.root}: {kind}, {self.nbytes / 1e9:.2f} GB"]
        for c in self.components.values():
            parts.append(f"  {c.name}: {len(c.files.header)} tensors in {len(c.files.files)} file(s), "
                         f"{len(c.quantized)} FP8 Linear(s)")
        parts += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(parts)


def _dit(root: Path, name: str) -> Component:
    from .dit import DiTConfig, dit_inventory
    folder = root / name
    files = component_files(folder, COMPONENTS[name])
    refuse_nf4(str(folder), files.header)
    try:
        cfg = DiTConfig.from_json(folder / "config.json")
    except (TypeError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None
    quantized, warnings = check_inventory(str(folder), files.header, dit_inventory(cfg))
    return Component(name, files, quantized, cfg, warnings)


def _text_encoder(root: Path) -> Component:
    from .text_encoder import is_fp8_weight_only, is_ignored_key, load_text_encoder_config, text_encoder_inventory
    folder = root / "text_encoder"
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{folder}: config.json missing")
    raw = json.loads((folder / "config.json").read_text())
    if "quantization_config" in raw:
        raise CheckpointError(f"{folder / 'config.json'}: has quantization_config "
                              f"({raw['quantization_config'].get('quant_method', '?')}): bitsandbytes NF4 "
                              "checkpoints are not supported; use the FP8 release (ideogram-ai/ideogram-4-fp8)")
    files = component_files(folder, COMPONENTS["text_encoder"])
    refuse_nf4(str(folder), files.header)
    config = load_text_encoder_config(folder)
    fp8_flag = is_fp8_weight_only(raw)
    fp8_weights = is_fp8(files.header)
    if fp8_weights and not fp8_flag:
        raise CheckpointError(f"{folder}: weights are FP8 but config.json lacks \"ideogram_fp8_weight_only\": true")
    inventory = text_encoder_inventory(config.text_config, fp8_flag)
    # FP8: loaded into Qwen3VLModel, unexpected keys fatal; otherwise transformers' from_pretrained drops them
    quantized, warnings = check_inventory(str(folder), files.header, inventory, ignore=is_ignored_key,
                                          drop_unexpected=not fp8_flag)
    return Component("text_encoder", files, quantized, config, warnings)


def _vae(root: Path) -> Component:
    from .vae import VAEConfig, vae_inventory
    folder = root / "vae"
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{folder}: config.json missing")
    try:
        cfg = VAEConfig.from_json(folder / "config.json")
    except (TypeError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None
    files = component_files(folder, COMPONENTS["vae"], allow_index=False)
    _, warnings = check_inventory(str(folder), files.header, vae_inventory(cfg))
    return Component("vae", files, [], cfg, warnings)


def _tokenizer(root: Path) -> None:
    folder = root / "tokenizer"
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if not (folder / f).exists():
            raise CheckpointError(f"{folder}: {f} missing")


def open_checkpoint(root: Path | str) -> Checkpoint:
    """Validate a checkpoint folder completely from headers and configs; raise CheckpointError if not usable."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    missing = [c for c in COMPONENTS if not (root / c).is_dir()]
    if missing:
        raise CheckpointError(f"{root}: missing component folder(s) {', '.join(missing)}; an Ideogram 4 "
                              f"checkpoint has {', '.join(COMPONENTS)}")
    _tokenizer(root)
    comps = {name: _dit(root, name) for name in DIT_FOLDERS}
    comps["text_encoder"] = _text_encoder(root)
    comps["vae"] = _vae(root)
    te = comps["text_encoder"].config.text_config
    from .text_encoder import tap_layers
    expected_f = te.hidden_size * len(tap_layers(te.num_hidden_layers))
    for name in DIT_FOLDERS:
        got = comps[name].config.llm_features_dim
        if got != expected_f:
            raise CheckpointError(f"{root / name}: llm_features_dim={got} but the text encoder yields "
                                  f"{expected_f} = hidden {te.hidden_size} × {len(tap_layers(te.num_hidden_layers))} taps")
    marker = root / SYNTHETIC_MARKER
    synthetic = json.loads(marker.read_text()) if marker.exists() else None
    return Checkpoint(root, comps, synthetic)


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
