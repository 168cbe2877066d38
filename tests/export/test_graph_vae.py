"""VAE decoder ONNX graph (export/graphs/vae.py) against the PyTorch reference, on onnxruntime CPU.

The bf16 graph runs through `bf16_to_fp32_emulation` (fp32 kernels, bf16 rounding after every op). The float
parity bound sits near the bf16 noise floor of the tiny random decoder: a bf16 deep net amplifies isolated
1-ulp differences (accumulation order) until two correct bf16 evaluations differ by about as much as bf16 and
fp32 do. Here the graph's float output is ~0.97e-2 (relative L2) from the reference, while the reference is
~0.99e-2 from *itself* when only its memory layout changes (channels_last) and 0.95e-2 from its fp32 twin. The
float bound is therefore 1e-2, or — only where that fails, e.g. on a CPU with other bf16 kernels — 1.05 × that
self-distance measured on the same input.
"""
from __future__ import annotations

import json
import math
import struct

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from ideogram4_engine.export.checkpoint import TensorSource, open_checkpoint
from ideogram4_engine.export.graphs.builder import F32, GraphBuilder
from ideogram4_engine.export.graphs.rewrite import bf16_to_fp32_emulation
from ideogram4_engine.export.graphs.vae import build_vae_decoder, emit_tokens_to_latent
from ideogram4_engine.export.reference.pipeline import ReferencePipeline, torch_unpatchify
from ideogram4_engine.export.reference.vae import diffusers_to_native, load_decoder, postprocess
from ideogram4_engine.runtime import latents as latent_math

ort = pytest.importorskip("onnxruntime")


def _session(model: onnx.ModelProto | str):
    m = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(m, providers=["CPUExecutionProvider"])


def _build(comp, path, **kw) -> onnx.ModelProto:
    g = build_vae_decoder(comp.config, TensorSource(comp.files), path, **kw)
    return g.save(path)


@pytest.fixture(scope="module")
def vae(tiny_checkpoint, tmp_path_factory):
    """Graph (production outputs) + CPU twin, the debug variant with the float output, and the reference."""
    comp = open_checkpoint(tiny_checkpoint).components["vae"]
    folder = tmp_path_factory.mktemp("vae_graph")
    out = {"comp": comp, "folder": folder, "path": folder / "vae_decoder.onnx"}
    for key, kw in (("op", {}), ("debug", {"float_output": True}),
                    ("matmul", {"float_output": True, "attention_form": "matmul"})):
        path = out["path"] if key == "op" else folder / f"vae_decoder_{key}.onnx"
        model = _build(comp, path, **kw)
        cpu_path = path.with_name(path.stem + ".cpu.onnx")
        onnx.save(bf16_to_fp32_emulation(model), str(cpu_path))      # same folder: shares the .data file
        out[key] = (model, _session(str(cpu_path)))
    out["decoder"] = load_decoder(tiny_checkpoint / "vae")
    return out


def _tokens(seed: int, b: int, gh: int, gw: int) -> torch.Tensor:
    return torch.randn(b, gh * gw, 128, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


@torch.inference_mode()
def _reference(decoder, z: torch.Tensor, gh: int, gw: int) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """(uint8 image via ReferencePipeline.decode, float decoder output, the bf16 latent it decoded)."""
    pipe = ReferencePipeline(None, None, None, None, decoder)
    img = pipe.decode(z, 16 * gh, 16 * gw)
    scale, shift = (torch.from_numpy(t) for t in (latent_math.LATENT_SCALE, latent_math.LATENT_SHIFT))
    latent = torch_unpatchify(z * scale + shift, gh, gw).to(torch.bfloat16)
    x = decoder(latent)
    assert np.array_equal(postprocess(x), img)           # the float path below is the same computation
    return img, x.float().numpy(), latent


@torch.inference_mode()
def _noise_floor(decoder, latent: torch.Tensor, x_ref: np.ndarray) -> float:
    """Relative L2 distance of the reference from itself when only its memory layout changes (channels_last:
    other oneDNN kernels, other accumulation order)."""
    try:
        cl = decoder.to(memory_format=torch.channels_last)(latent.contiguous(memory_format=torch.channels_last))
    finally:
        decoder.to(memory_format=torch.contiguous_format)
    return float(np.linalg.norm(cl.float().numpy() - x_ref) / np.linalg.norm(x_ref))


def _check_float(vae, rel: float, latent: torch.Tensor, x_ref: np.ndarray) -> None:
    """rel ≤ 1e-2; only where that fails (another CPU, other kernels) is the reference's own floor measured."""
    if rel > 1e-2:
        floor = _noise_floor(vae["decoder"], latent, x_ref)
        assert rel <= 1.05 * floor, f"float rel {rel:.5f} > 1e-2 and > 1.05 × reference noise floor {floor:.5f}"


# ------------------------------------------------------------------------------------------ pieces

def test_tokens_to_latent_bit_exact(tmp_path):
    g = GraphBuilder("t2l")
    x = g.input("tokens", F32, ["batch", "grid_h", "grid_w", 128])
    g.output(emit_tokens_to_latent(g, x), "latent", F32, ["batch", 32, "h", "w"])
    sess = _session(g.model())
    for b, gh, gw in ((1, 1, 1), (2, 3, 5), (1, 16, 24)):
        z = (np.random.default_rng(gh * gw).standard_normal((b, gh * gw, 128)) * 3).astype(np.float32)
        got = sess.run(None, {"tokens": z.reshape(b, gh, gw, 128)})[0]
        want = latent_math.tokens_to_latent(z, gh, gw)
        assert got.shape == (b, 32, 2 * gh, 2 * gw)
        assert got.tobytes() == want.tobytes()


def test_unknown_attention_form_refused(vae, tmp_path):
    with pytest.raises(ValueError, match="attention form"):
        build_vae_decoder(vae["comp"].config, TensorSource(vae["comp"].files), tmp_path / "x.onnx",
                          attention_form="flash")


# ------------------------------------------------------------------------------------------ structure

def _decoder_checkpoint_bytes(comp) -> int:
    """Bytes of decoder.* + post_quant_conv.* in the VAE safetensors file, from its header's offsets."""
    (path,) = comp.files.files
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
               if k.startswith(("decoder.", "post_quant_conv.")))


def test_graph_checks_and_interface(vae):
    path = vae["path"]
    onnx.checker.check_model(str(path))                 # by path: external data resolved
    m = onnx.load(str(path), load_external_data=False)
    assert m.ir_version == 11 and {o.domain: o.version for o in m.opset_import}[""] == 23

    def sig(vi):
        t = vi.type.tensor_type
        return vi.name, t.elem_type, [d.dim_param or d.dim_value for d in t.shape.dim]

    assert [sig(i) for i in m.graph.input] == [("latents", TensorProto.FLOAT, ["batch", "grid_h", "grid_w", 128])]
    assert [sig(o) for o in m.graph.output] == [("image", TensorProto.UINT8, ["batch", "height", "width", 3])]
    ops = {n.op_type for n in m.graph.node}
    assert "Attention" in ops and "GroupNormalization" not in ops and "Resize" in ops
    big = [t for t in m.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert big and {t.data_type for t in big} == {TensorProto.BFLOAT16}
    assert "decoder.mid.attn_1.q.weight" in {t.name for t in big}          # native names (§6.7)
    q = next(t for t in big if t.name == "decoder.mid.attn_1.q.weight")
    assert list(q.dims) == [64, 64, 1, 1]                                  # 2-D linear → 1×1 conv kernel

    def nbytes(t):
        if t.data_location == TensorProto.EXTERNAL:
            return int({e.key: e.value for e in t.external_data}["length"])
        return len(t.raw_data)

    init_bytes = sum(nbytes(t) for t in m.graph.initializer)
    ckpt_bytes = _decoder_checkpoint_bytes(vae["comp"])
    assert init_bytes <= 1.05 * ckpt_bytes, (init_bytes, ckpt_bytes)
    n_params = sum(math.prod(t.dims) for t in big)
    assert n_params * 2 == sum(nbytes(t) for t in big)
    # the production graph runs, with dynamic shapes, and equals the debug variant (one extra output only)
    z = _tokens(5, 2, 2, 3).numpy().reshape(2, 2, 3, 128)
    (img,) = vae["op"][1].run(None, {"latents": z})
    img_dbg, x = vae["debug"][1].run(None, {"latents": z})
    assert img.shape == (2, 32, 48, 3) and img.dtype == np.uint8 and x.shape == (2, 3, 32, 48)
    assert np.array_equal(img, img_dbg)


def test_native_named_source_gives_same_weights(vae, tmp_path):
    """`src` with native names (rename=diffusers_to_native; 2-D attention weights) → identical weight bytes."""
    comp = vae["comp"]
    path = tmp_path / "native.onnx"
    build_vae_decoder(comp.config, TensorSource(comp.files, rename=diffusers_to_native), path).save(path)
    ref = vae["path"].with_name(vae["path"].name + ".data")
    assert path.with_name(path.name + ".data").read_bytes() == ref.read_bytes()


# ------------------------------------------------------------------------------------------ parity

@pytest.mark.parametrize("seed,b,gh,gw", [(0, 1, 16, 16), (1, 2, 16, 24)])
def test_parity_with_reference(vae, seed, b, gh, gw):
    z = _tokens(seed, b, gh, gw)
    feeds = {"latents": z.numpy().reshape(b, gh, gw, 128)}
    img_ref, x_ref, latent = _reference(vae["decoder"], z, gh, gw)
    img, x = vae["debug"][1].run(None, feeds)
    assert img.shape == (b, 16 * gh, 16 * gw, 3) and img.dtype == np.uint8
    # the in-graph post-processing is exactly the official one on the graph's own float output
    assert np.array_equal(postprocess(torch.from_numpy(x)), img)
    d = np.abs(img.astype(np.int16) - img_ref.astype(np.int16))
    within2, mean = float((d <= 2).mean()), float(d.mean())
    rel = float(np.linalg.norm(x - x_ref) / np.linalg.norm(x_ref))
    print(f"\nB={b} grid {gh}x{gw}: uint8 within±2 {within2:.5f}, exact {(d == 0).mean():.4f}, "
          f"mean|Δ| {mean:.4f}, max|Δ| {d.max()}; float rel {rel:.5f}, max|Δ| {np.abs(x - x_ref).max():.4f}")
    assert within2 >= 0.99
    assert mean <= 0.75
    _check_float(vae, rel, latent, x_ref)


def test_parity_matmul_attention_form(vae):
    b, gh, gw = 2, 16, 24
    z = _tokens(1, b, gh, gw)
    img_ref, x_ref, latent = _reference(vae["decoder"], z, gh, gw)
    img, x = vae["matmul"][1].run(None, {"latents": z.numpy().reshape(b, gh, gw, 128)})
    d = np.abs(img.astype(np.int16) - img_ref.astype(np.int16))
    rel = float(np.linalg.norm(x - x_ref) / np.linalg.norm(x_ref))
    print(f"\nmatmul form B={b} grid {gh}x{gw}: within±2 {(d <= 2).mean():.5f}, mean|Δ| {d.mean():.4f}, "
          f"float rel {rel:.5f}")
    assert (d <= 2).mean() >= 0.99 and d.mean() <= 0.75
    _check_float(vae, rel, latent, x_ref)
