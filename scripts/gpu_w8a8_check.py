"""GPU check of the W8A8 path (issue 19): the op library's kernels inside onnxruntime-gpu against
higher-precision references with stated bounds, their speed against what they replace, and (after the
benchmark stages) the end-to-end deviation from the faithful path. Builds nothing: the op library is built on the
CPU machine (`make kernels`) and carried (build/kernels/libideogram4_kernels.so: the fused and the W8A8 ops).

    python scripts/gpu_w8a8_check.py kernels [--out DIR]        # ~2 min: correctness + timing, JSON
    python scripts/gpu_w8a8_check.py deviation --root ROOT      # after gpu_bench.sh runtime + runtime-w8a8

kernels, per shape (the DiT's at 1024², M = 4170 tokens, and odd ones):
* Fp8QuantizeRows: codes and scales bit-identical to the numpy model (export/reference/w8a8_model.py);
* Fp8RowScaledMatMul on the kernel's own quantized operands: |y − y64| ≤ gemm_bound (fp32 accumulation of K
  products, one bf16 rounding) against an fp64 product on the GPU, and rel. L2 ≤ 2^-8;
* the W8A8 linear against the faithful linear's exact value x·(q_w·s_w)ᵀ: |Δ| ≤ linear_bound (e4m3's 3
  mantissa bits) and rel. L2 inside the range random data must give (2^-5/√3 … 2^-4/√3);
* the runtime on the tiny synthetic model exported with --precision w8a8: runs, stays near faithful, and
  falls back with a warning when the library is missing;
* timing (differential: a graph with 9 GEMMs minus one with 1, so launch and run overheads cancel) against
  onnxruntime's bf16 MatMul, its weight-only MatMulBlockQuantizedFp8Weight (the faithful path's op), torch's
  bf16 matmul and torch._scaled_mm row-wise, in TFLOP/s.
Writes DIR/w8a8_kernels.json (DIR: --out, else $OUT, else /tmp); exit 1 if a check fails.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from ideogram4_engine.export.reference import w8a8_model as m
from ideogram4_engine.export.graphs.w8a8 import DOMAIN
from ideogram4_engine.runtime import kernels

LIB = kernels.default_library()
M_DIT = 4170                       # 1024²: 4096 image tokens + a 74-token prompt (dit_cond)
DIT = {"qkv": (13824, 4608), "o": (4608, 4608), "w1,w3": (12288, 4608), "w2": (4608, 12288)}    # (N, K)
ODD = [(1, 4608, 4608), (77, 48, 80), (4171, 16, 12288), (3, 13824, 4608)]                       # (M, N, K)
QUANT_ODD = [(5, 33), (1, 8), (7, 12296), (300, 4608)]                                           # (M, K)
REPS = 9


def _onnx():
    import onnx
    from onnx import TensorProto, helper
    return onnx, TensorProto, helper


def _model(nodes, inputs, outputs, inits):
    onnx, T, h = _onnx()
    g = h.make_graph(nodes, "g", inputs, outputs, inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 21), h.make_opsetid(DOMAIN, 1),
                                          h.make_opsetid("com.microsoft", 1)], ir_version=10)


def _weight_inits(wq: np.ndarray, ws: np.ndarray):
    onnx, T, h = _onnx()
    return [h.make_tensor("W", T.FLOAT8E4M3FN, list(wq.shape), wq.tobytes(), raw=True),
            onnx.numpy_helper.from_array(ws.astype(np.float32), "WS"),
            onnx.numpy_helper.from_array(np.array(1.0, np.float32), "one")]


def linear_graph(M, K, N, wq, ws, *, clamp=0.0, fast=False, reps=1, check=True):
    """x fp32 → bf16 → Fp8QuantizeRows → reps × Fp8RowScaledMatMul; with check, also q (as fp32 through an
    exact DequantizeLinear), the scales and y as fp32 outputs."""
    onnx, T, h = _onnx()
    vi = h.make_tensor_value_info
    qa = {"clamp": float(clamp)} if clamp else {}
    ma = {"fast_accumulation": 1} if fast else {}
    nodes = [h.make_node("Cast", ["x"], ["xb"], to=T.BFLOAT16),
             h.make_node("Fp8QuantizeRows", ["xb"], ["q", "s"], domain=DOMAIN, **qa)]
    outs = []
    for i in range(reps):
        nodes.append(h.make_node("Fp8RowScaledMatMul", ["q", "s", "W", "WS"], [f"y{i}"], domain=DOMAIN, **ma))
    if check:
        nodes += [h.make_node("DequantizeLinear", ["q", "one"], ["qf"]), h.make_node("Cast", ["y0"], ["yf"], to=T.FLOAT)]
        outs = [vi("qf", T.FLOAT, [M, K]), vi("s", T.FLOAT, [M]), vi("yf", T.FLOAT, [M, N])]
    else:
        outs = [vi(f"y{i}", T.BFLOAT16, [M, N]) for i in range(reps)]
    return _model(nodes, [vi("x", T.FLOAT, [M, K])], outs, _weight_inits(wq, ws))


def quantize_graph(M, K, clamp=0.0, quantize=True):
    onnx, T, h = _onnx()
    vi = h.make_tensor_value_info
    qa = {"clamp": float(clamp)} if clamp else {}
    nodes = [h.make_node("Cast", ["x"], ["xb"], to=T.BFLOAT16)]
    if not quantize:                                  # the timing baseline: the Cast alone
        return _model(nodes, [vi("x", T.FLOAT, [M, K])], [vi("xb", T.BFLOAT16, [M, K])], [])
    nodes += [h.make_node("Fp8QuantizeRows", ["xb"], ["q", "s"], domain=DOMAIN, **qa),
              h.make_node("DequantizeLinear", ["q", "one"], ["qf"])]
    return _model(nodes, [vi("x", T.FLOAT, [M, K])], [vi("qf", T.FLOAT, [M, K]), vi("s", T.FLOAT, [M])],
                  [onnx.numpy_helper.from_array(np.array(1.0, np.float32), "one")])


def baseline_graph(kind, M, K, N, wq, ws, w_bf16_bits, reps):
    """onnxruntime's own paths for the same linear: bf16 MatMul on bf16(q·s) (K, N), or the faithful
    MatMulBlockQuantizedFp8Weight on the e4m3 bytes."""
    onnx, T, h = _onnx()
    vi = h.make_tensor_value_info
    nodes = [h.make_node("Cast", ["x"], ["xb"], to=T.BFLOAT16)]
    if kind == "ort_bf16":
        inits = [h.make_tensor("Wb", T.BFLOAT16, [K, N], w_bf16_bits.tobytes(), raw=True)]
        nodes += [h.make_node("MatMul", ["xb", "Wb"], [f"y{i}"]) for i in range(reps)]
    else:
        inits = _weight_inits(wq, ws)[:1] + [onnx.numpy_helper.from_array(ws.astype(np.float32)[:, None], "rows")]
        nodes += [h.make_node("MatMulBlockQuantizedFp8Weight", ["xb", "W", "rows"], [f"y{i}"], domain="com.microsoft",
                              block_size=K) for i in range(reps)]
    return _model(nodes, [vi("x", T.FLOAT, [M, K])], [vi(f"y{i}", T.BFLOAT16, [M, N]) for i in range(reps)], inits)


class Gpu:
    def __init__(self):
        import onnxruntime as ort
        import torch
        self.ort, self.torch = ort, torch
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise SystemExit(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (stage onnxruntime-gpu)")
        if not LIB.is_file():
            raise SystemExit(f"{LIB} is missing: build it on the CPU machine (`make kernels`) and carry it")

    def session(self, model):
        so = self.ort.SessionOptions()
        so.log_severity_level = 3
        so.register_custom_ops_library(str(LIB))
        return self.ort.InferenceSession(model.SerializeToString(), so, providers=["CUDAExecutionProvider"])

    def run(self, model, x):
        return self.session(model).run(None, {"x": x})

    def time_ms(self, model, x, runs=15):
        sess = self.session(model)
        b = sess.io_binding()
        b.bind_ortvalue_input("x", self.ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
        for o in sess.get_outputs():
            b.bind_output(o.name, "cuda", 0)
        for _ in range(3):
            sess.run_with_iobinding(b)
        ts = []
        for _ in range(runs):
            t = time.perf_counter()
            sess.run_with_iobinding(b)
            ts.append(time.perf_counter() - t)
        return 1e3 * float(np.median(ts))

    def torch_ms(self, fn, runs=20):
        torch = self.torch
        for _ in range(3):
            fn()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(runs):
            fn()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / runs


def make_weight(gpu, N, K, seed):
    """Random weight quantized like the checkpoint: e4m3 rows with bf16-representable fp32 scales."""
    torch = gpu.torch
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(N, K, device="cuda", generator=g) * 0.02
    s = (w.abs().amax(1) / 448).clamp_min(1e-8).to(torch.bfloat16).float()
    q = (w / s[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    w_eff = q.double() * s.double()[:, None]
    bits = (q.float() * s[:, None]).to(torch.bfloat16).t().contiguous().view(torch.int16).cpu().numpy()
    return q.view(torch.uint8).cpu().numpy(), s.cpu().numpy(), w_eff, bits


def make_activation(M, K, seed, outliers=False):
    """bf16-valued fp32 activations: N(0, 1) rows with per-token magnitudes over 2^±4; with outliers, a few
    channels 100x and one all-zero row (what per-token scaling is for)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((M, K)).astype(np.float32) * np.exp2(rng.uniform(-4, 4, (M, 1))).astype(np.float32)
    if outliers and M > 1:
        x[:, rng.choice(K, size=max(1, K // 512), replace=False)] *= 100
        x[M // 2] = 0
    return m.bf16_round(x)


def check_linear(gpu, M, N, K, seed, fast=False, outliers=False) -> dict:
    torch = gpu.torch
    wq, ws, w_eff, _ = make_weight(gpu, N, K, seed)
    x = make_activation(M, K, seed + 1, outliers)
    qf, s, y = gpu.run(linear_graph(M, K, N, wq, ws, fast=fast), x)
    q_ref, s_ref = m.quantize_rows(x)
    quant_exact = bool(np.array_equal(qf, m.e4m3_decode(q_ref)) and np.array_equal(s, s_ref))
    xd = torch.from_numpy(x).cuda().double()
    qd = torch.from_numpy(qf).cuda().double() * torch.from_numpy(s).cuda().double()[:, None]
    y64 = (qd @ w_eff.t())                                           # the kernel's operands, exact product
    terms = (qd.abs() @ w_eff.abs().t())
    exact = xd @ w_eff.t()                                           # the faithful linear's exact value
    abs_sum, w_rows = (xd.abs() @ w_eff.abs().t()), w_eff.abs().sum(1)
    y64, terms, exact, abs_sum, w_rows = (t.cpu().numpy() for t in (y64, terms, exact, abs_sum, w_rows))
    gb = m.gemm_bound(terms, y64, K, fast)
    lb = m.linear_bound(abs_sum, w_rows, s_ref, exact, K, fast)
    gemm_err, lin_err = np.abs(y - y64), np.abs(y - exact)
    rel_gemm = float(np.linalg.norm(y - y64) / max(np.linalg.norm(y64), 1e-30))
    rel = float(np.linalg.norm(y - exact) / max(np.linalg.norm(exact), 1e-30))
    lo, hi = m.rms_relative_error_range()
    statistical = M * N >= 4096 and not outliers
    ok = quant_exact and bool(np.all(gemm_err <= gb)) and rel_gemm <= 2.0 ** -8 and bool(np.all(lin_err <= lb)) \
        and (not statistical or 0.9 * lo <= rel <= 1.1 * hi)
    return {"M": M, "N": N, "K": K, "fast_accumulation": fast, "outliers": outliers, "ok": ok,
            "quantize_bit_identical": quant_exact, "gemm_rel_l2_vs_fp64": rel_gemm,
            "gemm_max_err_over_bound": float((gemm_err / np.maximum(gb, 1e-300)).max()),
            "linear_rel_l2_vs_exact": rel, "linear_rel_l2_expected_range": [lo, hi] if statistical else None,
            "linear_max_err_over_bound": float((lin_err / np.maximum(lb, 1e-300)).max()),
            "finite": bool(np.isfinite(y).all()),
            "informative": fast}      # fast accumulation's bound is an assumption (w8a8_model.gemm_bound), not counted


def check_quantize(gpu, M, K, seed, clamped=False) -> dict:
    """Codes and scales bit for bit against the model, with outliers and a zero row; clamped: the amax capped
    at the 99.9th percentile of |x| (the outliers saturate)."""
    x = make_activation(M, K, seed, outliers=True)
    clamp = float(np.quantile(np.abs(x), 0.999)) if clamped else 0.0
    qf, s = gpu.run(quantize_graph(M, K, clamp), x)
    q_ref, s_ref = m.quantize_rows(x, clamp)
    same_q, same_s = np.array_equal(qf, m.e4m3_decode(q_ref)), np.array_equal(s, s_ref)
    return {"M": M, "K": K, "clamp": clamp, "ok": bool(same_q and same_s), "codes_bit_identical": bool(same_q),
            "scales_bit_identical": bool(same_s), "codes_differing": int((qf != m.e4m3_decode(q_ref)).sum())}


def check_refusal(gpu) -> dict:
    M, N, K = 4, 32, 40                                   # K not a multiple of 16
    wq, ws, _, _ = make_weight(gpu, N, K, 5)
    try:
        gpu.run(linear_graph(M, K, N, wq, ws), make_activation(M, K, 6))
        return {"ok": False, "error": None}
    except Exception as e:  # noqa: BLE001 -- onnxruntime's error types
        msg = str(e)
        return {"ok": "multiples of 16" in msg and "Fp8RowScaledMatMul" in msg, "error": msg.splitlines()[0][-300:]}


def check_tiny_pipeline(root: Path) -> dict:
    """The runtime end to end on the tiny synthetic model exported with --precision w8a8 (seconds): the W8A8
    graphs load and run (precision stays w8a8), their latents are finite and near the faithful ones, and a
    missing library gives the warning and the faithful graphs."""
    import warnings
    from ideogram4_engine.runtime.pipeline import Pipeline
    eng = root / "engines"
    if not (eng / "manifest.json").exists():
        from ideogram4_engine.export.devtools import checkpoint_and_export
        checkpoint_and_export(root, "tiny", precision="w8a8")
    kw = dict(width=256, height=256, steps=3, guidance=(3.0, 5.0, 7.0), seed=3)
    faithful = Pipeline(eng, backend="onnxruntime-cuda").generate("a lighthouse at dusk", **kw).latents
    runs = {}
    for name, fk in (("fused", None), ("stock", False)):      # cuda_fused_w8a8, then cuda_w8a8
        pipe = Pipeline(eng, backend="onnxruntime-cuda", precision="w8a8", fused_kernels=fk)
        runs[name] = (pipe.backend.precision, pipe.backend.graph_variant,
                      pipe.generate("a lighthouse at dusk", **kw).latents)
        del pipe
    old = os.environ.get(kernels.LIBRARY_ENV)
    os.environ[kernels.LIBRARY_ENV] = str(root / "no-such-library.so")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fallback = Pipeline(eng, backend="onnxruntime-cuda", precision="w8a8").backend.precision
    finally:
        os.environ.pop(kernels.LIBRARY_ENV) if old is None else os.environ.__setitem__(kernels.LIBRARY_ENV, old)
    warned = any("no-such-library.so" in str(c.message) for c in caught)
    z, zs = runs["fused"][2], runs["stock"][2]
    rel = float(np.linalg.norm(z - faithful) / np.linalg.norm(faithful))
    # the fused producers quantize bit-identically to Fp8QuantizeRows, so both W8A8 twins give the same bits
    same = bool(np.array_equal(z, zs))
    ok = [r[:2] for r in runs.values()] == [("w8a8", "cuda_fused_w8a8"), ("w8a8", "cuda_w8a8")] and \
        bool(np.isfinite(z).all()) and 0 < rel < 0.2 and same and fallback == "faithful" and warned
    return {"ok": ok, "ran": {k: list(v[:2]) for k, v in runs.items()}, "latents_rel_err_vs_faithful": rel,
            "fused_w8a8_bit_identical_to_cuda_w8a8": same,
            "fused_vs_stock_w8a8_rel_err": float(np.linalg.norm(z - zs) / np.linalg.norm(zs)),
            "fallback_precision": fallback, "fallback_warned": warned}


def time_shape(gpu, name, N, K, M=M_DIT) -> dict:
    torch = gpu.torch
    wq, ws, w_eff, bits = make_weight(gpu, N, K, 11)
    x = make_activation(M, K, 12)
    flop = 2.0 * M * N * K
    out = {"shape": name, "M": M, "N": N, "K": K}

    def per_gemm(build):
        return (gpu.time_ms(build(REPS), x) - gpu.time_ms(build(1), x)) / (REPS - 1)

    for fast in (False, True):
        key = "w8a8_gemm" + ("_fast" if fast else "")
        out[f"{key}_ms"] = per_gemm(lambda r: linear_graph(M, K, N, wq, ws, fast=fast, reps=r, check=False))
    out["w8a8_quantize_ms"] = gpu.time_ms(quantize_graph(M, K), x) - gpu.time_ms(quantize_graph(M, K, quantize=False), x)
    out["ort_bf16_matmul_ms"] = per_gemm(lambda r: baseline_graph("ort_bf16", M, K, N, wq, ws, bits, r))
    out["ort_fp8_weight_only_ms"] = per_gemm(lambda r: baseline_graph("ort_fp8wo", M, K, N, wq, ws, bits, r))
    xb = torch.from_numpy(x).cuda().to(torch.bfloat16)
    wb = w_eff.to(torch.bfloat16)
    out["torch_bf16_matmul_ms"] = gpu.torch_ms(lambda: xb @ wb.t())
    xs = (xb.float().abs().amax(1, keepdim=True) / 448).clamp_min(2.0 ** -100)
    xq = (xb.float() / xs).clamp(-448, 448).to(torch.float8_e4m3fn)
    wq_t = torch.from_numpy(wq).cuda().view(torch.float8_e4m3fn)
    wsd = torch.from_numpy(ws).cuda()[None, :]
    for fast in (False, True):
        try:
            out["torch_scaled_mm_rowwise" + ("_fast" if fast else "") + "_ms"] = gpu.torch_ms(
                lambda: torch._scaled_mm(xq, wq_t.t(), scale_a=xs, scale_b=wsd, out_dtype=torch.bfloat16,
                                         use_fast_accum=fast))
        except Exception as e:  # noqa: BLE001 -- older torch: not available
            out["torch_scaled_mm_error"] = str(e).splitlines()[0]
    for k in [k for k in out if k.endswith("_ms") and "quantize" not in k]:
        out[k.replace("_ms", "_tflops")] = flop / (out[k] * 1e-3) / 1e12
    out["w8a8_linear_ms"] = out["w8a8_gemm_ms"] + out["w8a8_quantize_ms"]
    out["speedup_vs_ort_fp8_weight_only"] = out["ort_fp8_weight_only_ms"] / out["w8a8_linear_ms"]
    return out


def cmd_kernels(a) -> int:
    out_dir = Path(a.out or os.environ.get("OUT") or "/tmp")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "w8a8_kernels.json"
    t0 = time.perf_counter()
    gpu = Gpu()
    torch = gpu.torch
    res = {"library": str(LIB), "onnxruntime": gpu.ort.__version__, "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(0), "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
           "checks": [], "timing": [], "errors": []}

    def save():
        res["elapsed_s"] = time.perf_counter() - t0
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
        tmp.replace(path)

    def section(kind, fn, *args, **kw):
        t = time.perf_counter()
        try:
            r = fn(*args, **kw)
            r["kind"], r["seconds"] = kind, time.perf_counter() - t
            res["timing" if kind == "timing" else "checks"].append(r)
            print(json.dumps(r), flush=True)
        except Exception as e:  # noqa: BLE001 -- record and go on: one failing shape must not hide the others
            res["errors"].append({"kind": kind, "args": repr(args), "error": traceback.format_exc()[-2000:]})
            print(f"FAILED {kind}{args}: {e}", flush=True)
        save()

    section("refusal", check_refusal, gpu)
    lt = ctypes.CDLL(str(LIB))                               # the library onnxruntime already loaded
    lt.ideogram4_cublaslt_problem.restype = ctypes.c_char_p
    res["cublaslt_version"] = int(lt.ideogram4_cublaslt_version())
    res["cublaslt_problem"] = lt.ideogram4_cublaslt_problem().decode()
    for M, K in QUANT_ODD:
        section("quantize", check_quantize, gpu, M, K, 21)
    section("quantize", check_quantize, gpu, 64, 4608, 22, clamped=True)
    for i, (name, (N, K)) in enumerate(DIT.items()):
        section("linear", check_linear, gpu, M_DIT, N, K, 31 + i)
    section("linear", check_linear, gpu, M_DIT, 12288, 4608, 40, fast=True)
    section("linear", check_linear, gpu, 256, 4608, 4608, 41, outliers=True)
    for M, N, K in ODD:
        section("linear", check_linear, gpu, M, N, K, 50 + M)
    section("tiny_pipeline", check_tiny_pipeline, Path(a.tiny_root))
    for name, (N, K) in DIT.items():
        section("timing", time_shape, gpu, name, N, K)
    res["ok"] = not res["errors"] and all(c["ok"] for c in res["checks"] if not c.get("informative"))
    save()
    t = {r["shape"]: r for r in res["timing"]}
    print(f"\nW8A8 kernels on {res['gpu']} (cuBLASLt {res['cublaslt_version']}): "
          f"{sum(c['ok'] for c in res['checks'])}/{len(res['checks'])} checks passed, {len(res['errors'])} errors, "
          f"{res['elapsed_s']:.0f} s -> {path}")
    for name, r in t.items():
        print(f"  {name:6s} W8A8 GEMM {r['w8a8_gemm_tflops']:6.0f} TFLOP/s ({r['w8a8_gemm_ms']:.3f} ms) + quantize "
              f"{r['w8a8_quantize_ms']:.3f} ms | ORT bf16 {r['ort_bf16_matmul_tflops']:.0f} | ORT FP8 weight-only "
              f"{r['ort_fp8_weight_only_tflops']:.0f} | torch bf16 {r['torch_bf16_matmul_tflops']:.0f} | torch "
              f"_scaled_mm {r.get('torch_scaled_mm_rowwise_tflops', float('nan')):.0f} TFLOP/s")
    return 0 if res["ok"] else 1


# ------------------------------------------------------------------------------------------ end to end

def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def cmd_deviation(a) -> int:
    """The W8A8 runtime's final latents and images against the faithful runtime's, same noise and prompt, per
    case that scripts/bench.py runtime wrote both for (`gpu_bench.sh runtime runtime-w8a8`)."""
    root = Path(a.root)
    recs = [json.loads(l) for l in (root / "results.jsonl").read_text().splitlines() if l.strip()]
    faithful = {(r["width"], r["height"], r["preset"]): r for r in recs if r.get("kind") == "runtime"}
    w8 = {(r["width"], r["height"], r["preset"]): r for r in recs if r.get("kind") == "runtime precision=w8a8"}
    rows = []
    for key in sorted(set(faithful) & set(w8)):
        w, h, preset = key
        tag = f"{w}x{h}_{preset}"
        za, zb = np.load(root / f"latents_runtime_precision=w8a8_{tag}.npy"), np.load(root / f"latents_runtime_{tag}.npy")
        row = {"width": w, "height": h, "preset": preset, "precision_ran": w8[key].get("precision"),
               "latents_rel_err": float(np.linalg.norm(za - zb) / np.linalg.norm(zb)),
               "latents_max_abs_diff": float(np.abs(za - zb).max()),
               "step_ms_faithful": faithful[key]["step_ms"], "step_ms_w8a8": w8[key]["step_ms"],
               "step_ratio": w8[key]["step_ms"] / faithful[key]["step_ms"],
               "gpu_mem_mib_faithful": faithful[key].get("gpu_mem_used_mib"),
               "gpu_mem_mib_w8a8": w8[key].get("gpu_mem_used_mib")}
        ia, ib = root / f"image_runtime_precision=w8a8_{tag}.npy", root / f"image_runtime_{tag}.npy"
        if ia.exists() and ib.exists():
            pa, pb = np.load(ia), np.load(ib)
            row.update(image_psnr_db=psnr(pa, pb), image_max_abs_diff=int(np.abs(pa.astype(int) - pb.astype(int)).max()))
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(a.out or os.environ.get("OUT") or root) / "w8a8_deviation.json"
    out.write_text(json.dumps({"cases": rows, "note": "synthetic random weights: no activation outliers; the real "
                               "model's deviation may be larger"}, indent=1))
    if not rows:
        print(f"no case has both a faithful and a w8a8 runtime record in {root}/results.jsonl", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("kernels")
    k.add_argument("--out", default=None)
    k.add_argument("--tiny-root", default="/tmp/ideogram4_w8a8_tiny", help="tiny checkpoint + w8a8 export (reused)")
    d = sub.add_parser("deviation")
    d.add_argument("--root", default="/tmp/ideogram4_bench")
    d.add_argument("--out", default=None)
    a = ap.parse_args()
    return {"kernels": cmd_kernels, "deviation": cmd_deviation}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
