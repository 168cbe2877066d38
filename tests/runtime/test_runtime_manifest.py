"""The runtime's reading of the engines folder (runtime/manifest.py): typed accessors over a real export, a
clear ManifestError for every way the folder can be broken, and sha256 verification with its in-process
cache."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from ideogram4_engine.export.reference.dit import rope_inv_freq
from ideogram4_engine.runtime import contract
from ideogram4_engine.runtime import verify as verify_mod
from ideogram4_engine.runtime.manifest import Manifest, ManifestError, load_manifest
from ideogram4_engine.runtime.verify import forget_verified, verify
from ideogram4_engine.runtime.packing import MAX_ASPECT, MAX_SIDE, MAX_TEXT_TOKENS, MIN_SIDE, PIXELS_PER_TOKEN
from ideogram4_engine.runtime.schedule import DEFAULT_PRESET, PRESETS
from ideogram4_engine.runtime.tokenizer import PromptTokenizer

COMPONENTS = ("text_encoder", "dit_cond", "dit_uncond", "vae_decoder")


@pytest.fixture(scope="module")
def engines(tiny_engines) -> Path:
    return tiny_engines


@pytest.fixture()
def copy(engines, tmp_path) -> Path:
    """A private copy of the engines folder to break."""
    dst = tmp_path / "tiny"
    shutil.copytree(engines, dst)
    return dst


def _edit(folder: Path, change) -> None:
    raw = json.loads((folder / "manifest.json").read_text())
    change(raw)
    (folder / "manifest.json").write_text(json.dumps(raw))


def test_accessors(engines):
    m = load_manifest(engines)
    raw = json.loads((engines / "manifest.json").read_text())
    assert isinstance(m, Manifest) and m.root == engines.absolute() and m.raw == raw
    assert m.presets == PRESETS and m.default_preset == DEFAULT_PRESET
    assert m.preset() == PRESETS[DEFAULT_PRESET] and m.preset("V4_TURBO_12") == PRESETS["V4_TURBO_12"]
    with pytest.raises(ValueError, match="unknown sampler preset 'nope'; allowed: V4_QUALITY_48"):
        m.preset("nope")
    dit = raw["model"]["dit"]
    expected = rope_inv_freq(dit["head_dim"], dit["rope_theta"]).numpy()
    assert m.inv_freq.dtype == np.float32 and np.array_equal(m.inv_freq, expected)
    assert not (m.inv_freq.view(np.uint32) & 0xFFFF).any()          # the bf16-rounded table (test_dit pins it)
    assert m.head_dim == dit["head_dim"] == 2 * len(m.inv_freq)
    assert m.mrope_section == tuple(dit["mrope_section"]) and isinstance(m.mrope_section, tuple)
    assert m.image_position_offset == 65536
    assert m.limits == {"min_side": MIN_SIDE, "max_side": MAX_SIDE, "multiple": PIXELS_PER_TOKEN,
                        "max_aspect": MAX_ASPECT, "max_text_tokens": MAX_TEXT_TOKENS}
    assert m.max_text_tokens == MAX_TEXT_TOKENS
    assert m.synthetic is not None and m.synthetic["config"] == "tiny"
    assert set(COMPONENTS) <= set(m.components)
    for name in COMPONENTS:
        assert m.variants(name) == ("bf16", "cuda", "cpu", "cuda_dql", "cpu_dql", "cuda_fused", "cuda_fused_dql")
        for variant in m.variants(name):
            assert m.graph_path(name, variant).is_file()
        assert m.graph_path(name, "bf16") == engines.absolute() / f"{name}.onnx"
        assert m.data_path(name) == engines.absolute() / f"{name}.onnx.data"
        assert m.input_names(name) == [io["name"] for io in raw["components"][name]["inputs"]]
        assert m.output_names(name) == [io["name"] for io in raw["components"][name]["outputs"]]
    assert m.input_names("dit_cond") == ["latents", "tau", "rope_cos", "rope_sin", "text_features"]
    files = {e["file"] for c in raw["components"].values()
             for e in [*c["graphs"].values(), c.get("data"), c.get("dequantize", {}).get("graph")] if e}
    files |= {e["file"] for c in raw["components"].values() for p in (c.get("first_block_cache") or {}).values()
              for e in p["graphs"].values()}                                  # the first-block cache's pieces
    files |= {raw["first_block_cache"][op]["graph"]["file"] for op in ("residual_change", "residual_extrapolate")}
    assert sorted(e["file"] for e in m.file_entries()) == sorted(files)
    assert [e["file"] for e in m.file_entries("vae_decoder")] == [
        "vae_decoder.onnx", "vae_decoder.cuda.onnx", "vae_decoder.cpu.onnx", "vae_decoder.cuda_dql.onnx",
        "vae_decoder.cpu_dql.onnx", "vae_decoder.onnx.data"]
    assert "dequantize.onnx" in [e["file"] for e in m.file_entries("dit_cond")]
    for name, comp in raw["components"].items():                 # e.g. a weightless helper graph
        if "data" not in comp:
            assert m.data_path(name) is None
    cpu = m.files_for_variant("cpu")
    assert "dit_cond.cpu.onnx" in cpu and "dit_cond.onnx.data" in cpu and "dit_cond.onnx" not in cpu
    assert len(cpu) == len(set(cpu)) and all((engines / f).is_file() for f in cpu) and "dequantize.onnx" not in cpu
    dql = m.files_for_variant("cuda_dql")
    assert "dit_cond.cuda_dql.onnx" in dql and "dit_cond.onnx.data" in dql and dql.count("dequantize.onnx") == 1
    assert m.files_for_variant("bf16", ["vae_decoder"]) == ["vae_decoder.onnx", "vae_decoder.onnx.data"]
    with pytest.raises(ManifestError, match="no 'fp4' graph; allowed: bf16, cuda, cpu, cuda_dql, cpu_dql"):
        m.graph_path("dit_cond", "fp4")
    with pytest.raises(ManifestError, match="no component 'unet'"):
        m.input_names("unet")
    tok = PromptTokenizer.from_folder(m.tokenizer_folder, max_tokens=m.max_text_tokens)
    assert tok.encode("hello")[-3:] == tok.encode("x")[-3:]


def test_missing_folder_and_manifest(tmp_path, copy):
    with pytest.raises(ManifestError, match=r"engines folder .*nowhere does not exist"):
        load_manifest(tmp_path / "nowhere")
    (copy / "manifest.json").unlink()
    with pytest.raises(ManifestError, match=r"tiny is not an engines folder: manifest\.json is missing: run "
                                            r"`make export`"):
        load_manifest(copy)


def test_garbage_json(copy):
    (copy / "manifest.json").write_text('{"format": "ideogram4-engine/manifest", "format_version": 1,')
    with pytest.raises(ManifestError, match=r"manifest\.json is not valid JSON"):
        load_manifest(copy)
    (copy / "manifest.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ManifestError, match=r"manifest\.json is not valid JSON"):
        load_manifest(copy)
    (copy / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ManifestError, match="must hold a JSON object"):
        load_manifest(copy)


def test_wrong_format_or_version(copy):
    """Formats 1 (before the bf16 rotary table) and 2 (before the tokenizer checksums) and unknown versions are
    refused, never used."""
    for version in (1, 2, 4):
        _edit(copy, lambda r: r.update(format_version=version))
        with pytest.raises(ManifestError, match=rf"manifest\.json: `format_version` is {version}; this runtime reads "
                                                r"version\(s\) 3: .*re-run `make export`"):
            load_manifest(copy)
    _edit(copy, lambda r: r.update(format_version=3, format="something-else"))
    with pytest.raises(ManifestError, match="`format` is 'something-else', expected 'ideogram4-engine/manifest'"):
        load_manifest(copy)


@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("rope"), r"`manifest` lacks 'rope'"),
    (lambda r: r.pop("sampler"), r"`manifest` lacks 'sampler'"),
    (lambda r: r["components"].pop("dit_uncond"), r"component\(s\) dit_uncond missing from `components`"),
    (lambda r: r["components"]["vae_decoder"]["graphs"].pop("cpu"), r"`components.vae_decoder.graphs` lacks the cpu"),
    (lambda r: r["components"]["dit_cond"].pop("inputs"), r"`components.dit_cond` lacks 'inputs'"),
    (lambda r: r["components"]["dit_cond"]["data"].update(sha256="xyz"), r"`components.dit_cond.data.sha256` must be"),
    (lambda r: r["components"]["dit_cond"]["data"].update(file="../escape.bin"), r"relative path inside the folder"),
    (lambda r: r["rope"].update(inv_freq=[1.0, 0.5]), r"`rope.inv_freq` must be 128 numbers"),
    (lambda r: r["rope"].update(inv_freq=[1.0 / 5e6 ** (i / 128) for i in range(128)]),
     r"`rope.inv_freq` is not bf16-rounded .* re-run `make export`"),
    (lambda r: r["rope"].update(mrope_section=[24, 20]), r"`rope.mrope_section` must be 3"),
    (lambda r: r["sampler"].update(default_preset="FAST"), r"`sampler.default_preset` 'FAST' is not one of"),
    (lambda r: r["sampler"]["presets"]["V4_TURBO_12"].update(steps=11), r"has 12 entries, expected one per step \(11\)"),
    (lambda r: r["limits"].pop("max_side"), r"`limits` lacks 'max_side'"),
    (lambda r: r["components"]["dit_cond"]["dequantize"]["weights"][3]["scale"].update(offset=1 << 40),
     r"`components.dit_cond.dequantize.weights\[3\].scale` must be \{offset, bytes, shape, dtype\} inside the data file"),
    (lambda r: r["components"]["text_encoder"]["dequantize"].update(weights=[]),
     r"`components.text_encoder.dequantize.weights\[0\]` must be \{input, axis, weight, scale\}"),
    (lambda r: r["tokenizer"].update(max_text_tokens="2048"), r"`tokenizer.max_text_tokens` must be a positive"),
])
def test_structure_errors(copy, change, message):
    _edit(copy, change)
    with pytest.raises(ManifestError, match=message) as e:
        load_manifest(copy)
    assert "manifest.json" in str(e.value)


def test_missing_files(copy):
    (copy / "dit_cond.cuda.onnx").unlink()
    with pytest.raises(ManifestError, match=r"file .*dit_cond\.cuda\.onnx named by the manifest is missing"):
        load_manifest(copy)


def test_missing_tokenizer(copy):
    (copy / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(ManifestError, match=r"tokenizer file .*tokenizer\.json is missing"):
        load_manifest(copy)
    shutil.rmtree(copy / "tokenizer")
    with pytest.raises(ManifestError, match=r"tokenizer folder .*tokenizer is missing"):
        load_manifest(copy)


def test_truncated_file_is_caught_at_load(copy):
    data = copy / "vae_decoder.onnx.data"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size - 100)
    with pytest.raises(ManifestError, match=r"vae_decoder\.onnx\.data is \d+ bytes, the manifest says \d+ "
                                            r"\(truncated or replaced"):
        load_manifest(copy)


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def test_verify_detects_a_flipped_byte(copy):
    m = load_manifest(copy)
    assert verify(m) == [e["file"] for e in [*m.file_entries(), *m.tokenizer_entries]]
    data = copy / "dit_uncond.onnx.data"
    expected = m.components["dit_uncond"]["data"]["sha256"]
    _flip_byte(data, data.stat().st_size // 2)
    m = load_manifest(copy)                             # same size: load cannot tell
    with pytest.raises(ManifestError) as e:
        verify(m)
    msg = str(e.value)
    assert "dit_uncond.onnx.data" in msg and "sha256 mismatch" in msg and f"expected {expected}" in msg
    actual = verify_mod._sha256(data)
    assert f"actual {actual}" in msg and actual != expected
    assert verify(m, ["dit_cond"]) == []                 # other components are still fine (and cached)
    with pytest.raises(ManifestError, match="dit_uncond.onnx.data"):
        verify(m, ["dit_uncond.onnx.data"])
    with pytest.raises(ManifestError, match="'nope.onnx' is neither a file nor a component"):
        verify(m, ["nope.onnx"])


def test_verify_cache(copy, monkeypatch):
    forget_verified()
    m = load_manifest(copy)
    calls = []
    real = verify_mod._sha256
    monkeypatch.setattr(verify_mod, "_sha256", lambda p, *a: calls.append(Path(p).name) or real(p, *a))
    assert verify(m, ["text_encoder"]) == ["text_encoder.onnx", "text_encoder.cuda.onnx", "text_encoder.cpu.onnx",
                                           "text_encoder.cuda_dql.onnx", "text_encoder.cpu_dql.onnx",
                                           "text_encoder.cuda_fused.onnx", "text_encoder.cuda_fused_dql.onnx",
                                           "text_encoder.onnx.data", "dequantize.onnx"]
    first = len(calls)
    assert first == 9
    assert verify(m, ["text_encoder"]) == [] and len(calls) == first          # nothing re-read
    assert verify(load_manifest(copy), ["text_encoder.onnx"]) == []           # a fresh Manifest shares it
    # a changed file is read again even if its mtime is put back (size/mtime/ctime/inode make the key)
    data = copy / "text_encoder.onnx.data"
    st = data.stat()
    time.sleep(0.05)
    _flip_byte(data, 0)
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ManifestError, match=r"text_encoder\.onnx\.data: sha256 mismatch"):
        verify(m, ["text_encoder.onnx.data"])
    assert calls[-1] == "text_encoder.onnx.data"
    _flip_byte(data, 0)                                  # restored: verifies again, then is cached
    assert verify(m, ["text_encoder.onnx.data"]) == ["text_encoder.onnx.data"]
    assert verify(m, ["text_encoder.onnx.data"]) == []
    forget_verified()
    assert verify(m, ["text_encoder.onnx"]) == ["text_encoder.onnx"]


def test_verify_streams_in_chunks(copy, monkeypatch):
    """Hashing reads bounded chunks, never the whole file at once."""
    monkeypatch.setattr(verify_mod, "HASH_CHUNK", 4096)
    forget_verified()
    m = load_manifest(copy)
    sizes = []
    real_open = open

    class Spy:
        def __init__(self, f):
            self.f = f

        def readinto(self, buf):
            sizes.append(len(buf))
            return self.f.readinto(buf)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(contract, "open", lambda *a, **k: Spy(real_open(*a, **k)), raising=False)
    verify(m, ["vae_decoder.onnx.data"])
    assert sizes and max(sizes) == 4096 and len(sizes) > (copy / "vae_decoder.onnx.data").stat().st_size // 4096
