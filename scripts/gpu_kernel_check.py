"""GPU check of the fused CUDA kernels (kernels/, the `ideogram4` ops of the cuda_fused graphs), in one process:

1. each op against the unfused subgraph it replaces (kernels/checks.py: the exporter's own layer functions),
   both on onnxruntime's CUDA provider, at the model's shapes (4170 tokens, D 4608, 18 heads x 256, FFN 12288)
   and at odd ones (few rows: other reduction layouts; widths not a multiple of 4: the scalar paths): the share
   of bit-identical values, the largest distance in bf16 ulps, the numpy model's agreement, and ms per call;
2. end to end on synthetic models (default tiny and full-width): the runtime with the fused graphs against the
   stock cuda graphs, FP8 resident and dequantize_at_load, same request: latents bit-identical or how far;
3. optionally (--cuda-graph) the full-width fused dit_cond under onnxruntime's CUDA graph capture.

    source scripts/device_env.sh; python3 scripts/gpu_kernel_check.py --out $OUT     # gpu_bench.sh stage `kernels`

One JSON line per case on stdout and in $OUT/kernel_check.jsonl; exit status 1 if a kernel is off its bound
(bit-identical) or an end-to-end case fails to run.
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))

CASES = [   # (op, dims): the model's shapes first, then odd ones
    ("NormModulate", dict(batch=1, tokens=4170, width=4608)),
    ("NormModulate", dict(batch=2, tokens=37, width=384)),
    ("NormModulate", dict(batch=1, tokens=300, width=1002)),
    ("GatedResidual", dict(batch=1, tokens=4170, width=4608)),
    ("GatedResidual", dict(batch=2, tokens=5, width=4608)),
    ("GatedResidualModulate", dict(batch=1, tokens=4170, width=4608)),
    ("GatedResidualModulate", dict(batch=1, tokens=4096, width=4608)),
    ("GatedResidualModulate", dict(batch=2, tokens=200, width=4608)),
    ("GatedResidualModulate", dict(batch=1, tokens=3, width=1001)),
    ("QkvNormRope", dict(batch=1, tokens=4170, heads=18, head_dim=256)),
    ("QkvNormRope", dict(batch=2, tokens=13, heads=3, head_dim=64)),
    ("QkvNormRope", dict(batch=1, tokens=100, heads=2, head_dim=6)),
    ("SwiGLU", dict(batch=1, tokens=4170, width=12288)),
    ("SwiGLU", dict(batch=1, tokens=7, width=1001)),
]


def emit(out: Path, rec: dict) -> None:
    line = json.dumps(rec)
    print(line, flush=True)
    with open(out / "kernel_check.jsonl", "a") as f:
        f.write(line + "\n")


def _timed(sess, binding, runs: int = 20) -> float:
    sess.run_with_iobinding(binding)
    t = time.perf_counter()
    for _ in range(runs):
        sess.run_with_iobinding(binding)
    return 1e3 * (time.perf_counter() - t) / runs


def _bisect_layout(ort, lib: Path, fused, inputs: dict, stock: dict) -> dict:
    """Which forced reduction layout (threads_y) would make the fused op bit-identical: tells a changed
    onnxruntime layout choice from another difference."""
    import os
    out = {}
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.register_custom_ops_library(str(lib))
    sess = ort.InferenceSession(fused.SerializeToString(), so, providers=["CUDAExecutionProvider"])
    for ty in (1, 2, 4, 8, 16):
        os.environ["IDEOGRAM4_KERNELS_NORM_THREADS_Y"] = str(ty)
        try:
            got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, inputs)))
            out[ty] = {k: float((got[k] == stock[k]).mean()) for k in stock}
        finally:
            del os.environ["IDEOGRAM4_KERNELS_NORM_THREADS_Y"]
    return out


def kernel_cases(out: Path, lib: Path) -> bool:
    import checks
    import onnxruntime as ort
    from ideogram4_engine.export.graphs.fuse import fused_kernels, fused_ops
    from ideogram4_engine.export.graphs.rewrite import for_cuda
    ok = True
    rng = np.random.default_rng(2026)
    for op, dims in CASES:
        heads, hd = dims.get("heads", 2), dims.get("head_dim", 256)
        width = dims.get("width", heads * hd)
        gains = checks.random_gains(op, rng, width, hd)
        stock = for_cuda(checks.subgraph(op, gains, heads, hd))
        fused = fused_kernels(stock)
        rec = {"kind": "kernel", "op": op, **dims, "fused_ops": fused_ops(fused)}
        try:
            inputs = checks.random_inputs(op, rng, batch=dims["batch"], tokens=dims["tokens"], width=width,
                                          heads=heads, head_dim=hd)
            got, ms = {}, {}
            for name, model in (("stock", stock), ("fused", fused)):
                so = ort.SessionOptions()
                so.log_severity_level = 3
                if name == "fused":
                    so.register_custom_ops_library(str(lib))
                sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CUDAExecutionProvider"])
                b = sess.io_binding()
                for k, v in inputs.items():
                    b.bind_ortvalue_input(k, ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0))
                for o in sess.get_outputs():
                    b.bind_output(o.name, "cuda", 0)
                ms[name] = _timed(sess, b)
                got[name] = dict(zip([o.name for o in sess.get_outputs()], [v.numpy() for v in b.get_outputs()]))
            want = checks.numpy_model(op, inputs, gains, heads, hd)
            per = {}
            for k in got["stock"]:
                a, f = got["stock"][k], got["fused"][k]
                d = checks.ulps(f, a)
                per[k] = {"bit_identical": float((a == f).mean()), "max_ulps": float(d.max()),
                          "numpy_model_identical": float((want[k].reshape(a.shape) == a).mean())}
            rec.update(outputs=per, stock_ms=ms["stock"], fused_ms=ms["fused"],
                       ok=all(v["bit_identical"] == 1.0 for v in per.values()))
            if not rec["ok"] and op != "SwiGLU":
                rec["forced_threads_y"] = _bisect_layout(ort, lib, fused, inputs, got["stock"])
        except Exception as e:  # noqa: BLE001 -- record and go on with the other cases
            rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[:400]}")
        ok &= rec["ok"]
        emit(out, rec)
        gc.collect()
    return ok


def end_to_end(out: Path, root: Path, config: str, lib: Path) -> bool:
    from ideogram4_engine.runtime.pipeline import Pipeline
    eng = root / config / "engines"
    if not (eng / "manifest.json").exists():
        from ideogram4_engine.export.synthetic.writer import write_checkpoint
        t = time.perf_counter()
        write_checkpoint(root / config / "ckpt", config, seed=0, device="cuda")
        subprocess.run([sys.executable, "-m", "ideogram4_engine.export", "--checkpoint", str(root / config / "ckpt"),
                        "--out", str(eng), "--no-progress"], check=True, capture_output=True)
        emit(out, {"kind": "prepare", "config": config, "seconds": time.perf_counter() - t})
    size = 512 if config == "tiny" else 1024
    kw = dict(width=size, height=size, steps=4, guidance=(3.0, 4.0, 5.0, 7.0), seed=3)
    ok = True
    for mode, opts in (("fp8", {}), ("dequantize_at_load", {"dequantize_at_load": True})):
        res, rec = {}, {"kind": "e2e", "config": config, "weights": mode, "size": size, "steps": kw["steps"]}
        try:
            for name, fk in (("stock", False), ("fused", True)):
                t = time.perf_counter()
                p = Pipeline(eng, backend="onnxruntime-cuda", fused_kernels=fk, kernels_library=str(lib), **opts)
                load = time.perf_counter() - t
                p.generate("a lighthouse at dusk", **kw)                     # warm-up
                res[name] = p.generate("a lighthouse at dusk", **kw)
                rec[f"{name}_variant"] = p.backend.graph_variant
                rec[f"{name}_step_ms"] = 1e3 * float(np.median(res[name].timings["step_s"]))
                rec[f"{name}_load_s"] = load
                del p
                gc.collect()
            a, b = res["fused"].latents, res["stock"].latents
            rec.update(bit_identical=bool(np.array_equal(a, b)), identical_frac=float((a == b).mean()),
                       rel_err=float(np.linalg.norm(a - b) / np.linalg.norm(b)), finite=bool(np.isfinite(a).all()),
                       ok=bool(np.isfinite(a).all()) and rec["fused_variant"].startswith("cuda_fused"))
        except Exception as e:  # noqa: BLE001
            rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[:600]}")
        ok &= rec["ok"]
        emit(out, rec)
    return ok


def cuda_graph(out: Path, root: Path, config: str, lib: Path) -> None:
    """The fused dit_cond under onnxruntime's CUDA graph capture (enable_cuda_graph, fixed input/output
    addresses): does it capture, does it match, how much faster per forward."""
    import onnxruntime as ort
    from ideogram4_engine.runtime.manifest import load_manifest
    from ideogram4_engine.runtime.rope import dit_rope_tables
    m = load_manifest(root / config / "engines")
    T, gh, gw = 74, 64, 64
    cos, sin = dit_rope_tables(T, gh, gw, m.inv_freq, m.mrope_section)
    rng = np.random.default_rng(0)
    feeds = {"latents": rng.standard_normal((1, gh * gw, 128), dtype=np.float32), "tau": np.array([0.5], np.float32),
             "rope_cos": cos[None].astype(np.float32), "rope_sin": sin[None].astype(np.float32),
             "text_features": rng.standard_normal((1, T, m.raw["model"]["dit"]["llm_features_dim"]), dtype=np.float32)}
    rec = {"kind": "cuda_graph", "config": config, "component": "dit_cond"}
    try:
        outs = {}
        for name, po in (("plain", {}), ("graph", {"enable_cuda_graph": "1"})):
            so = ort.SessionOptions()
            so.log_severity_level = 3
            so.register_custom_ops_library(str(lib))
            sess = ort.InferenceSession(str(m.graph_path("dit_cond", "cuda_fused")), so,
                                        providers=[("CUDAExecutionProvider", {"device_id": 0, **po})])
            b = sess.io_binding()
            vals = {k: ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0) for k, v in feeds.items()}
            for k, v in vals.items():
                b.bind_ortvalue_input(k, v)
            y = ort.OrtValue.ortvalue_from_shape_and_type((1, gh * gw, 128), np.float32, "cuda", 0)
            b.bind_ortvalue_output("velocity", y)
            rec[f"{name}_ms"] = _timed(sess, b, runs=10)
            outs[name] = y.numpy()
            del sess
        rec.update(ok=True, bit_identical=bool(np.array_equal(outs["plain"], outs["graph"])))
    except Exception as e:  # noqa: BLE001
        rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[:600]}")
    emit(out, rec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp")
    ap.add_argument("--root", default="/tmp/ideogram4_kernel_check")
    ap.add_argument("--library", default=None, help="the kernel library (default: runtime.kernels.default_library())")
    ap.add_argument("--configs", default="tiny,full-width", help="end-to-end configs ('' for none)")
    ap.add_argument("--cuda-graph", action="store_true")
    ap.add_argument("--skip-kernels", action="store_true")
    a = ap.parse_args()
    from ideogram4_engine.runtime import kernels
    out, root = Path(a.out), Path(a.root)
    out.mkdir(parents=True, exist_ok=True)
    lib = kernels.check(a.library, [0])
    import onnxruntime as ort
    emit(out, {"kind": "library", "path": str(lib), "arches": kernels.library_arches(lib),
               "compute_capability": kernels.compute_capability(0), "onnxruntime": ort.__version__})
    ok = True if a.skip_kernels else kernel_cases(out, lib)
    for config in [c for c in a.configs.split(",") if c]:
        ok &= end_to_end(out, root, config, lib)
    if a.cuda_graph and "full-width" in a.configs:
        cuda_graph(out, root, "full-width", lib)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
