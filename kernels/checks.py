"""What each fused op must compute, two ways, shared by tests/kernels/test_kernels.py (CPU) and scripts/gpu_kernel_check.py.

* `subgraph(op, ...)`: the unfused ONNX subgraph the op replaces, emitted by the exporter's own layer functions
  (export/graphs/layers.py, the DiT's ops and rounding points), fp32 at the boundary (Cast to bf16 inside, like
  the DiT). Its `fused_kernels` rewrite is the fused op on the same inputs; `bf16_to_fp32_emulation` of it is what
  the cpu twin computes.
* `numpy_model(op, ...)`: the op's semantics in numpy, with the reductions in onnxruntime-CUDA's order
  (kernels/fused.cu) and only 1/sqrt correctly rounded where CUDA's rsqrtf may differ by an fp32 ulp.
* The quantizing ops (`FP8_OPS`, the cuda_fused_w8a8 graphs' producers) replace their base op followed by the
  standalone Fp8QuantizeRows: `stock(op)` is the cuda twin of the base subgraph with that quantizer appended
  (its e4m3 codes read back through an exact DequantizeLinear), `fused(stock)` the rewrite the export applies;
  their numpy model is export/w8a8_model.quantize_rows of the base op's bf16 output.
* `bf16_io(model)`: the same graph without its fp32 boundary Casts (bf16 / e4m3 in and out), for timing the
  kernels rather than the casts around them.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from ideogram4_engine.export.reference import w8a8_model
from ideogram4_engine.export.graphs.builder import F32, GraphBuilder
from ideogram4_engine.export.graphs.fuse import DOMAIN as FUSE_DOMAIN, fused_kernels
from ideogram4_engine.export.graphs.layers import apply_rope, rms_norm, signed_sin, silu, to_bf16
from ideogram4_engine.export.graphs.rewrite import for_cuda
from ideogram4_engine.export.graphs.w8a8 import fused_quantization

OPS = ("NormModulate", "GatedResidual", "GatedResidualModulate", "QkvNormRope", "SwiGLU")
FP8_OPS = ("NormModulateFp8", "GatedResidualModulateFp8", "SwiGLUFp8")      # quantize the base op's `y`


def base_op(op: str) -> str:
    return op[:-3] if op in FP8_OPS else op
EPS, QK_EPS = 1e-5, 1e-5


def bf(x) -> np.ndarray:
    """float32 array of the nearest-even bf16 values."""
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance in bf16 ulps (of the larger magnitude) between two bf16-valued arrays."""
    m = np.maximum(np.abs(a), np.abs(b)).astype(np.float32)
    ulp = np.where(m > 0, np.exp2(np.floor(np.log2(np.where(m > 0, m, 1))) - 7), np.float32(2.0 ** -133))
    return np.abs(a - b) / ulp


# ------------------------------------------------------------------------------------------------ inputs

def shapes(op: str, batch: int, tokens: int, width: int, heads: int = 2, head_dim: int = 256) -> dict:
    op = base_op(op)
    D = heads * head_dim if op == "QkvNormRope" else width
    if op == "NormModulate":
        return {"x": (batch, tokens, D), "scale": (batch, 1, D)}
    if op in ("GatedResidual", "GatedResidualModulate"):
        out = {"h": (batch, tokens, D), "branch": (batch, tokens, D), "gate": (batch, 1, D)}
        return {**out, "scale": (batch, 1, D)} if op == "GatedResidualModulate" else out
    if op == "QkvNormRope":
        return {"qkv": (batch, tokens, 3 * D), "cos": (batch, tokens, head_dim), "sin": (batch, tokens, head_dim)}
    return {"a": (batch, tokens, width), "b": (batch, tokens, width)}


def random_inputs(op: str, rng: np.random.Generator, **dims) -> dict[str, np.ndarray]:
    """Fresh bf16-valued fp32 inputs at the model's magnitudes (activations ~N(0, σ²) with varied row scales)."""
    out = {}
    for name, shape in shapes(op, **dims).items():
        if name in ("cos", "sin"):
            angles = rng.uniform(0, 6.6e4, shape).astype(np.float32)
            out[name] = (np.cos(angles) if name == "cos" else np.sin(angles)).astype(np.float32)
        elif name in ("scale", "gate"):
            out[name] = bf(rng.standard_normal(shape) * 0.5)
        else:
            rows = rng.lognormal(0, 1, shape[:-1] + (1,))
            out[name] = bf(rng.standard_normal(shape) * rows * (4.0 if name == "branch" else 1.0))
    return out


def random_gains(op: str, rng: np.random.Generator, width: int, head_dim: int = 256) -> dict[str, torch.Tensor]:
    op = base_op(op)
    n = head_dim if op == "QkvNormRope" else width
    names = {"NormModulate": ["gain"], "GatedResidual": ["gain"], "GatedResidualModulate": ["gain", "gain2"],
             "QkvNormRope": ["gain_q", "gain_k"], "SwiGLU": []}[op]
    return {k: torch.from_numpy(bf(1 + 0.3 * rng.standard_normal(n))).to(torch.bfloat16) for k in names}


# ------------------------------------------------------------------------------------------------ subgraphs

class _Gains:
    def __init__(self, gains: dict[str, torch.Tensor]):
        self.gains = gains

    def get(self, name: str) -> torch.Tensor:
        return self.gains[name]


def stock(op: str, gains: dict[str, torch.Tensor], heads: int = 2, head_dim: int = 256) -> onnx.ModelProto:
    """The cuda twin of `op`'s op-by-op form (for an FP8_OPS op: its base op's, then Fp8QuantizeRows of `y`)."""
    model = for_cuda(subgraph(base_op(op), gains, heads, head_dim))
    return _quantized(model, "y") if op in FP8_OPS else model


def fused(model: onnx.ModelProto) -> onnx.ModelProto:
    """What the export makes of a `stock` graph: the fused ops, then the quantization folded into them."""
    return fused_quantization(fused_kernels(model))


def _quantized(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """`model` with its fp32 output `name` (a Cast of a bf16 value v) replaced by Fp8QuantizeRows(v): output `name`
    = the e4m3 codes as fp32 (exact DequantizeLinear), output `name`_scale = the row scales."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    cast = next(n for n in out.graph.node if list(n.output) == [name])
    v = cast.input[0]
    out.graph.node.remove(cast)
    one = onnx.numpy_helper.from_array(np.array(1.0, np.float32), f"{name}__one")
    out.graph.initializer.append(one)
    out.graph.node.extend([
        helper.make_node("Fp8QuantizeRows", [v], [f"{name}__e4m3", f"{name}_scale"], domain=FUSE_DOMAIN),
        helper.make_node("DequantizeLinear", [f"{name}__e4m3", one.name], [name])])
    rank = len(next(o for o in out.graph.output if o.name == name).type.tensor_type.shape.dim)
    out.graph.output.append(helper.make_tensor_value_info(f"{name}_scale", TensorProto.FLOAT, ["b", "l"][:rank - 1]))
    if not any(o.domain == FUSE_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(FUSE_DOMAIN, 1))
    return out


def bf16_io(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` without the Casts (and DequantizeLinears) at its boundary: bf16 inputs, bf16 / e4m3 outputs."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    ins = {i.name for i in g.input}
    outs = {o.name: o for o in g.output}
    rename, drop = {}, []
    for n in g.node:
        if n.op_type == "Cast" and n.input[0] in ins:
            rename[n.output[0]] = n.input[0]
            drop.append(n)
        elif n.output[0] in outs and n.op_type in ("Cast", "DequantizeLinear"):
            drop.append(n)
            o = outs[n.output[0]]
            o.type.tensor_type.elem_type = TensorProto.BFLOAT16 if n.op_type == "Cast" else TensorProto.FLOAT8E4M3FN
            rename[n.input[0]] = o.name
    for n in drop:
        g.node.remove(n)
    for i in g.input:
        i.type.tensor_type.elem_type = TensorProto.BFLOAT16
    for n in g.node:
        for k, x in enumerate(n.input):
            if x in rename and rename[x] in ins:
                n.input[k] = rename[x]
        for k, x in enumerate(n.output):
            if x in rename and rename[x] in outs:
                n.output[k] = rename[x]
    for n in g.node:      # a reader of a renamed output value reads the output itself
        for k, x in enumerate(n.input):
            if x in rename and rename[x] in outs:
                n.input[k] = rename[x]
    return out


def subgraph(op: str, gains: dict[str, torch.Tensor], heads: int = 2, head_dim: int = 256) -> onnx.ModelProto:
    """The op-by-op form of `op` as export/graphs/dit.py emits it, fp32 inputs and outputs."""
    g = GraphBuilder(f"unfused_{op}")
    src = _Gains(gains)
    one = g.const(torch.tensor(1.0, dtype=torch.bfloat16))
    spec = shapes(op, 1, 1, 1, heads, head_dim)
    ins = {name: to_bf16(g, g.input(name, F32, ["b", 1, "d"] if name in ("scale", "gate") else ["b", "l", f"n_{name}"]))
           for name in spec}
    outs: dict[str, str] = {}
    if op == "NormModulate":
        outs["y"] = g.op("Mul", rms_norm(g, ins["x"], "gain", src, EPS), g.op("Add", ins["scale"], one))
    elif op in ("GatedResidual", "GatedResidualModulate"):
        h = g.op("Add", ins["h"], g.op("Mul", g.op("Tanh", ins["gate"]), rms_norm(g, ins["branch"], "gain", src, EPS)))
        outs["h_out"] = h
        if op == "GatedResidualModulate":
            outs["y"] = g.op("Mul", rms_norm(g, h, "gain2", src, EPS), g.op("Add", ins["scale"], one))
    elif op == "QkvNormRope":
        cos = g.op("Unsqueeze", ins["cos"], g.i64(2))
        sin = signed_sin(g, g.op("Unsqueeze", ins["sin"], g.i64(2)), head_dim)
        qkv = g.op("Reshape", ins["qkv"], g.i64(0, 0, 3, heads, head_dim))
        q, k, v = (g.op("Squeeze", t, g.i64(2)) for t in g.op("Split", qkv, g.i64(1, 1, 1), axis=2, n_out=3))
        q = apply_rope(g, rms_norm(g, q, "gain_q", src, QK_EPS), cos, sin, head_dim)
        k = apply_rope(g, rms_norm(g, k, "gain_k", src, QK_EPS), cos, sin, head_dim)
        for name, t in (("q", q), ("k", k), ("v", v)):
            outs[name] = g.op("Reshape", t, g.i64(0, 0, -1))
    else:
        outs["y"] = g.op("Mul", silu(g, ins["a"]), ins["b"])
    for name, value in outs.items():
        g.output(g.op("Cast", value, to=F32), name, F32, ["b", "l", "d"])
    return g.model()


# ------------------------------------------------------------------------------------------------ numpy model

def ort_threads_y(rows: int, n: int, sms: int = 132, max_threads: int = 1024) -> int:
    """onnxruntime's cuApplyLayerNorm layout choice (threads_y of a 32 x threads_y block per row)."""
    ty = min(1 << max(0, int(np.ceil(np.log2(max(1, -(-n // 128)))))), max_threads // 64)
    parallel = sms * ((max_threads // 2) // 32 // ty)
    while ty > 2 and parallel < rows:
        ty, parallel = ty // 2, parallel * 2
    return ty


def _sumsq(x: np.ndarray, ty: int) -> np.ndarray:
    """Row sums of x² (float32) in onnxruntime-CUDA's order: per thread groups of 4 then the tail, a shuffle-down
    tree per warp, a halving tree across the warps."""
    rows, n = x.shape
    numx = 32 * ty
    part = np.zeros((rows, numx), np.float32)
    sq = (x * x).astype(np.float32)                  # exact: x is a bf16 value
    for t in range(numx):
        l = 4 * t
        while l + 3 < n:
            for k in range(4):
                part[:, t] += sq[:, l + k]
            l += 4 * numx
        while l < n:
            part[:, t] += sq[:, l]
            l += 1
    warps = part.reshape(rows, ty, 32)
    for stride in (16, 8, 4, 2, 1):
        warps[:, :, :stride] = warps[:, :, :stride] + warps[:, :, stride:2 * stride]
    w = warps[:, :, 0].copy()
    off = ty // 2
    while off > 0:
        w[:, :off] = w[:, :off] + w[:, off:2 * off]
        off //= 2
    return w[:, 0]


def _norm(x: np.ndarray, gain: np.ndarray, eps: float, rows_for_layout: int) -> np.ndarray:
    """bf16((gain · rsqrt(mean(x²) + eps)) · x) over the last axis, onnxruntime-CUDA's sum order."""
    n = x.shape[-1]
    flat = x.reshape(-1, n).astype(np.float32)
    s = _sumsq(flat, ort_threads_y(rows_for_layout, n))
    inv = (np.float32(1) / np.sqrt(s / np.float32(n) + np.float32(eps))).astype(np.float32)[:, None]
    return bf((gain.astype(np.float32)[None, :] * inv) * flat).reshape(x.shape)


def _silu(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        pos = np.float32(1) / (np.float32(1) + np.exp(-x, dtype=np.float32))
        neg = np.float32(1) - np.float32(1) / (np.float32(1) + np.exp(x, dtype=np.float32))
    return (x * np.where(x >= 0, pos, neg)).astype(np.float32)


def numpy_model(op: str, inputs: dict[str, np.ndarray], gains: dict[str, torch.Tensor], heads: int = 2,
                head_dim: int = 256) -> dict[str, np.ndarray]:
    if op in FP8_OPS:       # the base op's bf16 y, quantized per row: codes (as their exact values) and scales
        out = numpy_model(base_op(op), inputs, gains, heads, head_dim)
        codes, scale = w8a8_model.quantize_rows(out["y"])
        return {**out, "y": w8a8_model.e4m3_decode(codes), "y_scale": scale}
    gn = {k: v.float().numpy() for k, v in gains.items()}
    x = {k: bf(v) for k, v in inputs.items()}
    if op == "NormModulate":
        rows = x["x"].size // x["x"].shape[-1]
        return {"y": bf(_norm(x["x"], gn["gain"], EPS, rows) * bf(x["scale"] + np.float32(1)))}
    if op in ("GatedResidual", "GatedResidualModulate"):
        rows = x["h"].size // x["h"].shape[-1]
        o = _norm(x["branch"], gn["gain"], EPS, rows)
        h = bf(x["h"] + bf(bf(np.tanh(x["gate"])) * o))
        out = {"h_out": h}
        if op == "GatedResidualModulate":
            out["y"] = bf(_norm(h, gn["gain2"], EPS, rows) * bf(x["scale"] + np.float32(1)))
        return out
    if op == "QkvNormRope":
        B, L, _ = x["qkv"].shape
        qkv = x["qkv"].reshape(B, L, 3, heads, head_dim)
        half = head_dim // 2
        cos = bf(x["cos"])[:, :, None, :]
        sin = bf(x["sin"])[:, :, None, :] * np.concatenate([-np.ones(half), np.ones(half)]).astype(np.float32)
        out = {}
        for j, (name, gain) in enumerate((("q", gn.get("gain_q")), ("k", gn.get("gain_k")))):
            n = _norm(qkv[:, :, j], gain, QK_EPS, B * L * heads)
            swapped = np.concatenate([n[..., half:], n[..., :half]], axis=-1)
            out[name] = bf(bf(n * cos) + bf(swapped * sin)).reshape(B, L, heads * head_dim)
        out["v"] = qkv[:, :, 2].reshape(B, L, heads * head_dim)
        return out
    return {"y": bf(bf(_silu(x["a"])) * x["b"])}
