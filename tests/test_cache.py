"""Skipping work the sampler does not need (issue 21): guidance-1 steps without dit_uncond, and the first-block
cache over the exported head/body/tail pieces. CPU backend, tiny checkpoint."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from ideogram4_engine.runtime import pipeline as pipeline_mod
from ideogram4_engine.runtime.cache import CacheOptions, may_reuse, relative_change, reuse, taylor_weight
from ideogram4_engine.runtime.manifest import ManifestError, load_manifest
from ideogram4_engine.runtime.pipeline import Pipeline

PROMPT = "a lighthouse on a cliff at dusk"
KW = dict(width=256, height=256, steps=6, seed=3)
MIXED = (3.0, 1.0, 7.0, 1.0, 7.0, 1.0)          # index 0 = last step: executed steps 1, 3, 5 run at guidance 1


@pytest.fixture(scope="module")
def pipe(tiny_engines):
    return Pipeline(tiny_engines, backend="onnxruntime-cpu")


def counting(p):
    """The backend's own run, with a tally of the graphs it ran."""
    calls = []
    real = p.backend.run

    def run(component, inputs):
        calls.append(component)
        return real(component, inputs)
    p.backend.run = run
    return calls


# ---------------------------------------------------------------------------------------------- guidance 1

def test_guided_step_at_guidance_one_is_the_conditional_update(tiny_engines):
    """The graph's g·v_c + (1 − g)·v_u at g = 1, 1 − g = 0 is v_c whatever finite v_u is: the skipped path
    (v_u := v_c) and the computed one give the same bits, both equal to z + v_c·dt in float32."""
    sess = ort.InferenceSession(str(tiny_engines / "guided_step.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    z, v_c, v_u = (rng.standard_normal((2, 64, 128), dtype=np.float32) * 10 for _ in range(3))
    v_c[0, 0, :4] = [0.0, -0.0, 1e-30, -1e-38]        # zeros of both signs, tiny values
    feeds = dict(latents=z, velocity_cond=v_c, guidance=np.ones(1, np.float32),
                 one_minus_guidance=np.zeros(1, np.float32), dt=np.array([0.0371], np.float32))
    skipped = sess.run(None, {**feeds, "velocity_uncond": v_c})[0]
    computed = sess.run(None, {**feeds, "velocity_uncond": v_u})[0]
    exact = z + v_c * np.float32(0.0371)
    assert np.array_equal(skipped.view(np.uint32), computed.view(np.uint32))
    assert np.array_equal(skipped.view(np.uint32), exact.view(np.uint32))


def test_guidance_one_steps_skip_dit_uncond_bit_for_bit(pipe, monkeypatch):
    """Steps at guidance exactly 1 run no dit_uncond; the latents are those of running it at every step."""
    calls = counting(pipe)
    skipped = pipe.generate(PROMPT, guidance=MIXED, **KW)
    assert calls.count("dit_uncond") == 3 and calls.count("dit_cond") == 6
    monkeypatch.setattr(pipeline_mod, "needs_uncond", lambda g: True)       # the unskipped loop as reference
    calls.clear()
    computed = pipe.generate(PROMPT, guidance=MIXED, **KW)
    assert calls.count("dit_uncond") == 6
    assert np.array_equal(skipped.latents, computed.latents)
    assert skipped.images[0].tobytes() == computed.images[0].tobytes()


def test_all_guidance_one_never_loads_or_hashes_dit_uncond(tiny_engines, pipe, tmp_path):
    """load_uncond=False: no dit_uncond session and its files are not even read (a corrupt copy loads); the
    image equals the full pipeline's at guidance 1; a request that needs it is refused by name."""
    eng = tmp_path / "eng"
    shutil.copytree(tiny_engines, eng)
    data = eng / "dit_uncond.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    p = Pipeline(eng, backend="onnxruntime-cpu", load_uncond=False)
    assert "dit_uncond" not in p.backend.sessions and "dit_cond" in p.backend.sessions
    got = p.generate(PROMPT, guidance=1.0, **KW)
    want = pipe.generate(PROMPT, guidance=1.0, **KW)
    assert np.array_equal(got.latents, want.latents)
    with pytest.raises(ValueError, match=r"guidance\[5\]=7.0 needs the unconditional DiT.*load_uncond=False"):
        p.generate(PROMPT, guidance=(1.0,) * 5 + (7.0,), **KW)


# ---------------------------------------------------------------------------------------------- the pieces

def test_pieces_share_the_dit_weight_files(tiny_engines):
    """No second copy of the weights: every external initializer of every piece lies in its DiT's own data
    file, at the offset the full graph has for it; the export writes no other data file."""
    m = load_manifest(tiny_engines)
    assert sorted(p.name for p in tiny_engines.glob("*.data")) == sorted(
        f"{c}.onnx.data" for c in ("text_encoder", "dit_cond", "dit_uncond", "vae_decoder"))
    for dit in ("dit_cond", "dit_uncond"):
        full = {t.name: {e.key: e.value for e in t.external_data}
                for t in onnx.load(str(m.graph_path(dit, "cpu")), load_external_data=False).graph.initializer}
        for variant in ("cpu", "cuda", "cuda_fused", "cpu_dql", "cuda_w8a8"):
            if variant not in m.component(f"{dit}.head")["graphs"]:
                continue
            seen = set()
            for piece in ("head", "body", "tail"):
                g = onnx.load(str(m.graph_path(f"{dit}.{piece}", variant)), load_external_data=False).graph
                for t in g.initializer:
                    if t.data_location == onnx.TensorProto.EXTERNAL:
                        ext = {e.key: e.value for e in t.external_data}
                        assert ext["location"] == f"{dit}.onnx.data"
                        if variant == "cpu":
                            assert ext == full[t.name]
                        seen.add(t.name)
            if variant == "cpu":      # together the pieces read every weight of the graph
                assert seen == {n for n, e in full.items() if e}


def test_body_is_the_full_graph_and_tail_rebuilds_it(tiny_engines):
    """head → body gives the full graph's velocity bit for bit; the tail fed the body's own residual
    reproduces it too (hidden + residual, rounded to bf16, is the last block's output here)."""
    m = load_manifest(tiny_engines)
    p = Pipeline(tiny_engines, backend="onnxruntime-cpu", cache=CacheOptions(0.0))
    full = Pipeline(tiny_engines, backend="onnxruntime-cpu")
    be, rng = p.backend, np.random.default_rng(1)
    T, N = 7, 256
    feeds = {"latents": rng.standard_normal((1, N, 128), dtype=np.float32), "tau": np.array([0.4], np.float32),
             "rope_cos": rng.standard_normal((1, T + N, 256), dtype=np.float32),
             "rope_sin": rng.standard_normal((1, T + N, 256), dtype=np.float32),
             "text_features": rng.standard_normal((1, T, m.raw["model"]["dit"]["llm_features_dim"]), dtype=np.float32)}
    want = full.backend.download(full.backend.run("dit_cond", feeds)["velocity"])
    head = be.run("dit_cond.head", feeds)
    passed = {**feeds, **{k: v for k, v in head.items() if k != "first_residual"}}
    body = be.run("dit_cond.body", passed)
    tail = be.run("dit_cond.tail", {**passed, "body_residual": body["body_residual"]})
    assert np.array_equal(be.download(body["velocity"]), want)
    assert np.array_equal(be.download(tail["velocity"]), want)


def test_cache_graphs_are_checked_and_named(tiny_engines, tmp_path):
    """The manifest resolves the pieces like components, covers their files by sha256 and names a missing one."""
    m = load_manifest(tiny_engines)
    files = {e["file"] for e in m.file_entries()}
    assert {"dit_cond.head.cpu.onnx", "dit_uncond.tail.cuda_fused.onnx", "residual_change.onnx"} <= files
    assert m.files_for_variant("cpu", ["dit_uncond.body"]) == ["dit_uncond.body.cpu.onnx", "dit_uncond.onnx.data"]
    dq = m.dequantize("dit_cond.head", "cpu_dql")["weights"]
    assert 0 < len(dq) < len(m.dequantize("dit_cond")["weights"])
    eng = tmp_path / "eng"
    shutil.copytree(tiny_engines, eng)
    (eng / "dit_cond.body.cpu.onnx").unlink()
    with pytest.raises(ManifestError, match="dit_cond.body.cpu.onnx named by the manifest is missing"):
        load_manifest(eng)


# ---------------------------------------------------------------------------------------------- the cache

def test_threshold_zero_is_bit_identical_to_no_cache(tiny_engines, pipe):
    """Every step through head + body, guidance-1 steps included: latents and pixels equal the plain run's."""
    base = pipe.generate(PROMPT, guidance=MIXED, **KW)
    for opts, extra in ((CacheOptions(0.0), {}), (CacheOptions(0.0, warmup=0, taylor=True), {}),
                        (CacheOptions(0.0), {"dequantize_at_load": True})):    # the pieces' own weight tables
        p = Pipeline(tiny_engines, backend="onnxruntime-cpu", cache=opts, **extra)
        got = p.generate(PROMPT, guidance=MIXED, **KW)
        assert got.reused_steps == [[]]
        assert np.array_equal(got.latents, base.latents) and got.images[0].tobytes() == base.images[0].tobytes()


def test_reuse_follows_warmup_and_cap_with_one_decision_for_both_dits(tiny_engines, pipe):
    """At the largest threshold every allowed step is reused: after 2 warm-up steps, at most 2 in a row. A
    reused step runs both DiTs' tails and neither body; the images change but stay finite."""
    p = Pipeline(tiny_engines, backend="onnxruntime-cpu", cache=CacheOptions(10.0, warmup=2, max_consecutive=2))
    calls = counting(p)
    got = p.generate(PROMPT, guidance=7.0, **KW)
    assert got.reused_steps == [[2, 3, 5]]
    for d in ("dit_cond", "dit_uncond"):
        assert calls.count(f"{d}.head") == 6 and calls.count(f"{d}.body") == 3 and calls.count(f"{d}.tail") == 3
    base = pipe.generate(PROMPT, guidance=7.0, **KW)
    assert np.isfinite(got.latents).all() and not np.array_equal(got.latents, base.latents)


def test_taylor_extrapolates_the_reused_residual(tiny_engines):
    """TaylorSeer changes the reused steps only, and the extrapolation graph is latest + w·(latest − previous)."""
    kw = dict(guidance=7.0, **KW)
    plain = Pipeline(tiny_engines, backend="onnxruntime-cpu", cache=CacheOptions(10.0, max_consecutive=2))
    taylor = Pipeline(tiny_engines, backend="onnxruntime-cpu", cache=CacheOptions(10.0, max_consecutive=2, taylor=True))
    calls = counting(taylor)
    a, b = plain.generate(PROMPT, **kw), taylor.generate(PROMPT, **kw)
    assert a.reused_steps == b.reused_steps == [[2, 3, 5]]
    assert calls.count("dit_cond.extrapolate") == 3 and not np.array_equal(a.latents, b.latents)
    rng = np.random.default_rng(2)
    latest, previous = (rng.standard_normal((1, 9, 512), dtype=np.float32) for _ in range(2))
    w = np.array([taylor_weight(5, 4, 1)], np.float32)
    got = taylor.backend.download(taylor.backend.run("dit_cond.extrapolate", {"latest": latest, "previous": previous,
                                                                               "weight": w})["extrapolated"])
    assert np.array_equal(got, latest + (latest - previous) * w)


def test_decision_functions():
    opts = CacheOptions(0.1, warmup=2, max_consecutive=3)
    assert [may_reuse(k, 0, opts) for k in range(4)] == [False, False, True, True]
    assert not may_reuse(5, 3, opts) and may_reuse(5, 2, opts) and not may_reuse(5, 0, CacheOptions(0.0))
    assert relative_change(1.0, 4.0) == 0.25 and relative_change(1.0, 0.0) == float("inf")
    assert reuse([(0.5, 10.0), (0.9, 10.0)], 0.1) and not reuse([(0.5, 10.0), (1.0, 10.0)], 0.1)   # the max decides
    assert not reuse([], 0.1)
    assert taylor_weight(7, 5, 2) == 2 / 3


@pytest.mark.parametrize("kwargs,msg", [
    (dict(threshold=-0.1), r"cache threshold=-0.1 outside the allowed range; allowed: a number in \[0, 10\]"),
    (dict(threshold=float("nan")), "cache threshold=nan outside"),
    (dict(threshold=True), "cache threshold=True outside"),
    (dict(warmup=-1), r"cache warmup=-1 outside the allowed range; allowed: an integer in 0…1000"),
    (dict(max_consecutive=0), "cache max_consecutive=0 outside the allowed range; allowed: an integer in 1…1000"),
    (dict(taylor=1), "cache taylor=1; allowed: True or False"),
])
def test_bad_cache_options_name_the_value(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        CacheOptions(**kwargs)


def test_an_export_without_cache_graphs_is_refused(tiny_engines, tmp_path):
    eng = tmp_path / "eng"
    shutil.copytree(tiny_engines, eng)
    raw = json.loads((eng / "manifest.json").read_text())
    del raw["first_block_cache"]
    (eng / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="has no first-block cache graphs .*re-run `make export`"):
        Pipeline(eng, backend="onnxruntime-cpu", cache=CacheOptions(0.1))


def test_cli_reports_skips_and_records_the_cache(tiny_engines, tmp_path):
    cli = [str(Path(sys.executable).with_name("ideogram4"))]
    out = tmp_path / "a.png"
    r = subprocess.run([*cli, "generate", "--engines", str(tiny_engines), "--prompt", "a fox", "--width", "256",
                        "--height", "256", "--steps", "3", "--guidance", "1", "--backend", "onnxruntime-cpu",
                        "--output", str(out), "--cache-threshold", "10", "--cache-warmup", "1", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["uncond_loaded"] is False and report["reused_steps"] == [[1, 2]]
    assert "the unconditional DiT is not loaded" in r.stderr
    from PIL import Image
    assert Image.open(out).text["first_block_cache"] == "threshold=10.0,warmup=1,max_consecutive=3,taylor=False"
    bad = subprocess.run([*cli, "generate", "--engines", str(tiny_engines), "--prompt", "a fox", "--output",
                          str(tmp_path / "b.png"), "--cache-threshold", "-1"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "cache threshold=-1.0 outside the allowed range" in bad.stderr
    assert not (tmp_path / "b.png").exists()


def test_quantizing_ops_carry_their_own_types(tiny_w8a8_engines):
    """The head of a cuda_fused_w8a8 twin hands block 1's e4m3 activation and its fp32 row scales to the body:
    declared as what GatedResidualModulateFp8 produces (bf16 h, e4m3 codes, fp32 scales), not as bf16."""
    m = load_manifest(tiny_w8a8_engines)
    g = onnx.load(str(m.graph_path("dit_cond.head", "cuda_fused_w8a8")), load_external_data=False).graph
    node = next(n for n in g.node if "hidden" in n.output)          # block 0's last residual + block 1's input
    assert node.op_type == "GatedResidualModulateFp8"
    declared = {o.name: o.type.tensor_type.elem_type for o in g.output}
    T = onnx.TensorProto
    assert [declared[o] for o in node.output] == [T.BFLOAT16, T.FLOAT8E4M3FN, T.FLOAT]
    body = onnx.load(str(m.graph_path("dit_cond.body", "cuda_fused_w8a8")), load_external_data=False).graph
    takes = {i.name: i.type.tensor_type.elem_type for i in body.input}
    assert all(takes[o] == declared[o] for o in node.output)


def test_serve_passes_the_cache_options(tiny_engines):
    """`ideogram4 serve --cache-threshold …` hands the replicas' Pipelines the same CacheOptions."""
    from serve_server import have_serve
    if not have_serve()[0]:
        pytest.skip(have_serve()[1])
    from ideogram4_engine.serve.cli import config_from_mapping
    config, _ = config_from_mapping({"engines": str(tiny_engines), "backend": "onnxruntime-cpu",
                                     "cache_threshold": "0.1", "cache_max_consecutive": 2, "cache_taylor": True})
    assert config.pipeline_options["cache"] == CacheOptions(0.1, 2, 2, True)
    config, _ = config_from_mapping({"engines": str(tiny_engines), "backend": "onnxruntime-cpu"})
    assert "cache" not in config.pipeline_options
    with pytest.raises(ValueError, match="--cache-taylor needs --cache-threshold"):
        config_from_mapping({"engines": str(tiny_engines), "backend": "onnxruntime-cpu", "cache_taylor": True})
