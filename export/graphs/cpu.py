"""Per-backend rewrite for onnxruntime's CPU provider, which has almost no bfloat16 kernels.

The canonical graphs compute in bf16. This pass turns every bf16 value into an fp32 value that holds a
bf16-representable number: each op runs in fp32 and its output is rounded through Cast(bf16) → Cast(fp32).
Because a bf16 op on real hardware is "compute, then round to bf16", the rewritten graph reproduces the bf16
graph's values up to accumulation order, on any backend with fp32 kernels. bf16 initializers are kept as
they are (the weight file is shared with the canonical graph) and widened by a Cast where they are used.
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from .builder import BF16, F32


def _types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.value_info, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def _fused_bias_matmuls(model: onnx.ModelProto) -> set[str]:
    """Outputs of MatMuls whose only consumer is an Add of an initializer (a Linear's bias). GEMM libraries
    (PyTorch's addmm, cuBLASLt epilogues, TensorRT) add the bias to the fp32 accumulator and round once, so
    these MatMul results are not rounded on their own."""
    inits = {i.name for i in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out = set()
    for n in model.graph.node:
        if n.op_type == "MatMul":
            users = consumers.get(n.output[0], [])
            if len(users) == 1 and users[0].op_type == "Add" and any(i in inits for i in users[0].input):
                out.add(n.output[0])
    return out


def bf16_to_fp32_emulation(model: onnx.ModelProto) -> onnx.ModelProto:
    """The fp32-with-bf16-rounding twin of a bf16 graph (same inputs, outputs and weight file)."""
    types = _types(model)
    unrounded = _fused_bias_matmuls(model)
    nodes: list[onnx.NodeProto] = []
    twin: dict[str, str] = {}          # bf16 value -> fp32 value holding the same number

    def cast(src: str, dst: str, to: int) -> None:
        nodes.append(helper.make_node("Cast", [src], [dst], to=to, name=f"cast_{dst}"))

    for init in model.graph.initializer:
        if init.data_type == BF16:
            twin[init.name] = f"{init.name}__f32"
            cast(init.name, twin[init.name], F32)
    for node in model.graph.node:
        new = onnx.NodeProto()
        new.CopyFrom(node)
        for j, i in enumerate(node.input):
            if i and types.get(i) == BF16:
                new.input[j] = twin[i]
        post = []
        for j, o in enumerate(node.output):
            if types.get(o) != BF16:
                continue
            twin[o] = f"{o}__f32"
            if o in unrounded:                        # bias epilogue follows: stay fp32
                new.output[j] = twin[o]
            elif node.op_type == "Cast":                # the rounding itself: keep it, then widen
                post.append(helper.make_node("Cast", [o], [twin[o]], to=F32, name=f"cast_{twin[o]}"))
            else:                                     # compute in fp32, round to bf16, widen
                new.output[j] = f"{o}__raw"
                post.append(helper.make_node("Cast", [new.output[j]], [o], to=BF16, name=f"cast_{o}"))
                post.append(helper.make_node("Cast", [o], [twin[o]], to=F32, name=f"cast_{twin[o]}"))
        nodes.append(new)
        nodes.extend(post)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    del out.graph.value_info[:]
    return out
