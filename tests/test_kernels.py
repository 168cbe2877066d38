"""The fused CUDA kernels (kernels/) on the CPU: the library is built and loads into onnxruntime, the backend's
choice between fused and stock graphs, the export's rewrite (every pattern replaced, weights shared), and the
numpy model of each op against the unfused subgraph on onnxruntime's CPU provider (the cpu twin's emulation).
The kernels themselves run on a GPU: scripts/gpu_kernel_check.py (gpu_bench.sh stage `kernels`)."""
from __future__ import annotations

import ctypes
import re
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from ideogram4_engine.export import w8a8_model
from ideogram4_engine.export.graphs.fuse import DOMAIN, OPS, fused_kernels, fused_ops
from ideogram4_engine.export.graphs.rewrite import bf16_to_fp32_emulation
from ideogram4_engine.runtime import kernels
from ideogram4_engine.runtime.backends.base import BackendUnavailable
from ideogram4_engine.runtime.backends.onnxruntime import FusedKernelsOff, OnnxRuntimeBackend
from ideogram4_engine.runtime.manifest import load_manifest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
import checks  # noqa: E402

LIB = kernels.default_library()


# ------------------------------------------------------------------------------------------------ the library

def test_library_is_built_and_exports_its_entry_points():
    assert LIB.is_file(), f"{LIB} missing: `make test` builds it (make kernels)"
    lib = ctypes.CDLL(str(LIB))
    assert hasattr(lib, "RegisterCustomOps")
    arches = kernels.library_arches(LIB)
    assert (9, 0) in arches and all(a[0] in (8, 9, 10, 12) for a in arches)
    lib.ideogram4_kernels_domain.restype = ctypes.c_char_p
    assert lib.ideogram4_kernels_domain().decode() == DOMAIN


def _one_op_graph(op: str = "SwiGLU") -> bytes:
    from onnx import TensorProto as T, helper
    node = helper.make_node(op, ["a", "b"], ["y"], domain=DOMAIN)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info(x, T.BFLOAT16, [4]) for x in "ab"],
                          [helper.make_tensor_value_info("y", T.BFLOAT16, [4])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)],
                             ir_version=10).SerializeToString()


def test_library_registers_the_domain_in_onnxruntime():
    """Without the library the op is unknown; with it onnxruntime knows the op and finds only CUDA kernels."""
    with pytest.raises(Exception, match="is not a registered function/op"):
        ort.InferenceSession(_one_op_graph(), ort.SessionOptions(), providers=["CPUExecutionProvider"])
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(LIB))
    with pytest.raises(Exception, match="Could not find an implementation for SwiGLU"):
        ort.InferenceSession(_one_op_graph(), so, providers=["CPUExecutionProvider"])


def test_check_names_the_file_and_the_compute_capability(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "compute_capability", lambda d: (9, 0))
    assert kernels.check(LIB, [0]) == LIB
    with pytest.raises(kernels.KernelsUnavailable, match=r"nope\.so not found .*make kernels.*compute capability 9\.0"):
        kernels.check(tmp_path / "nope.so", [0])
    bad = tmp_path / "bad.so"
    bad.write_bytes(b"not a library")
    with pytest.raises(kernels.KernelsUnavailable, match="bad.so cannot be loaded"):
        kernels.check(bad, [0])
    monkeypatch.setattr(kernels, "compute_capability", lambda d: (8, 0) if d == 1 else (9, 0))
    with pytest.raises(kernels.KernelsUnavailable, match=r"machine code for sm 89,90,100,120, but GPU 1 is compute "
                                                         r"capability 8\.0"):
        kernels.check(LIB, [0, 1])
    assert kernels.runs_on([(9, 0)], (9, 0)) and kernels.runs_on([(12, 0)], (12, 1))
    assert not kernels.runs_on([(9, 0)], (10, 0)) and not kernels.runs_on([(12, 1)], (12, 0))


def _backend(manifest, device_ids=(0,), variant="cuda"):
    """The backend's choice of graphs without a CUDA provider: the object is created bare and only the state its
    `_plan` step reads is set."""
    b = object.__new__(OnnxRuntimeBackend)
    b.manifest, b.graph_variant, b.devices = manifest, variant, {"dit_cond": device_ids[0], "dit_uncond": device_ids[-1]}
    return b


def _plan(manifest, wanted=None, library=str(LIB), precision="faithful", variant="cuda"):
    return [(v, p, lib is not None) for v, p, lib in _backend(manifest, variant=variant)._plan(wanted, library, precision)]


def test_backend_uses_the_fused_graphs_only_when_the_library_can_serve_the_gpu(tiny_engines, monkeypatch, tmp_path):
    m = load_manifest(tiny_engines)
    monkeypatch.delenv(kernels.SWITCH_ENV, raising=False)
    monkeypatch.setattr(kernels, "compute_capability", lambda d: (9, 0))
    assert _plan(m) == [("cuda_fused", "faithful", True), ("cuda", "faithful", False)]
    assert _plan(m, variant="cuda_dql") == [("cuda_fused_dql", "faithful", True), ("cuda_dql", "faithful", False)]
    assert _plan(m, wanted=True) == [("cuda_fused", "faithful", True)]
    assert _plan(m, wanted=False) == [("cuda", "faithful", False)]
    monkeypatch.setenv(kernels.SWITCH_ENV, "0")
    assert _plan(m) == [("cuda", "faithful", False)]
    monkeypatch.delenv(kernels.SWITCH_ENV)
    with pytest.warns(FusedKernelsOff, match=r"missing\.so not found.*compute capability 9\.0.*stock CUDA graphs"):
        assert _plan(m, library=str(tmp_path / "missing.so")) == [("cuda", "faithful", False)]
    with pytest.raises(BackendUnavailable, match="missing.so not found"):
        _plan(m, wanted=True, library=str(tmp_path / "missing.so"))
    monkeypatch.setattr(kernels, "compute_capability", lambda d: (8, 0))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert _plan(m) == [("cuda", "faithful", False)]
    assert len(seen) == 1 and "compute capability 8.0" in str(seen[0].message)


def test_backend_plans_w8a8_on_the_fused_graphs_first(tiny_w8a8_engines, tiny_engines, monkeypatch, tmp_path):
    """precision w8a8: cuda_fused_w8a8, then cuda_w8a8, then the faithful graphs; without the fused kernels
    (False, or an export without cuda_fused_w8a8) cuda_w8a8 first; a library that cannot serve the GPU leaves
    one warning and the faithful stock graphs."""
    m = load_manifest(tiny_w8a8_engines)
    monkeypatch.delenv(kernels.SWITCH_ENV, raising=False)
    monkeypatch.setattr(kernels, "compute_capability", lambda d: (9, 0))
    assert _plan(m, precision="w8a8") == [("cuda_fused_w8a8", "w8a8", True), ("cuda_w8a8", "w8a8", True),
                                          ("cuda_fused", "faithful", True), ("cuda", "faithful", False)]
    assert _plan(m, precision="w8a8", wanted=False) == [("cuda_w8a8", "w8a8", True), ("cuda", "faithful", False)]
    assert _plan(m, precision="w8a8", wanted=True) == [("cuda_fused_w8a8", "w8a8", True), ("cuda_fused", "faithful", True)]
    with pytest.raises(BackendUnavailable, match="no fused CUDA graphs for precision w8a8"):
        _plan(load_manifest(tiny_engines), precision="w8a8", wanted=True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert _plan(m, precision="w8a8", library=str(tmp_path / "gone.so")) == [("cuda", "faithful", False)]
    assert len(seen) == 1 and re.search(r"precision w8a8 is unavailable here: .*gone\.so not found", str(seen[0].message))


# ------------------------------------------------------------------------------------------------ the rewrite

def _graph(engines: Path, component: str, variant: str) -> onnx.ModelProto:
    m = load_manifest(engines)
    return onnx.load(str(m.graph_path(component, variant)), load_external_data=False)


@pytest.mark.parametrize("component", ["dit_cond", "dit_uncond"])
@pytest.mark.parametrize("stock", ["cuda", "cuda_dql"])
def test_rewrite_replaces_every_pattern_and_shares_the_weights(tiny_engines, component, stock):
    m = load_manifest(tiny_engines)
    layers = m.raw["model"]["dit"]["num_layers"]
    before, after = _graph(tiny_engines, component, stock), _graph(tiny_engines, component, m.fused_variant(stock))
    assert fused_ops(after) == {"NormModulate": 1, "GatedResidualModulate": 2 * layers - 1, "GatedResidual": 1,
                                "QkvNormRope": layers, "SwiGLU": layers}
    ops = [n.op_type for n in after.graph.node]
    assert ops.count("RMSNormalization") == (1 if component == "dit_cond" else 0)      # llm_cond_norm only
    assert not {"Tanh", "Squeeze", "Split"} & set(ops[ops.index("QkvNormRope"):]) - {"Split"}
    assert ops.count("Tanh") == 0 and ops.count("Squeeze") == 0
    assert ops.count("MultiHeadAttention") == layers
    assert len(after.graph.node) < len(before.graph.node) - 10 * layers
    io = lambda g: ([(v.name, v.type.SerializeToString()) for v in g.input],       # noqa: E731
                    [(v.name, v.type.SerializeToString()) for v in g.output])
    assert io(after.graph) == io(before.graph)
    inits_b = {i.name: i.SerializeToString() for i in before.graph.initializer}
    inits_a = {i.name: i.SerializeToString() for i in after.graph.initializer}
    assert inits_a.keys() <= inits_b.keys() and all(inits_a[k] == inits_b[k] for k in inits_a)   # same weight file
    big = [i for i in after.graph.initializer if i.external_data]
    assert big and {e.value for i in big for e in i.external_data if e.key == "location"} == {f"{component}.onnx.data"}
    assert any(o.domain == DOMAIN and o.version == 1 for o in after.opset_import)


def test_rewrite_leaves_graphs_without_patterns_sharing_their_twins_file(tiny_engines):
    m = load_manifest(tiny_engines)
    graphs = m.component("vae_decoder")["graphs"]
    assert graphs["cuda_fused"] == graphs["cuda"] and graphs["cuda_fused_dql"]["sha256"] == graphs["cuda_dql"]["sha256"]
    assert graphs["cuda_fused_dql"]["file"] in (graphs["cuda"]["file"], graphs["cuda_dql"]["file"])
    te = _graph(tiny_engines, "text_encoder", "cuda_fused")
    assert fused_ops(te) == {"SwiGLU": m.raw["model"]["text_encoder"]["num_hidden_layers"]}
    assert m.raw["kernels"]["variants"] == {"cuda": "cuda_fused", "cuda_dql": "cuda_fused_dql"}
    assert m.raw["kernels"]["library"] == kernels.LIBRARY_NAME and m.raw["kernels"]["ops"] == list(OPS)
    assert m.raw["kernels"]["domain"] == kernels.DOMAIN


@pytest.mark.parametrize("op", checks.OPS)
def test_each_subgraph_becomes_exactly_its_op(op):
    rng = np.random.default_rng(0)
    fused = fused_kernels(checks.subgraph(op, checks.random_gains(op, rng, 64, 16), heads=2, head_dim=16))
    assert fused_ops(fused) == {op: 1}
    assert {n.op_type for n in fused.graph.node if n.domain != DOMAIN} <= {"Cast", "Unsqueeze", "Mul"}


@pytest.mark.parametrize("op", checks.OPS + checks.FP8_OPS)
def test_gpu_check_graphs(op):
    """What scripts/gpu_kernel_check.py runs: the stock cuda twin (with Fp8QuantizeRows for the quantizing ops)
    becomes exactly the op, and the bf16-boundary timing graphs keep only it (and QkvNormRope's table prep)."""
    rng = np.random.default_rng(1)
    stock = checks.stock(op, checks.random_gains(op, rng, 64, 16), heads=2, head_dim=16)
    fused = checks.fused(stock)
    assert fused_ops(fused) == {op: 1}
    assert [o.name for o in fused.graph.output] == [o.name for o in stock.graph.output]
    for model in (stock, fused):
        onnx.checker.check_model(model)
        timing = checks.bf16_io(model)
        onnx.checker.check_model(timing)
        assert all(i.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16 for i in timing.graph.input)
        assert {o.type.tensor_type.elem_type for o in timing.graph.output} <= {
            onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT}
    assert not {"Cast", "DequantizeLinear"} & {n.op_type for n in checks.bf16_io(fused).graph.node}
    if op in checks.FP8_OPS:
        assert [n.op_type for n in stock.graph.node if n.domain == DOMAIN] == ["Fp8QuantizeRows"]
        assert [o.name for o in fused.graph.output][-2:] == ["y", "y_scale"]


@pytest.mark.parametrize("op", checks.FP8_OPS)
def test_numpy_model_of_the_quantizing_ops(op):
    """The quantizing ops' model is Fp8QuantizeRows' model (export/w8a8_model) of the base op's y: on the cpu
    twin's y (which agrees with the base model on >= 99 % of the values) the e4m3 codes agree on >= 99 % too,
    and every row scale is amax/448 of the modelled y."""
    rng = np.random.default_rng(zlib.crc32(op.encode()))
    base = checks.base_op(op)
    dims = CASES[base]
    gains = checks.random_gains(op, rng, dims.get("width", 512))
    inputs = checks.random_inputs(op, rng, **dims)
    want = checks.numpy_model(op, inputs, gains)
    cpu = bf16_to_fp32_emulation(checks.subgraph(base, gains))
    sess = ort.InferenceSession(cpu.SerializeToString(), providers=["CPUExecutionProvider"])
    y = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, inputs)))["y"]
    codes, scale = w8a8_model.quantize_rows(checks.bf(y))
    assert (w8a8_model.e4m3_decode(codes).reshape(want["y"].shape) == want["y"]).mean() >= 0.99
    base_y = checks.numpy_model(base, inputs, gains)["y"]
    assert np.array_equal(want["y_scale"], (np.abs(base_y).max(-1) / np.float32(448)).astype(np.float32))
    assert want["y_scale"].shape == base_y.shape[:-1] and np.all(want["y_scale"] > 0)


# ------------------------------------------------------------------------------------------------ semantics

CASES = {"NormModulate": dict(batch=2, tokens=37, width=384), "GatedResidual": dict(batch=2, tokens=37, width=4608),
         "GatedResidualModulate": dict(batch=1, tokens=150, width=4608), "QkvNormRope": dict(batch=1, tokens=41),
         "SwiGLU": dict(batch=1, tokens=64, width=1000)}


@pytest.mark.parametrize("op", checks.OPS)
def test_numpy_model_matches_the_unfused_subgraph_on_the_cpu(op):
    """The cpu twin computes each op in fp32 with its own summation order and MLAS's sigmoid/tanh, so an
    intermediate may round the other way: the numpy model (onnxruntime-CUDA's order) must agree bit for bit on
    >= 99 % of the values; the others are one intermediate rounding apart: 1 ulp, or after a cancellation
    (h + t ≈ 0, SiLU's far negative tail) many ulps of a small result but within 2^-7 of the rows' RMS."""
    rng = np.random.default_rng(zlib.crc32(op.encode()))
    dims = CASES[op]
    width = dims.get("width", 512)
    gains = checks.random_gains(op, rng, width)
    inputs = checks.random_inputs(op, rng, **dims, width=width) if "width" not in dims else \
        checks.random_inputs(op, rng, **dims)
    cpu = bf16_to_fp32_emulation(checks.subgraph(op, gains))
    sess = ort.InferenceSession(cpu.SerializeToString(), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, inputs)))
    want = checks.numpy_model(op, inputs, gains)
    assert set(got) == set(want)
    for name in want:
        g, w = got[name].reshape(want[name].shape), want[name]
        d = checks.ulps(g, w)
        rows = [w] + [v for k, v in inputs.items() if v.shape == w.shape]
        rms = np.max([np.sqrt(np.mean(r.astype(np.float64) ** 2, axis=-1, keepdims=True)) for r in rows], axis=0)
        assert np.all(np.isfinite(w)) and w.std() > 0
        assert (d > 0).mean() <= 0.01, f"{op}.{name}: {(d > 0).mean():.4%} differ"
        assert np.all((d <= 1) | (np.abs(g - w) <= rms * 2.0**-7)), f"{op}.{name}: {np.abs(g - w).max()} off"


# ------------------------------------------------------------------------------------------------ CUDA graphs

def test_cuda_graph_option_is_refused_where_it_cannot_run(tiny_engines):
    m = load_manifest(tiny_engines)
    with pytest.raises(ValueError, match="cuda_graph=True needs the CUDA provider"):
        OnnxRuntimeBackend(m, device="cpu", cuda_graph=True)


def test_cuda_graph_copy_model_is_a_valid_identity():
    """The copy graph the CUDA-graph runner moves inputs and outputs with (hand-written protobuf: the runtime does
    not depend on onnx) is valid ONNX and copies each input exactly, whatever its shape."""
    from ideogram4_engine.runtime.backends.cuda_graphs import identity_model
    types = ("tensor(float)", "tensor(int64)", "tensor(float)")
    model = onnx.load_from_string(identity_model(types))
    assert [n.op_type for n in model.graph.node] == ["Identity"] * 3 and model.opset_import[0].version == 17
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(identity_model(types), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(5)
    feeds = {"x0": rng.standard_normal((2, 7, 3)).astype(np.float32), "x1": rng.integers(-9, 9, 5),
             "x2": np.array([np.nan, -0.0, 1e-45], np.float32)}
    for got, (name, want) in zip(sess.run(None, feeds), feeds.items()):
        assert got.dtype == want.dtype and np.array_equal(got.view(np.uint8), want.view(np.uint8)), name


def test_gpu_kernel_check_reaches_both_kernel_paths_of_every_norm_op():
    """scripts/gpu_kernel_check.py must test fused_warp.cu's kernels (onnxruntime layout threads_y 2, width a multiple
    of 8) off the DiT's own shapes too (partial chunks, several gate rows, narrow heads) and fused.cu's general
    kernels (other layouts or widths) for each norm op: otherwise one path would run in the model unchecked."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import gpu_kernel_check as g
    paths: dict[str, set[str]] = {}
    for op, d in g.CASES:
        if checks.base_op(op) == "SwiGLU":
            continue
        rows, n = (d["batch"] * d["tokens"] * d["heads"], d["head_dim"]) if op == "QkvNormRope" else \
            (d["batch"] * d["tokens"], d["width"])
        warp = checks.ort_threads_y(rows, n) == 2 and n % 8 == 0 and (n <= 256 if op == "QkvNormRope" else n <= 4608)
        dit = d["tokens"] in (4096, 4170) and n in (256, 4608)
        paths.setdefault(op, set()).add("warp-dit" if warp and dit else "warp-other" if warp else "general")
    assert set(paths) == {"NormModulate", "NormModulateFp8", "GatedResidual", "GatedResidualModulate",
                          "GatedResidualModulateFp8", "QkvNormRope"}
    for op, seen in paths.items():
        assert {"warp-dit", "general"} <= seen, (op, seen)
    assert sum("warp-other" in s for s in paths.values()) >= 4, paths
