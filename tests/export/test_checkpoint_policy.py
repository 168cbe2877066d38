"""The checkpoint reader's acceptance policy, one test per row of docs/checkpoint.md: what the official loaders
accept is accepted (with a warning where something is skipped or filled in), only what they would fail on or
misuse is refused."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ideogram4_engine.export.checkpoint import CheckpointError, open_checkpoint
from ideogram4_engine.export.reference.dit import load_dit
from ideogram4_engine.export.to_onnx import ExportOptions, export
from ideogram4_engine.export.reference.text_encoder import FP8_FLAG, load_text_encoder
from ideogram4_engine.export.reference.vae import load_decoder

VAE_FILE = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture
def copy(ckpt, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(ckpt, dst)
    return dst


def _single(folder, stem):
    """Merge a (possibly sharded) component into one file; returns its tensors for editing."""
    tensors = {}
    for f in sorted(folder.glob(f"{stem}*.safetensors")):
        tensors.update(load_file(f))
        f.unlink()
    (folder / f"{stem}.safetensors.index.json").unlink(missing_ok=True)
    return tensors


def _edit_vae(root, change):
    path = root / "vae" / VAE_FILE
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def _edit_text_encoder(root, change):
    folder = root / "text_encoder"
    tensors = _single(folder, "model")
    change(tensors)
    save_file(tensors, folder / "model.safetensors")


def _refusal(root) -> str:
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(root)
    return str(e.value)


# ------------------------------------------------------------------------------------------ VAE buffers


def test_bn_buffers_in_any_dtype_are_accepted_and_exported(copy, tmp_path):
    """`num_batches_tracked` as F32 (what a checkpoint written by the official code holds; it used to be refused),
    running statistics in bf16 / int64: the official strict load casts them, the pipeline never reads them."""
    def change(t):
        t["bn.num_batches_tracked"] = torch.tensor(7.0)
        t["bn.running_mean"] = t["bn.running_mean"].to(torch.bfloat16)
        t["bn.running_var"] = torch.ones_like(t["bn.running_var"], dtype=torch.int64)
    _edit_vae(copy, change)
    ck = open_checkpoint(copy)
    assert ck.warnings == []
    assert "warning" not in ck.describe()
    load_decoder(copy / "vae")
    manifest = export(copy, tmp_path / "engines", ExportOptions(progress=False), log=lambda s: None)
    assert set(manifest["components"]) >= {"text_encoder", "dit_cond", "dit_uncond", "vae_decoder"}


def test_bn_counter_as_one_element_vector_is_accepted(copy):
    _edit_vae(copy, lambda t: t.update({"bn.num_batches_tracked": torch.tensor([3], dtype=torch.int32)}))
    assert open_checkpoint(copy).warnings == []


def test_missing_bn_counter_warns_and_goes_on(copy):
    _edit_vae(copy, lambda t: t.pop("bn.num_batches_tracked"))
    ck = open_checkpoint(copy)
    (w,) = ck.warnings
    assert "'bn.num_batches_tracked' is missing; accepted" in w and "vae" in w
    assert f"  warning: {w}" in ck.describe()
    load_decoder(copy / "vae")


def test_missing_or_misshapen_running_statistics_are_refused(copy):
    def change(t):
        del t["bn.running_var"]
        t["bn.running_mean"] = t["bn.running_mean"][:5].contiguous()
    _edit_vae(copy, change)
    msg = _refusal(copy)
    assert "missing tensor 'bn.running_var'" in msg
    assert "'bn.running_mean' has shape (5,), expected (128,)" in msg


def test_unknown_vae_key_is_refused(copy):
    _edit_vae(copy, lambda t: t.update({"decoder.extra.weight": torch.zeros(2)}))
    assert "unexpected tensor(s): 'decoder.extra.weight'" in _refusal(copy)


# ------------------------------------------------------------------------------------------ text encoder


def test_vision_tower_and_rotary_buffers_warn_and_are_skipped(copy):
    def change(t):
        t["visual.patch_embed.proj.weight"] = torch.randn(4, 3, 2, 2, 2).to(torch.bfloat16)
        t["visual.blocks.0.norm1.weight"] = torch.ones(4, dtype=torch.bfloat16)
        t["language_model.rotary_emb.inv_freq"] = torch.rand(8)
    _edit_text_encoder(copy, change)
    ck = open_checkpoint(copy)
    (w,) = ck.warnings
    assert "3 tensor(s) that text-to-image never uses, skipped" in w and "'visual.blocks.0.norm1.weight'" in w
    enc = load_text_encoder(copy / "text_encoder")
    assert enc.encode(torch.tensor([[9, 99, 999]])).shape == (1, 3, 13 * 64)


def test_unknown_key_in_fp8_text_encoder_is_refused(copy):
    _edit_text_encoder(copy, lambda t: t.update({"lm_head.weight": torch.zeros(3, 64, dtype=torch.bfloat16)}))
    assert "unexpected tensor(s): 'lm_head.weight'" in _refusal(copy)


def test_missing_language_model_tensor_is_refused(copy):
    """The official FP8 load only warns here and would then run uninitialised weights: refused."""
    _edit_text_encoder(copy, lambda t: t.pop("language_model.layers.20.mlp.up_proj.weight"))
    assert "missing tensor 'language_model.layers.20.mlp.up_proj.weight'" in _refusal(copy)


def test_unknown_key_in_bf16_text_encoder_warns_and_is_skipped(copy):
    """A non-FP8 text encoder goes through transformers' from_pretrained, which drops unexpected keys."""
    def change(t):
        for k in [k for k in t if k.endswith(".weight_scale")]:
            w = k[: -len("_scale")]
            t[w] = (t[w].to(torch.float32) * t.pop(k)[:, None]).to(torch.bfloat16)
        t["lm_head.weight"] = torch.zeros(3, 64, dtype=torch.bfloat16)
    _edit_text_encoder(copy, change)
    cfg_path = copy / "text_encoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg[FP8_FLAG]
    cfg_path.write_text(json.dumps(cfg))
    ck = open_checkpoint(copy)
    (w,) = ck.warnings
    assert "1 unexpected tensor(s) skipped, as the official loader drops them: 'lm_head.weight'" in w
    assert ck.components["text_encoder"].quantized == []
    enc = load_text_encoder(copy / "text_encoder")
    assert torch.isfinite(enc.encode(torch.tensor([[5, 6, 7, 8]]))).all()


# ------------------------------------------------------------------------------------------ dtypes


def test_float_dtypes_the_official_loader_casts_are_accepted(copy):
    """F64 gains and a bf16 weight_scale are cast to bf16 by the official loader: accepted, and loadable."""
    folder = copy / "transformer"
    tensors = _single(folder, "diffusion_pytorch_model")
    tensors["layers.0.ffn_norm1.weight"] = tensors["layers.0.ffn_norm1.weight"].to(torch.float64)
    tensors["adaln_proj.weight_scale"] = tensors["adaln_proj.weight_scale"].to(torch.bfloat16)
    save_file(tensors, folder / "diffusion_pytorch_model.safetensors")
    ck = open_checkpoint(copy)
    assert ck.warnings == []
    dit = load_dit(ck.components["transformer"])
    assert dit.layers[0].ffn_norm1.weight.dtype == torch.bfloat16


def test_integer_or_fp8_floats_are_refused(copy):
    folder = copy / "transformer"
    tensors = _single(folder, "diffusion_pytorch_model")
    tensors["layers.0.ffn_norm1.weight"] = tensors["layers.0.ffn_norm1.weight"].to(torch.int32)
    tensors["input_proj.bias"] = tensors["input_proj.bias"].to(torch.float8_e4m3fn)
    tensors["adaln_proj.weight_scale"] = tensors["adaln_proj.weight_scale"].to(torch.int64)
    save_file(tensors, folder / "diffusion_pytorch_model.safetensors")
    msg = _refusal(copy)
    assert "'layers.0.ffn_norm1.weight' has dtype I32, expected one of BF16, F16, F32, F64" in msg
    assert "'input_proj.bias' has dtype F8_E4M3" in msg
    assert "scale 'adaln_proj.weight_scale' has dtype I64" in msg
