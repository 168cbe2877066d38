"""Per-backend rewrites of the canonical bf16 graphs, for backends that lack bf16 kernels for some ops.

A bf16 op on real hardware means "compute in fp32, round to bf16". So an op a backend cannot run in bf16 is
run in fp32 on widened inputs and its output rounded through Cast(bf16): same numbers, other kernels.

* `cpu` — onnxruntime's CPU provider has almost no bf16 kernels: every op is emulated, every bf16 value
  becomes an fp32 value holding a bf16-representable number (Cast(bf16) → Cast(fp32) after each op).
* `cuda` — onnxruntime's CUDA provider runs most of the graph in bf16; only the ops listed in
  `CUDA_FP32_OPS` (found on the GPU machine: no bf16 kernel registered) are wrapped, and every FP8 linear
  becomes onnxruntime's `MatMulBlockQuantizedFp8Weight` on the stored e4m3 bytes (`fp8_matmuls`).
* `*_dql` — the graphs for `dequantize_at_load`: each FP8 weight's dequantization cut out and the bf16 weight
  made a graph input (`weights_as_inputs`), then emulated like the twin of the same provider.

The rewritten graphs keep the bf16 initializers and read the same weight file as the canonical graph.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from .builder import BF16, F32

# onnxruntime-gpu 1.31 (CUDA EP) has no bf16 kernel for these (session creation fails with "Provider type
# for <op> node ... is not set"); measured with scripts/gpu_export_check.py. The dequantization cannot instead
# be Cast(e4m3→bf16)·scale: that CUDA Cast returns wrong values (up to 9.2e18 from e4m3 weights, H200,
# docs/tuning.md §4), so it stays DequantizeLinear in fp32 → Cast(bf16).
CUDA_FP32_OPS = frozenset({"DequantizeLinear", "Resize"})


def _types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.value_info, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def _consumers(nodes) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _fused_bias_matmuls(model: onnx.ModelProto) -> set[str]:
    """Outputs of MatMuls whose only consumer is an Add of an initializer (a Linear's bias). GEMM libraries
    (PyTorch's addmm, cuBLASLt epilogues, TensorRT) add the bias to the fp32 accumulator and round once, so
    under full emulation these MatMul results are not rounded on their own."""
    inits = {i.name for i in model.graph.initializer}
    consumers = _consumers(model.graph.node)
    out = set()
    for n in model.graph.node:
        if n.op_type == "MatMul":
            users = consumers.get(n.output[0], [])
            if len(users) == 1 and users[0].op_type == "Add" and any(i in inits for i in users[0].input):
                out.add(n.output[0])
    return out


def _softmax_in_fp32(node: onnx.NodeProto) -> None:
    """onnxruntime's Attention takes softmax_precision; the canonical graph omits it for TensorRT."""
    if node.op_type == "Attention" and not any(a.name == "softmax_precision" for a in node.attribute):
        node.attribute.append(helper.make_attribute("softmax_precision", F32))


def emulate_bf16(model: onnx.ModelProto, ops: frozenset[str] | None = None) -> onnx.ModelProto:
    """Run the ops in `ops` (all ops if None) in fp32 with their bf16 results rounded as bf16 kernels would.
    Same inputs, outputs and weight file as `model`."""
    full = ops is None
    types = _types(model)
    unrounded = _fused_bias_matmuls(model) if full else set()
    nodes: list[onnx.NodeProto] = []
    wide: dict[str, str] = {}           # bf16 value -> fp32 value holding the same number

    def widen(name: str) -> str:
        if name not in wide:
            wide[name] = f"{name}__f32"
            nodes.append(helper.make_node("Cast", [name], [wide[name]], to=F32, name=f"cast_{wide[name]}"))
        return wide[name]

    for node in model.graph.node:
        new = onnx.NodeProto()
        new.CopyFrom(node)
        _softmax_in_fp32(new)
        if not full and node.op_type not in ops:
            nodes.append(new)
            continue
        for j, i in enumerate(node.input):
            if i and types.get(i) == BF16:
                new.input[j] = widen(i)
        post = []
        for j, o in enumerate(node.output):
            if types.get(o) != BF16:
                continue
            if o in unrounded:                         # bias epilogue follows: stays fp32
                new.output[j] = wide[o] = f"{o}__f32"
            elif node.op_type == "Cast":               # the rounding itself
                if full:
                    post.append(("widen", o))
            else:                                      # compute in fp32, round to bf16
                new.output[j] = f"{o}__raw"
                post.append(("round", o))
        nodes.append(new)
        for kind, o in post:
            if kind == "round":
                nodes.append(helper.make_node("Cast", [f"{o}__raw"], [o], to=BF16, name=f"cast_{o}"))
            if full:
                widen(o)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    hints = [v for v in out.graph.value_info if v.type.tensor_type.elem_type != BF16]   # types unchanged: still true
    del out.graph.value_info[:]
    out.graph.value_info.extend(hints)
    return out


def bf16_to_fp32_emulation(model: onnx.ModelProto) -> onnx.ModelProto:
    """The CPU twin: every op emulated."""
    return emulate_bf16(dequantize_when_needed(model), None)


def cuda_dequantized_at_load(model: onnx.ModelProto) -> onnx.ModelProto:
    """The `dequantize_at_load` graph for CUDA: every FP8 weight a bf16 (in, out) input (its DequantizeLinear →
    Transpose cut out), then the CUDA twin's emulation and attention."""
    return fused_attention(emulate_bf16(weights_as_inputs(model), CUDA_FP32_OPS))


def cpu_dequantized_at_load(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same for the CPU provider: the bf16 inputs are widened like every other bf16 value, so the numbers are
    the cpu twin's (a Transpose of bf16-representable fp32 values is exact)."""
    return emulate_bf16(weights_as_inputs(model), None)


def for_cuda(model: onnx.ModelProto, ops: frozenset[str] = CUDA_FP32_OPS) -> onnx.ModelProto:
    """The onnxruntime-CUDA twin: bf16 except the ops without bf16 CUDA kernels, self-attention as onnxruntime's
    fused MultiHeadAttention, FP8 linears as its fused FP8-weight MatMul."""
    return fp8_matmuls(fused_attention(emulate_bf16(model, ops)))


# ------------------------------------------------------------------------------ attention on onnxruntime-CUDA

MHA = "MultiHeadAttention"       # com.microsoft


def _shapes(model: onnx.ModelProto) -> dict[str, list]:
    g = onnx.shape_inference.infer_shapes(model).graph
    return {v.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
            for v in [*g.input, *g.value_info, *g.output] if v.type.tensor_type.HasField("shape")}


def _ints(node: onnx.NodeProto, name: str) -> list[int] | None:
    return next((list(a.ints) for a in node.attribute if a.name == name), None)


def fused_attention(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each self-attention `Reshape(Transpose(Attention(Transpose(q), Transpose(k), Transpose(v))), (B, L, H·hd))`
    with q, k, v of shape (B, L, H, hd) — the DiT's block — becomes onnxruntime's contrib
    `MultiHeadAttention(q', k', v', num_heads=H)` on the same tensors viewed as (B, L, H·hd).

    Why: on onnxruntime-gpu 1.31.1 the opset-23 `Attention` at head_dim 256 runs an unfused path (two GEMMs around
    an fp32 softmax over 18 × L² scores) at 1.28 ms per call with its Transposes, `MultiHeadAttention` a fused
    kernel at 0.55 ms, equal up to bf16 output rounding (H200, docs/tuning.md §12–13). It also drops the four
    Transposes per block and the L² score buffers. Attention nodes of any other form (causal, masked, grouped
    heads: the text encoder's) are left as they are."""
    shapes = _shapes(model)
    shape_consts = {i.name: onnx.numpy_helper.to_array(i).tolist() for i in model.graph.initializer
                    if i.data_type == TensorProto.INT64 and not i.external_data and len(i.dims) == 1}
    users = _consumers(model.graph.node)
    producer = {o: n for n in model.graph.node for o in n.output}
    replace: dict[int, list[onnx.NodeProto]] = {}
    for att in model.graph.node:
        if att.op_type != "Attention" or len(att.input) != 3 or len(att.output) != 1 or \
                any(a.name not in ("scale", "softmax_precision") for a in att.attribute):
            continue
        ins = [producer.get(i) for i in att.input]
        if any(t is None or t.op_type != "Transpose" or _ints(t, "perm") != [0, 2, 1, 3]
               or len(users.get(t.output[0], [])) != 1 for t in ins):
            continue
        dims = [shapes.get(t.input[0]) for t in ins]
        if any(d is None or len(d) != 4 or not isinstance(d[2], int) or not isinstance(d[3], int) or d[2:] != dims[0][2:]
               for d in dims):
            continue                                     # head counts unknown or grouped: not this pattern
        heads, head_dim = dims[0][2], dims[0][3]
        after = users.get(att.output[0], [])
        back = users.get(after[0].output[0], []) if len(after) == 1 else []
        if len(after) != 1 or after[0].op_type != "Transpose" or _ints(after[0], "perm") != [0, 2, 1, 3] or \
                len(back) != 1 or back[0].op_type != "Reshape" or \
                shape_consts.get(back[0].input[1]) not in ([0, 0, heads * head_dim], [0, 0, -1]):
            continue
        scale = next((a.f for a in att.attribute if a.name == "scale"), head_dim ** -0.5)
        flat = [f"{t.input[0]}__flat" for t in ins]
        new = [helper.make_node("Reshape", [t.input[0], "mha_flat_shape"], [f], name=f) for t, f in zip(ins, flat)]
        new.append(helper.make_node(MHA, flat, list(back[0].output), name=att.name or f"mha_{back[0].output[0]}",
                                    domain="com.microsoft", num_heads=heads, scale=scale))
        replace[id(att)] = new
        for n in (*ins, after[0], back[0]):
            replace[id(n)] = []
    return _with_contrib_nodes(model, replace, np.array([0, 0, -1], np.int64), "mha_flat_shape")


def _with_contrib_nodes(model: onnx.ModelProto, replace: dict[int, list[onnx.NodeProto]], const: np.ndarray,
                        const_name: str) -> onnx.ModelProto:
    """A copy of `model` with each node whose id is in `replace` swapped for its list of nodes (com.microsoft
    ops among them), re-sorted, with the rewrite's one constant added and what became unused pruned; `model`
    itself when there is nothing to replace."""
    if not replace:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = [_copy(m) for n in model.graph.node for m in replace.get(id(n), [n])]
    del out.graph.node[:]
    out.graph.node.extend(_toposort(nodes))
    out.graph.initializer.append(onnx.numpy_helper.from_array(const, const_name))
    if not any(o.domain == "com.microsoft" for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _prune(out)
    return out


# ------------------------------------------------------------------------------ FP8 linears on onnxruntime-CUDA

FP8_MATMUL = "MatMulBlockQuantizedFp8Weight"    # com.microsoft, CUDA provider, onnxruntime-gpu >= 1.31


def fp8_matmuls(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every FP8 linear DequantizeLinear(q, s, axis=0) → Cast(bf16) → Transpose → MatMul(x, ·) becomes
    onnxruntime's `MatMulBlockQuantizedFp8Weight(x, q, s[:, None], block_size=in)` on the (out, in) e4m3 bytes as
    stored: the weight is dequantized to bf16(q·s) — the same fp32 product rounded once, as DequantizeLinear →
    Cast — in a scratch tile of at most 256 MiB right before a cuBLAS GEMM, so only the e4m3 bytes stay resident
    and each weight costs 3 bytes of traffic per parameter instead of 11 (docs/tuning.md §10: bit-identical at
    the model's GEMM shapes, 0.67 vs 0.92 ms at w1; rows M ≤ 8 take a GEMV kernel of another summation order).

    Applied after the emulation, which has already widened the DequantizeLinear's bf16 scale to fp32: the
    per-row scale becomes the op's fp32 rows by one Unsqueeze, a constant subgraph that onnxruntime folds at
    session creation (the backend keeps constant folding on for CUDA: no DequantizeLinear of an initializer is
    left there to fold)."""
    users = _consumers(model.graph.node)
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    replace: dict[int, list[onnx.NodeProto]] = {}      # id(node) -> nodes in its place ([] drops it)
    for dq in _fp8_dequantizations(model):
        q, scale = dq.input[0], dq.input[1]
        weight, producers = _rounded_weight(dq, users)
        matmuls = users.get(weight, [])
        axis = _axis(dq)
        if not matmuls or any(m.op_type != "MatMul" or m.input[1] != weight or m.input[0] == weight for m in matmuls):
            raise ValueError(f"FP8 weight {q!r} feeds {[m.op_type for m in matmuls]}; {FP8_MATMUL} replaces only "
                             "MatMul(x, W)")
        perm = [list(a.ints) for a in producers[-1].attribute if a.name == "perm"]
        if axis != 0 or len(dims[q]) != 2 or producers[-1].op_type != "Transpose" or perm != [[1, 0]]:
            raise ValueError(f"FP8 weight {q!r} has shape {dims[q]}, scale axis {axis} and is used through "
                             f"{[p.op_type for p in producers]}; expected (out, in), axis 0, then a Transpose")
        rows = f"{q}__scale_rows"
        replace[id(dq)] = [helper.make_node("Unsqueeze", [scale, "fp8mm_axis1"], [rows], name=rows)]
        for p in producers[1:]:
            replace[id(p)] = []
        for m in matmuls:
            replace[id(m)] = [helper.make_node(FP8_MATMUL, [m.input[0], q, rows], list(m.output),
                                               name=m.name or m.output[0], domain="com.microsoft",
                                               block_size=dims[q][1])]
    return _with_contrib_nodes(model, replace, np.array([1], np.int64), "fp8mm_axis1")


# ------------------------------------------------------------------------------ when the weights are dequantized

def _fp8_dequantizations(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The DequantizeLinear nodes that expand an e4m3 initializer (a quantized Linear's weight)."""
    fp8 = {i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT8E4M3FN}
    return [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in fp8]


def _axis(dq: onnx.NodeProto) -> int:
    return next((a.i for a in dq.attribute if a.name == "axis"), 1)      # ONNX's default axis is 1


def _rounded_weight(node: onnx.NodeProto, users: dict[str, list[onnx.NodeProto]]) -> tuple[str, list[onnx.NodeProto]]:
    """(name of the bf16 (in, out) weight a dequantization produces, the nodes that produce it from the e4m3
    bytes): DequantizeLinear → Transpose in the canonical graph, DequantizeLinear → Cast(bf16) → Transpose in
    the twins."""
    chain = [node]
    nxt = users.get(node.output[0], [])
    if len(nxt) == 1 and nxt[0].op_type == "Cast" and \
            next(a.i for a in nxt[0].attribute if a.name == "to") == BF16:
        chain.append(nxt[0])
        nxt = users.get(nxt[0].output[0], [])
    if len(nxt) == 1 and nxt[0].op_type == "Transpose":
        chain.append(nxt[0])
    return chain[-1].output[0], chain


def dequantize_when_needed(model: onnx.ModelProto) -> onnx.ModelProto:
    """Make every FP8 weight's dequantization wait for the activation it multiplies.

    A DequantizeLinear of an initializer depends on nothing, so onnxruntime's executor may run them all
    first and hold every dequantized weight (fp32 + bf16: 6 bytes per parameter) at once — 124 GiB for the
    full model on the H200, 49 GiB with this rewrite (docs/tuning.md §7). Here the per-row scale passes through
    Reshape(scale, shape + 0·Shape(x)[:1]): a host-side int64 computation that changes no value but ties the
    dequantization to x, so each weight is expanded right before its MatMul and its buffers are reused by the
    next one. For the CPU twin only: TensorRT needs constant DequantizeLinear inputs to fold, and the CUDA
    twin has no DequantizeLinear left (`fp8_matmuls`)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    dqs = _fp8_dequantizations(out)
    users = _consumers(out.graph.node)
    dims = {i.name: list(i.dims) for i in out.graph.initializer}
    extra = [onnx.numpy_helper.from_array(np.zeros(1, np.int64), "dq_dep_zero")]
    before: dict[int, list[onnx.NodeProto]] = {}       # id(DQ node) -> nodes to insert before it
    token: dict[str, str] = {}                          # activation -> its zero-valued shape token
    for dq in dqs:
        weight = _rounded_weight(dq, users)[0]
        act = next((i for u in users.get(weight, []) for i in u.input if i and i != weight and i not in dims), None)
        scale_dims = dims.get(dq.input[1])
        if act is None or scale_dims is None or len(scale_dims) != 1:
            continue                                    # nothing to wait for, or not a per-row scale
        new: list[onnx.NodeProto] = []
        if act not in token:
            token[act] = f"{act}__dq_dep"
            new += [helper.make_node("Shape", [act], [f"{act}__dq_dim"], start=0, end=1, name=f"{act}__dq_dim"),
                    helper.make_node("Mul", [f"{act}__dq_dim", "dq_dep_zero"], [token[act]], name=token[act])]
        scale, tag = dq.input[1], f"{dq.name}__dep"
        extra.append(onnx.numpy_helper.from_array(np.array(scale_dims, np.int64), f"{tag}_shape"))
        new += [helper.make_node("Add", [f"{tag}_shape", token[act]], [f"{tag}_shape_x"], name=f"{tag}_add"),
                helper.make_node("Reshape", [scale, f"{tag}_shape_x"], [f"{tag}_scale"], name=f"{tag}_reshape")]
        dq.input[1] = f"{tag}_scale"
        before[id(dq)] = new
    if not before:
        return out
    nodes = [_copy(m) for m in _toposort([m for n in out.graph.node for m in [*before.get(id(n), []), n]])]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(extra)
    return out


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    new = onnx.NodeProto()
    new.CopyFrom(node)
    return new


def _toposort(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Nodes in an order where each comes after its producers, otherwise as given (stable)."""
    import heapq
    producer = {o: k for k, n in enumerate(nodes) for o in n.output}
    waiting = [sum(1 for i in set(n.input) if i in producer) for n in nodes]
    users: dict[int, list[int]] = {}
    for k, n in enumerate(nodes):
        for i in set(n.input):
            if i in producer:
                users.setdefault(producer[i], []).append(k)
    ready = [k for k, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    out = []
    while ready:
        k = heapq.heappop(ready)
        out.append(nodes[k])
        for u in users.get(k, []):
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(out) != len(nodes):
        raise ValueError("graph has a cycle")
    return out


def _prune(model: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nobody reads and initializers nobody uses (in place)."""
    g = model.graph
    wanted = {o.name for o in g.output}
    keep: list[onnx.NodeProto] = []
    for n in reversed(g.node):
        if any(o in wanted for o in n.output):
            keep.append(n)
            wanted.update(i for i in n.input if i)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [i for i in g.initializer if i.name in wanted]
    del g.initializer[:]
    g.initializer.extend(inits)


def fp8_weights(model: onnx.ModelProto) -> list[tuple[str, str, int]]:
    """(e4m3 initializer, its scale initializer, axis) of every FP8 weight, in graph order."""
    return [(dq.input[0], dq.input[1], _axis(dq)) for dq in _fp8_dequantizations(model)]


def weights_as_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with every FP8 weight's dequantization (DequantizeLinear [→ Cast] → Transpose) cut out:
    the bf16 (in, out) weight becomes a graph input named after the e4m3 initializer (appended after the regular
    inputs, in graph order), to be computed once at load by the `dequantize` graph with the same ops and bound
    for every run. Nothing else changes, so the results are bit-identical to the graph it is made from."""
    users = _consumers(model.graph.node)
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    rename: dict[str, str] = {}
    drop: set[int] = set()
    inputs = []
    for dq in _fp8_dequantizations(model):
        weight, producers = _rounded_weight(dq, users)
        rename[weight] = dq.input[0]
        drop.update(id(n) for n in producers)
        shape = dims[dq.input[0]][::-1] if producers[-1].op_type == "Transpose" else dims[dq.input[0]]
        inputs.append(helper.make_tensor_value_info(dq.input[0], BF16, shape))
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    for n in model.graph.node:
        if id(n) in drop:
            continue
        new = _copy(n)
        for j, i in enumerate(new.input):
            new.input[j] = rename.get(i, i)
        nodes.append(new)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.input.extend(inputs)
    inits = [i for i in out.graph.initializer if i.name not in rename.values()]    # the e4m3 bytes
    del out.graph.initializer[:]
    out.graph.initializer.extend(inits)
    _prune(out)
    return out
