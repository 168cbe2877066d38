"""DiT graphs on onnxruntime CPU against the torch reference (spec §2), FP8 kept as FP8."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ideogram4_engine.export.checkpoint import TensorSource, open_checkpoint
from ideogram4_engine.export.reference.dit import load_dit, rope_inv_freq
from ideogram4_engine.export.graphs.rewrite import bf16_to_fp32_emulation
from ideogram4_engine.export.graphs.dit import build_dit
from ideogram4_engine.runtime.packing import pack, token_grid
from ideogram4_engine.runtime.rope import dit_rope_tables

FORMS = ("op", "matmul")


@pytest.fixture(scope="module")
def graphs(tiny_checkpoint, tmp_path_factory):
    ck = open_checkpoint(tiny_checkpoint)
    out = tmp_path_factory.mktemp("dit_graphs")
    paths = {}
    for form in FORMS:
        for name, folder, text in (("cond", "transformer", True), ("uncond", "unconditional_transformer", False)):
            path = out / f"dit_{name}_{form}.onnx"
            model = build_dit(ck.components[folder].config, TensorSource(ck.components[folder].files), path,
                              text=text, attention_form=form).save(path)
            onnx.save(bf16_to_fp32_emulation(model), str(out / f"dit_{name}_{form}.cpu.onnx"))
            paths[name, form] = path
    return ck, paths


def session(path):
    return ort.InferenceSession(str(path.with_suffix(".cpu.onnx")), providers=["CPUExecutionProvider"])


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("height,width,n_text,batch", [(256, 256, 9, 1), (256, 384, 40, 2)])
def test_cond_and_uncond_match_reference(graphs, form, height, width, n_text, batch):
    ck, paths = graphs
    cfg = ck.components["transformer"].config
    g = torch.Generator().manual_seed(height + width + n_text)
    gh, gw = token_grid(height, width)
    N = gh * gw
    feats = torch.randn(batch, n_text, cfg.llm_features_dim, generator=g) * 2
    lat = torch.randn(batch, N, 128, generator=g)
    tau = torch.rand(batch, generator=g).clamp(1e-4, 0.999)
    cos, sin = dit_rope_tables(n_text, gh, gw, rope_inv_freq(cfg.head_dim, cfg.rope_theta).numpy(), cfg.mrope_section)
    cos, sin = np.broadcast_to(cos, (batch, *cos.shape)).copy(), np.broadcast_to(sin, (batch, *sin.shape)).copy()
    p = pack([n_text] * batch, height, width)
    pos, seg, ind = (torch.from_numpy(a) for a in (p.positions, p.segments, p.indicators))
    with torch.no_grad():
        ref_c = load_dit(ck.components["transformer"])(
            torch.cat([feats, torch.zeros(batch, N, cfg.llm_features_dim)], 1),
            torch.cat([torch.zeros(batch, n_text, 128), lat], 1), tau, pos, seg, ind)[:, n_text:].numpy()
        ref_u = load_dit(ck.components["unconditional_transformer"])(
            None, lat, tau, pos[:, n_text:], seg[:, n_text:], ind[:, n_text:]).numpy()
    out_c, = session(paths["cond", form]).run(None, {
        "latents": lat.numpy(), "tau": tau.numpy(), "rope_cos": cos, "rope_sin": sin, "text_features": feats.numpy()})
    out_u, = session(paths["uncond", form]).run(None, {
        "latents": lat.numpy(), "tau": tau.numpy(), "rope_cos": cos[:, n_text:], "rope_sin": sin[:, n_text:]})
    e_c, e_u = rel_err(out_c, ref_c), rel_err(out_u, ref_u)
    print(f"\n{form} {height}x{width} T={n_text} B={batch}: rel err cond {e_c:.2e} uncond {e_u:.2e}")
    assert out_c.shape == (batch, N, 128) and out_u.shape == (batch, N, 128)
    assert e_c <= 1e-2 and e_u <= 1e-2


def test_fp8_weights_stay_fp8(graphs, tiny_checkpoint):
    ck, paths = graphs
    L = ck.components["transformer"].config.num_layers
    for (name, form), path in paths.items():
        model = onnx.load(str(path), load_external_data=False)
        inits = {i.name: i for i in model.graph.initializer}
        dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
        assert len(dq) == (7 if name == "cond" else 6) + 6 * L       # uncond has no llm_cond_proj
        assert all(inits[n.input[0]].data_type == onnx.TensorProto.FLOAT8E4M3FN for n in dq)
        # no weight matrix was expanded to bf16: every 2-D initializer is the e4m3 one or the tiny indicator table
        big = [i.name for i in inits.values() if len(i.dims) == 2 and i.data_type != onnx.TensorProto.FLOAT8E4M3FN]
        assert big == ["embed_image_indicator.weight"]
        weight_bytes = sum(int(next(e.value for e in i.external_data if e.key == "length")) if i.external_data
                           else len(i.raw_data) for i in inits.values())
        ckpt_bytes = ck.components["transformer" if name == "cond" else "unconditional_transformer"].files.nbytes
        assert weight_bytes <= 1.05 * ckpt_bytes, (weight_bytes, ckpt_bytes)


def test_checker_and_polygraphy_by_path(graphs):
    _, paths = graphs
    for path in paths.values():
        for p in (path, path.with_suffix(".cpu.onnx")):
            onnx.checker.check_model(str(p))
            m = onnx.load(str(p), load_external_data=False)
            assert m.ir_version <= 13 and m.opset_import[0].version >= 21
    r = subprocess.run([str(Path(sys.executable).with_name("polygraphy")), "inspect", "model", str(paths["cond", "op"])],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "velocity" in r.stdout and "text_features" in r.stdout


def test_graph_dequantization_is_the_official_formula_bit_for_bit(tmp_path):
    """x = I through the graph's FP8 Linear returns W_eff exactly: DequantizeLinear(e4m3, bf16 scale) is
    bf16(bf16(q)·bf16(s)), identical to the reference's FP8Linear."""
    from ideogram4_engine.export.reference.fp8 import dequantize, quantize_rows
    from ideogram4_engine.export.graphs.builder import BF16, F32, GraphBuilder
    from ideogram4_engine.export.graphs.layers import linear, to_bf16

    gen = torch.Generator().manual_seed(4)
    w = torch.randn(48, 32, generator=gen) * torch.logspace(-3, 1, 48)[:, None]
    q, s = quantize_rows(w)

    class Src:
        def get(self, name):
            return {"p.weight": q, "p.weight_scale": s}[name]
    path = tmp_path / "lin.onnx"
    g = GraphBuilder("lin", path.with_name("lin.onnx.data"))
    x = g.input("x", F32, [32, 32])
    g.output(g.op("Cast", linear(g, to_bf16(g, x), "p", Src(), bias=False), to=F32), "y", F32, [32, 48])
    onnx.save(bf16_to_fp32_emulation(g.save(path)), str(tmp_path / "lin.cpu.onnx"))
    y, = ort.InferenceSession(str(tmp_path / "lin.cpu.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.eye(32, dtype=np.float32)})
    np.testing.assert_array_equal(y, dequantize(q, s).to(torch.float32).t().numpy())


def _dit_attention_graph(batch: int, tokens: int, heads: int, head_dim: int) -> onnx.ModelProto:
    """The DiT block's attention as the exporter writes it (q, k, v of (B, L, H, hd) → Transposes → opset-23
    Attention → Transpose → Reshape to (B, L, H·hd)), in fp32 so that onnxruntime's CPU kernels run both forms."""
    from onnx import TensorProto as TP, helper
    from ideogram4_engine.export.graphs.builder import IR_VERSION, OPSET
    f32 = TP.FLOAT
    nodes = [helper.make_node("Transpose", [n], [f"{n}t"], perm=[0, 2, 1, 3]) for n in "qkv"]
    nodes += [helper.make_node("Attention", ["qt", "kt", "vt"], ["o"], scale=head_dim ** -0.5, softmax_precision=f32),
              helper.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ot", "flat"], ["y"])]
    graph = helper.make_graph(
        nodes, "attention", [helper.make_tensor_value_info(n, f32, [batch, tokens, heads, head_dim]) for n in "qkv"],
        [helper.make_tensor_value_info("y", f32, [batch, tokens, heads * head_dim])],
        [onnx.numpy_helper.from_array(np.array([0, 0, heads * head_dim], np.int64), "flat")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = IR_VERSION
    return m


def test_multihead_attention_rewrite_computes_the_attention_it_replaces():
    """fused_attention (the onnxruntime-CUDA twins' attention) against the opset-23 Attention it replaces, both on
    onnxruntime's CPU kernels in fp32 with fresh random inputs: equal to fp32 rounding (another summation order),
    and the graph keeps no Transpose."""
    from ideogram4_engine.export.graphs.rewrite import fused_attention
    rng = np.random.default_rng()
    B, L, H, hd = 2, 37, 3, 16
    before = _dit_attention_graph(B, L, H, hd)
    after = fused_attention(before)
    assert [n.op_type for n in after.graph.node if n.op_type != "Reshape"] == ["MultiHeadAttention"]
    mha = next(n for n in after.graph.node if n.op_type == "MultiHeadAttention")
    assert {a.name: onnx.helper.get_attribute_value(a) for a in mha.attribute} == \
        {"num_heads": H, "scale": pytest.approx(hd ** -0.5)}
    feeds = {n: (3 * rng.standard_normal((B, L, H, hd))).astype(np.float32) for n in "qkv"}
    ref, got = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
                for m in (before, after))
    assert got.shape == ref.shape == (B, L, H * hd)
    assert rel_err(got, ref) < 1e-5, rel_err(got, ref)


def test_multihead_attention_rewrite_leaves_other_attention_alone():
    """A causal Attention (the text encoder's) or one whose output is not flattened back is not rewritten."""
    from ideogram4_engine.export.graphs.rewrite import fused_attention
    causal = _dit_attention_graph(1, 8, 2, 16)
    next(n for n in causal.graph.node if n.op_type == "Attention").attribute.append(
        onnx.helper.make_attribute("is_causal", 1))
    assert fused_attention(causal) is causal
    kept_heads = _dit_attention_graph(1, 8, 2, 16)
    del kept_heads.graph.node[-2:]                        # output stays (B, H, L, hd)
    kept_heads.graph.output[0].CopyFrom(onnx.helper.make_tensor_value_info("o", onnx.TensorProto.FLOAT, [1, 2, 8, 16]))
    assert fused_attention(kept_heads) is kept_heads
