"""`make engines` on the CPU: the tiny graphs build with TensorRT-RTX (ahead of time, no GPU), the manifest's engines
section and checksums, the layer reports and their checks (FP8 weights kept, one fused attention kernel per block),
reuse, and every refusal. Nothing here executes an engine (no GPU here; TensorRT-RTX refuses Hopper anyway)."""
import hashlib
import importlib
import json
import shutil
import types
from dataclasses import replace

import pytest

from ideogram4_engine.export import engines as E
from ideogram4_engine.export.to_onnx import ExportOptions, export
from ideogram4_engine.runtime.manifest import load_manifest

# Small buckets keep the build at a few seconds; at 256x256 the tiny VAE's single-head attention is *not* fused
# (TensorRT-RTX decomposes it), which a test below uses to show that the attention check can fail.
BUCKETS = "512x512,768x512"
OPTS = E.BuildOptions(buckets=E.parse_buckets(BUCKETS), max_text_tokens=64, opt_text_tokens=32)


from conftest import HAVE_RTX, NO_RTX  # noqa: E402
needs_rtx = pytest.mark.skipif(not HAVE_RTX, reason=NO_RTX)


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "tiny"
    export(tiny_checkpoint, out, ExportOptions(progress=False), log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def built(exported):
    if not HAVE_RTX:
        pytest.skip(NO_RTX)
    said = []
    section = E.build_engines(exported, "tensorrt-rtx", OPTS, say=said.append)
    return exported, section, said


# ---------------------------------------------------------------------------------------------- buckets

def test_default_buckets_are_the_official_table_plus_512_and_768():
    labels = [b.label for b in E.BuildOptions().buckets]
    assert labels == ["1024x1024", "1536x1024", "1024x1536", "1920x1088", "2048x768", "1024x1792", "1600x400",
                      "512x512", "768x768"]
    assert E.parse_bucket("1920x1088").grid == (68, 120) and E.parse_bucket("1920x1088").tokens == 8160


@pytest.mark.parametrize("text, words", [
    ("1000x1000", ["'1000x1000'", "width 1000", "multiple of 16", "256…2048"]),
    ("2064x1024", ["width 2064", "256…2048"]),
    ("1024x240", ["height 240"]),
    ("2048x256", ["aspect ratio 8.00:1", "6:1"]),
    ("1024", ["not WIDTHxHEIGHT", "e.g. 1024x1024"]),
])
def test_bad_buckets_are_refused_naming_value_and_rule(text, words):
    with pytest.raises(E.EngineBuildError) as e:
        E.parse_buckets(text)
    for w in words:
        assert w in str(e.value)


def test_bucket_list_dedupes_and_refuses_empty():
    assert [b.label for b in E.parse_buckets("512x512, 512X512,768x768")] == ["512x512", "768x768"]
    with pytest.raises(E.EngineBuildError, match="no buckets"):
        E.parse_buckets(" , ")


# ---------------------------------------------------------------------------------------------- profiles

def test_profiles_per_distinct_image_shape(exported):
    comps = json.loads((exported / "manifest.json").read_text())["components"]
    buckets = E.BuildOptions().buckets
    batch, text = (1, 1, 2), (1, 512, 2048)
    dit = E.component_profiles("dit_cond", comps["dit_cond"]["inputs"], buckets, batch, text)
    # 1536x1024, 1024x1536 and 2048x768 all have 6144 tokens: one DiT profile serves the three
    assert len(dit) == 7
    shared = next(p for p in dit if len(p["buckets"]) == 3)
    assert shared["buckets"] == ["1536x1024", "1024x1536", "2048x768"]
    assert shared["shapes"]["latents"] == {"min": [1, 6144, 128], "opt": [1, 6144, 128], "max": [2, 6144, 128]}
    assert shared["shapes"]["rope_cos"]["min"][1] == 6145 and shared["shapes"]["rope_cos"]["max"][1] == 6144 + 2048
    assert shared["shapes"]["text_features"]["opt"][1] == 512
    vae = E.component_profiles("vae_decoder", comps["vae_decoder"]["inputs"], buckets, batch, text)
    assert len(vae) == 9 and vae[1]["shapes"]["latents"]["min"] == [1, 64, 96, 128]      # 1536x1024: 64x96 grid
    te = E.component_profiles("text_encoder", comps["text_encoder"]["inputs"], buckets, batch, text)
    assert len(te) == 1 and te[0]["buckets"] == [] and te[0]["shapes"]["input_ids"]["max"] == [2, 2048]
    gs = E.component_profiles("guided_step", comps["guided_step"]["inputs"], buckets, batch, text)
    assert len(gs) == 7 and gs[0]["shapes"]["guidance"] == {"min": [1], "opt": [1], "max": [1]}


def test_unknown_dimension_is_refused():
    with pytest.raises(E.EngineBuildError, match="dimension 'frames'"):
        E.component_profiles("x", [{"name": "a", "shape": ["batch", "frames"]}], (), (1, 1, 1), (1, 1, 1))


# ---------------------------------------------------------------------------------------------- refusals

def test_no_builder_installed_names_both(monkeypatch):
    real = importlib.import_module

    def fake(name, *a, **k):
        if name in ("tensorrt", "tensorrt_rtx"):
            raise ImportError(f"No module named '{name}'")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(E.EngineBuildError) as e:
        E.load_toolkit()
    msg = str(e.value)
    assert "no TensorRT builder is installed" in msg and "tensorrt-rtx" in msg and "pip install tensorrt" in msg
    with pytest.raises(E.EngineBuildError, match="the tensorrt builder is not installed"):
        E.load_toolkit("tensorrt")
    assert E.main(["--engines", "nowhere", "--if-available"]) == 0          # what `make export` relies on
    with pytest.raises(E.EngineBuildError, match="unknown builder 'trt'"):
        E.load_toolkit("trt")


@needs_rtx
def test_missing_or_invalid_engines_folder_is_refused(tmp_path):
    with pytest.raises(E.EngineBuildError, match="does not exist.*make export"):
        E.build_engines(tmp_path / "absent", "tensorrt-rtx", OPTS)
    with pytest.raises(E.EngineBuildError, match="manifest.json is missing"):
        E.build_engines(tmp_path, "tensorrt-rtx", OPTS)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(E.EngineBuildError, match="not valid JSON"):
        E.build_engines(tmp_path, "tensorrt-rtx", OPTS)


@needs_rtx
def test_bad_options_are_refused_before_building(exported):
    before = sorted(p.name for p in exported.iterdir())
    for opts, match in [
        (E.BuildOptions(buckets=OPTS.buckets, max_text_tokens=4096), r"max text tokens 4096 .* 1…2048"),
        (E.BuildOptions(buckets=OPTS.buckets, max_batch=0), "max batch 0"),
        (E.BuildOptions(buckets=OPTS.buckets, compute_capabilities=("9.0",)), r"'9.0' is not one .*allowed: .*8.9"),
        (E.BuildOptions(buckets=OPTS.buckets, components=("vae",)), "vae not in"),
    ]:
        with pytest.raises(E.EngineBuildError, match=match):
            E.build_engines(exported, "tensorrt-rtx", opts)
    assert sorted(p.name for p in exported.iterdir()) == before


def test_full_tensorrt_refuses_compute_capabilities():
    tk = E.Toolkit("tensorrt", object())
    with pytest.raises(E.EngineBuildError, match="TensorRT-RTX option"):
        tk.set_targets(None, ("8.9",))
    assert tk.set_targets(None, None) == {"requested": None}


def test_cli_bad_bucket_exits_2(capsys):
    assert E.main(["--engines", "x", "--buckets", "1000x1000"]) == 2
    assert "multiple of 16" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- builds

@needs_rtx
def test_tiny_engines_build_and_are_recorded(built):
    folder, section, said = built
    import tensorrt_rtx
    assert section["builder"] == {"name": "tensorrt-rtx", "module": "tensorrt_rtx", "version": tensorrt_rtx.__version__}
    assert set(section["components"]) == set(E.ENGINE_COMPONENTS)
    assert section["buckets"] == ["512x512", "768x512"] and section["text_tokens"] == {"min": 1, "opt": 32, "max": 64}
    raw = json.loads((folder / "manifest.json").read_text())
    E.validate(raw)                                        # the schema's engines section
    load_manifest(folder)                                  # and the runtime's loader still accepts the manifest
    n_profiles = {"text_encoder": 1, "dit_cond": 2, "dit_uncond": 2, "vae_decoder": 2, "guided_step": 2}
    for c, e in section["components"].items():
        path = folder / e["file"]
        assert path.name == f"{c}.engine"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == e["sha256"] and path.stat().st_size == e["bytes"]
        assert e["graph"]["sha256"] == raw["components"][c]["graphs"]["bf16"]["sha256"]
        assert e["builder"] == section["builder"] and e["build_seconds"] > 0
        assert len(e["profiles"]) == n_profiles[c]
        insp = folder / e["inspection"]["file"]
        assert hashlib.sha256(insp.read_bytes()).hexdigest() == e["inspection"]["sha256"]
    # FP8 needs compute capability 8.9+: the builder dropped 8.0 and 8.6 from the FP8 engines and said so
    assert section["components"]["dit_cond"]["targets"]["compute_capabilities"] == ["8.9", "12.0"]
    assert "fp8" in section["components"]["dit_cond"]["targets"]["note"]
    assert section["components"]["guided_step"]["targets"]["compute_capabilities"] == ["8.0", "8.6", "8.9", "12.0"]
    assert section["compute_capabilities"] == ["8.9", "12.0"]
    assert not [p for p in folder.iterdir() if ".tmp-" in p.name]
    dit = section["components"]["dit_cond"]["profiles"]
    assert [p["buckets"] for p in dit] == [["512x512"], ["768x512"]]
    assert dit[1]["shapes"]["rope_sin"] == {"min": [1, 1537, 256], "opt": [1, 1568, 256], "max": [1, 1600, 256]}


@needs_rtx
def test_layer_reports_show_fp8_kept_and_fused_attention(built):
    folder, section, _ = built
    checks = E.check_engines(folder)              # reads the .layers.json files back
    for c in ("text_encoder", "dit_cond", "dit_uncond", "vae_decoder"):
        assert checks[c]["fp8_weights"]["status"] == "pass", checks[c]["fp8_weights"]
        assert checks[c]["attention"]["status"] == "pass", checks[c]["attention"]["detail"]
    assert checks["guided_step"]["fp8_weights"]["status"] == "n/a"
    assert checks["guided_step"]["attention"]["status"] == "n/a"
    dit = checks["dit_cond"]
    assert dit["attention"]["blocks"] == 2 and dit["attention"]["fused"] == 2           # tiny: 2 DiT layers
    assert all("mha" in b["kernel"] for b in dit["attention"]["per_block"])
    assert checks["text_encoder"]["attention"]["blocks"] == 36                          # tiny: the official 36 text layers
    f = dit["fp8_weights"]
    assert f["engine_fp8_constant_bytes_per_profile"] == [f["fp8_initializer_bytes"]] * 2
    assert f["weights_ratio"] <= 1.1
    report = json.loads((folder / "dit_cond.layers.json").read_text())
    assert report["source"] == "builder-log" and "inspector" in report["source_note"]
    assert report["summary"]["weights_memory_bytes"] == section["components"]["dit_cond"]["weights_bytes"]
    assert any(c["dtype"] == "FP8" for la in report["layers"] for c in la.get("constants", []))
    # tiny graphs: the compiled code is a large fixed share of the engine file (measured at full width in docs)
    print({c: checks[c]["fp8_weights"]["engine_bytes_ratio"] for c in checks})


def test_attention_check_fails_without_a_fused_kernel():
    layers = [{"name": "__fc1_myl0_1", "type": "kgen", "tactic": "", "inputs": [], "outputs": [], "constants": [],
               "metadata": ["Attention_7"]},
              {"name": "__myl_MaxrSubExpSumDiv_myl0_2", "type": "kgen", "tactic": "", "inputs": [], "outputs": [],
               "constants": [], "metadata": ["Attention_7"]}]
    report = {"graph": {"initializer_bytes": 0, "fp8_initializer_bytes": 0,
                        "attention_blocks": [{"form": "op", "anchor": "Attention_7", "core": ["Attention_7"]}]},
              "summary": {"engine_bytes": 10, "weights_memory_bytes": 0}, "layers": layers}
    att = E.run_checks(report)["attention"]
    assert att["status"] == "fail" and "Attention_7" in att["detail"] and "2 layer(s)" in att["detail"]
    layers.append({"name": "_gemm_mha_v2_myl0_3", "type": "kgen", "tactic": "", "inputs": [], "outputs": [],
                   "constants": [], "metadata": ["Attention_7"]})
    assert E.run_checks(report)["attention"]["status"] == "pass"


@needs_rtx
def test_small_vae_attention_is_reported_unfused(built, tmp_path):
    """At 256x256 (1024 tokens, one head) TensorRT-RTX 1.7 has no dedicated kernel and decomposes the VAE's
    attention into GEMM → softmax → GEMM: the check reports it instead of passing."""
    folder = tmp_path / "copy"
    shutil.copytree(built[0], folder)
    E.build_engines(folder, "tensorrt-rtx", E.BuildOptions(buckets=E.parse_buckets("256x256"), max_text_tokens=64,
                                                            components=("vae_decoder",)), say=lambda s: None)
    att = E.check_engines(folder)["vae_decoder"]["attention"]
    assert att["status"] == "fail" and att["per_block"][0]["fused_profiles"] == 0
    assert len(att["per_block"][0]["layers"]) >= 3


@needs_rtx
def test_rebuild_reuses_unchanged_engines(built):
    folder, section, _ = built
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.engine")}
    said = []
    again = E.build_engines(folder, "tensorrt-rtx", OPTS, say=said.append)
    assert sum("unchanged, engine reused" in s for s in said) == len(E.ENGINE_COMPONENTS)
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.engine")} == stamps
    assert {c: e["sha256"] for c, e in again["components"].items()} == \
        {c: e["sha256"] for c, e in section["components"].items()}


@needs_rtx
def test_check_refuses_a_report_of_another_engine(built, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(built[0], folder)
    report = json.loads((folder / "dit_cond.layers.json").read_text())
    report["engine"]["sha256"] = "0" * 64
    (folder / "dit_cond.layers.json").write_text(json.dumps(report))
    with pytest.raises(E.EngineBuildError, match="describes another engine"):
        E.check_engines(folder)
    assert E.main(["--engines", str(built[0]), "--check"]) == 0


@needs_rtx
def test_timing_cache_is_ignored_by_rtx_with_a_note(built, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(built[0], folder)
    said = []
    E.build_engines(folder, "tensorrt-rtx", E.BuildOptions(buckets=OPTS.buckets, max_text_tokens=64,
                                                            components=("guided_step",), force=True,
                                                            timing_cache=tmp_path / "tc"), say=said.append)
    assert any("--timing-cache ignored" in s for s in said) and not (tmp_path / "tc").exists()


# ---------------------------------------------------------------------------------------------- full TensorRT's reports
# Built here only by TensorRT-RTX; the inspector JSON below follows full TensorRT's documented fields (10.x:
# "Format/Datatype"; 11.x: "Datatype" + "Format", Polygraphy 0.53.6's reader) — hand-written samples, not dumps.

def _report(layers, init=1000, fp8=800, weights=1000, blocks=("Attention_7",)):
    return {"graph": {"initializer_bytes": init, "fp8_initializer_bytes": fp8,
                      "attention_blocks": [{"form": "op", "anchor": b, "core": [b]} for b in blocks]},
            "summary": {"engine_bytes": 2000, "weights_memory_bytes": weights}, "layers": layers}


def _layer(name, meta=("Attention_7",), tactic="", ltype="kgen", **extra):
    return {"name": name, "type": ltype, "tactic": tactic, "inputs": [], "outputs": [], "constants": [],
            "metadata": list(meta), **extra}


def test_inspector_json_of_tensorrt_10_and_11_gives_the_builder_log_dtypes():
    def info(tensor):
        return json.dumps({"Layers": [{"Name": "gemm", "LayerType": "gemm", "TacticName": "sm90_xmma",
                                       "Inputs": [{"Name": "a", "Dimensions": [1, 8], **tensor}], "Outputs": [],
                                       "Metadata": "[ONNX Layer: /mlp/MatMul]"}]})
    assert E.inspector_layers(info({"Format/Datatype": "Row major linear BF16 format"}))[0]["inputs"][0]["dtype"] \
        == "BFloat16"
    la = E.inspector_layers(info({"Datatype": "FP8", "Format": "Row major linear FP8 format (kLINEAR)"}))[0]
    assert la["inputs"][0]["dtype"] == "FP8" and la["metadata"] == ["/mlp/MatMul"]
    assert [E.normalize_dtype(s) for s in ("Half", "Row major linear FP32 format", "Int64", "UInt8", "Bool")] == \
        ["Half", "Float", "Int64", "UInt8", "Bool"]


def test_profiles_are_read_from_tags_and_both_naming_conventions():
    assert [E.layer_profile(la) for la in (
        _layer("__myl_Mul_myl1_4"), _layer("/blocks.0/MatMul [profile 2]"), _layer("x", profile=3), _layer("x"))] \
        == [1, 2, 3, 0]


def test_a_layer_named_after_the_attention_node_is_not_a_fused_kernel():
    report = _report([_layer("Attention_7"), _layer("/attn/Attention_7_softmax")], fp8=0)
    att = E.run_checks(report)["attention"]
    assert att["status"] == "fail", att
    report["layers"].append(_layer("fused", tactic="sm89_fmha_v2_bf16_64"))
    assert E.run_checks(report)["attention"]["status"] == "pass"


def test_attention_inside_an_opaque_region_or_in_too_few_profiles_is_unverified():
    opaque = _report([_layer("{ForeignNode[/attn/Attention_7.../mlp/MatMul]}", ltype="Myelin")], fp8=0)
    att = E.run_checks(opaque)["attention"]
    assert att["status"] == "unverified" and "ForeignNode" in att["detail"]
    one = _report([_layer("_gemm_mha_v2", profile=0)], fp8=0)
    assert E.run_checks(one)["attention"]["status"] == "pass"               # profile count unknown: as before
    att = E.run_checks(one, 2)["attention"]                                 # the engine has 2 profiles
    assert att["status"] == "unverified" and "the engine has 2" in att["detail"]
    both = _report([_layer("_gemm_mha_v2", profile=0), _layer("_gemm_mha_v2", profile=1)], fp8=0)
    assert E.run_checks(both, 2)["attention"]["status"] == "pass"


def test_fp8_check_without_a_constants_list_decides_on_the_weight_total():
    fp8 = E.run_checks(_report([_layer("{ForeignNode[...]}", ltype="Myelin")], weights=1004))["fp8_weights"]
    assert fp8["status"] == "pass" and "lists no constants" in fp8["detail"]
    expanded = E.run_checks(_report([_layer("{ForeignNode[...]}", ltype="Myelin")], weights=1800))["fp8_weights"]
    assert expanded["status"] == "fail"                                     # FP8 expanded to bf16: 1.8x


# ---------------------------------------------------------------------------------------------- builder version, parser

def _fake_module(version, unsupported=()):
    class Parser:
        def __init__(self, network, logger):
            pass

        def supports_operator(self, op):
            return op not in unsupported

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return object()
    return types.SimpleNamespace(__version__=version, Builder=Builder, OnnxParser=Parser,
                                 Logger=types.SimpleNamespace(ERROR=1, __call__=None),
                                 NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=0))


def test_full_tensorrt_older_than_10_15_is_refused_up_front():
    with pytest.raises(E.EngineBuildError) as e:
        E.Toolkit("tensorrt", _fake_module("10.13.3.9")).check_version()
    assert "10.13.3.9 is too old" in str(e.value) and "RMSNormalization" in str(e.value) \
        and "tensorrt>=10.15" in str(e.value)
    for v in ("10.15.1.29", "11.0.0.1"):
        E.Toolkit("tensorrt", _fake_module(v)).check_version()
    E.Toolkit("tensorrt-rtx", _fake_module("1.7.1.116")).check_version()    # RTX: the operator check decides


def test_operators_the_parser_lacks_are_named_before_parsing(monkeypatch):
    mod = _fake_module("10.14.0", unsupported=("RMSNormalization",))
    mod.Logger = lambda level: None
    mod.Logger.ERROR = 1
    with pytest.raises(E.EngineBuildError) as e:
        E.Toolkit("tensorrt", mod).check_operators({"dit_cond": {"MatMul", "RMSNormalization", "Attention"}})
    assert "dit_cond" in str(e.value) and "does not support RMSNormalization" in str(e.value)
    assert "Attention" not in str(e.value).split("support ")[1].split(" (")[0]
    assert "10.15" in str(e.value)


def test_timing_cache_is_per_gpu_and_a_mismatched_one_is_replaced(monkeypatch, tmp_path):
    from ideogram4_engine.export.engines import toolkit as TK
    monkeypatch.setattr(TK, "cuda_devices", lambda: ([{"cc": "9.0", "name": "NVIDIA H100 80GB HBM3"}], ""))
    monkeypatch.setattr(TK.Path, "home", lambda: tmp_path)
    path = TK.default_timing_cache("10.15.1.29")
    assert path.name == "tensorrt-10.15.1.29-NVIDIA-H100-80GB-HBM3-sm90.timing-cache"

    class Config:
        def __init__(self):
            self.attached = []

        def create_timing_cache(self, blob):
            return {"blob": bytes(blob)}

        def set_timing_cache(self, cache, ignore_mismatch):
            self.attached.append(cache["blob"])
            return cache["blob"] != b"from another GPU"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"from another GPU")
    said, cfg = [], Config()
    assert E.Toolkit("tensorrt", _fake_module("10.15.1.29")).attach_timing_cache(cfg, None, said.append) == path
    assert cfg.attached == [b"from another GPU", b""] and "fresh one" in said[0]

    class Cache:
        def serialize(self):
            return b"tuned"
    cfg.get_timing_cache = lambda: Cache()
    E.Toolkit("tensorrt", _fake_module("10.15.1.29")).save_timing_cache(cfg, tmp_path / "f" / "x", said.append)
    assert (tmp_path / "f" / "x").read_bytes() == b"tuned"
    (tmp_path / "ro").write_text("a file where a folder should be")
    E.Toolkit("tensorrt", _fake_module("10.15.1.29")).save_timing_cache(cfg, tmp_path / "ro" / "x", said.append)
    assert "timing cache not saved" in said[-1]                  # reported, not fatal


@needs_rtx
def test_weight_streaming_builds_are_recorded(built, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(built[0], folder)
    opts = E.BuildOptions(buckets=OPTS.buckets, max_text_tokens=64, opt_text_tokens=32, components=("dit_cond",))
    said = []
    section = E.build_engines(folder, "tensorrt-rtx", replace(opts, weight_streaming=True), say=said.append)
    assert section["components"]["dit_cond"]["weight_streaming"] is True and not any("reused" in s for s in said)
    section = E.build_engines(folder, "tensorrt-rtx", opts, say=said.append)      # the flag is part of the key
    assert "weight_streaming" not in section["components"]["dit_cond"]
