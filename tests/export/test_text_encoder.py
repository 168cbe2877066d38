"""Qwen3-VL text encoder reference + synthetic writer, checked against transformers' own Qwen3-VL code."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, Qwen3VLModel, Qwen3VLTextModel

from ideogram4_engine.export.reference.fp8 import FP8Linear
from ideogram4_engine.export.synthetic.common import write_sharded
from ideogram4_engine.export.synthetic.text_encoder import text_encoder_config_json, text_encoder_tensors
from ideogram4_engine.export.reference.text_encoder import (
    OFFICIAL_TAPS, is_fp8_weight_only, load_text_encoder, load_text_encoder_config, tap_layers,
    text_encoder_inventory)

TINY = dict(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
            mrope_section=(4, 2, 2))
HIDDEN, LAYERS, VOCAB = 64, 4, 151936
SEED = 7


def rand_ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def write_te(folder: Path, *, fp8: bool = True, max_shard_bytes: int | None = None,
             edit=None, config: dict | None = None) -> Path:
    """config.json + weights; `edit(dict)` may drop/add tensors before writing."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = config or text_encoder_config_json(**TINY)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    text_config = AutoConfig.from_pretrained(str(folder)).text_config
    tensors = text_encoder_tensors(text_config, seed=SEED, fp8=fp8)
    if edit is not None:
        tensors = dict(tensors)
        edit(tensors)
        tensors = tensors.items()
    if max_shard_bytes is None:
        write_sharded(folder, "model", tensors)
    else:
        write_sharded(folder, "model", tensors, max_shard_bytes)
    return folder


@pytest.fixture(scope="module")
def te_dir(tmp_path_factory) -> Path:
    return write_te(tmp_path_factory.mktemp("te") / "text_encoder")


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory) -> Path:
    """Two+ shards, plus a stored vision tensor and a rotary buffer, both of which must be ignored."""
    def extra(t: dict) -> None:
        t["visual.patch_embed.proj.weight"] = torch.zeros(4, 3, dtype=torch.bfloat16)
        t["language_model.rotary_emb.inv_freq"] = torch.ones(8)
    return write_te(tmp_path_factory.mktemp("te_sh") / "text_encoder", max_shard_bytes=1 << 20, edit=extra)


@pytest.fixture(scope="module")
def encoder(te_dir):
    return load_text_encoder(te_dir)


# --------------------------------------------------------------------------------------------- taps

def test_tap_layers():
    assert tap_layers(36) == OFFICIAL_TAPS == (0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 35)
    assert tap_layers(4) == (0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3)
    for n in range(1, 41):
        taps = tap_layers(n)
        assert len(taps) == 13 and taps[0] == 0 and taps[-1] == n - 1
        assert list(taps) == sorted(taps)


# ---------------------------------------------------------------------------------------- inventory

def test_inventory_matches_transformers(te_dir):
    config = load_text_encoder_config(te_dir)
    sd = Qwen3VLModel(config).state_dict()
    ours = {k: tuple(v.shape) for k, v in sd.items() if not k.startswith("visual.")}
    assert all(k.startswith("language_model.") for k in ours)
    inv = text_encoder_inventory(config.text_config, fp8=True)
    assert {k: s.shape for k, s in inv.items()} == ours
    projections = {k for k, s in inv.items() if s.kind == "linear"}
    assert len(projections) == 7 * LAYERS and all(k.endswith("_proj.weight") for k in projections)
    assert all(s.kind == "float" for s in text_encoder_inventory(config.text_config, fp8=False).values())


def test_real_size_parameter_count():
    """Spec §3.1: 622,329,856 + 36 x 192,946,432 + 4,096 = 7,568,405,504 parameters."""
    real = text_encoder_config_json(hidden_size=4096, num_layers=36, num_heads=32, num_kv_heads=8,
                                    head_dim=128, intermediate_size=12288)["text_config"]
    inv = text_encoder_inventory(real, fp8=True)
    numel = lambda s: torch.Size(s.shape).numel()  # noqa: E731
    assert numel(inv["language_model.embed_tokens.weight"]) == 622_329_856
    assert sum(numel(s) for k, s in inv.items() if ".layers.0." in k) == 192_946_432
    assert sum(numel(s) for s in inv.values()) == 7_568_405_504


@pytest.mark.parametrize("fp8", [True, False])
def test_written_tensors_match_inventory(te_dir, fp8):
    text_config = load_text_encoder_config(te_dir).text_config
    inv = text_encoder_inventory(text_config, fp8=fp8)
    written = dict(text_encoder_tensors(text_config, seed=SEED, fp8=fp8))
    expected = set(inv) | ({k + "_scale" for k, s in inv.items() if s.kind == "linear"} if fp8 else set())
    assert set(written) == expected
    for k, spec in inv.items():
        t = written[k]
        assert tuple(t.shape) == spec.shape, k
        if fp8 and spec.kind == "linear":
            assert t.dtype == torch.float8_e4m3fn, k
            s = written[k + "_scale"]
            assert s.dtype == torch.float32 and tuple(s.shape) == (spec.shape[0],), k
        else:
            assert t.dtype == torch.bfloat16, k
    # deterministic per name, and different names differ
    again = dict(text_encoder_tensors(text_config, seed=SEED, fp8=fp8))
    k = "language_model.layers.2.mlp.up_proj.weight"
    assert torch.equal(written[k].view(torch.uint8) if fp8 else written[k],
                       again[k].view(torch.uint8) if fp8 else again[k])
    assert not torch.equal(written[k].float(), written[k.replace("up_proj", "gate_proj")].float())


# ------------------------------------------------------------------------------- encode vs transformers

def reference_model(folder: Path, attn: str = "sdpa") -> Qwen3VLTextModel:
    """transformers' own text model with the checkpoint dequantized (bf16(q)*bf16(s)) into plain Linears."""
    config = AutoConfig.from_pretrained(str(folder))
    raw: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("model*.safetensors")):
        raw.update(load_file(str(f)))
    sd = {}
    for k, t in raw.items():
        if not k.startswith("language_model.") or k.endswith("_scale") or k.endswith("inv_freq"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            t = t.to(torch.bfloat16) * raw[k + "_scale"].to(torch.bfloat16)[:, None]
        sd[k[len("language_model."):]] = t
    # built the way from_pretrained(dtype=bf16) builds it: bf16 parameters, fp32 rotary inv_freq (a plain
    # .to(bfloat16) would round inv_freq to bf16 and move every RoPE angle)
    model = Qwen3VLTextModel._from_config(config.text_config, dtype=torch.bfloat16).eval()
    assert model.rotary_emb.inv_freq.dtype == torch.float32
    model.load_state_dict(sd, strict=True)
    model.set_attn_implementation(attn)
    return model


@pytest.mark.parametrize("which", ["single", "sharded"])
def test_encode_matches_transformers(which, te_dir, sharded_dir):
    folder = te_dir if which == "single" else sharded_dir
    if which == "sharded":
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) >= 2
        assert not (folder / "model.safetensors").exists()
    enc = load_text_encoder(folder)
    ids = rand_ids(11, seed=3)
    feats = enc.encode_prompt(ids)
    assert feats.shape == (11, 13 * HIDDEN) and feats.dtype == torch.float32
    taps = feats.view(11, HIDDEN, 13)  # f = d*13 + j

    ref = reference_model(folder)
    with torch.inference_mode():
        out = ref(input_ids=ids[None], output_hidden_states=True)
        hs = out.hidden_states
        # HF convention in 5.23: L+1 entries, [0] = embeddings, [i+1] = output of layer i, and the last entry
        # is replaced by the final-normed last_hidden_state.
        assert len(hs) == LAYERS + 1
        assert torch.equal(hs[0][0], ref.embed_tokens(ids))
        assert torch.equal(hs[-1], out.last_hidden_state)
        last = taps[..., -1].to(torch.bfloat16)
        assert torch.equal(ref.norm(last), hs[-1][0])
        assert not torch.allclose(last.float(), hs[-1][0].float(), atol=1e-2)
        ref.norm = nn.Identity()  # now hidden_states[L] is the raw output of the last layer
        hs = ref(input_ids=ids[None], output_hidden_states=True).hidden_states
    for j, layer in enumerate(tap_layers(LAYERS)):
        assert torch.equal(taps[..., j], hs[layer + 1][0].float()), (j, layer)

    # the interleaved layout, spelled out
    for d, j in [(0, 0), (5, 12), (63, 7), (17, 3)]:
        layer = tap_layers(LAYERS)[j]
        assert torch.equal(feats[:, d * 13 + j], hs[layer + 1][0, :, d].float())
    assert not torch.equal(feats[:, :HIDDEN], hs[1][0].float())  # not 13 contiguous blocks

    # an independent attention kernel (eager softmax) agrees within bf16 rounding
    eager = reference_model(folder, attn="eager")
    eager.norm = nn.Identity()
    with torch.inference_mode():
        hs_e = eager(input_ids=ids[None], output_hidden_states=True).hidden_states
    for j, layer in enumerate(tap_layers(LAYERS)):
        torch.testing.assert_close(taps[..., j], hs_e[layer + 1][0].float(), rtol=2e-2, atol=5e-2)


def test_fp8_projections_are_swapped(encoder):
    lm = encoder.language_model
    fp8 = [n for n, m in lm.named_modules() if isinstance(m, FP8Linear)]
    plain = [n for n, m in lm.named_modules() if isinstance(m, nn.Linear)]
    assert len(fp8) == 7 * LAYERS and not plain
    assert lm.embed_tokens.weight.dtype == torch.bfloat16 and lm.norm.weight.dtype == torch.bfloat16


def test_causality(encoder, te_dir):
    ids = rand_ids(16, seed=5)
    full = encoder.encode_prompt(ids)
    eager = load_text_encoder(te_dir, attn_implementation="eager")
    full_eager = eager.encode_prompt(ids)
    for k in (1, 6, 15):
        assert torch.equal(eager.encode_prompt(ids[:k]), full_eager[:k])  # eager: bit-exact
        # sdpa's CPU kernel blocks by length: equal up to bf16 rounding (a causality bug would be O(1))
        diff = (encoder.encode_prompt(ids[:k]) - full[:k]).abs()
        assert diff.max() < 0.05 and diff.mean() < 0.01, (k, diff.max(), diff.mean())
    # later tokens do see earlier ones: changing token 0 changes token 5's features
    other = ids.clone()
    other[0] = (ids[0] + 1) % VOCAB
    assert not torch.allclose(encoder.encode_prompt(other)[5], full[5])


def test_batch_with_padding_mask(encoder):
    a, b = rand_ids(9, seed=11), rand_ids(5, seed=12)
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, 4:], mask[1, 4:] = b, 1  # left padding
    out = encoder.encode(ids, mask)
    torch.testing.assert_close(out[0], encoder.encode_prompt(a), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1, 4:], encoder.encode_prompt(b), rtol=0, atol=1e-6)
    assert torch.count_nonzero(out[1, :4]) == 0


def test_tap_statistics(encoder):
    n = 32
    taps = encoder.encode_prompt(rand_ids(n, seed=9)).view(n, HIDDEN, 13)
    assert torch.isfinite(taps).all()
    layers = tap_layers(LAYERS)
    for j, layer in enumerate(layers):
        x = taps[..., j]
        std, per_dim_token_std = x.std().item(), x.std(dim=0).mean().item()
        assert 0.1 < std < 10, (j, std)
        assert per_dim_token_std > 0.3 * std, (j, per_dim_token_std, std)  # not constant across tokens
        assert torch.cdist(x, x).add(torch.eye(n) * 1e3).min() > 0.1  # every token distinct
    firsts = {layer: j for j, layer in reversed(list(enumerate(layers)))}
    for l1 in firsts:
        for l2 in firsts:
            if l1 < l2:
                assert (taps[..., firsts[l1]] - taps[..., firsts[l2]]).abs().mean() > 0.05
    # repeated synthetic taps are the same layer's output
    assert torch.equal(taps[..., 0], taps[..., 1])


# ------------------------------------------------------------------------------------ config / refusals

def test_config(te_dir, tmp_path):
    raw = json.loads((te_dir / "config.json").read_text())
    assert raw["ideogram_fp8_weight_only"] is True and is_fp8_weight_only(raw)
    config = load_text_encoder_config(te_dir)
    assert type(config).__name__ == "Qwen3VLConfig" and is_fp8_weight_only(config)
    tc = config.text_config
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_key_value_heads, tc.head_dim) == (64, 4, 2, 16)
    assert tc.rope_parameters["rope_theta"] == 5_000_000 and list(tc.rope_parameters["mrope_section"]) == [4, 2, 2]
    assert tc.rms_norm_eps == 1e-6 and tc.attention_bias is False and config.tie_word_embeddings is False
    assert not is_fp8_weight_only({"text_config": {}})

    # legacy RoPE keys give the same rope parameters
    legacy = json.loads(json.dumps(raw))
    rp = legacy["text_config"].pop("rope_parameters")
    legacy["text_config"]["rope_theta"] = rp.pop("rope_theta")
    legacy["text_config"]["rope_scaling"] = rp
    (tmp_path / "legacy").mkdir()
    (tmp_path / "legacy" / "config.json").write_text(json.dumps(legacy))
    assert load_text_encoder_config(tmp_path / "legacy").text_config.rope_parameters["rope_theta"] == 5_000_000

    # no theta anywhere: transformers would silently use 5e5
    del legacy["text_config"]["rope_theta"]
    (tmp_path / "legacy" / "config.json").write_text(json.dumps(legacy))
    with pytest.raises(ValueError, match="rope_theta"):
        load_text_encoder_config(tmp_path / "legacy")

    with pytest.raises(ValueError, match="head_dim/2"):
        text_encoder_config_json(**{**TINY, "mrope_section": (24, 20, 20)})


def test_nf4_config_refused(tmp_path):
    cfg = text_encoder_config_json(**TINY)
    del cfg["ideogram_fp8_weight_only"]
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                  "bnb_4bit_quant_type": "nf4"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"quantization_config.*bitsandbytes.*ideogram-4-fp8"):
        load_text_encoder_config(tmp_path)
    with pytest.raises(ValueError, match="quantization_config"):
        load_text_encoder(tmp_path)


def test_bad_checkpoints_refused(tmp_path):
    name = "language_model.layers.1.self_attn.k_proj.weight"
    write_te(tmp_path / "noscale", edit=lambda t: t.pop(name + "_scale"))
    with pytest.raises(ValueError, match=rf"{name}.*weight_scale is missing"):
        load_text_encoder(tmp_path / "noscale")
    write_te(tmp_path / "extra", edit=lambda t: t.update({"lm_head.weight": torch.zeros(2, 2)}))
    with pytest.raises(ValueError, match="unexpected.*lm_head.weight"):
        load_text_encoder(tmp_path / "extra")
    write_te(tmp_path / "missing", edit=lambda t: t.pop("language_model.norm.weight"))
    with pytest.raises(ValueError, match=r"missing.*language_model\.norm\.weight"):
        load_text_encoder(tmp_path / "missing")


def test_bf16_checkpoint_loads(tmp_path, encoder):
    """No scales -> plain bf16 Linears; same fp32 draws as the FP8 checkpoint, so features nearly agree."""
    enc = load_text_encoder(write_te(tmp_path / "bf16", fp8=False))
    lm = enc.language_model
    assert not any(isinstance(m, FP8Linear) for m in lm.modules())
    assert lm.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    ids = rand_ids(12, seed=4)
    a, b = enc.encode_prompt(ids), encoder.encode_prompt(ids)
    assert torch.isfinite(a).all() and not torch.equal(a, b)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
