"""Checkpoint layout: write -> read round trip, determinism, atomic writes, and every refusal (spec §1)."""
import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ideogram4_engine.export.checkpoint import CheckpointError, open_checkpoint
from ideogram4_engine.export.reference.dit import DiTConfig, dit_inventory, load_dit
from ideogram4_engine.export.synthetic import writer as writer_mod
from ideogram4_engine.export.synthetic.common import write_sharded
from ideogram4_engine.export.synthetic.configs import get_config
from ideogram4_engine.export.synthetic.writer import write_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ck") / "tiny", "tiny", seed=0)


@pytest.fixture
def copy(ckpt, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(ckpt, dst)
    return dst


def _merge_to_single(folder, stem="diffusion_pytorch_model"):
    """Rewrite a sharded component as one file; returns its tensors for editing."""
    tensors = {}
    for f in sorted(folder.glob(f"{stem}*.safetensors")):
        tensors.update(load_file(f))
        f.unlink()
    (folder / f"{stem}.safetensors.index.json").unlink(missing_ok=True)
    return tensors


def test_round_trip_inventory(ckpt):
    c = open_checkpoint(ckpt)
    cfg = get_config("tiny").dit
    L = cfg.num_layers
    for name in ("transformer", "unconditional_transformer"):
        comp = c.components[name]
        assert len(comp.files.header) == 19 * L + 23
        assert len(comp.quantized) == 7 + 5 * L + L                 # every Linear is FP8
        assert comp.files.index is not None and len(comp.files.files) >= 2   # tiny DiTs are sharded
        for k, e in comp.files.header.items():
            if k.endswith(".weight_scale"):
                assert e.dtype == "F32" and comp.files.header[k[:-6]].dtype == "F8_E4M3"
            elif e.dtype != "F8_E4M3":
                assert e.dtype == "BF16", k
        assert comp.config == cfg
    te = c.components["text_encoder"]
    assert len(te.quantized) == 7 * get_config("tiny").text_encoder.num_layers
    assert c.synthetic["config"] == "tiny" and c.synthetic["seed"] == 0
    assert "SYNTHETIC" in c.describe()
    # the formula holds for the real depth: 669 tensors per FP8 DiT at 34 layers
    real = dit_inventory(DiTConfig())
    assert len(real) + sum(s.kind == "linear" for s in real.values()) == 669


def test_weights_load_and_are_what_was_written(ckpt):
    c = open_checkpoint(ckpt)
    dit = load_dit(c.components["transformer"])
    qkv = dit.layers[1].attention.qkv
    raw = {}
    for f in c.components["transformer"].files.files:
        raw.update(load_file(f))
    assert qkv.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(qkv.weight.view(torch.uint8), raw["layers.1.attention.qkv.weight"].view(torch.uint8))
    assert torch.equal(qkv.weight_scale, raw["layers.1.attention.qkv.weight_scale"])
    assert dit.layers[0].ffn_norm2.weight.dtype == torch.bfloat16


def test_single_file_and_unquantized_linears_are_accepted(copy):
    folder = copy / "transformer"
    tensors = _merge_to_single(folder)
    w = tensors.pop("input_proj.weight").to(torch.bfloat16) * tensors.pop("input_proj.weight_scale")[:, None].to(torch.bfloat16)
    tensors["input_proj.weight"] = w                               # a bf16 Linear among FP8 ones
    save_file(tensors, folder / "diffusion_pytorch_model.safetensors")
    comp = open_checkpoint(copy).components["transformer"]
    assert comp.files.index is None and "input_proj.weight" not in comp.quantized
    dit = load_dit(comp)
    assert type(dit.input_proj) is torch.nn.Linear and dit.input_proj.weight.dtype == torch.bfloat16


def test_writer_is_deterministic_and_seeded(ckpt, tmp_path):
    def digest(root):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted((root / "transformer").glob("*.safetensors"))}
    again = write_checkpoint(tmp_path / "again", "tiny", seed=0)
    assert digest(again) == digest(ckpt)
    other = write_checkpoint(tmp_path / "other", "tiny", seed=1)
    assert digest(other) != digest(ckpt)
    a = load_file(next((ckpt / "transformer").glob("*00001*")))
    b = load_file(next((ckpt / "unconditional_transformer").glob("*00001*")))
    k = "input_proj.weight_scale"
    assert not torch.equal(a[k], b[k])                           # two different weight sets


def test_write_is_atomic(tmp_path, monkeypatch):
    def broken(folder):
        raise RuntimeError("disk full (simulated)")
    monkeypatch.setattr(writer_mod, "write_tokenizer", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_checkpoint(tmp_path / "ck", "tiny", seed=0)
    assert list(tmp_path.iterdir()) == []                         # no half-written folder, no temp left
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        write_checkpoint(tmp_path / "exists", "tiny")
    with pytest.raises(ValueError, match="unknown synthetic config 'huge'"):
        write_checkpoint(tmp_path / "x", "huge")


def test_refuses_missing_component(copy):
    shutil.rmtree(copy / "vae")
    with pytest.raises(CheckpointError, match="missing component folder\\(s\\) vae"):
        open_checkpoint(copy)


def test_refuses_missing_weights_file(copy):
    for f in (copy / "unconditional_transformer").glob("*.safetensors*"):
        f.unlink()
    with pytest.raises(CheckpointError, match="no diffusion_pytorch_model.safetensors and no"):
        open_checkpoint(copy)


def test_refuses_missing_shard(copy):
    next((copy / "transformer").glob("*00002-of*")).unlink()
    with pytest.raises(CheckpointError, match="shard\\(s\\) missing: diffusion_pytorch_model-00002"):
        open_checkpoint(copy)


def test_refuses_nf4(copy):
    folder = copy / "transformer"
    tensors = _merge_to_single(folder)
    tensors["layers.0.attention.qkv.weight.quant_state.bitsandbytes__nf4"] = torch.zeros(4, dtype=torch.uint8)
    save_file(tensors, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="bitsandbytes NF4 checkpoint.*ideogram-4-fp8"):
        open_checkpoint(copy)


def test_refuses_nf4_text_encoder_config(copy):
    path = copy / "text_encoder" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quantization_config \\(bitsandbytes\\).*not supported"):
        open_checkpoint(copy)


def test_refuses_fp8_weight_without_scale(copy):
    folder = copy / "unconditional_transformer"
    tensors = _merge_to_single(folder)
    del tensors["layers.1.feed_forward.w2.weight_scale"]
    save_file(tensors, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="FP8 weight 'layers.1.feed_forward.w2.weight' has no scale"):
        open_checkpoint(copy)


def test_refuses_wrong_dtype_and_shape(copy):
    folder = copy / "transformer"
    tensors = _merge_to_single(folder)
    tensors["layers.0.ffn_norm1.weight"] = tensors["layers.0.ffn_norm1.weight"].to(torch.int32)
    tensors["layers.1.attention.o.weight"] = tensors["layers.1.attention.o.weight"][:, :100].contiguous()
    tensors["adaln_proj.weight_scale"] = tensors["adaln_proj.weight_scale"][:10].contiguous()
    tensors["layers.0.attention.qkv.weight"] = tensors["layers.0.attention.qkv.weight"].to(torch.float8_e5m2)
    save_file(tensors, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(copy)
    msg = str(e.value)
    assert "'layers.0.ffn_norm1.weight' has dtype I32, expected one of BF16, F16, F32" in msg
    assert "'layers.1.attention.o.weight' has shape (512, 100), expected (512, 512)" in msg
    assert "scale 'adaln_proj.weight_scale' has shape (10,), expected (64,)" in msg
    assert "'layers.0.attention.qkv.weight' has dtype F8_E5M2" in msg


def test_refuses_missing_and_unexpected_tensors(copy):
    folder = copy / "transformer"
    tensors = _merge_to_single(folder)
    del tensors["final_layer.linear.bias"]
    tensors["layers.9.attention.qkv.weight"] = torch.zeros(3, 3)
    save_file(tensors, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="(?s)missing tensor 'final_layer.linear.bias'.*unexpected tensor"
                                              "\\(s\\): 'layers.9.attention.qkv.weight'"):
        open_checkpoint(copy)


def test_refuses_config_that_disagrees_with_weights(copy):
    path = copy / "transformer" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["num_layers"] = 3
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing tensor 'layers.2.attention.qkv.weight'"):
        open_checkpoint(copy)


def test_refuses_fp8_text_encoder_without_flag(copy):
    path = copy / "text_encoder" / "config.json"
    cfg = json.loads(path.read_text())
    del cfg["ideogram_fp8_weight_only"]
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="FP8 but config.json lacks \"ideogram_fp8_weight_only\": true"):
        open_checkpoint(copy)


def test_refuses_vae_index_only(copy):
    vae = copy / "vae"
    tensors = load_file(vae / "diffusion_pytorch_model.safetensors")
    (vae / "diffusion_pytorch_model.safetensors").unlink()
    write_sharded(vae, "diffusion_pytorch_model", tensors.items(), max_shard_bytes=1 << 20)
    with pytest.raises(CheckpointError, match="only the single file diffusion_pytorch_model.safetensors"):
        open_checkpoint(copy)


def test_refuses_corrupt_file(copy):
    f = copy / "vae" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(b"\x00" * 7)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        open_checkpoint(copy)


def test_refuses_missing_tokenizer(copy):
    (copy / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json missing"):
        open_checkpoint(copy)
