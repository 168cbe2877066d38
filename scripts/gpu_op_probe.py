"""GPU probe for issue 7: which fused ONNX ops onnxruntime-gpu runs in bf16, how fast, and whether they keep
the reference's numbers, at Ideogram 4's real shapes (1024² = 4096 image + 74 text tokens, D 4608, 18 heads of
256, FFN 12288). Each case builds a one-purpose graph twice — the decomposed form our graphs use today and a
candidate — and reports time per run, peak arena growth and bit-identity of the outputs on the same inputs.

Run on the GPU machine (torch is used only to make device tensors): python3 scripts/gpu_op_probe.py [--out F]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto as TP, helper

L, D, H, HD, F = 4170, 4608, 18, 256, 12288
BF16, F32, FP8 = TP.BFLOAT16, TP.FLOAT, TP.FLOAT8E4M3FN


def model(nodes, inputs, outputs, inits=()):
    g = helper.make_graph(nodes, "probe", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])
    m.ir_version = 11
    return m


def vi(name, t, shape):
    return helper.make_tensor_value_info(name, t, shape)


def init(name, t: torch.Tensor, onnx_type):
    raw = t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
    return onnx.TensorProto(name=name, data_type=onnx_type, dims=list(t.shape), raw_data=raw)


def session(m, **opts):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    for k, v in opts.get("config", {}).items():
        so.add_session_config_entry(k, v)
    if "order" in opts:
        so.execution_order = getattr(ort.ExecutionOrder, opts["order"])
    cuda = {"device_id": 0, **opts.get("provider", {})}
    return ort.InferenceSession(m.SerializeToString(), so, providers=[("CUDAExecutionProvider", cuda)])


def timed(sess, feeds: dict[str, torch.Tensor], n=20):
    b = sess.io_binding()
    for k, t in feeds.items():
        b.bind_ortvalue_input(k, ort.OrtValue.from_dlpack(t.__dlpack__()) if hasattr(ort.OrtValue, "from_dlpack")
                              else ort.OrtValue.ortvalue_from_numpy(t.cpu().numpy(), "cuda", 0))
    for o in sess.get_outputs():
        b.bind_output(o.name, "cuda", 0)
    for _ in range(3):
        sess.run_with_iobinding(b)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        sess.run_with_iobinding(b)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / n * 1e3
    out = b.get_outputs()[0]
    return ms, torch.from_dlpack(out) if hasattr(out, "__dlpack__") else torch.tensor(out.numpy())


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    a32, b32 = a.float(), b.float()
    same = (a.view(torch.int16) == b.view(torch.int16)).float().mean().item() if a.dtype == torch.bfloat16 \
        else (a32 == b32).float().mean().item()
    rel = ((a32 - b32).norm() / b32.norm()).item()
    return {"bit_identical_fraction": same, "rel_l2": rel, "max_abs": (a32 - b32).abs().max().item()}


ONLY: str | None = None         # --only: run just the cases whose name contains this text


def case(name, variants, feeds, results, per_variant=None, **session_opts):
    """variants: {label: model}; the first is the baseline the others are compared with. per_variant: {label:
    extra session options} for variants that differ only in how the session is made."""
    if ONLY and ONLY not in name:
        return
    base = None
    for label, m in variants.items():
        row = {"case": name, "variant": label}
        try:
            s = session(m, **{**session_opts, **(per_variant or {}).get(label, {})})
            row["providers"] = s.get_providers()[0]
            torch.cuda.synchronize()
            ms, out = timed(s, feeds)
            row["ms"] = round(ms, 4)
            if base is None:
                base = out.clone()
            else:
                row.update(compare(out, base))
            del s
        except Exception as e:  # noqa: BLE001 -- the probe's purpose is to record what fails
            row["error"] = str(e).splitlines()[0][:300]
        print(json.dumps(row), flush=True)
        results.append(row)


def norm_models(shape, eps):
    x, y = vi("x", BF16, shape), vi("y", BF16, shape)
    g = torch.randn(shape[-1]).to(torch.bfloat16)
    dec = [helper.make_node("Cast", ["x"], ["xf"], to=F32),
           helper.make_node("Mul", ["xf", "xf"], ["sq"]),
           helper.make_node("ReduceMean", ["sq", "ax"], ["ms"], keepdims=1),
           helper.make_node("Add", ["ms", "eps"], ["mse"]),
           helper.make_node("Sqrt", ["mse"], ["rt"]),
           helper.make_node("Reciprocal", ["rt"], ["inv"]),
           helper.make_node("Mul", ["xf", "inv"], ["n"]),
           helper.make_node("Mul", ["n", "gf"], ["ng"]),
           helper.make_node("Cast", ["ng"], ["y"], to=BF16)]
    consts = [init("ax", torch.tensor([-1]), TP.INT64), init("eps", torch.tensor(eps), F32),
              init("gf", g.float(), F32)]
    fused = [helper.make_node("RMSNormalization", ["x", "g"], ["y"], axis=-1, epsilon=eps)]
    return {"decomposed": model(dec, [x], [y], consts),
            "RMSNormalization": model(fused, [x], [y], [init("g", g, BF16)])}


def rope_models():
    shape = [1, H, L, HD]
    x, y = vi("x", BF16, shape), vi("y", BF16, shape)
    half = HD // 2
    ang = torch.rand(1, L, half) * 100
    cos_h, sin_h = torch.cos(ang).to(torch.bfloat16), torch.sin(ang).to(torch.bfloat16)
    cos_f, sin_f = torch.cat([cos_h, cos_h], -1)[:, None], torch.cat([sin_h, sin_h], -1)[:, None]
    dec = [helper.make_node("Slice", ["x", "z", "h", "ax"], ["lo"]),
           helper.make_node("Slice", ["x", "h", "hd", "ax"], ["hi"]),
           helper.make_node("Neg", ["hi"], ["nhi"]),
           helper.make_node("Concat", ["nhi", "lo"], ["rot"], axis=-1),
           helper.make_node("Mul", ["x", "cos"], ["a"]),
           helper.make_node("Mul", ["rot", "sin"], ["b"]),
           helper.make_node("Add", ["a", "b"], ["y"])]
    consts = [init("z", torch.tensor([0]), TP.INT64), init("h", torch.tensor([half]), TP.INT64),
              init("hd", torch.tensor([HD]), TP.INT64), init("ax", torch.tensor([-1]), TP.INT64),
              init("cos", cos_f, BF16), init("sin", sin_f, BF16)]
    fused = [helper.make_node("RotaryEmbedding", ["x", "cosh", "sinh"], ["y"])]
    return {"decomposed": model(dec, [x], [y], consts),
            "RotaryEmbedding": model(fused, [x], [y], [init("cosh", cos_h, BF16), init("sinh", sin_h, BF16)])}


def dequant_models(n_out, n_in):
    x, y = vi("x", BF16, [1, L, n_in]), vi("y", BF16, [1, L, n_out])
    w = (torch.randn(n_in, n_out) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    s = (torch.rand(n_out) * 1e-3 + 1e-4).to(torch.bfloat16)
    fp32 = [helper.make_node("DequantizeLinear", ["q", "sf"], ["wf"], axis=1),
            helper.make_node("Cast", ["wf"], ["w"], to=BF16),
            helper.make_node("MatMul", ["x", "w"], ["y"])]
    cast_mul = [helper.make_node("Cast", ["q"], ["qb"], to=BF16),
                helper.make_node("Mul", ["qb", "s"], ["w"]),
                helper.make_node("MatMul", ["x", "w"], ["y"])]
    pre = [helper.make_node("MatMul", ["x", "wb"], ["y"])]
    wb = (w.to(torch.bfloat16) * s).to(torch.bfloat16)
    q, sf, sb = init("q", w, FP8), init("sf", s.float(), F32), init("s", s, BF16)
    return {"dq_fp32_cast": model(fp32, [x], [y], [q, sf]),
            "cast_bf16_mul": model(cast_mul, [x], [y], [q, sb]),
            "bf16_weight": model(pre, [x], [y], [init("wb", wb, BF16)])}


def w8a8_models(n_out, n_in):
    """W8A8 candidates for one linear (issue 7): the activation quantized to e4m3 per tensor, the e4m3 weight
    used as it is, onnxruntime's contrib `GemmFloat8` (cuBLASLt). Its schema supports FP8 only with transA=0,
    transB=1, i.e. the weight as (out, in) — the checkpoint's own layout — and scalar scales, so the per-row
    weight scale is applied to the output. Baseline: the faithful bf16-weight MatMul."""
    x, y = vi("x", BF16, [1, L, n_in]), vi("y", BF16, [1, L, n_out])
    w = (torch.randn(n_in, n_out) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    s = (torch.rand(n_out) * 1e-3 + 1e-4).to(torch.bfloat16)
    wb = (w.to(torch.bfloat16) * s).to(torch.bfloat16)
    inits = [init("q_t", w.t().contiguous(), FP8), init("q", w, FP8), init("s", s, BF16),
             init("one", torch.tensor(1.0), F32), init("inv448", torch.tensor(1 / 448), F32),
             init("static_sx", torch.tensor(6.0 / 448), F32),
             init("rows", torch.tensor([L, n_in]), TP.INT64), init("out_shape", torch.tensor([1, L, n_out]), TP.INT64)]

    def gemm(scale: str, trans_b: int, weight: str) -> list:
        return [helper.make_node("Reshape", ["x", "rows"], ["x2"]),
                helper.make_node("Cast", ["x2"], ["x32"], to=F32),
                helper.make_node("QuantizeLinear", ["x32", scale], ["xq"], output_dtype=FP8),
                helper.make_node("GemmFloat8", ["xq", weight, "", scale, "one"], ["g"], domain="com.microsoft",
                                 transA=0, transB=trans_b, dtype=BF16),
                helper.make_node("Mul", ["g", "s"], ["gs"]),
                helper.make_node("Reshape", ["gs", "out_shape"], ["y"])]
    dynamic = [helper.make_node("Abs", ["x"], ["ax"]),
               helper.make_node("ReduceMax", ["ax"], ["mx"], keepdims=0),
               helper.make_node("Cast", ["mx"], ["mx32"], to=F32),
               helper.make_node("Mul", ["mx32", "inv448"], ["sx"])]
    faithful = [helper.make_node("MatMul", ["x", "wb"], ["y"])]

    def m(nodes, extra=()):
        out = model(nodes, [x], [y], [*inits, *extra])
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        return out
    return {"bf16_weight": model(faithful, [x], [y], [init("wb", wb, BF16)]),
            "w8a8 dynamic scale": m(dynamic + gemm("sx", 1, "q_t")),
            "w8a8 static scale": m(gemm("static_sx", 1, "q_t")),
            "w8a8 transB=0 (first try's layout)": m(gemm("static_sx", 0, "q"))}


def fp8mm_models(n_out, n_in):
    """onnxruntime's contrib MatMulBlockQuantizedFp8Weight (1.31): the e4m3 weight as (out, in) with fp32
    scales per row and K block, dequantized to bf16 in a scratch tile (≤ 256 MiB) right before a cuBLAS GEMM;
    with a scalar a_scale the activation is rounded to e4m3 too (W8A8; native FP8 GEMM through DeepGEMM on
    SM90 when ORT_FP8_MATMUL_DEEPGEMM=1 and block_size=128). Baseline: the twins' DequantizeLinear(fp32) →
    Cast → MatMul on the (in, out) weight."""
    x, y = vi("x", BF16, [1, L, n_in]), vi("y", BF16, [1, L, n_out])
    w = (torch.randn(n_in, n_out) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    s = (torch.rand(n_out) * 1e-3 + 1e-4).to(torch.bfloat16)
    wb = (w.to(torch.bfloat16) * s).to(torch.bfloat16)
    blocks = -(-n_in // 128)
    inits = [init("q", w, FP8), init("q_t", w.t().contiguous(), FP8), init("sf", s.float(), F32),
             init("s_row", s.float()[:, None], F32), init("s_blk", s.float()[:, None].expand(n_out, blocks), F32),
             init("inv448", torch.tensor(1 / 448), F32),
             init("static_sx", torch.tensor(6.0 / 448), F32)]
    faithful = [helper.make_node("DequantizeLinear", ["q", "sf"], ["wf"], axis=1),
                helper.make_node("Cast", ["wf"], ["w"], to=BF16),
                helper.make_node("MatMul", ["x", "w"], ["y"])]

    def op(weight, scale, block, a_scale=None):
        ins = ["x", weight, scale] + ([a_scale] if a_scale else [])
        return helper.make_node("MatMulBlockQuantizedFp8Weight", ins, ["y"], domain="com.microsoft", block_size=block)
    transpose = [helper.make_node("Transpose", ["q"], ["qt_run"], perm=[1, 0])]
    dynamic = [helper.make_node("Cast", ["x"], ["x32"], to=F32), helper.make_node("Abs", ["x32"], ["ax"]),
               helper.make_node("ReduceMax", ["ax"], ["mx"], keepdims=0),
               helper.make_node("Mul", ["mx", "inv448"], ["sx"])]

    def m(nodes):
        out = model(nodes, [x], [y], inits)
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        return out
    return {"dq_fp32_cast": m(faithful),
            "bf16_weight": model([helper.make_node("MatMul", ["x", "wb"], ["y"])], [x], [y], [init("wb", wb, BF16)]),
            "fp8mm (out,in) block=K": m([op("q_t", "s_row", n_in)]),
            "fp8mm Transpose per run, block=K": m(transpose + [op("qt_run", "s_row", n_in)]),
            "fp8mm (out,in) block=128": m([op("q_t", "s_blk", 128)]),
            "fp8mm W8A8 static a_scale, block=128": m([op("q_t", "s_blk", 128, "static_sx")]),
            "fp8mm W8A8 dynamic a_scale, block=128": m(dynamic + [op("q_t", "s_blk", 128, "sx")])}


def attention_models():
    """Self-attention at the DiT's shape (1 × 4170 tokens × 18 heads × 256, bf16, scale 1/16). Baseline: the
    graphs' form, opset-23 Attention on BNSH with an fp32 softmax between Transposes. Candidate: contrib
    MultiHeadAttention on the (1, L, 18·256) projections as they come (no Transposes), with onnxruntime's
    default kernel choice and with cuDNN's fused SDPA (head_dim ≤ 256), which the CUDA provider enables by its
    `sdpa_kernel` bitmask (8 = cuDNN flash attention, 16 = unfused fallback); both ops also with flash and
    memory-efficient attention forced, to learn which kernel the default picks at head_dim 256."""
    flat = [1, L, H * HD]
    q, k, v, y = (vi(n, BF16, flat) for n in ("q", "k", "v", "y"))
    split = init("bnsh", torch.tensor([1, L, H, HD]), TP.INT64)
    back = init("flat", torch.tensor(flat), TP.INT64)
    onnx23 = [n for name in ("q", "k", "v") for n in (
                  helper.make_node("Reshape", [name, "bnsh"], [f"{name}4"]),
                  helper.make_node("Transpose", [f"{name}4"], [f"{name}t"], perm=[0, 2, 1, 3]))]
    onnx23 += [helper.make_node("Attention", ["qt", "kt", "vt"], ["o"], scale=1 / 16, softmax_precision=F32),
               helper.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
               helper.make_node("Reshape", ["ot", "flat"], ["y"])]
    mha = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft", num_heads=H,
                           scale=1 / 16)
    m_mha = model([mha], [q, k, v], [y])
    m_mha.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    m23 = model(onnx23, [q, k, v], [y], [split, back])
    out = {"Attention opset 23 (BNSH)": m23}
    for kernel in ATTENTION_KERNELS:          # same graphs, the CUDA provider's sdpa_kernel bitmask set
        out[f"Attention opset 23, sdpa_kernel={kernel}"] = m23
    out["MultiHeadAttention, default kernels"] = m_mha
    for kernel in sorted(ATTENTION_KERNELS, key=lambda k: k == "1"):   # flash-only last: it crashed the context (§13)
        out[f"MultiHeadAttention, sdpa_kernel={kernel}"] = m_mha
    return out


# sdpa_kernel bits (onnxruntime attention_common.h): 1 flash, 2 memory-efficient, 8 cuDNN flash, 16 unfused
ATTENTION_KERNELS = {"1": "flash", "2": "memory-efficient", "24": "cuDNN SDPA, unfused fallback"}


def silu_models():
    shape = [1, L, F]
    x, y = vi("x", BF16, shape), vi("y", BF16, shape)
    ref = [helper.make_node("Cast", ["x"], ["xf"], to=F32), helper.make_node("Sigmoid", ["xf"], ["sg"]),
           helper.make_node("Mul", ["xf", "sg"], ["yf"]), helper.make_node("Cast", ["yf"], ["y"], to=BF16)]
    bf = [helper.make_node("Sigmoid", ["x"], ["sg"]), helper.make_node("Mul", ["x", "sg"], ["y"])]
    swish = [helper.make_node("Swish", ["x"], ["y"])]
    m_sw = model(swish, [x], [y])
    m_sw.opset_import[0].version = 24
    return {"fp32_cast": model(ref, [x], [y]), "bf16_sigmoid_mul": model(bf, [x], [y]), "Swish_opset24": m_sw}


def order_models(layers=16):
    """A chain of FP8 linears: does onnxruntime keep every dequantized weight alive (execution order)?"""
    x = vi("x", BF16, [1, L, D])
    nodes, inits, cur = [], [], "x"
    for i in range(layers):
        w = (torch.randn(D, D) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        inits += [init(f"q{i}", w, FP8), init(f"s{i}", torch.full((D,), 1e-4), F32)]
        nodes += [helper.make_node("DequantizeLinear", [f"q{i}", f"s{i}"], [f"wf{i}"], axis=1),
                  helper.make_node("Cast", [f"wf{i}"], [f"w{i}"], to=BF16),
                  helper.make_node("MatMul", [cur, f"w{i}"], [f"h{i}"])]
        cur = f"h{i}"
    nodes[-1].output[0] = "y"
    return model(nodes, [x], [vi("y", BF16, [1, L, D])], inits)


def arena_case(results):
    if ONLY and ONLY not in "fp8 chain memory":
        return
    for order in ("DEFAULT", "PRIORITY_BASED"):
        m = order_models()
        torch.cuda.synchronize()
        free0 = torch.cuda.mem_get_info()[0]
        row = {"case": "fp8 chain 16x(4608x4608) memory", "variant": f"execution_order={order}"}
        try:
            s = session(m, order=order, config={"optimization.disable_specified_optimizers": "ConstantFolding"})
            ms, _ = timed(s, {"x": torch.randn(1, L, D, device="cuda").to(torch.bfloat16)}, n=5)
            row["ms"] = round(ms, 3)
            row["gpu_mem_grown_mib"] = round((free0 - torch.cuda.mem_get_info()[0]) / 2**20)
            row["fp8_weight_mib"] = round(16 * D * D / 2**20)
            del s
        except Exception as e:  # noqa: BLE001
            row["error"] = str(e).splitlines()[0][:300]
        print(json.dumps(row), flush=True)
        results.append(row)


def cast_case(results):
    """Cast of an e4m3 initializer to bf16 / fp16 / fp32 on the CUDA provider (constant folding off, so the
    CUDA kernel runs), against torch's exact decoding of the same bytes."""
    if ONLY and ONLY not in "Cast e4m3 initializer":
        return
    q = (torch.randn(4608, 512) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    exact = q.to(torch.float32)
    for name, t in (("bf16", BF16), ("fp16", TP.FLOAT16), ("fp32", F32)):
        nodes = [helper.make_node("Cast", ["q"], ["c"], to=t), helper.make_node("Cast", ["c"], ["y"], to=F32)]
        m = model(nodes, [vi("x", F32, [1])], [vi("y", F32, [4608, 512])], [init("q", q, FP8)])
        m.graph.node.insert(0, helper.make_node("Identity", ["x"], ["unused"]))
        row = {"case": "Cast e4m3 initializer on CUDA", "variant": f"to {name}"}
        try:
            s = session(m, config={"optimization.disable_specified_optimizers": "ConstantFolding"})
            y = torch.from_numpy(s.run(None, {"x": np.zeros(1, np.float32)})[0])
            row.update(exact_fraction=(y == exact).float().mean().item(), max_abs=(y - exact).abs().max().item())
        except Exception as e:  # noqa: BLE001
            row["error"] = str(e).splitlines()[0][:300]
        print(json.dumps(row), flush=True)
        results.append(row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default=None, help="run only the cases whose name contains this text")
    args = ap.parse_args()
    print(json.dumps({"onnxruntime": ort.__version__, "device": torch.cuda.get_device_name()}))
    results: list[dict] = []
    dev = lambda *s: torch.randn(*s, device="cuda").to(torch.bfloat16)  # noqa: E731
    global ONLY
    ONLY = args.only
    case("attention (1, 4170, 18x256)", attention_models(), {n: dev(1, L, H * HD) for n in "qkv"}, results,
         per_variant={f"{op}, sdpa_kernel={k}": {"provider": {"sdpa_kernel": k}}
                      for op in ("Attention opset 23", "MultiHeadAttention") for k in ATTENTION_KERNELS})
    case("fp8mm w1 (12288x4608)", fp8mm_models(F, D), {"x": dev(1, L, D)}, results)
    case("fp8mm w2 (4608x12288)", fp8mm_models(D, F), {"x": dev(1, L, F)}, results)
    case("w8a8 linear w1 (12288x4608)", w8a8_models(F, D), {"x": dev(1, L, D)}, results)
    cast_case(results)
    case("rms_norm (L, D)", norm_models([1, L, D], 1e-5), {"x": dev(1, L, D) * 3}, results)
    case("qk rms_norm (L, H, hd)", norm_models([1, L, H, HD], 1e-5), {"x": dev(1, L, H, HD) * 3}, results)
    case("rope (H, L, hd)", rope_models(), {"x": dev(1, H, L, HD)}, results)
    # constant folding off (the runtime's default): with it on, onnxruntime folds the Cast(e4m3→bf16) of the
    # weight on the CPU and the CUDA Cast (wrong values on 1.31.1, docs/tuning.md §4) never runs
    case("fp8 linear w1 (12288x4608)", dequant_models(F, D), {"x": dev(1, L, D)}, results,
         config={"optimization.disable_specified_optimizers": "ConstantFolding"})
    case("fp8 linear w1, dequantize_at_load", dequant_models(F, D), {"x": dev(1, L, D)}, results,
         config={"session.disable_quant_qdq": "1"})
    case("silu (L, F)", silu_models(), {"x": dev(1, L, F) * 4}, results)
    arena_case(results)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(json.dumps(r) for r in results) + "\n")


if __name__ == "__main__":
    main()
