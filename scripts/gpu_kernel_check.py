"""GPU check of the fused CUDA kernels (kernels/, the `ideogram4` ops of the cuda_fused graphs), in one process:

1. each op against the unfused subgraph it replaces (kernels/checks.py: the exporter's own layer functions; for
   the quantizing *Fp8 ops that subgraph followed by the standalone Fp8QuantizeRows), both on onnxruntime's CUDA
   provider, at the model's shapes (4170 tokens, D 4608, 18 heads x 256, FFN 12288) and at odd ones (few rows:
   other reduction layouts, widths not a multiple of 8: fused.cu's kernels; the DiT's: fused_warp.cu's): the share of bit-identical values, the
   largest distance in bf16 ulps, the numpy model's agreement, and ms per call of the graphs with bf16 / e4m3
   boundaries (checks.bf16_io: the kernels, not the fp32 casts around them; median of 5 x 20 runs);
2. end to end on synthetic models (default tiny and full-width): the runtime with the fused graphs against the
   stock cuda graphs, FP8 resident and dequantize_at_load, same request: latents bit-identical or how far;
3. optionally (--cuda-graph) the full-width stock and fused dit_cond under onnxruntime's CUDA graph capture
   (plain vs replayed ms per forward, bit-identity); when a capture fails, the first node whose inclusion breaks
   it (bisection over graph prefixes); then the runtime end to end with cuda_graph=True against plain runs.

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
    ("GatedResidualModulate", dict(batch=1, tokens=64, width=36868)),      # too wide for the warp kernels
    ("GatedResidualModulate", dict(batch=2, tokens=300, width=4608)),      # warp kernels, two gate rows
    ("GatedResidualModulate", dict(batch=1, tokens=600, width=1000)),      # warp kernels, 4 chunks, partial last
    ("GatedResidual", dict(batch=1, tokens=600, width=2056)),              # warp kernels, 9 of 18 chunks
    ("QkvNormRope", dict(batch=1, tokens=4170, heads=18, head_dim=256)),
    ("QkvNormRope", dict(batch=2, tokens=13, heads=3, head_dim=64)),
    ("QkvNormRope", dict(batch=1, tokens=100, heads=2, head_dim=6)),
    ("QkvNormRope", dict(batch=2, tokens=50, heads=3, head_dim=160)),      # warp kernel, 20 of 32 lanes
    ("SwiGLU", dict(batch=1, tokens=4170, width=12288)),
    ("SwiGLU", dict(batch=1, tokens=7, width=1001)),
    ("SwiGLU", dict(batch=1, tokens=7, width=1000)),                       # vector kernel, partial last block
    ("NormModulateFp8", dict(batch=1, tokens=4170, width=4608)),
    ("NormModulateFp8", dict(batch=2, tokens=37, width=384)),
    ("NormModulateFp8", dict(batch=1, tokens=300, width=1002)),
    ("NormModulateFp8", dict(batch=1, tokens=1200, width=2056)),           # warp kernels, 9 of 18 chunks
    ("GatedResidualModulateFp8", dict(batch=1, tokens=4170, width=4608)),
    ("GatedResidualModulateFp8", dict(batch=2, tokens=200, width=4608)),
    ("GatedResidualModulateFp8", dict(batch=1, tokens=3, width=1001)),
    ("SwiGLUFp8", dict(batch=1, tokens=4170, width=12288)),
    ("SwiGLUFp8", dict(batch=2, tokens=5, width=2048)),
    ("SwiGLUFp8", dict(batch=1, tokens=7, width=1001)),
    ("SwiGLUFp8", dict(batch=1, tokens=3, width=20000)),                  # wider than the register path
]


def emit(out: Path, rec: dict) -> None:
    line = json.dumps(rec)
    print(line, flush=True)
    with open(out / "kernel_check.jsonl", "a") as f:
        f.write(line + "\n")


def _timed(sess, binding, runs: int = 20, repeats: int = 5) -> float:
    sess.run_with_iobinding(binding)
    best = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(runs):
            sess.run_with_iobinding(binding)
        best.append(1e3 * (time.perf_counter() - t) / runs)
    return float(np.median(best))


def _session(ort, model, lib: Path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.register_custom_ops_library(str(lib))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CUDAExecutionProvider"])


def _kernel_ms(ort, sess, inputs: dict) -> float:
    """ms per run of a checks.bf16_io graph: bf16 inputs made on the device by a Cast session, outputs left there."""
    from onnx import TensorProto, helper
    vi = helper.make_tensor_value_info
    names = list(inputs)
    g = helper.make_graph([helper.make_node("Cast", [k], [f"{k}_bf16"], to=TensorProto.BFLOAT16) for k in names], "cast",
                          [vi(k, TensorProto.FLOAT, None) for k in names],
                          [vi(f"{k}_bf16", TensorProto.BFLOAT16, None) for k in names])
    cast = ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
                                .SerializeToString(), providers=["CUDAExecutionProvider"])
    cb = cast.io_binding()
    for k in names:
        cb.bind_ortvalue_input(k, ort.OrtValue.ortvalue_from_numpy(inputs[k], "cuda", 0))
        cb.bind_output(f"{k}_bf16", "cuda", 0)
    cast.run_with_iobinding(cb)
    b = sess.io_binding()
    for k, v in zip(names, cb.get_outputs()):
        b.bind_ortvalue_input(k, v)
    for o in sess.get_outputs():
        b.bind_output(o.name, "cuda", 0)
    return _timed(sess, b)


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


def kernel_cases(out: Path, lib: Path, only: set[str] | None = None) -> bool:
    import checks
    import onnxruntime as ort
    from ideogram4_engine.export.graphs.fuse import fused_ops
    ok = True
    rng = np.random.default_rng(2026)
    for op, dims in CASES:
        if only and op not in only:
            continue
        heads, hd = dims.get("heads", 2), dims.get("head_dim", 256)
        width = dims.get("width", heads * hd)
        gains = checks.random_gains(op, rng, width, hd)
        stock = checks.stock(op, gains, heads, hd)
        fused = checks.fused(stock)
        rec = {"kind": "kernel", "op": op, **dims, "fused_ops": fused_ops(fused)}
        try:
            inputs = checks.random_inputs(op, rng, batch=dims["batch"], tokens=dims["tokens"], width=width,
                                          heads=heads, head_dim=hd)
            got, ms = {}, {}
            for name, model in (("stock", stock), ("fused", fused)):
                sess = _session(ort, model, lib)
                got[name] = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, inputs)))
                del sess
                ms[name] = _kernel_ms(ort, _session(ort, checks.bf16_io(model), lib), inputs)
                gc.collect()
            want = checks.numpy_model(op, inputs, gains, heads, hd)
            per = {}
            for k in got["stock"]:
                a = got["stock"][k]
                per[k] = {"numpy_model_identical": float((want[k].reshape(a.shape) == a).mean())}
                for name in ("fused",):
                    f = got[name][k]
                    same = (a == f) | (np.isnan(a) & np.isnan(f))
                    per[k][f"{name}_bit_identical"] = float(same.mean())
                    per[k][f"{name}_max_ulps"] = float(checks.ulps(f, a).max()) if k != "y_scale" else \
                        float(np.abs(f / a - 1).max())
            rec.update(outputs=per, stock_ms=ms["stock"], fused_ms=ms["fused"],
                       ok=all(v["fused_bit_identical"] == 1.0 for v in per.values()))
            if not rec["ok"] and checks.base_op(op) != "SwiGLU":
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
    modes = (("fp8", {}), ("dequantize_at_load", {"dequantize_at_load": True}))
    for mode, opts in modes[:1] if config == "tiny" else modes:
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


def _graph_feeds(m):
    from ideogram4_engine.runtime.rope import dit_rope_tables
    T, gh, gw = 74, 64, 64
    cos, sin = dit_rope_tables(T, gh, gw, m.inv_freq, m.mrope_section)
    rng = np.random.default_rng(0)
    return {"latents": rng.standard_normal((1, gh * gw, 128), dtype=np.float32), "tau": np.array([0.5], np.float32),
            "rope_cos": cos[None].astype(np.float32), "rope_sin": sin[None].astype(np.float32),
            "text_features": rng.standard_normal((1, T, m.raw["model"]["dit"]["llm_features_dim"]), dtype=np.float32)}


def _capture(ort, model_bytes: bytes, lib: Path, feeds: dict, graph: bool, runs: int = 10) -> tuple[float, dict]:
    """ms per forward and the outputs, with fixed-address IO binding, plain or under enable_cuda_graph. Every
    output is fp32 (the DiT's velocity; the prefixes of _first_breaking_node cast theirs)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.register_custom_ops_library(str(lib))
    so.enable_mem_pattern = False
    po = {"device_id": 0, **({"enable_cuda_graph": "1"} if graph else {})}
    sess = ort.InferenceSession(model_bytes, so, providers=[("CUDAExecutionProvider", po)])
    b = sess.io_binding()
    vals = {k: ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0) for k, v in feeds.items()
            if k in {i.name for i in sess.get_inputs()}}
    for k, v in vals.items():
        b.bind_ortvalue_input(k, v)
    plain = sess.io_binding()                     # output shapes from a run that captures nothing
    for k, v in vals.items():
        plain.bind_ortvalue_input(k, v)
    for o in sess.get_outputs():
        plain.bind_output(o.name, "cuda", 0)
    ro = ort.RunOptions()
    ro.add_run_config_entry("gpu_graph_id", "-1")
    sess.run_with_iobinding(plain, ro if graph else None)
    outs = {o.name: ort.OrtValue.ortvalue_from_shape_and_type(v.shape(), np.float32, "cuda", 0)
            for o, v in zip(sess.get_outputs(), plain.get_outputs())}
    for k, v in outs.items():
        b.bind_ortvalue_output(k, v)
    ms = _timed(sess, b, runs=runs, repeats=3)
    return ms, {k: v.numpy() for k, v in outs.items()}


def _first_breaking_node(ort, path: Path, lib: Path, feeds: dict, steps: int = 11) -> dict:
    """Bisection over prefixes of the graph (nodes [0, k] in order, the last node's outputs cast to fp32): the
    smallest prefix whose capture fails names the node that breaks capture. Each prefix is written next to the
    graph (same external weight file) and removed afterwards."""
    import onnx
    from onnx import TensorProto, helper
    from ideogram4_engine.export.graphs.rewrite import _prune
    model = onnx.load(str(path), load_external_data=False)
    nodes = list(model.graph.node)
    probe = path.parent / ".capture_probe.onnx"

    def prefix(k: int) -> str:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        del m.graph.node[k + 1:]
        del m.graph.output[:]
        for j, o in enumerate(x for x in nodes[k].output if x):
            m.graph.node.append(helper.make_node("Cast", [o], [f"__probe{j}"], to=TensorProto.FLOAT))
            m.graph.output.append(helper.make_tensor_value_info(f"__probe{j}", TensorProto.FLOAT, None))
        _prune(m)
        probe.write_bytes(m.SerializeToString())
        return str(probe)

    def breaks(k: int) -> str | None:
        try:
            _capture(ort, prefix(k), lib, feeds, graph=True, runs=1)
            return None
        except Exception as e:  # noqa: BLE001
            return str(e).splitlines()[0][:300]
        finally:
            gc.collect()

    lo, hi, why = -1, len(nodes) - 1, None      # invariant: prefix(lo) captures (or is empty), prefix(hi) fails
    for _ in range(steps):
        if hi - lo <= 1:
            break
        mid = (lo + hi) // 2
        err = breaks(mid)
        if err is None:
            lo = mid
        else:
            hi, why = mid, err
    probe.unlink(missing_ok=True)
    n = nodes[hi]
    return {"node": n.name, "op_type": n.op_type, "domain": n.domain, "index": hi, "exact": hi - lo <= 1,
            "error": why}


def cuda_graph(out: Path, root: Path, config: str, lib: Path) -> None:
    """The stock and the fused dit_cond under onnxruntime's CUDA graph capture (enable_cuda_graph, fixed input
    and output addresses): does it capture, does it match plain runs bit for bit, how much faster per forward;
    if not, which node breaks the capture. Then the runtime end to end with cuda_graph=True."""
    import onnxruntime as ort
    from ideogram4_engine.runtime.manifest import load_manifest
    m = load_manifest(root / config / "engines")
    feeds = _graph_feeds(m)
    bisected = False
    for variant in ("cuda", "cuda_fused"):
        rec = {"kind": "cuda_graph", "config": config, "component": "dit_cond", "variant": variant}
        path = m.graph_path("dit_cond", variant)
        try:
            rec["plain_ms"], plain = _capture(ort, str(path), lib, feeds, graph=False)
            try:
                rec["graph_ms"], replay = _capture(ort, str(path), lib, feeds, graph=True)
                rec.update(ok=True, captured=True, bit_identical=all(np.array_equal(plain[k], replay[k]) for k in plain))
            except Exception as e:  # noqa: BLE001
                rec.update(ok=False, captured=False, error=f"{type(e).__name__}: {str(e)[:600]}")
                if not bisected:            # once: the stock and the fused graph share their first nodes
                    rec["first_breaking_node"] = _first_breaking_node(ort, path, lib, feeds)
                    bisected = True
        except Exception as e:  # noqa: BLE001
            rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[:600]}")
        emit(out, rec)
        gc.collect()
    _cuda_graph_end_to_end(out, root, config, lib)


def _cuda_graph_end_to_end(out: Path, root: Path, config: str, lib: Path) -> None:
    import warnings
    from ideogram4_engine.runtime.pipeline import Pipeline
    eng = root / config / "engines"
    kw = dict(width=1024, height=1024, steps=4, guidance=(3.0, 4.0, 5.0, 7.0), seed=3)
    rec, res = {"kind": "e2e_cuda_graph", "config": config}, {}
    try:
        for name, opt in (("plain", False), ("graph", True)):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                p = Pipeline(eng, backend="onnxruntime-cuda", kernels_library=str(lib), cuda_graph=opt)
                p.generate("a lighthouse at dusk", **kw)                 # warm-up (and the captures)
                res[name] = p.generate("a lighthouse at dusk", **kw)
            rec[f"{name}_variant"] = p.backend.graph_variant
            rec[f"{name}_step_ms"] = 1e3 * float(np.median(res[name].timings["step_s"]))
            rec[f"{name}_warnings"] = [str(c.message)[:300] for c in caught]
            del p
            gc.collect()
        a, b = res["graph"].latents, res["plain"].latents
        rec.update(ok=bool(np.array_equal(a, b)), bit_identical=bool(np.array_equal(a, b)),
                   rel_err=float(np.linalg.norm(a - b) / np.linalg.norm(b)))
    except Exception as e:  # noqa: BLE001
        rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[:600]}")
    emit(out, rec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp")
    ap.add_argument("--root", default="/tmp/ideogram4_kernel_check")
    ap.add_argument("--library", default=None, help="the kernel library (default: runtime.kernels.default_library())")
    ap.add_argument("--configs", default="tiny,full-width", help="end-to-end configs ('' for none)")
    ap.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                    help="capture attempts on the full-width dit_cond, stock and fused (default on)")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated op names: run only their kernel cases")
    a = ap.parse_args()
    from ideogram4_engine.runtime import kernels
    out, root = Path(a.out), Path(a.root)
    out.mkdir(parents=True, exist_ok=True)
    lib = kernels.check(a.library, [0])
    import onnxruntime as ort
    emit(out, {"kind": "library", "path": str(lib), "arches": kernels.library_arches(lib),
               "compute_capability": kernels.compute_capability(0), "onnxruntime": ort.__version__})
    ok = True if a.skip_kernels else kernel_cases(out, lib, {o for o in a.only.split(",") if o} or None)
    for config in [c for c in a.configs.split(",") if c]:
        ok &= end_to_end(out, root, config, lib)
    if a.cuda_graph and "full-width" in a.configs:
        cuda_graph(out, root, "full-width", lib)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
