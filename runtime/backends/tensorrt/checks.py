"""What the manifest's `engines` section says, and the refusals made from it before anything goes to the GPU:
module and version, GPU architecture, file checksum."""
from __future__ import annotations

import hashlib
from pathlib import Path

from ...contract import TRT_MODULES
from ..base import BackendUnavailable
from .errors import EngineChecksumError, EngineMismatch

MODULES = TRT_MODULES       # builder name -> Python module
FP8_MIN_CC = (8, 9)            # FP8 tensor-core math: Ada (8.9), Hopper (9.0), Blackwell (10.x, 12.x)


def engines_section(manifest) -> dict:
    raw = getattr(manifest, "raw", manifest)
    section = raw.get("engines")
    root = getattr(manifest, "root", "the engines folder")
    if not section or not section.get("components"):
        raise BackendUnavailable(f"{root} has no TensorRT engines (manifest.json has no `engines` section): "
                                 "run `make engines` (python -m ideogram4_engine.export.engines --engines <folder>)")
    return section


def engine_entries(manifest, components=None) -> dict[str, dict]:
    section = engines_section(manifest)
    raw = getattr(manifest, "raw", manifest)
    names = list(components) if components else list(raw["components"])
    missing = [c for c in names if c not in section["components"]]
    if missing:
        raise BackendUnavailable(f"no engine for {', '.join(missing)} (built: {', '.join(section['components'])}); "
                                 "run `make engines`")
    return {c: section["components"][c] for c in names}


def has_fp8(manifest, component: str, entry: dict) -> bool:
    """Whether the component's engine computes with FP8 weights: the export records FP8 weights for load-time
    dequantization; TensorRT-RTX also says so when it drops targets below 8.9."""
    raw = getattr(manifest, "raw", manifest)
    comp = raw.get("components", {}).get(component, {})
    return bool(comp.get("dequantize")) or "fp8" in str(entry.get("targets", {}).get("note", "")).lower()


def parse_cc(cc: str) -> tuple[int, int]:
    major, _, minor = str(cc).partition(".")
    return int(major), int(minor or 0)


def check_builder(entry: dict, component: str, module_name: str, version: str) -> None:
    """The engine was built by this module and version (engines are not portable across either)."""
    b = entry["builder"]
    if b["module"] != module_name:
        raise EngineMismatch(f"{component}.engine was built by {b['name']} ({b['module']} {b['version']}) and cannot "
                             f"be loaded by {module_name}: use the backend of that module, or rebuild with "
                             f"`make engines BUILDER={'tensorrt-rtx' if module_name == 'tensorrt_rtx' else 'tensorrt'}`")
    if b["version"] != version:
        raise EngineMismatch(f"{component}.engine was built by {b['name']} {b['version']}; the installed {module_name} "
                             f"is {version}. TensorRT engines only load in the version that built them: rebuild with "
                             f"`make engines` (or install {b['name']}=={b['version']})")


def check_architecture(entry: dict, component: str, cc: tuple[int, int], gpu: str = "this GPU",
                       fp8: bool = False) -> None:
    """The GPU's compute capability is one the engine targets. TensorRT-RTX engines built for the builder's default
    targets are also meant for later capabilities (`forward_compatible`); the runtime's header check decides those.
    Below 8.9 an FP8 engine cannot run at all: no rebuild helps, so the advice is another backend."""
    t = entry["targets"]
    targets = [parse_cc(x) for x in t["compute_capabilities"]]
    have = f"{cc[0]}.{cc[1]}"
    listed = ", ".join(t["compute_capabilities"]) or "none recorded"
    rtx = entry["builder"]["module"] == "tensorrt_rtx"
    if cc in targets:
        return
    if fp8 and cc < FP8_MIN_CC:
        raise EngineMismatch(f"{gpu} has compute capability {have}; {component}.engine computes with FP8 weights, "
                             "which need compute capability 8.9 or later (Ada, Hopper, Blackwell), so no TensorRT "
                             "build can run it here. Use the onnxruntime-cuda backend (`--backend onnxruntime-cuda`)")
    if rtx and cc[0] in (9, 10):
        raise EngineMismatch(f"{gpu} has compute capability {have} (data-center {'Hopper' if cc[0] == 9 else 'Blackwell'}"
                             f"); TensorRT-RTX runs only on RTX-class architectures (8.x, 12.x) and these engines "
                             f"target {listed}. Use full TensorRT engines (`make engines BUILDER=tensorrt` on this GPU) "
                             "or the onnxruntime-cuda backend")
    if t.get("forward_compatible") and targets and cc > max(targets):
        return
    if not targets:
        return          # nothing recorded (full TensorRT built where the GPU was unknown): the runtime decides
    raise EngineMismatch(f"{component}.engine targets compute capability {listed}; {gpu} is {have}. Rebuild for it: "
                         + (f"`make engines ENGINE_FLAGS=--compute-capabilities={have}`" if rtx else
                            "`make engines BUILDER=tensorrt` on this GPU"))


def verify_engine(entry: dict, component: str, data, path: Path) -> None:
    if len(data) != entry["bytes"]:
        raise EngineChecksumError(f"{path}: {len(data)} bytes, the manifest says {entry['bytes']} (truncated or "
                                  "replaced; re-run `make engines`)")
    actual = hashlib.sha256(data).hexdigest()
    if actual != entry["sha256"]:
        raise EngineChecksumError(f"{path}: sha256 mismatch: expected {entry['sha256']}, actual {actual}; the engine "
                                  "was modified after `make engines` (re-run it)")
