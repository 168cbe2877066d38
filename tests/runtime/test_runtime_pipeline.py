"""The lean runtime on onnxruntime CPU: parity with the torch reference, batching, determinism."""
import json
import shutil

import numpy as np
import pytest
import torch

from ideogram4_engine.export.reference.pipeline import SamplingParams
from ideogram4_engine.runtime.backends import BackendUnavailable
from ideogram4_engine.runtime.packing import token_grid
from ideogram4_engine.runtime.pipeline import Pipeline

PROMPT = '{"high_level_description":"A lighthouse on a cliff at dusk","compositional_deconstruction":{"background":"sea","elements":[]}}'


@pytest.fixture(scope="module")
def engines(tiny_engines):
    return tiny_engines


@pytest.fixture(scope="module")
def pipe(engines):
    return Pipeline(engines, backend="onnxruntime-cpu")


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def pixels_within(a, b, tol=2):
    return float(np.mean(np.abs(np.asarray(a, int) - np.asarray(b, int)) <= tol))


def test_parity_with_reference_pipeline(pipe, tiny_pipeline):
    """Same prompt, size, sampler and initial noise through both implementations (V4_TURBO_12)."""
    height, width = 256, 384
    gh, gw = token_grid(height, width)
    noise = tiny_pipeline.noise(1, gh * gw, 7).numpy()
    ref = tiny_pipeline(PROMPT, height=height, width=width, params=SamplingParams.from_preset("V4_TURBO_12"),
                        noise=noise)
    got = pipe.generate(PROMPT, width=width, height=height, preset="V4_TURBO_12", noise=noise)
    e = rel_err(got.latents, ref.latents)
    w = pixels_within(got.images[0], ref.images[0])
    print(f"\nruntime vs reference (12 steps, 256x384): latents rel err {e:.2e}, pixels within ±2 {w:.4f}")
    assert got.token_ids[0] == ref.token_ids[0]
    assert got.images[0].size == (width, height) and got.images[0].mode == "RGB"
    assert e <= 1e-2 and w >= 0.99


def test_batched_prompts_equal_one_by_one(pipe):
    prompts = ["a red fox", "a red fox in the snow at night, cinematic", "a blue fox"]   # two lengths
    height = width = 256
    gh, gw = token_grid(height, width)
    noise = np.random.default_rng(5).standard_normal((3, gh * gw, 128), dtype=np.float32)
    kw = dict(width=width, height=height, steps=3, guidance=(3.0, 7.0, 7.0))
    batch = pipe.generate(prompts, noise=noise, **kw)
    for i, p in enumerate(prompts):
        one = pipe.generate(p, noise=noise[i:i + 1], **kw)
        assert rel_err(batch.latents[i], one.latents[0]) <= 1e-2
        assert pixels_within(batch.images[i], one.images[0]) >= 0.99
    assert not np.array_equal(batch.latents[0], batch.latents[2])      # different prompts, different images


def test_seeded_generation_is_deterministic_and_seed_dependent(pipe):
    kw = dict(width=256, height=256, steps=2, guidance=7.0)
    a = pipe.generate("a cat", seed=123, **kw)
    b = pipe.generate("a cat", seed=123, **kw)
    c = pipe.generate("a cat", seed=124, **kw)
    assert np.array_equal(a.latents, b.latents) and a.images[0].tobytes() == b.images[0].tobytes()
    assert not np.array_equal(a.latents, c.latents)
    assert a.seed == 123 and a.sampling.steps == 2 and a.sampling.guidance == (7.0, 7.0)
    assert len(a.timings["step_s"]) == 2 and a.timings["total_s"] > 0


def test_checksum_mismatch_is_refused_before_running(engines, tmp_path):
    from ideogram4_engine.runtime.manifest import ManifestError
    bad = tmp_path / "bad"
    shutil.copytree(engines, bad)
    data = bad / "dit_uncond.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match="dit_uncond.onnx.data"):
        Pipeline(bad, backend="onnxruntime-cpu")


@pytest.mark.parametrize("kwargs,msg", [
    (dict(prompts="   "), "prompt is empty"),
    (dict(prompts="word " * 2100), "allowed: at most 2048"),
    (dict(width=1000), "width=1000 must be a multiple of 16"),
    (dict(height=2064), "height=2064 outside the supported range 256…2048"),
    (dict(width=256, height=1600), "aspect ratio 256x1600 exceeds 6:1"),
    (dict(steps=0, guidance=7.0), "steps=0 must be an integer >= 1"),
    (dict(steps=3, guidance=(7.0, 3.0)), "guidance schedule has 2 entries, expected one per step \\(3\\)"),
    (dict(steps=5), "also give guidance"),
    (dict(seed=-1), "seed=-1 outside 0…2\\^64-1"),
    (dict(seed=2**64), "outside 0…2\\^64-1"),
    (dict(preset="V5_FAST"), "unknown sampler preset 'V5_FAST'; allowed: V4_QUALITY_48"),
    (dict(noise=np.zeros((1, 3, 128), np.float32)), "noise has shape \\(1, 3, 128\\), expected \\(1, 256, 128\\)"),
    # Python API types (issue 16): each refusal names the value or type and what is allowed
    (dict(prompts=None), "prompts must be a str or a list of str, got NoneType"),
    (dict(prompts=b"a fox"), "got bytes \\(decode bytes to str first\\)"),
    (dict(prompts=[b"a fox"]), "prompts\\[0\\] must be a str, got bytes"),
    (dict(prompts=["a fox", 3]), "prompts\\[1\\] must be a str, got int"),
    (dict(prompts=[]), "no prompts given"),
    (dict(prompts="a\ud800b"), "not valid Unicode \\(lone surrogate"),
    (dict(steps=True, guidance=7.0), "steps=True must be an integer"),
    (dict(steps=2.0, guidance=7.0), "steps=2.0 must be an integer"),
    (dict(width=True), "width=True must be an integer"),
    (dict(width=256.0), "width=256.0 must be an integer: a multiple of 16 in 256…2048"),
    (dict(height="256"), "height='256' must be an integer"),
    (dict(seed=True), "seed=True outside 0…2\\^64-1"),
    (dict(seed=1.5), "seed=1.5 outside 0…2\\^64-1"),
    (dict(seed=None), "seed=None outside 0…2\\^64-1"),
    (dict(steps=1, guidance="7"), "guidance='7' must be a number or a sequence of numbers"),
    (dict(steps=1, guidance=True), "guidance=True must be a number or a sequence"),
    (dict(steps=2, guidance=(7.0, None)), "guidance\\[1\\]=None must be a number"),
    (dict(steps=1, guidance=float("nan")), "guidance\\[0\\]=nan outside the allowed range"),
    (dict(mu=np.float64("nan")), "mu=nan outside the allowed range; allowed: a finite number in \\[-20, 20\\]"),
    (dict(mu=float("inf")), "mu=inf outside the allowed range"),
    (dict(mu="0.5"), "mu='0.5' must be a number"),
    (dict(std=np.float32(-1)), "std=-1.0 outside the allowed range; allowed: a finite number in \\(0, 20\\]"),
    (dict(batch_index=-1), "batch_index=-1 outside 0…1023"),
    (dict(noise=np.full((1, 256, 128), np.nan, np.float32)), "noise contains NaN or Inf"),
    (dict(noise=np.full((1, 256, 128), "x")), "noise has dtype <U1; allowed: a float32 array"),
])
def test_bad_input_is_refused_before_any_graph_runs(pipe, monkeypatch, kwargs, msg):
    def no_graphs(*a, **k):
        raise AssertionError("a graph ran before the input was validated")
    monkeypatch.setattr(pipe.backend, "run", no_graphs)
    prompts = kwargs.pop("prompts", "a fox")
    kw = dict(width=256, height=256) | kwargs
    with pytest.raises(ValueError, match=msg):
        pipe.generate(prompts, **kw)


def test_numpy_scalars_and_arrays_are_accepted(pipe):
    """numpy integers and floats are numbers like any other (they come out of arrays and configs)."""
    r = pipe.prepare("a fox", width=np.int64(256), height=np.uint16(256), steps=np.int32(2),
                     guidance=np.array([3.0, 7.0], np.float32), mu=np.float32(0.25), std=np.float64(1.5),
                     seed=np.uint64(2**64 - 1), batch_index=np.int8(1))
    assert (r.width, r.height, r.sampling.steps, r.sampling.guidance) == (256, 256, 2, (3.0, 7.0))
    assert r.sampling.mu == 0.25 and r.sampling.std == 1.5 and r.seed == 2**64 - 1 and r.batch_index == 1
    assert type(r.width) is int and type(r.seed) is int
    assert pipe.prepare("a fox", width=256, height=256, steps=1, guidance=np.float32(7)).sampling.guidance == (7.0,)



def test_dequantize_at_load_is_bit_identical(engines, pipe):
    """Dequantizing every FP8 weight once at load (the `*_dql` graphs, weights bound as bf16 inputs) runs the
    twins' own dequantization ops, only earlier: latents and pixels are bit-identical to the default."""
    kw = dict(width=256, height=256, steps=2, guidance=(3.0, 7.0), seed=5)
    base = pipe.generate("a lighthouse at dusk", **kw)
    p = Pipeline(engines, backend="onnxruntime-cpu", dequantize_at_load=True)
    assert p.backend.graph_variant == "cpu_dql" and set(p.backend._weights) == {"text_encoder", "dit_cond", "dit_uncond"}
    first = p.generate("a lighthouse at dusk", **kw)
    again = p.generate("a lighthouse at dusk", **kw)        # the kept binding serves a second request unchanged
    for other in (first, again):
        assert np.array_equal(other.latents, base.latents)
        assert np.array_equal(np.asarray(other.images[0]), np.asarray(base.images[0]))


def test_shared_arena_is_bit_identical(engines, pipe):
    """One arena per device for all graphs (`shared_arena`, the default) changes where activations live, not
    the numbers: an arena per session gives the same latents; two pipelines in one process share the
    registered arena, also with the load-time dequantization."""
    kw = dict(width=256, height=256, steps=2, guidance=(3.0, 7.0), seed=11)
    base = pipe.generate("a lighthouse at dusk", **kw)
    assert pipe.backend._opts.get_session_config_entry("session.use_env_allocators") == "1"
    for options in (dict(shared_arena=False), dict(dequantize_at_load=True)):
        other = Pipeline(engines, backend="onnxruntime-cpu", **options).generate("a lighthouse at dusk", **kw)
        assert np.array_equal(other.latents, base.latents), options


def test_dequantize_at_load_refuses_an_unknown_weight_format(engines, tmp_path):
    """A manifest whose weight table names a format dequantize.onnx does not take is refused at load, naming
    the weight, before anything is read."""
    eng = tmp_path / "eng"
    shutil.copytree(engines, eng)
    raw = json.loads((eng / "manifest.json").read_text())
    w = raw["components"]["dit_cond"]["dequantize"]["weights"][2]
    w["scale"]["dtype"] = "float"
    (eng / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BackendUnavailable, match=rf"weight {w['input']} is \(dtype, scale dtype, axis\) = "
                                                 r"\('float8e4m3fn', 'float', 0\)"):
        Pipeline(eng, backend="onnxruntime-cpu", dequantize_at_load=True)


def test_dequantize_at_load_out_of_memory_names_the_need(engines, monkeypatch):
    """An arena that cannot grow while the weights are dequantized (an 80 GB H100 at full size, docs/tuning.md
    §16) ends the load with a MemoryError naming the component, the weight and the bf16 bytes the mode needs,
    not onnxruntime's bare allocation failure. The failure is injected: a CPU machine has no such limit."""
    import onnxruntime as ort
    real = ort.InferenceSession.run_with_iobinding
    sessions = []

    def run(self, binding, run_options=None):
        if self._model_path.endswith("dequantize.onnx"):
            if self not in sessions:
                sessions.append(self)
            if self is sessions[-1] and len(sessions) == 2:     # the first weight of dit_cond, after the text encoder
                raise RuntimeError("Error in execution: Non-zero status code returned while running "
                                   "DequantizeLinear node. Status Message: bfc_arena.cc:360 Failed to allocate "
                                   "memory for requested buffer of size 226492416")
        return real(self, binding, run_options)

    monkeypatch.setattr(ort.InferenceSession, "run_with_iobinding", run)
    manifest = Pipeline(engines, backend="onnxruntime-cpu").manifest
    names = [w["input"] for w in manifest.dequantize("dit_cond")["weights"]]
    need = sum(2 * int(np.prod(w["weight"]["shape"])) for c in ("text_encoder", "dit_cond", "dit_uncond")
               for w in manifest.dequantize(c)["weights"])
    with pytest.raises(MemoryError, match=rf"cpu:0 is out of memory at dit_cond weight {names[0]}\. .*"
                                          rf"text_encoder, dit_cond, dit_uncond as bf16 .*\({need / 2**30:.1f} GiB"):
        Pipeline(engines, backend="onnxruntime-cpu", dequantize_at_load=True)


def test_cfg_parallel_needs_the_cuda_provider(engines):
    with pytest.raises(ValueError, match="uncond_device_id needs the CUDA provider"):
        Pipeline(engines, backend="onnxruntime-cpu", uncond_device_id=1)


@pytest.mark.parametrize("value", ["kSameAsRequsted", "samerequested", 1])
def test_bad_arena_strategy_is_refused_before_loading(engines, value):
    """A misspelt arena growth strategy is refused, naming the value and the allowed ones, before any graph is
    loaded (onnxruntime would otherwise fail per session, or the shared arena silently keep its default)."""
    with pytest.raises(ValueError, match=rf"arena_extend_strategy={value!r}; allowed: kNextPowerOfTwo, kSameAsRequested"):
        Pipeline(engines, backend="onnxruntime-cpu", arena_extend_strategy=value)


def test_non_finite_sampler_state_is_an_error(engines):
    """A backend whose kernels produce NaN (seen on the GPU with a broken Cast) fails loudly, never returns
    an image. The fault is injected into the real backend's dit_cond output."""
    p = Pipeline(engines, backend="onnxruntime-cpu")
    real = p.backend.run

    def faulty(component, inputs):
        out = real(component, inputs)
        if component == "dit_cond":
            v = p.backend.download(out["velocity"]).copy()
            v[0, 0, 0] = np.nan
            out["velocity"] = p.backend.upload(v)
        return out
    p.backend.run = faulty
    with pytest.raises(FloatingPointError, match="non-finite"):
        p.generate("a lighthouse at dusk", width=256, height=256, steps=1, guidance=3.0, seed=1)


def test_a_preset_without_overrides_keeps_its_name():
    """The PNG metadata and reports name the preset only when nothing overrode it (a regression: the
    overrides were tested after mu/std had been filled in from the preset)."""
    from ideogram4_engine.runtime.request import resolve_sampling
    from ideogram4_engine.runtime.schedule import PRESETS
    assert resolve_sampling(PRESETS, "V4_DEFAULT_20").preset == "V4_DEFAULT_20"
    assert resolve_sampling(PRESETS, "V4_DEFAULT_20", "V4_TURBO_12").preset == "V4_TURBO_12"
    assert resolve_sampling(PRESETS, "V4_DEFAULT_20", mu=0.25).preset is None
    assert resolve_sampling(PRESETS, "V4_DEFAULT_20", std=1.0).preset is None
