"""The first-block cache's graphs: each exported DiT graph cut into head, body and tail, plus two small
weightless graphs for the runtime's decision and extrapolation (runtime/cache.py).

The cut is a partition of the finished graph of any variant (cpu, cuda, cuda_fused, *_dql, *_w8a8), so every
op and every rounding stays what that variant computes, and every piece reads the variant's own weight file:

* head  = the nodes the first block's output needs (input projections, embeddings, RoPE casts, block 0);
  outputs `hidden` (block 0's output), `first_residual` (hidden − block 0's input, fp32) and `carry_<i>`:
  every other value of the head that later nodes read (the adaLN vector, the RoPE tables, a fused twin's
  next modulation, ...).
* body  = every other node: blocks 1… and the final layer; outputs `velocity`, bit for bit the full graph's,
  and `body_residual` (the last block's output − hidden, fp32).
* tail  = the final layer alone, fed `hidden` + `body_residual` (what a cached step runs instead of the body).

Body and tail take every input of the DiT (unused ones are ignored), `hidden` and the carries, so the
runtime feeds them the same dictionary whatever the variant's carries are. Names come from the builder's
marks (graphs/dit.py: `blocks_in`, `first_block_out`, `blocks_out`), which every rewrite keeps.
"""
from __future__ import annotations

import onnx
from onnx import helper

from .builder import BF16, F32, FP8, GraphBuilder
from .fuse import _attr
from .rewrite import _toposort

PIECES = ("head", "body", "tail")
RESIDUAL_SHAPE = ["batch", "sequence", "hidden"]


# outputs of the op library's quantizing ops (export/graphs/w8a8.py), None = the first input's type
_OUTPUT_TYPES = {"Fp8QuantizeRows": (FP8, F32), "NormModulateFp8": (FP8, F32), "SwiGLUFp8": (FP8, F32),
                 "GatedResidualModulateFp8": (None, FP8, F32), "Fp8RowScaledMatMul": (BF16,)}


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value, carried by hand (ONNX's inference stops at contrib and custom ops): a
    Cast gives its `to`, a Shape int64, a DequantizeLinear its scale's type, the W8A8 ops their own, every other
    op of these graphs its first input's type."""
    types = {i.name: i.data_type for i in model.graph.initializer}
    types.update({v.name: v.type.tensor_type.elem_type for v in model.graph.input})
    for n in _toposort(list(model.graph.node)):
        first = next((types[i] for i in n.input if i in types), None)
        fixed = _OUTPUT_TYPES.get(n.op_type) if n.domain == "ideogram4" else None
        for j, o in enumerate(n.output):
            t = (fixed[j] or first if fixed else _attr(n, "to") if n.op_type == "Cast" else
                 onnx.TensorProto.INT64 if n.op_type == "Shape" else
                 types.get(n.input[1]) if n.op_type == "DequantizeLinear" else first)
            if t is not None:
                types[o] = t
    return types


def _ancestors(nodes: list[onnx.NodeProto], values) -> set[int]:
    """Indices of the nodes that `values` are computed from (their producers, transitively)."""
    producer = {o: k for k, n in enumerate(nodes) for o in n.output}
    seen: set[int] = set()
    stack = [producer[v] for v in values if v in producer]
    while stack:
        k = stack.pop()
        if k in seen:
            continue
        seen.add(k)
        stack += [producer[i] for i in nodes[k].input if i in producer and producer[i] not in seen]
    return seen


def _renamed(node: onnx.NodeProto, names: dict[str, str]) -> onnx.NodeProto:
    new = onnx.NodeProto()
    new.CopyFrom(node)
    for j, i in enumerate(new.input):
        new.input[j] = names.get(i, i)
    for j, o in enumerate(new.output):
        new.output[j] = names.get(o, o)
    return new


def _piece(model: onnx.ModelProto, name: str, nodes: list[onnx.NodeProto], inputs: list, outputs: list,
           doc: str) -> onnx.ModelProto:
    """A model of `nodes` with the initializers and shape hints they read (external data: the same file)."""
    used = {i for n in nodes for i in n.input} | {o for n in nodes for o in n.output}
    g = model.graph
    graph = helper.make_graph(nodes, f"{g.name}_{name}", inputs, outputs,
                              [t for t in g.initializer if t.name in used], doc_string=doc,
                              value_info=[v for v in g.value_info if v.name in used])
    out = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name=model.producer_name)
    out.ir_version = model.ir_version
    return out


def _vi(name: str, elem_type: int, shape=None):
    return helper.make_tensor_value_info(name, elem_type, shape)


def split_first_block(model: onnx.ModelProto, marks: dict[str, str], regular_inputs: list[str]) -> dict:
    """{head, body, tail} models cut from `model` (a DiT graph of any variant) at the builder's `marks`.
    `regular_inputs`: the DiT's own inputs (a *_dql graph's other inputs are its bf16 weights)."""
    nodes = list(model.graph.node)
    c0, c1, c2 = marks["blocks_in"], marks["first_block_out"], marks["blocks_out"]
    if c1 == c2:
        raise ValueError("the first-block cache needs at least two DiT blocks")
    types = _value_types(model)
    outputs = [o.name for o in model.graph.output]
    every = set(range(len(nodes)))
    head = _ancestors(nodes, [c1])
    body = every - head
    tail = _ancestors(nodes, outputs) - _ancestors(nodes, [c2])
    produced = lambda ks: {o for k in ks for o in nodes[k].output}     # noqa: E731
    read = lambda ks: {i for k in ks for i in nodes[k].input if i}      # noqa: E731
    if c0 not in produced(head) or any(v not in types for v in (c0, c1, c2)):
        raise ValueError(f"{model.graph.name}: the cut values {c0!r}, {c1!r}, {c2!r} are not in this graph")
    if read(tail) & produced(body - tail) - {c2}:
        raise ValueError(f"{model.graph.name}: the final layer reads block values other than the last output")
    body_reads = read(body)
    carried = [o for k in sorted(head) for o in nodes[k].output if o in body_reads and o != c1]
    names = {c1: "hidden", **{v: f"carry_{i}" for i, v in enumerate(carried)}}
    graph_in = {i.name: i for i in model.graph.input}
    regular = [graph_in[n] for n in regular_inputs]
    def weights(ks) -> list:         # a *_dql twin's bf16 weight inputs that these nodes read
        reads = read(ks)
        return [i for n, i in graph_in.items() if n not in regular_inputs and n in reads]
    carry_vi = [_vi(names[v], types[v]) for v in carried]
    hidden_vi = _vi("hidden", types[c1])

    h_nodes = [_renamed(nodes[k], names) for k in sorted(head)]
    h_nodes += [helper.make_node("Cast", ["hidden"], ["hidden__fbc_f32"], to=F32, name="fbc_hidden_f32"),
                helper.make_node("Cast", [c0], [f"{c0}__fbc_f32"], to=F32, name="fbc_blocks_in_f32"),
                helper.make_node("Sub", ["hidden__fbc_f32", f"{c0}__fbc_f32"], ["first_residual"],
                                 name="fbc_first_residual")]
    pieces = {"head": _piece(model, "head", h_nodes, [graph_in[n] for n in regular_inputs] + weights(head),
                             [hidden_vi, _vi("first_residual", F32, RESIDUAL_SHAPE), *carry_vi],
                             "first-block cache head: input projections, embeddings and block 0")}

    b_nodes = [_renamed(nodes[k], names) for k in sorted(body)]
    b_nodes += [helper.make_node("Cast", [c2], [f"{c2}__fbc_f32"], to=F32, name="fbc_blocks_out_f32"),
                helper.make_node("Cast", ["hidden"], ["hidden__fbc_f32"], to=F32, name="fbc_hidden_f32"),
                helper.make_node("Sub", [f"{c2}__fbc_f32", "hidden__fbc_f32"], ["body_residual"],
                                 name="fbc_body_residual")]
    pieces["body"] = _piece(model, "body", b_nodes, regular + [hidden_vi, *carry_vi] + weights(body),
                            [*model.graph.output, _vi("body_residual", F32, RESIDUAL_SHAPE)],
                            "first-block cache body: blocks 1… and the final layer")

    t_nodes = [helper.make_node("Cast", ["hidden"], ["hidden__fbc_f32"], to=F32, name="fbc_hidden_f32"),
               helper.make_node("Add", ["hidden__fbc_f32", "body_residual"], ["blocks_out__fbc_f32"],
                                name="fbc_blocks_out"),
               helper.make_node("Cast", ["blocks_out__fbc_f32"], [c2], to=types[c2], name="fbc_blocks_out_cast")]
    t_nodes += [_renamed(nodes[k], names) for k in sorted(tail)]
    pieces["tail"] = _piece(model, "tail", t_nodes,
                            regular + [hidden_vi, _vi("body_residual", F32, RESIDUAL_SHAPE), *carry_vi] + weights(tail),
                            list(model.graph.output),
                            "first-block cache tail: the final layer on hidden + a cached body residual")
    return pieces


# ------------------------------------------------------------------------------ weightless helpers (fp32)

def build_residual_change() -> GraphBuilder:
    """Σ|r − ref| and Σ|ref| over the whole batch: the relative L1 change is their ratio (two scalars cross
    to the host, not the residuals)."""
    g = GraphBuilder("residual_change")
    r = g.input("residual", F32, RESIDUAL_SHAPE)
    ref = g.input("reference", F32, RESIDUAL_SHAPE)
    g.output(g.op("ReduceSum", g.op("Abs", g.op("Sub", r, ref)), keepdims=0), "change_l1", F32, [])
    g.output(g.op("ReduceSum", g.op("Abs", ref), keepdims=0), "reference_l1", F32, [])
    return g


def build_residual_extrapolate() -> GraphBuilder:
    """First-order TaylorSeer: latest + w·(latest − previous), w = steps since the latest full step over the
    steps between the two full steps."""
    g = GraphBuilder("residual_extrapolate")
    latest = g.input("latest", F32, RESIDUAL_SHAPE)
    previous = g.input("previous", F32, RESIDUAL_SHAPE)
    w = g.input("weight", F32, [1])
    g.output(g.op("Add", latest, g.op("Mul", g.op("Sub", latest, previous), w)), "extrapolated", F32,
             RESIDUAL_SHAPE)
    return g
