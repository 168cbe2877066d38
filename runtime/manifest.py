"""The engines folder contract (`manifest.json`, written by `make export`) as the runtime reads it.

`load_manifest(folder)` parses and checks, by hand (no jsonschema at run time), everything the runtime uses:
format and version, the sections, the four components with their graph variants, weight files and I/O
names, sampler presets, RoPE tables, limits and the tokenizer folder with its files' sha256 (format 3: the
tokenizer and chat template are covered like the graphs); and that every file the manifest names exists
with its recorded size. `verify(manifest)` (verify.py) checks sha256s and remembers which unchanged files it
has already verified, in this process and across processes. Every problem is a `ManifestError` (a ValueError)
naming the folder or file and what was expected.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable

import numpy as np

from . import cache
from .schedule import SamplerPreset, lookup_preset
from .schema import schema_error

FORMAT = "ideogram4-engine/manifest"
FORMAT_VERSIONS = (3,)                  # manifest versions this runtime reads (3: tokenizer files checksummed; 2: bf16-rounded MRoPE inv_freq)
MANIFEST_FILE = "manifest.json"
REQUIRED_SECTIONS = ("format", "format_version", "exporter", "source", "model", "tokenizer", "sampler", "rope",
                     "limits", "components")
REQUIRED_COMPONENTS = ("text_encoder", "dit_cond", "dit_uncond", "vae_decoder")
REQUIRED_VARIANTS = ("bf16", "cuda", "cpu")
LOAD_DEQUANTIZED = "_dql"               # suffix of the graph variants that take their FP8 weights as bf16 inputs
FUSED = "_fused"                        # cuda<FUSED>[_dql]: the cuda twins with the project's fused CUDA ops
PRECISION_VARIANTS = {"faithful": None, "w8a8": "cuda_w8a8"}    # `exporter.precision` -> the graphs it adds
REQUIRED_LIMITS = ("min_side", "max_side", "multiple", "max_aspect", "max_text_tokens")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class ManifestError(ValueError):
    """The engines folder is missing, incomplete, of another format version, or corrupt."""


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class Manifest:
    root: Path          # the engines folder (absolute)
    raw: dict           # manifest.json as parsed

    # ------------------------------------------------------------------------------------------ sections
    @property
    def path(self) -> Path:
        return self.root / MANIFEST_FILE

    @property
    def components(self) -> dict[str, dict]:
        return self.raw["components"]

    @cached_property
    def presets(self) -> dict[str, SamplerPreset]:
        return {name: SamplerPreset(name, p["steps"], tuple(float(g) for g in p["guidance"]), float(p["mu"]),
                                    float(p["std"]))
                for name, p in self.raw["sampler"]["presets"].items()}

    @property
    def default_preset(self) -> str:
        return self.raw["sampler"]["default_preset"]

    def preset(self, name: str | None = None) -> SamplerPreset:
        return lookup_preset(self.presets, self.default_preset if name is None else name)

    @cached_property
    def inv_freq(self) -> np.ndarray:
        a = np.asarray(self.raw["rope"]["inv_freq"], dtype=np.float32)
        a.flags.writeable = False
        return a

    @property
    def mrope_section(self) -> tuple[int, int, int]:
        return tuple(int(x) for x in self.raw["rope"]["mrope_section"])

    @property
    def head_dim(self) -> int:
        return int(self.raw["rope"]["head_dim"])

    @property
    def image_position_offset(self) -> int:
        return int(self.raw["rope"]["image_position_offset"])

    @property
    def limits(self) -> dict:
        return self.raw["limits"]

    @property
    def max_text_tokens(self) -> int:
        return int(self.raw["tokenizer"]["max_text_tokens"])

    @property
    def precisions(self) -> tuple[str, ...]:
        """The numerics this export holds graphs for: "faithful" always; "w8a8" (opt-in, `--precision w8a8`)
        adds every component's cuda_w8a8 graph. Manifests written before the option have no entry: faithful."""
        return tuple(self.raw["exporter"].get("precision", ["faithful"]))

    @property
    def synthetic(self) -> dict | None:
        return self.raw["source"].get("synthetic")

    @property
    def tokenizer_folder(self) -> Path:
        return self.root / self.raw["tokenizer"]["folder"]

    @property
    def tokenizer_entries(self) -> list[dict]:
        """{file, sha256, bytes} of every file in the tokenizer folder (chat template included)."""
        return self.raw["tokenizer"]["files"]

    @property
    def tokenizer_checksums(self) -> dict[str, dict]:
        """The tokenizer entries keyed by their name inside the tokenizer folder (what the tokenizer reads)."""
        prefix = len(self.raw["tokenizer"]["folder"].rstrip("/")) + 1
        return {e["file"][prefix:]: e for e in self.tokenizer_entries}

    # ------------------------------------------------------------------------------------------ components
    def component(self, name: str) -> dict:
        """A component, or a first-block cache piece ("dit_cond.head", …: runtime/cache.py)."""
        found = self.components.get(name) or cache.piece_component(self.raw, name)
        if found is None:
            raise ManifestError(f"{self.path}: no component {name!r}; it has "
                                f"{', '.join([*self.components, *cache.piece_names(self.raw)])}")
        return found

    @property
    def has_cache_pieces(self) -> bool:
        """Whether the export holds the first-block cache's graphs (exporter >= 11)."""
        return bool(cache.piece_names(self.raw))

    def variants(self, component: str) -> tuple[str, ...]:
        return tuple(self.component(component)["graphs"])

    def graph_path(self, component: str, variant: str) -> Path:
        graphs = self.component(component)["graphs"]
        if variant not in graphs:
            raise ManifestError(f"{self.path}: component {component!r} has no {variant!r} graph; "
                                f"allowed: {', '.join(graphs)}")
        return self.root / graphs[variant]["file"]

    def fused_variant(self, variant: str) -> str | None:
        """The graph variant standing for `variant` with the fused CUDA ops of the kernel library ("cuda" ->
        "cuda_fused"), or None when the export has none (exported before them, or not a cuda variant)."""
        return (self.raw.get("kernels") or {}).get("variants", {}).get(variant)

    def data_path(self, component: str) -> Path | None:
        data = self.component(component).get("data")
        return None if data is None else self.root / data["file"]

    def dequantize(self, component: str, variant: str | None = None) -> dict | None:
        """The component's FP8 weights for load-time dequantization ({graph, weights}), or None; for a cache
        piece, those its `variant` graph takes."""
        comp = self.component(component)
        dq, takes = comp.get("dequantize"), comp.get("dequantize_inputs")
        if dq is None or takes is None or variant is None:
            return dq
        names = set(takes.get(variant, ()))
        return {**dq, "weights": [w for w in dq["weights"] if w["input"] in names]}

    def input_names(self, component: str) -> list[str]:
        return [io["name"] for io in self.component(component)["inputs"]]

    def output_names(self, component: str) -> list[str]:
        return [io["name"] for io in self.component(component)["outputs"]]

    def file_entries(self, component: str | None = None) -> list[dict]:
        """{file, sha256, bytes} entries of one component (graphs, then weights) or of all of them, each file
        once (variants may share a graph file; components without weights have no `data`)."""
        names = [*self.components, *cache.piece_names(self.raw)] if component is None else [component]
        out: dict[str, dict] = {}
        for name in names:
            comp = self.component(name)
            extra = [comp["data"]] if comp.get("data") is not None else []
            if comp.get("dequantize") is not None:
                extra.append(comp["dequantize"]["graph"])
            for entry in [*comp["graphs"].values(), *extra]:
                out.setdefault(entry["file"], entry)
        return list(out.values())

    def files_for_variant(self, variant: str, components: Iterable[str] | None = None) -> list[str]:
        """File names one backend needs: each component's `variant` graph and its weights (for `verify`)."""
        out: dict[str, None] = {}
        for name in self.components if components is None else components:
            out[self.graph_path(name, variant).relative_to(self.root).as_posix()] = None
            data = self.component(name).get("data")
            if data is not None:
                out[data["file"]] = None
            dq = self.dequantize(name)
            if dq is not None and variant.endswith(LOAD_DEQUANTIZED):
                out[dq["graph"]["file"]] = None
        return list(out)


# ---------------------------------------------------------------------------------------------- loading

class _Checker:
    def __init__(self, path: Path):
        self.path = path

    def fail(self, what: str):
        raise ManifestError(f"{self.path}: {what}")

    def obj(self, parent: dict, key: str, where: str) -> dict:
        v = parent.get(key)
        if not isinstance(v, dict):
            self.fail(f"`{where}{key}` must be an object, found {_describe(v)}")
        return v

    def need(self, parent: dict, keys: Iterable[str], where: str) -> None:
        missing = [k for k in keys if k not in parent]
        if missing:
            self.fail(f"`{where}` lacks {', '.join(repr(k) for k in missing)} (is it from another exporter "
                      "version? re-run `make export`)")

    def file_entry(self, entry, where: str) -> dict:
        if not isinstance(entry, dict):
            self.fail(f"`{where}` must be a file entry {{file, sha256, bytes}}, found {_describe(entry)}")
        self.need(entry, ("file", "sha256", "bytes"), where)
        name, digest, size = entry["file"], entry["sha256"], entry["bytes"]
        if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
            self.fail(f"`{where}.file` must be a relative path inside the folder, found {name!r}")
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            self.fail(f"`{where}.sha256` must be 64 lowercase hex digits, found {digest!r}")
        if not _int(size) or size < 0:
            self.fail(f"`{where}.bytes` must be a non-negative integer, found {size!r}")
        return entry


def _describe(v) -> str:
    return "nothing" if v is None else f"a {type(v).__name__}"


def _check(raw: dict, path: Path) -> None:
    c = _Checker(path)
    fmt, version = raw.get("format"), raw.get("format_version")
    if fmt != FORMAT:
        c.fail(f"`format` is {fmt!r}, expected {FORMAT!r}: not an ideogram4-engine manifest")
    if version not in FORMAT_VERSIONS:
        c.fail(f"`format_version` is {version!r}; this runtime reads version(s) "
               f"{', '.join(map(str, FORMAT_VERSIONS))}: the engines folder is from another exporter version, "
               "re-run `make export`")
    c.need(raw, REQUIRED_SECTIONS, "manifest")

    tok = c.obj(raw, "tokenizer", "")
    c.need(tok, ("folder", "max_text_tokens", "files"), "tokenizer")
    if not isinstance(tok["folder"], str) or ".." in Path(tok["folder"]).parts or Path(tok["folder"]).is_absolute():
        c.fail(f"`tokenizer.folder` must be a relative folder name, found {tok['folder']!r}")
    if not isinstance(tok["files"], list):
        c.fail(f"`tokenizer.files` must be a list of file entries, found {_describe(tok['files'])}")
    for k, entry in enumerate(tok["files"]):
        c.file_entry(entry, f"tokenizer.files[{k}]")
        if not entry["file"].startswith(tok["folder"].rstrip("/") + "/"):
            c.fail(f"`tokenizer.files[{k}].file` {entry['file']!r} is not inside the tokenizer folder {tok['folder']!r}")
    listed = {e["file"] for e in tok["files"]}
    for name in TOKENIZER_FILES:
        if f"{tok['folder'].rstrip('/')}/{name}" not in listed:
            c.fail(f"`tokenizer.files` lacks {name}: every tokenizer file must be covered by a sha256")
    if not _int(tok["max_text_tokens"]) or tok["max_text_tokens"] < 1:
        c.fail(f"`tokenizer.max_text_tokens` must be a positive integer, found {tok['max_text_tokens']!r}")

    sampler = c.obj(raw, "sampler", "")
    c.need(sampler, ("presets", "default_preset"), "sampler")
    presets = c.obj(sampler, "presets", "sampler.")
    if not presets:
        c.fail("`sampler.presets` is empty")
    for name, p in presets.items():
        where = f"sampler.presets.{name}"
        if not isinstance(p, dict):
            c.fail(f"`{where}` must be an object, found {_describe(p)}")
        c.need(p, ("steps", "guidance", "mu", "std"), where)
        if not (_int(p["steps"]) and p["steps"] >= 1 and isinstance(p["guidance"], list)
                and all(_num(g) for g in p["guidance"]) and _num(p["mu"]) and _num(p["std"])):
            c.fail(f"`{where}` must hold steps (int >= 1), guidance (numbers), mu and std (numbers)")
        if len(p["guidance"]) != p["steps"]:
            c.fail(f"`{where}.guidance` has {len(p['guidance'])} entries, expected one per step ({p['steps']})")
    if not isinstance(sampler["default_preset"], str) or sampler["default_preset"] not in presets:
        c.fail(f"`sampler.default_preset` {sampler['default_preset']!r} is not one of the presets "
               f"({', '.join(presets)})")

    rope = c.obj(raw, "rope", "")
    c.need(rope, ("head_dim", "mrope_section", "inv_freq", "image_position_offset"), "rope")
    hd, sec, inv = rope["head_dim"], rope["mrope_section"], rope["inv_freq"]
    if not _int(hd) or hd < 2 or hd % 2:
        c.fail(f"`rope.head_dim` must be a positive even integer, found {hd!r}")
    if not (isinstance(sec, list) and len(sec) == 3 and all(_int(s) and s >= 0 for s in sec)):
        c.fail(f"`rope.mrope_section` must be 3 non-negative integers, found {sec!r}")
    if not (isinstance(inv, list) and len(inv) == hd // 2 and all(_num(x) for x in inv)):
        c.fail(f"`rope.inv_freq` must be {hd // 2} numbers (head_dim/2), found "
               f"{len(inv) if isinstance(inv, list) else _describe(inv)}")
    if np.any(np.asarray(inv, np.float32).view(np.uint32) & 0xFFFF):
        c.fail("`rope.inv_freq` is not bf16-rounded (spec §2.6: the official DiT runs the table rounded to bf16): "
               "re-run `make export`")
    if not _int(rope["image_position_offset"]):
        c.fail("`rope.image_position_offset` must be an integer")

    limits = c.obj(raw, "limits", "")
    c.need(limits, REQUIRED_LIMITS, "limits")
    if not all(_num(limits[k]) for k in REQUIRED_LIMITS):
        c.fail(f"`limits` values must be numbers: {', '.join(REQUIRED_LIMITS)}")

    precision = c.obj(raw, "exporter", "").get("precision", ["faithful"])
    if not (isinstance(precision, list) and "faithful" in precision
            and all(isinstance(p, str) and p in PRECISION_VARIANTS for p in precision)):
        c.fail(f"`exporter.precision` must list 'faithful' and optionally {', '.join(PRECISION_VARIANTS)}, "
               f"found {precision!r}")

    source = c.obj(raw, "source", "")
    if source.get("synthetic") is not None and not isinstance(source["synthetic"], dict):
        c.fail(f"`source.synthetic` must be an object or null, found {_describe(source['synthetic'])}")

    comps = c.obj(raw, "components", "")
    missing = [n for n in REQUIRED_COMPONENTS if n not in comps]
    if missing:
        c.fail(f"component(s) {', '.join(missing)} missing from `components` (has: {', '.join(comps) or 'none'}); "
               "re-run `make export`")
    kern = raw.get("kernels")
    if kern is not None:
        if not (isinstance(kern, dict) and isinstance(kern.get("domain"), str) and isinstance(kern.get("variants"), dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in kern["variants"].items())):
            c.fail("`kernels` must be an object with `domain` (a string) and `variants` (stock -> fused variant names)")
    for name, comp in comps.items():
        if not isinstance(comp, dict):
            c.fail(f"`components.{name}` must be an object, found {_describe(comp)}")
        c.need(comp, ("graphs", "inputs", "outputs"), f"components.{name}")
        graphs = c.obj(comp, "graphs", f"components.{name}.")
        absent = [v for v in (*REQUIRED_VARIANTS, *(PRECISION_VARIANTS[p] for p in precision if PRECISION_VARIANTS[p]))
                  if v not in graphs]
        if absent:
            c.fail(f"`components.{name}.graphs` lacks the {', '.join(absent)} graph(s)")
        for variant, entry in graphs.items():
            c.file_entry(entry, f"components.{name}.graphs.{variant}")
        lacking = [v for v in (kern or {}).get("variants", {}).values() if v not in graphs]
        if lacking:
            c.fail(f"`components.{name}.graphs` lacks the {', '.join(lacking)} graph(s) that `kernels.variants` names")
        if comp.get("data") is not None:
            c.file_entry(comp["data"], f"components.{name}.data")
        if comp.get("dequantize") is not None:
            dq = c.obj(comp, "dequantize", f"components.{name}.")
            c.file_entry(dq.get("graph"), f"components.{name}.dequantize.graph")
            if comp.get("data") is None:
                c.fail(f"`components.{name}.dequantize` needs the component's `data` file")
            weights = dq.get("weights")
            for k, w in enumerate(weights if isinstance(weights, list) and weights else [None]):
                where = f"components.{name}.dequantize.weights[{k}]"
                if not (isinstance(w, dict) and isinstance(w.get("input"), str) and _int(w.get("axis"))):
                    c.fail(f"`{where}` must be {{input, axis, weight, scale}}, found {_describe(w)}")
                for part in ("weight", "scale"):
                    loc = w.get(part)
                    if not (isinstance(loc, dict) and _int(loc.get("offset")) and _int(loc.get("bytes"))
                            and isinstance(loc.get("shape"), list) and all(_int(d) for d in loc["shape"])
                            and isinstance(loc.get("dtype"), str)
                            and loc["offset"] + loc["bytes"] <= comp["data"]["bytes"]):
                        c.fail(f"`{where}.{part}` must be {{offset, bytes, shape, dtype}} inside the data file "
                               f"({comp['data']['bytes']} bytes), found {_describe(loc)}")
        for side in ("inputs", "outputs"):
            ios = comp[side]
            if not (isinstance(ios, list) and ios and all(isinstance(io, dict) and isinstance(io.get("name"), str)
                                                          for io in ios)):
                c.fail(f"`components.{name}.{side}` must be a non-empty list of {{name, dtype, shape}} objects")
    cache.check_sections(raw, c.fail, c.file_entry)
    problem = schema_error(raw)      # what the schema states and the checks above do not (schema.py)
    if problem:
        c.fail(f"does not follow the manifest schema: {problem} (re-run `make export`)")


def _check_files(m: Manifest) -> None:
    if not m.root.joinpath(m.raw["tokenizer"]["folder"]).is_dir():
        raise ManifestError(f"{m.path}: tokenizer folder {m.tokenizer_folder} is missing")
    for f in TOKENIZER_FILES:
        if not (m.tokenizer_folder / f).is_file():
            raise ManifestError(f"{m.path}: tokenizer file {m.tokenizer_folder / f} is missing")
    for entry in [*m.file_entries(), *m.tokenizer_entries]:
        p = m.root / entry["file"]
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            raise ManifestError(f"{m.path}: file {p} named by the manifest is missing "
                                "(incomplete copy? re-run `make export`)") from None
        if not p.is_file():
            raise ManifestError(f"{m.path}: {p} named by the manifest is not a regular file")
        if size != entry["bytes"]:
            raise ManifestError(f"{m.path}: file {p} is {size} bytes, the manifest says {entry['bytes']} "
                                "(truncated or replaced; re-copy or re-run `make export`)")


def load_manifest(folder: Path | str) -> Manifest:
    """Read and check `<folder>/manifest.json` and the presence and sizes of the files it names."""
    root = Path(folder).expanduser().absolute()
    if not root.exists():
        raise ManifestError(f"engines folder {root} does not exist (run `make export`)")
    if not root.is_dir():
        raise ManifestError(f"{root} is not a folder: expected an engines folder with {MANIFEST_FILE}")
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"{root} is not an engines folder: {MANIFEST_FILE} is missing: run `make export`")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path} is not valid JSON ({e}); re-run `make export`") from None
    except OSError as e:
        raise ManifestError(f"{path} cannot be read: {e}") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{path} must hold a JSON object, found {_describe(raw)}")
    _check(raw, path)
    m = Manifest(root, raw)
    try:
        m.presets
    except ValueError as e:
        raise ManifestError(f"{path}: bad sampler preset: {e}") from None
    _check_files(m)
    return m
