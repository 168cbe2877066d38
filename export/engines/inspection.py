"""What an engine is made of: the builder's verbose layer list or the engine inspector's JSON, turned into one
per-layer format (`<c>.layers.json`), and the facts of the ONNX graph the checks compare it with.

Layer sources differ: TensorRT-RTX's builder log lists every profile's layers (names end in `_myl<profile>_<n>`);
full TensorRT's inspector (10.x, and 11.x where the "Format/Datatype" field became "Datatype" + "Format") lists the
layers of the profile its execution context is set to, so each profile is inspected with its own context. The
inspector JSON of full TensorRT has no per-layer constants list."""
from __future__ import annotations

import json
import re

from .common import ENGINES_FORMAT_VERSION, LAYERS_FORMAT
from .checks import run_checks

# Substrings of a data-type description → the builder log's names (BFLOAT16 before FLOAT, UINT8 before INT8).
_DTYPE_TOKENS = (("FP8", "FP8"), ("E4M3", "FP8"), ("BFLOAT16", "BFloat16"), ("BF16", "BFloat16"), ("FP16", "Half"),
                 ("HALF", "Half"), ("FP32", "Float"), ("FLOAT", "Float"), ("UINT8", "UInt8"), ("INT8", "Int8"),
                 ("INT32", "Int32"), ("INT64", "Int64"), ("BOOL", "Bool"), ("E8M0", "E8M0"), ("FP4", "FP4"),
                 ("INT4", "Int4"))


def normalize_dtype(text) -> str:
    """'Row major linear FP16 format', 'Half', 'BFloat16' … → the builder log's name ('Half', 'BFloat16', …)."""
    up = str(text).upper()
    return next((name for token, name in _DTYPE_TOKENS if token in up), str(text))


def _tensor_dtype(t: dict) -> str:
    """TensorRT 10: "Format/Datatype"; TensorRT 11: separate "Datatype" and "Format"."""
    if "Format/Datatype" in t:
        return normalize_dtype(t["Format/Datatype"])
    return normalize_dtype(" ".join(str(t[k]) for k in ("Datatype", "DataType", "Format") if t.get(k)))


def _split_tensors(text: str) -> list[dict]:
    out = []
    for body in re.findall(r"\{(.*?)\}", text):
        name = re.search(r"Name:\s*([^,]+)", body)
        dims = re.search(r"Dimensions:\s*\[([^\]]*)\]", body)
        dtype = re.search(r"Datatype:\s*(\w+)", body)
        shape = [int(x) for x in dims.group(1).split(",") if x.strip()] if dims else []
        out.append({"name": name.group(1).strip() if name else "", "shape": shape,
                    "dtype": dtype.group(1) if dtype else ""})
    return out


def parse_layer_dump(text: str) -> list[dict]:
    """The builder's verbose 'Layers:' message (ProfilingVerbosity.DETAILED) → one dict per engine layer:
    name, type, tactic, inputs/constants/outputs ({name, shape, dtype}), metadata (the ONNX nodes it implements).
    Lines that do not follow the format are kept verbatim under `raw`."""
    layers = []
    for line in text.splitlines():
        if not line.startswith("Name: "):
            continue
        try:
            name = line[len("Name: "):line.index(", LayerType: ")]
            rest = line[line.index(", LayerType: ") + len(", LayerType: "):]
            ltype = rest[:rest.index(",")]
            ins = rest[rest.index("Inputs: [") + 9:rest.index("], Constants: [")]
            consts = rest[rest.index("], Constants: [") + 15:rest.index("], Outputs: [")]
            outs = rest[rest.index("], Outputs: [") + 13:rest.index("], TacticName: ")]
            tail = rest[rest.index("], TacticName: ") + 15:]
            tactic = tail[:tail.index(",")] if "," in tail else tail
            meta = re.findall(r"\[ONNX Layer: ([^\]]+)\]", tail)
            layers.append({"name": name, "type": ltype, "tactic": tactic.strip(), "inputs": _split_tensors(ins),
                           "constants": _split_tensors(consts), "outputs": _split_tensors(outs), "metadata": meta})
        except ValueError:
            layers.append({"raw": line})
    return layers


def inspector_layers(info_json: str) -> list[dict]:
    """IEngineInspector JSON (DETAILED) → the same per-layer dicts as `parse_layer_dump` (data types normalized to
    the builder log's names)."""
    data = json.loads(info_json)
    out = []
    for layer in data.get("Layers", []):
        if isinstance(layer, str):
            out.append({"name": layer, "type": "", "tactic": "", "inputs": [], "constants": [], "outputs": [],
                        "metadata": []})
            continue
        meta = layer.get("Metadata", "")
        tensors = lambda key: [{"name": t.get("Name", ""), "shape": t.get("Dimensions", []),  # noqa: E731
                                "dtype": _tensor_dtype(t)} for t in layer.get(key, []) if isinstance(t, dict)]
        out.append({"name": layer.get("Name", ""), "type": layer.get("LayerType", ""),
                    "tactic": str(layer.get("TacticName", layer.get("TacticValue", ""))),
                    "inputs": tensors("Inputs"), "constants": tensors("Constants"), "outputs": tensors("Outputs"),
                    "metadata": re.findall(r"\[ONNX Layer: ([^\]]+)\]", meta) if isinstance(meta, str) else []})
    return out


def graph_facts(graph_path: Path) -> dict:
    """What the checks compare an engine with, read from the ONNX graph alone (no weights loaded): initializer
    bytes by dtype and the attention blocks (each `Attention` node, or each softmax between two MatMuls)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(graph_path), load_external_data=False)
    g = model.graph
    by_dtype: dict[str, int] = {}
    fp8_count = 0
    for init in g.initializer:
        n = 1
        for d in init.dims:
            n *= d
        size = n * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize \
            if init.data_type not in (TensorProto.BFLOAT16, TensorProto.FLOAT8E4M3FN) else \
            n * (2 if init.data_type == TensorProto.BFLOAT16 else 1)
        key = TensorProto.DataType.Name(init.data_type)
        by_dtype[key] = by_dtype.get(key, 0) + size
        fp8_count += init.data_type == TensorProto.FLOAT8E4M3FN
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def walk(start, step, depth=5):
        frontier, seen = [start], set()
        for _ in range(depth):
            nxt = []
            for node in frontier:
                for m in step(node):
                    if m.name in seen:
                        continue
                    seen.add(m.name)
                    if m.op_type == "MatMul":
                        return m
                    nxt.append(m)
            frontier = nxt
        return None

    up = lambda node: [producer[i] for i in node.input if i in producer]  # noqa: E731
    down = lambda node: [m for o in node.output for m in consumers.get(o, [])]  # noqa: E731
    groups = []
    for n in g.node:
        if n.op_type == "Attention":
            groups.append({"form": "op", "anchor": n.name, "core": [n.name]})
        elif n.op_type in ("Softmax", "Exp"):
            qk, pv = walk(n, up), walk(n, down)
            if qk is not None and pv is not None:
                groups.append({"form": "matmul", "anchor": n.name, "core": [qk.name, n.name, pv.name]})
    total = sum(by_dtype.values())
    return {"graph": graph_path.name, "initializer_bytes": total, "initializer_bytes_by_dtype": by_dtype,
            "fp8_initializers": fp8_count, "fp8_initializer_bytes": by_dtype.get("FLOAT8E4M3FN", 0),
            "attention_blocks": groups}


def graph_ops(graph_path) -> set[str]:
    """The operator types of a graph (no weights loaded), for the parser's up-front support check."""
    import onnx
    return {n.op_type for n in onnx.load(str(graph_path), load_external_data=False).graph.node}


_PROFILE_SUFFIX = re.compile(r" \[profile (\d+)\]")


def inspect_engine(toolkit, blob, log, n_profiles: int) -> tuple[tuple[str, list[dict]] | None, str]:
    """The real engine inspector; returns (("engine-inspector", layers) or None, note). Full TensorRT with several
    profiles: one execution context (no device memory of its own) per profile, layers tagged with it."""
    trt = toolkit.trt
    n_err = len(log.errors)
    log.muted = True
    try:
        runtime = trt.Runtime(log.logger)
        engine = runtime.deserialize_cuda_engine(blob)
    except Exception as e:  # noqa: BLE001
        return None, f"deserialize_cuda_engine raised {type(e).__name__}: {e}"
    finally:
        log.muted = False
    if engine is None:
        why = "; ".join(m.splitlines()[0] for m in log.errors[n_err:]) or "no reason logged"
        del log.errors[n_err:]          # expected on a machine without a usable GPU: not a build error
        return None, f"deserialize_cuda_engine returned None ({why[:300]})"
    inspector = engine.create_engine_inspector()
    fmt = trt.LayerInformationFormat.JSON
    if toolkit.rtx or n_profiles == 1:
        return ("engine-inspector", inspector_layers(inspector.get_engine_information(fmt))), ""
    try:
        ctx = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        layers = []
        for p in range(n_profiles):
            if not ctx.set_optimization_profile_async(p, 0):
                raise RuntimeError(f"set_optimization_profile_async({p}) failed")
            inspector.execution_context = ctx
            for la in inspector_layers(inspector.get_engine_information(fmt)):
                hit = _PROFILE_SUFFIX.search(la["name"])
                if hit and int(hit.group(1)) != p:      # a listing that already holds every profile
                    continue
                layers.append({**la, "profile": p})
        return ("engine-inspector", layers), "one execution context per optimization profile"
    except Exception as e:  # noqa: BLE001
        return (("engine-inspector", inspector_layers(inspector.get_engine_information(fmt))),
                f"per-profile inspection failed ({e}): layers not separated by profile")


def layer_report(component: str, engine_path, engine_sha: str, engine_bytes: int, facts: dict, log,
                 inspected: tuple[str, list[dict]] | None, inspector_note: str, toolkit, n_profiles: int) -> dict:
    if inspected is not None:
        source, layers = inspected
        note = "IEngineInspector.get_engine_information(JSON) on the deserialized engine" + \
            (f" ({inspector_note})" if inspector_note else "")
    else:
        dump = log.layer_dump()
        layers = parse_layer_dump(dump) if dump else []
        source = "builder-log" if dump else "none"
        note = ("the builder's verbose 'Layers:' message (ProfilingVerbosity.DETAILED): the engine's final layer "
                "list as compiled; the engine inspector could not run here: " + inspector_note)
    types: dict[str, int] = {}
    for la in layers:
        types[la.get("type", "raw")] = types.get(la.get("type", "raw"), 0) + 1
    report = {
        "format": LAYERS_FORMAT, "version": ENGINES_FORMAT_VERSION, "component": component,
        "engine": {"file": engine_path.name, "sha256": engine_sha, "bytes": engine_bytes},
        "builder": toolkit.record(), "source": source, "source_note": note,
        "summary": {"engine_bytes": engine_bytes, "layers": len(layers), "layer_types": types,
                    "weights_memory_bytes": log.number("Total Weights Memory"),
                    "activation_memory_bytes": log.number("Total Activation Memory"),
                    "myelin": (log.find("After Myelin optimization") or "").strip() or None},
        "graph": facts,
        "layers": layers,
    }
    report["checks"] = run_checks(report, n_profiles)
    return report
