"""`--precision w8a8` on the CPU: the op library registers the W8A8 ops with onnxruntime, the export writes
cuda_w8a8 twins whose DiT block linears are the library's ops wired to the right tensors and cuda_fused_w8a8
twins that quantize inside the fused producers (the faithful graphs unchanged), the manifest records it, and
the runtime refuses or falls back clearly. The kernels themselves run only on a GPU: scripts/gpu_w8a8_check.py
and scripts/gpu_kernel_check.py."""
import json
import re
import shutil
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from ideogram4_engine.export.to_onnx import ExportOptions, export, validate_manifest
from ideogram4_engine.export.graphs import w8a8 as rw
from ideogram4_engine.runtime import kernels
from ideogram4_engine.runtime.manifest import ManifestError, load_manifest

QUIET = ExportOptions(progress=False)


@pytest.fixture(scope="module")
def exported(tiny_w8a8_engines):
    return tiny_w8a8_engines, json.loads((tiny_w8a8_engines / "manifest.json").read_text())


def _graph(out, manifest, component, variant):
    return onnx.load(str(out / manifest["components"][component]["graphs"][variant]["file"]), load_external_data=False)


def _op_model(op: str, ins, outs, **attrs) -> bytes:
    node = helper.make_node(op, [i.name for i in ins], [o.name for o in outs], domain=rw.DOMAIN, **attrs)
    g = helper.make_graph([node], "g", ins, outs)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(rw.DOMAIN, 1)],
                             ir_version=10).SerializeToString()


def test_library_is_built_and_registers_both_ops():
    """`make test` builds the one library; onnxruntime (here its CPU build) loads it and knows both ops in the
    domain the rewrite writes: creating a CPU session then fails for want of a CPU kernel, not of the op."""
    path = kernels.default_library()
    assert path.is_file(), f"{path} missing: run `make kernels` (make test builds it)"
    assert rw.DOMAIN == kernels.DOMAIN
    vi = helper.make_tensor_value_info
    models = [_op_model(rw.QUANTIZE, [vi("x", TensorProto.BFLOAT16, [4, 32])],
                        [vi("q", TensorProto.FLOAT8E4M3FN, [4, 32]), vi("s", TensorProto.FLOAT, [4])]),
              _op_model(rw.MATMUL, [vi("q", TensorProto.FLOAT8E4M3FN, [4, 32]), vi("s", TensorProto.FLOAT, [4]),
                                    vi("w", TensorProto.FLOAT8E4M3FN, [16, 32]), vi("ws", TensorProto.FLOAT, [16])],
                        [vi("y", TensorProto.BFLOAT16, [4, 16])])]
    for op, model in zip((rw.QUANTIZE, rw.MATMUL), models):
        without = ort.SessionOptions()
        with pytest.raises(Exception, match="not a registered function/op"):
            ort.InferenceSession(model, without, providers=["CPUExecutionProvider"])
        so = ort.SessionOptions()
        so.register_custom_ops_library(str(path))
        with pytest.raises(Exception, match=f"Could not find an implementation for {op}"):
            ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def test_manifest_records_the_precision(exported, tiny_engines):
    out, manifest = exported
    validate_manifest(manifest)
    assert manifest["exporter"]["precision"] == ["faithful", "w8a8"]
    assert all({"cuda_w8a8", "cuda_fused_w8a8"} <= set(c["graphs"]) for c in manifest["components"].values())
    assert manifest["kernels"]["variants"]["cuda_w8a8"] == "cuda_fused_w8a8"
    assert load_manifest(out).fused_variant("cuda_w8a8") == "cuda_fused_w8a8"
    assert load_manifest(out).precisions == ("faithful", "w8a8")
    default = json.loads((tiny_engines / "manifest.json").read_text())
    assert default["exporter"]["precision"] == ["faithful"]
    assert not any("cuda_w8a8" in c["graphs"] for c in default["components"].values())
    assert "cuda_w8a8" not in default["graph_variants"]
    assert load_manifest(tiny_engines).precisions == ("faithful",)


def test_faithful_graphs_are_unchanged_by_the_option(exported, tiny_engines):
    """The default export and the w8a8 one write the same faithful graph files, byte for byte."""
    out, manifest = exported
    default = json.loads((tiny_engines / "manifest.json").read_text())
    for name, comp in default["components"].items():
        for variant, entry in comp["graphs"].items():
            assert manifest["components"][name]["graphs"][variant]["sha256"] == entry["sha256"], (name, variant)


def test_manifest_lacking_the_w8a8_graphs_is_refused(exported, tmp_path):
    out, _ = exported
    eng = tmp_path / "eng"
    shutil.copytree(out, eng)
    raw = json.loads((eng / "manifest.json").read_text())
    del raw["components"]["dit_cond"]["graphs"]["cuda_w8a8"]
    (eng / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="lacks the cuda_w8a8 graph"):
        load_manifest(eng)
    raw["exporter"]["precision"] = ["w8a8"]
    (eng / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="must list 'faithful'"):
        load_manifest(eng)


def test_dit_block_linears_become_w8a8_ops(exported, tiny_checkpoint):
    """In each DiT's cuda_w8a8 twin: every block linear (qkv, o, w1, w3, w2 of every layer) is one
    Fp8RowScaledMatMul on the stored (out, in) e4m3 initializer and the fp32 of its bf16 row scale, fed by the
    Fp8QuantizeRows of exactly the activation the faithful twin multiplied (w1 and w3 share one); every other
    node of the faithful twin is still there, and the conditioning linears keep the weight-only FP8 op."""
    out, manifest = exported
    layers = manifest["model"]["dit"]["num_layers"]
    for name in ("dit_cond", "dit_uncond"):
        cuda, twin = _graph(out, manifest, name, "cuda"), _graph(out, manifest, name, "cuda_w8a8")
        assert any(o.domain == rw.DOMAIN and o.version == 1 for o in twin.opset_import)
        inits = {i.name: i for i in twin.graph.initializer}
        producer = {o: n for n in twin.graph.node for o in n.output}
        faithful = {n.output[0]: n for n in cuda.graph.node if n.op_type == "MatMulBlockQuantizedFp8Weight"}
        mms = [n for n in twin.graph.node if n.op_type == rw.MATMUL]
        quants = {n.output[0]: n for n in twin.graph.node if n.op_type == rw.QUANTIZE}
        assert len(mms) == 5 * layers and len(quants) == 4 * layers
        assert sorted({re.sub(r"^layers\.\d+\.", "", m.input[2]) for m in mms}) == \
            ["attention.o.weight", "attention.qkv.weight", "feed_forward.w1.weight", "feed_forward.w2.weight",
             "feed_forward.w3.weight"]
        for m in mms:
            old = faithful[m.output[0]]                         # the same output name as the replaced node
            assert m.domain == rw.DOMAIN and m.input[2] == old.input[1]
            q = quants[m.input[0]]
            assert q.output[1] == m.input[1] and q.input[0] == old.input[0]
            w = inits[m.input[2]]
            assert w.data_type == TensorProto.FLOAT8E4M3FN and len(w.dims) == 2
            cast = producer[m.input[3]]                         # fp32 of the graph's bf16 row scale
            assert cast.op_type == "Cast" and cast.input[0] == m.input[2] + "_scale"
            assert list(inits[cast.input[0]].dims) == [w.dims[0]]
        left = {n.input[1] for n in twin.graph.node if n.op_type == "MatMulBlockQuantizedFp8Weight"}
        assert left and not any(rw.BLOCK_LINEARS.match(w) for w in left)
        assert left == {n.input[1] for n in faithful.values()} - {m.input[2] for m in mms}
        kept = [n.op_type for n in cuda.graph.node if n.op_type != "MatMulBlockQuantizedFp8Weight"]
        now = [n.op_type for n in twin.graph.node
               if n.op_type not in ("MatMulBlockQuantizedFp8Weight", rw.MATMUL, rw.QUANTIZE)]
        unsqueezes = len(mms)                                   # the replaced ops' (N, 1) scale rows, pruned
        assert sorted(now + ["Unsqueeze"] * unsqueezes) == sorted(kept)
        onnx.checker.check_model(str(out / manifest["components"][name]["graphs"]["cuda_w8a8"]["file"]))


def test_text_encoder_and_vae_twins_are_the_faithful_ones(exported):
    out, manifest = exported
    for name in ("text_encoder", "vae_decoder"):
        a, b = _graph(out, manifest, name, "cuda"), _graph(out, manifest, name, "cuda_w8a8")
        assert a.graph.SerializeToString() == b.graph.SerializeToString()
        graphs = manifest["components"][name]["graphs"]
        assert graphs["cuda_fused_w8a8"]["sha256"] == graphs["cuda_fused"]["sha256"]


def test_fused_w8a8_twin_quantizes_in_the_producers(exported):
    """cuda_fused_w8a8 = cuda_w8a8's linears on cuda_fused, with the modulations (qkv, w1/w3) and SwiGLU (w2)
    writing the e4m3 activation themselves: per layer 2 quantizing modulations and one SwiGLUFp8, only the
    attention output (before o) still through Fp8QuantizeRows, and every W8A8 GEMM reading exactly the codes
    and scales one op wrote."""
    out, manifest = exported
    layers = manifest["model"]["dit"]["num_layers"]
    for name in ("dit_cond", "dit_uncond"):
        g = _graph(out, manifest, name, "cuda_fused_w8a8")
        ops = [n.op_type for n in g.graph.node if n.domain == kernels.DOMAIN]
        count = {o: ops.count(o) for o in set(ops)}
        assert count == {"NormModulateFp8": 1, "GatedResidualModulateFp8": 2 * layers - 1, "GatedResidual": 1,
                         "QkvNormRope": layers, "SwiGLUFp8": layers, rw.QUANTIZE: layers, rw.MATMUL: 5 * layers}
        producer = {o: n for n in g.graph.node for o in n.output}
        for m in (n for n in g.graph.node if n.op_type == rw.MATMUL):
            p = producer[m.input[0]]
            assert producer[m.input[1]] is p and p.op_type in ("NormModulateFp8", "GatedResidualModulateFp8",
                                                                "SwiGLUFp8", rw.QUANTIZE)
            if p.op_type == rw.QUANTIZE:
                assert m.input[2].endswith("attention.o.weight") and producer[p.input[0]].op_type == "MultiHeadAttention"
        fused = _graph(out, manifest, name, "cuda_fused")
        io = lambda m: [(v.name, v.type.SerializeToString()) for v in (*m.graph.input, *m.graph.output)]  # noqa: E731
        assert io(g) == io(fused)
        onnx.checker.check_model(str(out / manifest["components"][name]["graphs"]["cuda_fused_w8a8"]["file"]))


def test_fused_quantization_leaves_a_shared_activation_alone():
    """A modulated output read by something besides its quantizer stays bf16 (its reader needs it)."""
    vi = helper.make_tensor_value_info
    nodes = [helper.make_node("NormModulate", ["x", "g", "s"], ["y"], domain=rw.DOMAIN, epsilon=1e-5),
             helper.make_node(rw.QUANTIZE, ["y"], ["q", "qs"], domain=rw.DOMAIN, clamp=7.0)]
    ins = [vi("x", TensorProto.BFLOAT16, [2, 32]), vi("g", TensorProto.BFLOAT16, [32]), vi("s", TensorProto.BFLOAT16, [32])]
    outs = [vi("q", TensorProto.FLOAT8E4M3FN, [2, 32]), vi("qs", TensorProto.FLOAT, [2])]
    model = helper.make_model(helper.make_graph(nodes, "g", ins, outs),
                              opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(rw.DOMAIN, 1)])
    fused = rw.fused_quantization(model)
    assert [n.op_type for n in fused.graph.node] == ["NormModulateFp8"]
    n = fused.graph.node[0]
    assert list(n.output) == ["q", "qs"] and {a.name: helper.get_attribute_value(a) for a in n.attribute} == \
        {"epsilon": pytest.approx(1e-5), "clamp": pytest.approx(7.0)}
    model.graph.output.append(vi("y", TensorProto.BFLOAT16, [2, 32]))
    assert rw.fused_quantization(model) is model


def test_rewrite_options_and_alignment():
    """clamp and fast_accumulation become attributes; a linear whose sizes are not multiples of 16 stays."""
    vi = helper.make_tensor_value_info
    nodes, inits = [], []
    for i, (n, k) in enumerate([(32, 48), (40, 48)]):
        w, s = f"layers.{i}.attention.o.weight", f"layers.{i}.attention.o.weight_scale"
        inits += [helper.make_tensor(w, TensorProto.FLOAT8E4M3FN, [n, k], np.zeros(n * k, np.uint8).tobytes(), raw=True),
                  onnx.numpy_helper.from_array(np.ones(n, np.float32), s)]
        nodes += [helper.make_node("Unsqueeze", [s, "ax"], [f"r{i}"]),
                  helper.make_node("MatMulBlockQuantizedFp8Weight", ["x", w, f"r{i}"], [f"y{i}"], domain="com.microsoft",
                                   block_size=k)]
    inits.append(onnx.numpy_helper.from_array(np.array([1], np.int64), "ax"))
    g = helper.make_graph(nodes, "g", [vi("x", TensorProto.BFLOAT16, [1, 5, 48])],
                          [vi("y0", TensorProto.BFLOAT16, None), vi("y1", TensorProto.BFLOAT16, None)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)])
    out = rw.w8a8_matmuls(model, clamp=30.0, fast_accumulation=True)
    ops = [n.op_type for n in out.graph.node]
    assert ops.count(rw.MATMUL) == 1 and ops.count(rw.QUANTIZE) == 1 and ops.count("MatMulBlockQuantizedFp8Weight") == 1
    q = next(n for n in out.graph.node if n.op_type == rw.QUANTIZE)
    m = next(n for n in out.graph.node if n.op_type == rw.MATMUL)
    assert helper.get_attribute_value(q.attribute[0]) == pytest.approx(30.0)
    assert helper.get_attribute_value(m.attribute[0]) == 1 and m.output[0] == "y0"
    assert rw.w8a8_matmuls(model, select=lambda w: False) is model
    with pytest.raises(ValueError, match="clamp=-1"):
        rw.w8a8_matmuls(model, clamp=-1)


def test_runtime_refuses_w8a8_where_it_cannot_run(exported, tiny_engines):
    from ideogram4_engine.runtime.backends.onnxruntime import OnnxRuntimeBackend
    out, _ = exported
    with pytest.raises(ValueError, match="needs the CUDA provider"):
        OnnxRuntimeBackend(load_manifest(out), device="cpu", precision="w8a8")
    with pytest.raises(ValueError, match="precision='fp4'; allowed: faithful, w8a8"):
        OnnxRuntimeBackend(load_manifest(out), device="cpu", precision="fp4")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = OnnxRuntimeBackend(load_manifest(out), device="cpu", components=("guided_step",))
    assert b.precision == "faithful" and b.graph_variant == "cpu"


def test_gpu_check_script_builds_valid_graphs():
    """scripts/gpu_w8a8_check.py runs only on the GPU machine; its graphs are checked here so a slip costs no
    device time."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("gpu_w8a8_check", Path(__file__).parents[2] / "scripts" / "gpu_w8a8_check.py")
    g = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(g)
    M, K, N = 5, 32, 16
    wq, ws, bits = np.zeros((N, K), np.uint8), np.ones(N, np.float32), np.zeros((K, N), np.int16)
    models = [g.linear_graph(M, K, N, wq, ws), g.linear_graph(M, K, N, wq, ws, clamp=3.0, fast=True, reps=3, check=False),
              g.quantize_graph(M, K), g.quantize_graph(M, K, quantize=False), g.quantize_graph(M, K, clamp=2.0),
              g.baseline_graph("ort_bf16", M, K, N, wq, ws, bits, 3), g.baseline_graph("ort_fp8wo", M, K, N, wq, ws, bits, 3)]
    for model in models:
        onnx.checker.check_model(model)
    ops = {n.op_type for n in models[0].graph.node}
    assert {rw.QUANTIZE, rw.MATMUL} <= ops and g.DOMAIN == rw.DOMAIN
