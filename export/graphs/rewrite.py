"""Per-backend rewrites of the canonical bf16 graphs, for backends that lack bf16 kernels for some ops.

A bf16 op on real hardware means "compute in fp32, round to bf16". So an op a backend cannot run in bf16 is
run in fp32 on widened inputs and its output rounded through Cast(bf16): same numbers, other kernels.

* `cpu` — onnxruntime's CPU provider has almost no bf16 kernels: every op is emulated, every bf16 value
  becomes an fp32 value holding a bf16-representable number (Cast(bf16) → Cast(fp32) after each op).
* `cuda` — onnxruntime's CUDA provider runs most of the graph in bf16; only the ops listed in
  `CUDA_FP32_OPS` (found on the GPU machine: no bf16 kernel registered) are wrapped.

The rewritten graphs keep the bf16 initializers and read the same weight file as the canonical graph.
"""
from __future__ import annotations

import onnx
from onnx import helper

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


def _fused_bias_matmuls(model: onnx.ModelProto) -> set[str]:
    """Outputs of MatMuls whose only consumer is an Add of an initializer (a Linear's bias). GEMM libraries
    (PyTorch's addmm, cuBLASLt epilogues, TensorRT) add the bias to the fp32 accumulator and round once, so
    under full emulation these MatMul results are not rounded on their own."""
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
    del out.graph.value_info[:]
    return out


def bf16_to_fp32_emulation(model: onnx.ModelProto) -> onnx.ModelProto:
    """The CPU twin: every op emulated."""
    return emulate_bf16(model, None)


def for_cuda(model: onnx.ModelProto, ops: frozenset[str] = CUDA_FP32_OPS) -> onnx.ModelProto:
    """The onnxruntime-CUDA twin: bf16 except the ops without bf16 CUDA kernels."""
    return emulate_bf16(model, ops)
