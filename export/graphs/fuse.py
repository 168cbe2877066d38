"""The `cuda_fused` twins: the CUDA twins' elementwise chains as the project's own fused CUDA ops (kernels/).

Applied to a finished `cuda` or `cuda_dql` graph (same inputs, outputs and weight file). Each pattern below is the
op-by-op form that export/graphs/dit.py and layers.py emit; the op computing it keeps every bf16 rounding of that
form (kernels/fused.cu says how), so the fused graph's numbers are those of the graph it is made from.

* `NormModulate(x, gain, s)`          = RMSNormalization(x, gain) · (s + 1)                       (adaLN modulation)
* `GatedResidual(h, b, gain, g)`      = h + Tanh(g) · RMSNormalization(b, gain)                   (gated residual)
* `GatedResidualModulate(…, gain2, s)`= the residual and the next modulation of its result, two outputs
  (within a block: attention residual → FFN modulation; across blocks: FFN residual → next attention modulation)
* `QkvNormRope(qkv, gq, gk, cos, sin)`= Reshape → Split → Squeeze ×3, RMSNormalization of q and k, the rotation
  x·cos + Gather(x, swap)·sin, and the Reshapes to (B, L, H·hd) that MultiHeadAttention reads
* `SwiGLU(a, b)`                      = Cast(bf16)(Cast(a)·Sigmoid(Cast(a))) · b                  (SiLU·up)

Graphs without these patterns (the VAE) come back unchanged; the text encoder's MLP gets `SwiGLU`.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from .builder import BF16, F32
from .rewrite import _consumers, _copy, _prune, _toposort, cuda_dequantized_at_load, for_cuda

DOMAIN = "ideogram4"
OP_VERSION = 1
OPS = ("NormModulate", "GatedResidual", "GatedResidualModulate", "QkvNormRope", "SwiGLU")


class _Graph:
    """Read-only indexes over one graph for the matchers."""

    def __init__(self, model: onnx.ModelProto):
        self.nodes = list(model.graph.node)
        self.users = _consumers(self.nodes)
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consts = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer
                       if not i.external_data and int(np.prod(i.dims, dtype=np.int64)) <= 4096}
        self.dtypes = _dtypes(model)
        self.outputs = {o.name for o in model.graph.output}

    def sole_user(self, value: str, op_type: str) -> onnx.NodeProto | None:
        """The one node reading `value`, if it is of `op_type` and `value` is no graph output."""
        users = self.users.get(value, [])
        if len(users) == 1 and users[0].op_type == op_type and value not in self.outputs:
            return users[0]
        return None

    def made_by(self, value: str, op_type: str) -> onnx.NodeProto | None:
        n = self.producer.get(value)
        return n if n is not None and n.op_type == op_type else None

    def const(self, value: str):
        return self.consts.get(value)


def _dtypes(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value. ONNX's shape inference stops at the contrib ops (MatMulBlockQuantizedFp8Weight,
    MultiHeadAttention: no schema in onnx), so types are carried by hand: a Cast gives its `to`, a Shape int64,
    a DequantizeLinear its scale's type, every other op of these graphs its first input's type."""
    types = {i.name: i.data_type for i in model.graph.initializer}
    types.update({v.name: v.type.tensor_type.elem_type for v in model.graph.input})
    for n in _toposort(list(model.graph.node)):
        if n.op_type == "Cast":
            t = _attr(n, "to")
        elif n.op_type == "Shape":
            t = TensorProto.INT64
        elif n.op_type == "DequantizeLinear":
            t = types.get(n.input[1])
        else:
            t = next((types[i] for i in n.input if i in types), None)
        for o in n.output:
            if t is not None:
                types[o] = t
    return types


def _attr(node: onnx.NodeProto, name: str, default=None):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _rms(g: _Graph, node: onnx.NodeProto | None) -> tuple[str, str, float] | None:
    """(x, gain, epsilon) of a last-axis RMSNormalization over bf16 with a bf16 gain, else None."""
    if node is None or node.op_type != "RMSNormalization" or len(node.input) != 2 or len(node.output) != 1:
        return None
    if _attr(node, "axis", -1) != -1 or _attr(node, "stash_type", 1) != 1:
        return None
    if g.dtypes.get(node.input[0]) != BF16 or g.dtypes.get(node.input[1]) != BF16:
        return None
    return node.input[0], node.input[1], float(_attr(node, "epsilon", 1e-5))


def _other(node: onnx.NodeProto, value: str) -> str:
    a, b = node.input
    return b if a == value else a


def _is_one(g: _Graph, name: str) -> bool:
    c = g.const(name)
    return c is not None and c.size == 1 and g.dtypes.get(name) == BF16 and float(c.reshape(-1)[0]) == 1.0


def _modulation(g: _Graph, norm: onnx.NodeProto) -> tuple[onnx.NodeProto, str, list] | None:
    """RMSNormalization → Mul(·, Add(s, 1)): (the Mul, s, nodes covered) when `norm` starts that pattern."""
    if _rms(g, norm) is None:
        return None
    mul = g.sole_user(norm.output[0], "Mul")
    if mul is None or len(mul.input) != 2:
        return None
    add = g.made_by(_other(mul, norm.output[0]), "Add")
    if add is None or len(add.input) != 2:
        return None
    one = next((i for i in add.input if _is_one(g, i)), None)
    if one is None:
        return None
    s = _other(add, one)
    covered = [norm, mul] + ([add] if len(g.users.get(add.output[0], [])) == 1 else [])
    return mul, s, covered


def _gated(g: _Graph, add: onnx.NodeProto) -> tuple[str, str, str, str, float, list] | None:
    """Add(h, Mul(Tanh(gate), RMSNormalization(b, gain))): (h, b, gain, gate, eps, nodes covered)."""
    if add.op_type != "Add" or len(add.input) != 2:
        return None
    for h, m in (add.input, add.input[::-1]):
        mul = g.made_by(m, "Mul")
        if mul is None or len(mul.input) != 2 or g.sole_user(m, "Add") is not add:
            continue
        for t, r in (mul.input, mul.input[::-1]):
            tanh, norm = g.made_by(t, "Tanh"), g.made_by(r, "RMSNormalization")
            rms = _rms(g, norm)
            if tanh is None or rms is None or g.sole_user(r, "Mul") is not mul or g.dtypes.get(t) != BF16:
                continue
            covered = [add, mul, norm] + ([tanh] if len(g.users.get(t, [])) == 1 else [])
            return h, rms[0], rms[1], tanh.input[0], rms[2], covered
    return None


def _rotation(g: _Graph, norm_out: str, hd: int) -> tuple[str, str, onnx.NodeProto, list] | None:
    """x·cos + Gather(x, swap)·sin after a q/k norm: (cos, sin, the Add, nodes covered)."""
    users = g.users.get(norm_out, [])
    if len(users) != 2 or norm_out in g.outputs:
        return None
    mul_c = next((u for u in users if u.op_type == "Mul"), None)
    gather = next((u for u in users if u.op_type == "Gather"), None)
    if mul_c is None or gather is None or gather.input[0] != norm_out or _attr(gather, "axis", 0) not in (-1, 3):
        return None
    swap = g.const(gather.input[1])
    want = np.concatenate([np.arange(hd // 2, hd), np.arange(hd // 2)])
    if swap is None or swap.shape != (hd,) or not np.array_equal(swap, want):
        return None
    mul_s = g.sole_user(gather.output[0], "Mul")
    if mul_s is None:
        return None
    cos, sin = _other(mul_c, norm_out), _other(mul_s, gather.output[0])
    add = g.sole_user(mul_c.output[0], "Add")
    if add is None or g.sole_user(mul_s.output[0], "Add") is not add:
        return None
    return cos, sin, add, [mul_c, gather, mul_s, add]


def _qkv(g: _Graph, reshape: onnx.NodeProto) -> tuple[onnx.NodeProto, list] | None:
    """Reshape(qkv, (0, 0, 3, H, hd)) → Split → Squeeze ×3 → q/k norm + rotation → Reshape(0, 0, -1) ×3."""
    shape = g.const(reshape.input[1]) if len(reshape.input) == 2 else None
    if shape is None or shape.shape != (5,) or list(shape[:3]) != [0, 0, 3] or g.dtypes.get(reshape.input[0]) != BF16:
        return None
    heads, hd = int(shape[3]), int(shape[4])
    split = g.sole_user(reshape.output[0], "Split")
    if split is None or _attr(split, "axis") != 2 or len(split.output) != 3:
        return None
    if len(split.input) > 1 and (g.const(split.input[1]) is None or list(g.const(split.input[1])) != [1, 1, 1]):
        return None
    covered, flat, norms = [reshape, split], [], []
    for j, part in enumerate(split.output):
        sq = g.sole_user(part, "Squeeze")
        if sq is None or g.const(sq.input[1]) is None or list(g.const(sq.input[1]).reshape(-1)) != [2]:
            return None
        covered.append(sq)
        end = sq.output[0]
        if j < 2:                                   # q, k: norm, then rotation
            norm = g.sole_user(end, "RMSNormalization")
            rms = _rms(g, norm)
            rot = _rotation(g, norm.output[0], hd) if rms else None
            if rot is None:
                return None
            norms.append((rms, rot[0], rot[1]))
            covered += [norm, *rot[3]]
            end = rot[2].output[0]
        back = g.sole_user(end, "Reshape")
        if back is None or g.const(back.input[1]) is None or list(g.const(back.input[1])) not in ([0, 0, -1],
                                                                                                [0, 0, heads * hd]):
            return None
        covered.append(back)
        flat.append(back.output[0])
    (q_rms, cos, sin), (k_rms, cos_k, sin_k) = norms
    if (cos, sin) != (cos_k, sin_k):
        return None
    node = helper.make_node("QkvNormRope", [reshape.input[0], q_rms[1], k_rms[1], cos, sin], flat,
                            name=f"{reshape.name}__qkv_norm_rope", domain=DOMAIN, num_heads=heads,
                            epsilon_q=q_rms[2], epsilon_k=k_rms[2])
    return node, covered


def _swiglu(g: _Graph, mul: onnx.NodeProto) -> tuple[onnx.NodeProto, list] | None:
    """Mul(Cast(bf16)(Mul(Cast(f32)(a), Sigmoid(Cast(f32)(a)))), b) → SwiGLU(a, b)."""
    if mul.op_type != "Mul" or len(mul.input) != 2 or g.dtypes.get(mul.output[0]) != BF16:
        return None
    for s, b in (mul.input, mul.input[::-1]):
        down = g.made_by(s, "Cast")
        if down is None or _attr(down, "to") != BF16 or g.sole_user(s, "Mul") is not mul:
            continue
        inner = g.made_by(down.input[0], "Mul")
        if inner is None or g.sole_user(down.input[0], "Cast") is not down:
            continue
        for xf, sg in (inner.input, inner.input[::-1]):
            up, sig = g.made_by(xf, "Cast"), g.made_by(sg, "Sigmoid")
            if up is None or sig is None or sig.input[0] != xf or _attr(up, "to") != F32 or \
                    g.dtypes.get(up.input[0]) != BF16 or g.dtypes.get(b) != BF16:
                continue
            if {id(u) for u in g.users.get(xf, [])} != {id(inner), id(sig)} or g.sole_user(sg, "Mul") is not inner:
                continue
            node = helper.make_node("SwiGLU", [up.input[0], b], list(mul.output), name=f"{mul.name}__swiglu",
                                    domain=DOMAIN)
            return node, [mul, down, inner, sig, up]
    return None


def fused_kernels(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with every pattern above replaced by its `ideogram4` op; `model` itself if none is found."""
    g = _Graph(model)
    replace: dict[int, list[onnx.NodeProto]] = {}
    taken: set[int] = set()

    def claim(new: onnx.NodeProto, anchor: onnx.NodeProto, covered: list) -> None:
        for n in covered:
            replace[id(n)] = []
            taken.add(id(n))
        replace[id(anchor)] = [new]

    def free(nodes) -> bool:
        return not any(id(n) in taken for n in nodes)

    for n in g.nodes:
        if n.op_type == "Reshape" and (m := _qkv(g, n)) and free(m[1]):
            claim(m[0], n, m[1])
        elif n.op_type == "Mul" and (m := _swiglu(g, n)) and free(m[1]):
            claim(m[0], n, m[1])
    for n in g.nodes:                               # residuals, each with the modulation of its result if any
        gr = _gated(g, n) if id(n) not in taken else None
        if gr is None or not free(gr[5]):
            continue
        h, b, gain, gate, eps, covered = gr
        mods = [m for u in g.users.get(n.output[0], []) if (m := _modulation(g, u)) and free(m[2])]
        if len(mods) == 1:
            mul, s, more = mods[0]
            gain2, eps2 = _rms(g, more[0])[1:]
            new = helper.make_node("GatedResidualModulate", [h, b, gain, gate, gain2, s], [n.output[0], mul.output[0]],
                                   name=f"{n.name}__gated_residual_modulate", domain=DOMAIN, epsilon=eps,
                                   epsilon2=eps2)
            claim(new, n, covered + more)
        else:
            claim(helper.make_node("GatedResidual", [h, b, gain, gate], [n.output[0]],
                                   name=f"{n.name}__gated_residual", domain=DOMAIN, epsilon=eps), n, covered)
    for n in g.nodes:                               # modulations not taken by a residual
        m = _modulation(g, n) if id(n) not in taken else None
        if m and free(m[2]):
            mul, s, covered = m
            x, gain, eps = _rms(g, n)
            claim(helper.make_node("NormModulate", [x, gain, s], list(mul.output), name=f"{n.name}__norm_modulate",
                                   domain=DOMAIN, epsilon=eps), n, covered)
    if not replace:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = [_copy(m) for n in model.graph.node for m in replace.get(id(n), [n])]
    del out.graph.node[:]
    out.graph.node.extend(_toposort(nodes))
    del out.graph.value_info[:]
    if not any(o.domain == DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(DOMAIN, OP_VERSION))
    _prune(out)
    return out


def fused_ops(model: onnx.ModelProto) -> dict[str, int]:
    """How many of each `ideogram4` op a graph has (for the manifest and the tests)."""
    counts: dict[str, int] = {}
    for n in model.graph.node:
        if n.domain == DOMAIN:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def for_cuda_fused(model: onnx.ModelProto) -> onnx.ModelProto:
    """The `cuda_fused` twin: the cuda twin with its elementwise chains as `ideogram4` ops."""
    return fused_kernels(for_cuda(model))


def cuda_fused_dequantized_at_load(model: onnx.ModelProto) -> onnx.ModelProto:
    """The `cuda_fused_dql` twin: the same rewrite of the `dequantize_at_load` graph."""
    return fused_kernels(cuda_dequantized_at_load(model))
