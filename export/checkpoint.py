"""Reading a checkpoint folder in the official Ideogram 4 layout (spec §1).

Everything here works from safetensors headers first: a folder is checked completely (components, files,
key inventory, dtypes, shapes, FP8 scales) before a single weight is read, so a bad checkpoint fails in
seconds with a message naming the tensor, not minutes later inside a model load.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .reference.dit import DiTConfig, dit_inventory
from .inventory import FP8_DTYPE, KIND_DTYPES, SCALE_DTYPES, TensorSpec, scale_name
from .safetensors_files import (COMPONENTS, DTYPE_BYTES, CheckpointError, ComponentFiles, HeaderEntry,  # noqa: F401
                                TensorSource, component_files, load_tensors, read_safetensors_header)
from .reference.text_encoder import (is_fp8_weight_only, is_ignored_key, load_text_encoder_config, tap_layers,
                           text_encoder_inventory)
from .reference.vae import VAEConfig, vae_inventory

DIT_FOLDERS = ("transformer", "unconditional_transformer")
SYNTHETIC_MARKER = "synthetic.json"
NF4_KEY_MARKERS = (".quant_state.bitsandbytes__", ".absmax", ".quant_map")


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
    expected_f = te.hidden_size * len(tap_layers(te.num_hidden_layers))
    for name in DIT_FOLDERS:
        got = comps[name].config.llm_features_dim
        if got != expected_f:
            raise CheckpointError(f"{root / name}: llm_features_dim={got} but the text encoder yields "
                                  f"{expected_f} = hidden {te.hidden_size} × {len(tap_layers(te.num_hidden_layers))} taps")
    marker = root / SYNTHETIC_MARKER
    synthetic = json.loads(marker.read_text()) if marker.exists() else None
    return Checkpoint(root, comps, synthetic)
