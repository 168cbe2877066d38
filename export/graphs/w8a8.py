"""W8A8 (opt-in, `--precision w8a8`): the DiT blocks' FP8 linears on FP8 tensor cores with FP8 activations.

Works on any onnxruntime-CUDA twin whose FP8 linears are `com.microsoft.MatMulBlockQuantizedFp8Weight(x, q,
s_rows)` (rewrite.fp8_matmuls): each selected linear becomes

    Fp8QuantizeRows(x) -> (x_q e4m3, x_scale fp32 per token)           once per activation (w1 and w3 share it)
    Fp8RowScaledMatMul(x_q, x_scale, q, s) -> y bf16                    the checkpoint's (out, in) e4m3 bytes

of the project's op library (kernels/w8a8_ops.cu; arithmetic in export/w8a8_model.py). On the fused twin
(`cuda_fused_w8a8`) the quantization then moves into the fused kernel that produces the activation where that
saves a pass (`fused_quantization`): the modulations before qkv and w1/w3, SwiGLU before w2; the attention
output before o keeps the standalone quantizer. Selected: the blocks'
qkv, o, w1, w3 and w2 (nearly all of a forward's GEMM FLOPs at image sizes); the conditioning linears (time
embedding, adaLN, final layer) run at M = batch rows, where an FP8 GEMM saves nothing, and the input and text
projections are small, so they keep the faithful weight-only op. Linears whose in or out size is not a
multiple of 16 (cuBLASLt's FP8 layout rule) are left as they are.
"""
from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import helper

from .fuse import DOMAIN, for_cuda_fused
from .rewrite import FP8_MATMUL, _consumers, _copy, _prune, _toposort, for_cuda

QUANTIZE = "Fp8QuantizeRows"
MATMUL = "Fp8RowScaledMatMul"
ALIGNMENT = 16
OPS = (QUANTIZE, MATMUL)
# producer op -> (its quantizing form, which output is the activation): the *Fp8 op writes that output's e4m3
# codes and row scales in its place (kernels/fused_warp.cu, fused.cu; bit-identical to Fp8QuantizeRows of it)
FUSED_PRODUCERS = {"NormModulate": ("NormModulateFp8", 0), "GatedResidualModulate": ("GatedResidualModulateFp8", 1),
                   "SwiGLU": ("SwiGLUFp8", 0)}
BLOCK_LINEARS = re.compile(r"^layers\.\d+\.(attention\.(qkv|o)|feed_forward\.w[123])\.weight$")


def w8a8_matmuls(model: onnx.ModelProto, *, clamp: float = 0.0, fast_accumulation: bool = False,
                 select=BLOCK_LINEARS.match) -> onnx.ModelProto:
    """A copy of `model` with the FP8 linears whose weight name passes `select` as W8A8 (see the module doc).

    clamp > 0 caps each token's amax (outliers beyond it saturate; docs/runtime.md says when that helps);
    fast_accumulation turns on Hopper's faster, less precise FP8 accumulation in cuBLASLt. `model` itself
    when no linear is selected (the text encoder, the VAE)."""
    if clamp < 0 or not np.isfinite(clamp):
        raise ValueError(f"clamp={clamp!r}; allowed: 0 (off) or a positive finite amax cap")
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    replace: dict[int, list[onnx.NodeProto]] = {}
    quantized: dict[str, tuple[str, str]] = {}          # activation -> (its e4m3 value, its token scales)
    for node in model.graph.node:
        if node.op_type != FP8_MATMUL or node.domain != "com.microsoft" or not select(node.input[1]):
            continue
        n_out, k_in = dims.get(node.input[1], (0, 0))
        if n_out % ALIGNMENT or k_in % ALIGNMENT:
            continue
        x = node.input[0]
        new: list[onnx.NodeProto] = []
        if x not in quantized:
            quantized[x] = (f"{x}__e4m3", f"{x}__e4m3_scale")
            attrs = {"clamp": float(clamp)} if clamp else {}
            new.append(helper.make_node(QUANTIZE, [x], list(quantized[x]), name=f"{x}__quantize", domain=DOMAIN,
                                        **attrs))
        scale = _row_vector(node.input[2], producer)
        attrs = {"fast_accumulation": 1} if fast_accumulation else {}
        new.append(helper.make_node(MATMUL, [*quantized[x], node.input[1], scale], list(node.output),
                                    name=f"{node.name or node.output[0]}__w8a8", domain=DOMAIN, **attrs))
        replace[id(node)] = new
    if not replace:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = [_copy(m) for n in model.graph.node for m in replace.get(id(n), [n])]
    del out.graph.node[:]
    out.graph.node.extend(_toposort(nodes))
    if not any(o.domain == DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    _prune(out)
    return out


def _row_vector(rows: str, producer: dict) -> str:
    """The (N,) fp32 weight scale behind the (N, 1) rows of the fused op: rewrite.fp8_matmuls makes them
    `Unsqueeze(s, [1])` of a constant (folded by onnxruntime at session creation)."""
    p = producer.get(rows)
    if p is None or p.op_type != "Unsqueeze":
        raise ValueError(f"{FP8_MATMUL} scale rows {rows!r} are not Unsqueeze(scale, [1]) as rewrite.fp8_matmuls "
                         "writes them")
    return p.input[0]


def fused_quantization(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each Fp8QuantizeRows whose input is an output of a fused op in FUSED_PRODUCERS, read by nothing else, folded
    into that op's quantizing form (its `clamp` carried over); `model` itself when there is none."""
    nodes = list(model.graph.node)
    users = _consumers(nodes)
    producer = {o: n for n in nodes for o in n.output}
    outputs = {o.name for o in model.graph.output}
    replace: dict[int, list[onnx.NodeProto]] = {}
    for q in nodes:
        if q.op_type != QUANTIZE or q.domain != DOMAIN:
            continue
        x = q.input[0]
        p = producer.get(x)
        form = FUSED_PRODUCERS.get(p.op_type) if p is not None and p.domain == DOMAIN else None
        if form is None or p.output[form[1]] != x or x in outputs or len(users.get(x, [])) != 1 or id(p) in replace:
            continue
        outs = list(p.output[:form[1]]) + list(q.output) + list(p.output[form[1] + 1:])
        new = helper.make_node(form[0], list(p.input), outs, name=f"{p.name}__fp8", domain=DOMAIN)
        new.attribute.extend(p.attribute)
        new.attribute.extend(a for a in q.attribute if a.name == "clamp")
        replace[id(p)], replace[id(q)] = [new], []
    if not replace:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(_toposort([_copy(m) for n in nodes for m in replace.get(id(n), [n])]))
    return out


def for_cuda_w8a8(model: onnx.ModelProto) -> onnx.ModelProto:
    """The `cuda_w8a8` twin: the onnxruntime-CUDA twin with the DiT blocks' linears as W8A8."""
    return w8a8_matmuls(for_cuda(model))


def for_cuda_fused_w8a8(model: onnx.ModelProto) -> onnx.ModelProto:
    """The `cuda_fused_w8a8` twin: the same W8A8 linears on the cuda_fused twin, quantizing in the producers."""
    return fused_quantization(w8a8_matmuls(for_cuda_fused(model)))
