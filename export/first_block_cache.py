"""Writing the first-block cache's graphs into an export (exporter v11; the cut itself: graphs/cache.py).

Each DiT twin's head / body / tail file is named `<dit>.<piece>.<twin>.onnx` and reads `<dit>.onnx.data`; the two
weightless helpers are shared by every twin. The manifest entries mirror the components' (file entries, io).
"""
from __future__ import annotations

from pathlib import Path

import onnx

from ..runtime.manifest import LOAD_DEQUANTIZED
from .files import sha256_file
from .graphs.cache import PIECES, build_residual_change, build_residual_extrapolate, split_first_block


def _file_entry(path: Path) -> dict:
    return {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def _io(name, dtype, shape, meaning):
    return {"name": name, "dtype": dtype, "shape": shape, "meaning": meaning}


def write_pieces(name: str, twins: dict[str, onnx.ModelProto], marks: dict[str, str], ins: list,
                        outs: list, table: list[dict], folder: Path) -> dict:
    """Every twin of a DiT cut into head, body and tail (graphs/cache.py), all reading `<name>.onnx.data`; a
    *_dql piece's FP8 weights are the entries of the component's table that it takes (named per variant)."""
    regular = [io["name"] for io in ins]
    section: dict[str, dict] = {p: {"graphs": {}} for p in PIECES}
    written: dict[bytes, str] = {}
    for variant, model in twins.items():
        for piece, m in split_first_block(model, marks, regular).items():
            data = m.SerializeToString()
            if data not in written:
                written[data] = f"{name}.{piece}.{variant}.onnx"
                (folder / written[data]).write_bytes(data)
            section[piece]["graphs"][variant] = _file_entry(folder / written[data])
            if variant.endswith(LOAD_DEQUANTIZED):     # a fused twin's head also takes block 1's adaLN weights
                takes = {i.name for i in m.graph.input}
                section[piece].setdefault("dequantize_inputs", {})[variant] = [w["input"] for w in table
                                                                              if w["input"] in takes]
    carry = "carry_<i>: the head's values that later nodes read (the variant's own; pass every one on)"
    hidden = _io("hidden", "float32|bfloat16", ["batch", "sequence", "hidden"],
                 "block 0's output (the variant's dtype), from the head")
    residual = lambda n, m: _io(n, "float32", ["batch", "sequence", "hidden"], m)   # noqa: E731
    section["head"].update(inputs=ins, outputs=[hidden, residual("first_residual", "hidden - block 0's input"),
                                                _io("carry_<i>", "any", [], carry)])
    section["body"].update(inputs=[*ins, hidden, _io("carry_<i>", "any", [], carry)],
                           outputs=[*outs, residual("body_residual", "last block's output - hidden")])
    section["tail"].update(inputs=[*ins, hidden, residual("body_residual", "a cached (or extrapolated) body residual"),
                                   _io("carry_<i>", "any", [], carry)], outputs=outs)
    return section


def write_ops(folder: Path) -> dict:
    """The first-block cache's weightless fp32 graphs (graphs/cache.py), one file each for every backend."""
    out = {"decision": "per step run both heads; reuse the bodies' residuals (tail instead of body) when "
                       "max over the DiTs run of change_l1 / reference_l1 < threshold, after warm-up and within "
                       "the cap on consecutive reused steps (runtime/cache.py)"}
    for name, build in (("residual_change", build_residual_change), ("residual_extrapolate", build_residual_extrapolate)):
        g = build()
        g.save(folder / f"{name}.onnx")
        out[name] = {"graph": _file_entry(folder / f"{name}.onnx"),
                     "inputs": [_io(i.name, "float32", [], "") for i in g.inputs],
                     "outputs": [_io(o.name, "float32", [], "") for o in g.outputs]}
    return out
