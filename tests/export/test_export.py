"""`make export` end to end on the tiny checkpoint: manifest contract, checksums, reuse, atomicity,
unquantized inputs, and the whole sampler driven over the exported graphs against the torch reference."""
import hashlib
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file, save_file

from ideogram4_engine.export import to_onnx as export_mod
from ideogram4_engine.export.checkpoint import CheckpointError
from ideogram4_engine.export.to_onnx import ExportOptions, export, validate_manifest
from ideogram4_engine.export.reference.pipeline import SamplingParams
from ideogram4_engine.runtime.packing import token_grid
from ideogram4_engine.runtime.rope import dit_rope_tables
from ideogram4_engine.runtime.schedule import plan, resolution_mu

QUIET = ExportOptions(progress=False)
ONNX_DTYPES = {"float32": onnx.TensorProto.FLOAT, "int64": onnx.TensorProto.INT64, "uint8": onnx.TensorProto.UINT8}


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "tiny"
    logs = []
    manifest = export(tiny_checkpoint, out, QUIET, log=logs.append)
    return out, manifest, logs


def sessions(out, manifest):
    return {name: ort.InferenceSession(str(out / c["graphs"]["cpu"]["file"]), providers=["CPUExecutionProvider"])
            for name, c in manifest["components"].items()}


def test_manifest_is_complete_and_checksums_match(exported):
    out, manifest, _ = exported
    validate_manifest(json.loads((out / "manifest.json").read_text()))
    assert manifest["source"]["synthetic"]["config"] == "tiny"
    assert manifest["exporter"]["opset"] >= 21 and manifest["exporter"]["ir_version"] <= 13
    for name, comp in manifest["components"].items():
        for entry in [*comp["graphs"].values(), *([comp["data"]] if "data" in comp else [])]:
            assert hashlib.sha256((out / entry["file"]).read_bytes()).hexdigest() == entry["sha256"], entry
        for kind, variant in comp["graphs"].items():
            model = onnx.load(str(out / variant["file"]), load_external_data=False)
            graph_in = [(i.name, i.type.tensor_type.elem_type) for i in model.graph.input]
            graph_out = [(o.name, o.type.tensor_type.elem_type) for o in model.graph.output]
            weights = [(w["input"], onnx.TensorProto.BFLOAT16) for w in comp.get("dequantize", {}).get("weights", [])]
            assert graph_in == [(i["name"], ONNX_DTYPES[i["dtype"]]) for i in comp["inputs"]] + \
                (weights if kind.endswith("_dql") else []), (name, kind)
            assert graph_out == [(o["name"], ONNX_DTYPES[o["dtype"]]) for o in comp["outputs"]], name
            onnx.checker.check_model(str(out / variant["file"]))
        assert comp["initializer_bytes"] <= 1.05 * comp["checkpoint_bytes"], name
    assert (out / "tokenizer" / "tokenizer.json").exists()
    assert [p.name for p in out.parent.iterdir()] == ["tiny"]            # no temporary folder left


def test_unchanged_components_are_reused(exported, tiny_checkpoint):
    out, manifest, _ = exported
    logs = []
    again = export(tiny_checkpoint, out, QUIET, log=logs.append)
    assert sum("reused" in line for line in logs) == 4      # the four weighted components
    assert {n: c["cache_key"] for n, c in again["components"].items()} == \
           {n: c["cache_key"] for n, c in manifest["components"].items()}
    logs = []
    other = out.parent / "matmul"
    export(tiny_checkpoint, other, ExportOptions(attention_form="matmul", progress=False), log=logs.append)
    assert not any("reused" in line for line in logs)
    shutil.rmtree(other)


def test_failed_export_leaves_previous_output_intact(exported, tiny_checkpoint, monkeypatch):
    out, manifest, _ = exported
    before = (out / "manifest.json").read_bytes()

    def boom(*a, **k):
        raise RuntimeError("builder crashed (simulated)")
    monkeypatch.setattr(export_mod, "_build", boom)
    monkeypatch.setattr(export_mod, "_reuse", lambda *a, **k: None)
    with pytest.raises(RuntimeError, match="simulated"):
        export(tiny_checkpoint, out, QUIET)
    assert (out / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]


def test_bad_inputs_are_refused_before_writing(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="missing component folder"):
        export(tmp_path, tmp_path / "out", QUIET)
    with pytest.raises(ValueError, match="attention form 'flash'; allowed: op, matmul"):
        export(tiny_checkpoint, tmp_path / "out", ExportOptions(attention_form="flash"))
    assert not (tmp_path / "out").exists()


def test_unquantized_checkpoint_is_quantized_at_export(tiny_checkpoint, tmp_path):
    ck = tmp_path / "bf16"
    shutil.copytree(tiny_checkpoint, ck)
    folder = ck / "unconditional_transformer"
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
        f.unlink()
    (folder / "diffusion_pytorch_model.safetensors.index.json").unlink()
    for k in [k for k in tensors if k.endswith(".weight_scale")]:
        w = k[: -len("_scale")]
        tensors[w] = tensors[w].to(torch.bfloat16) * tensors.pop(k).to(torch.bfloat16)[:, None]
    save_file(tensors, folder / "diffusion_pytorch_model.safetensors")
    m = export(ck, tmp_path / "e_fp8", QUIET)
    comp = m["components"]["dit_uncond"]
    assert comp["weights"] == "fp8-quantized-at-export" and m["exporter"]["weights"] == "fp8-quantized-at-export"
    model = onnx.load(str(tmp_path / "e_fp8" / "dit_uncond.onnx"), load_external_data=False)
    fp8 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT8E4M3FN]
    assert len(fp8) == sum(1 for n in model.graph.node if n.op_type == "DequantizeLinear") > 0
    kept = export(ck, tmp_path / "e_keep", ExportOptions(weights="keep", progress=False))["components"]["dit_uncond"]
    assert kept["weights"] == "kept-dtype" and kept["initializer_bytes"] > 1.8 * comp["initializer_bytes"]


def test_sampler_over_exported_graphs_matches_reference(exported, tiny_pipeline):
    """A plain test loop over onnxruntime (text encoder → both DiTs × 3 steps → VAE) against the torch
    reference pipeline on the same prompt and noise."""
    out, manifest, _ = exported
    s = sessions(out, manifest)
    height, width = 256, 384
    gh, gw = token_grid(height, width)
    ids = tiny_pipeline.tokenize("A lighthouse on a cliff at dusk, waves, long exposure.")
    feats, = s["text_encoder"].run(None, {"input_ids": np.array([ids], np.int64)})
    ref_feats = tiny_pipeline.encode(ids)
    e_text = np.linalg.norm(feats[0] - ref_feats.numpy()) / np.linalg.norm(ref_feats.numpy())
    params = SamplingParams(3, 0.0, 1.75, (3.0, 7.0, 7.0))
    noise = tiny_pipeline.noise(1, gh * gw, 11)
    rope = manifest["rope"]
    cos, sin = dit_rope_tables(len(ids), gh, gw, np.array(rope["inv_freq"], np.float32), tuple(rope["mrope_section"]))
    n = len(ids)
    z = noise.numpy().copy()
    for st in plan(params.steps, resolution_mu(params.mu, height, width), params.std, params.guidance):
        tau = np.array([st.tau], np.float32)
        v_c, = s["dit_cond"].run(None, {"latents": z, "tau": tau, "rope_cos": cos[None], "rope_sin": sin[None],
                                        "text_features": feats})
        v_u, = s["dit_uncond"].run(None, {"latents": z, "tau": tau, "rope_cos": cos[None, n:],
                                          "rope_sin": sin[None, n:]})
        z = z + (np.float32(st.guidance) * v_c + np.float32(1.0 - st.guidance) * v_u) * st.dt
    ref_z = tiny_pipeline.sample([ref_feats], height, width, params, noise).numpy()
    e_lat = np.linalg.norm(z - ref_z) / np.linalg.norm(ref_z)
    image, = s["vae_decoder"].run(None, {"latents": z.reshape(1, gh, gw, 128).astype(np.float32)})
    ref_img = tiny_pipeline.decode(torch.from_numpy(ref_z), height, width)
    within = np.mean(np.abs(image.astype(int) - ref_img.astype(int)) <= 2)
    print(f"\ntext features rel err {e_text:.2e}, latents after 3 steps rel err {e_lat:.2e}, "
          f"pixels within ±2: {within:.4f}")
    assert image.shape == (1, height, width, 3) and image.dtype == np.uint8
    # text features: the tiny encoder (36 layers) amplifies bf16 rounding so much that the torch reference itself
    # moves by ~2e-2 between its own sdpa and eager attention kernels (tests/export/test_graph_text_encoder.py measures
    # it); the graph is held to 3e-2 against the sdpa reference here and there, 2e-2 against same-attention ones.
    assert e_text <= 3e-2
    assert e_lat <= 1e-2 and within >= 0.99


def test_guided_step_graph_is_the_reference_update_bit_for_bit(exported):
    out, manifest, _ = exported
    sess = ort.InferenceSession(str(out / manifest["components"]["guided_step"]["graphs"]["cpu"]["file"]),
                                providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    z, v_c, v_u = (rng.standard_normal((2, 96, 128)).astype(np.float32) * 3 for _ in range(3))
    for g, dt in ((7.0, 0.0273), (3.0, 0.1), (1.5, 0.3)):
        dt32 = np.float32(dt)
        got, = sess.run(None, {"latents": z, "velocity_cond": v_c, "velocity_uncond": v_u,
                               "guidance": np.array([g], np.float32), "one_minus_guidance": np.array([1.0 - g], np.float32),
                               "dt": np.array([dt32])})
        ref = (torch.from_numpy(z) + (g * torch.from_numpy(v_c) + (1.0 - g) * torch.from_numpy(v_u)) * float(dt32)).numpy()
        np.testing.assert_array_equal(got, ref)


def test_load_dequantization_table_points_at_the_fp8_bytes(exported):
    """Every `dequantize` entry names the exact bytes of an e4m3 initializer and its bf16 scale in the weight
    file, and the *_dql graphs take exactly those weights as inputs, with no FP8 left in them."""
    out, manifest, _ = exported
    assert {n for n, c in manifest["components"].items() if "dequantize" in c} == {"text_encoder", "dit_cond", "dit_uncond"}
    for name, comp in manifest["components"].items():
        if "dequantize" not in comp:
            continue
        canonical = onnx.load(str(out / comp["graphs"]["bf16"]["file"]))        # with its external data
        inits = {i.name: i for i in canonical.graph.initializer}
        raw = (out / comp["data"]["file"]).read_bytes()
        table = comp["dequantize"]["weights"]
        fp8 = {i.name for i in inits.values() if i.data_type == onnx.TensorProto.FLOAT8E4M3FN}
        assert {w["input"] for w in table} <= fp8 and len(table) == len({w["input"] for w in table})
        for w in table:
            q = onnx.numpy_helper.to_array(inits[w["input"]])
            dq = next(n for n in canonical.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == w["input"])
            for part, tensor, dtype in (("weight", inits[w["input"]], "float8e4m3fn"), ("scale", inits[dq.input[1]], "bfloat16")):
                loc = w[part]
                assert loc["dtype"] == dtype and loc["shape"] == list(tensor.dims)
                assert raw[loc["offset"]:loc["offset"] + loc["bytes"]] == tensor.raw_data
            assert w["axis"] == 0 and q.shape == tuple(w["weight"]["shape"])
        for kind in ("cuda_dql", "cpu_dql"):
            model = onnx.load(str(out / comp["graphs"][kind]["file"]), load_external_data=False)
            assert not any(n.op_type == "DequantizeLinear" for n in model.graph.node)
            assert not any(i.data_type == onnx.TensorProto.FLOAT8E4M3FN for i in model.graph.initializer)


def _ancestors(model: onnx.ModelProto, value: str) -> set[str]:
    producer = {o: n for n in model.graph.node for o in n.output}
    seen, todo = set(), [value]
    while todo:
        v = todo.pop()
        if v in seen:
            continue
        seen.add(v)
        if v in producer:
            todo += [i for i in producer[v].input if i]
    return seen


def test_twins_dequantize_each_weight_after_its_input(exported):
    """In the CPU twin each FP8 weight's DequantizeLinear depends on the activation it multiplies (so the
    executor cannot expand every weight up front and hold them all); in the canonical graph it stays on
    constants only, which TensorRT needs to fold it into its FP8 GEMMs."""
    out, manifest, _ = exported
    comp = manifest["components"]["dit_cond"]
    for kind in ("bf16", "cpu"):
        model = onnx.load(str(out / comp["graphs"][kind]["file"]), load_external_data=False)
        inputs = {i.name for i in model.graph.input}
        dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
        assert len(dqs) == len(comp["dequantize"]["weights"])
        dependent = [bool(_ancestors(model, n.output[0]) & inputs) for n in dqs]
        assert all(dependent) if kind != "bf16" else not any(dependent), kind


def test_cuda_twin_multiplies_the_e4m3_weights_directly(exported):
    """The CUDA twin has no DequantizeLinear left: every FP8 weight of the table reaches onnxruntime's
    MatMulBlockQuantizedFp8Weight as the stored (out, in) initializer — no Transpose — with its bf16 scale as
    fp32 rows and one block per row (block_size = in), replacing exactly the MatMuls that multiplied the
    dequantized weight in the canonical graph; the scale rows hang on initializers only (folded at load)."""
    out, manifest, _ = exported
    for name in ("text_encoder", "dit_cond", "dit_uncond"):
        comp = manifest["components"][name]
        bf16 = onnx.load(str(out / comp["graphs"]["bf16"]["file"]), load_external_data=False)
        cuda = onnx.load(str(out / comp["graphs"]["cuda"]["file"]), load_external_data=False)
        assert not any(n.op_type == "DequantizeLinear" for n in cuda.graph.node)
        assert any(o.domain == "com.microsoft" and o.version == 1 for o in cuda.opset_import)
        inputs = {i.name for i in cuda.graph.input}
        inits = {i.name: list(i.dims) for i in cuda.graph.initializer}
        producer = {o: n for n in bf16.graph.node for o in n.output}
        canon_users = {}                   # e4m3 initializer -> outputs of the canonical MatMuls it feeds
        for n in bf16.graph.node:
            if n.op_type == "MatMul" and n.input[1] in producer and producer[n.input[1]].op_type == "Transpose":
                dq = producer.get(producer[n.input[1]].input[0])
                if dq is not None and dq.op_type == "DequantizeLinear":
                    canon_users.setdefault(dq.input[0], []).append(n.output[0])
        fused = [n for n in cuda.graph.node if n.op_type == "MatMulBlockQuantizedFp8Weight"]
        seen = set()
        for n in fused:
            q = n.input[1]
            w = next(x for x in comp["dequantize"]["weights"] if x["input"] == q)
            assert inits[q] == w["weight"]["shape"]                       # the stored (out, in) bytes
            block = next(a.i for a in n.attribute if a.name == "block_size")
            assert block == w["weight"]["shape"][1]                       # one scale per output row
            assert n.output[0] in canon_users[q]                          # the same MatMul as in bf16
            assert not (_ancestors(cuda, n.input[2]) & inputs)            # constants only: folded at load
            seen.add(q)
        assert seen == {w["input"] for w in comp["dequantize"]["weights"]}, name
        assert len(fused) == sum(len(canon_users[q]) for q in seen)


def test_cuda_twins_attend_through_multihead_attention(exported):
    """In the DiTs' CUDA twins (FP8 resident and dequantize_at_load) every opset-23 Attention of the canonical
    graph is one contrib MultiHeadAttention with the same heads and scale, and no Transpose is left; the text
    encoder's causal, grouped-head Attention stays the opset-23 op."""
    out, manifest, _ = exported
    heads = manifest["model"]["dit"]["num_heads"]
    for name in ("text_encoder", "dit_cond", "dit_uncond"):
        comp = manifest["components"][name]
        bf16 = onnx.load(str(out / comp["graphs"]["bf16"]["file"]), load_external_data=False)
        scales = [onnx.helper.get_attribute_value(a) for n in bf16.graph.node if n.op_type == "Attention"
                  for a in n.attribute if a.name == "scale"]
        assert scales
        for kind in ("cuda", "cuda_dql"):
            twin = onnx.load(str(out / comp["graphs"][kind]["file"]), load_external_data=False)
            ops = [n.op_type for n in twin.graph.node]
            mha = [n for n in twin.graph.node if n.op_type == "MultiHeadAttention"]
            if name == "text_encoder":
                assert not mha and ops.count("Attention") == len(scales), kind
                continue
            assert "Attention" not in ops and "Transpose" not in ops, (name, kind)
            assert [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in mha] == \
                [{"num_heads": heads, "scale": pytest.approx(s)} for s in scales], (name, kind)
