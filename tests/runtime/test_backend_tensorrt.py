"""The TensorRT runtime backend without a GPU: manifest reading, profile and size selection, and the version,
module, architecture, memory and checksum refusals, against a real engine built by TensorRT-RTX on the CPU. The
execution tests at the end run only where a GPU and runtime that can execute these engines exist (none of this
project's machines: no GPU here, TensorRT-RTX refuses Hopper, full TensorRT is not installable); they are skipped
with that reason, never faked."""
import copy

import numpy as np
import pytest

from ideogram4_engine.runtime import backends
from ideogram4_engine.runtime.backends import tensorrt as T
from ideogram4_engine.runtime.manifest import ManifestError, load_manifest

BUCKETS = "512x512,768x512"


from conftest import HAVE_RTX, NO_RTX  # noqa: E402


@pytest.fixture(scope="module")
def engines(tiny_checkpoint, tmp_path_factory):
    """Tiny export with engines for the image-dependent components (what the refusals need)."""
    if not HAVE_RTX:
        pytest.skip(NO_RTX)
    from ideogram4_engine.export import engines as E
    from ideogram4_engine.export.to_onnx import ExportOptions, export
    out = tmp_path_factory.mktemp("trtrt") / "tiny"
    export(tiny_checkpoint, out, ExportOptions(progress=False), log=lambda s: None)
    E.build_engines(out, "tensorrt-rtx", E.BuildOptions(buckets=E.parse_buckets(BUCKETS), max_text_tokens=64,
                                                         components=("dit_cond", "vae_decoder", "guided_step")),
                    say=lambda s: None)
    return load_manifest(out)


def _entry(m, c="dit_cond"):
    return copy.deepcopy(m.raw["engines"]["components"][c])


# ---------------------------------------------------------------------------------------------- manifest

def test_no_engines_section_says_run_make_engines():
    raw = {"components": {"dit_cond": {}}}
    with pytest.raises(backends.BackendUnavailable, match="make engines"):
        T.engines_section(raw)
    with pytest.raises(backends.BackendUnavailable, match="make engines"):
        T.TensorRTBackend(raw)


def test_missing_component_engines_are_named(engines):
    with pytest.raises(backends.BackendUnavailable, match="no engine for text_encoder, dit_uncond"):
        T.engine_entries(engines)                 # all components by default; only three were built
    assert set(T.engine_entries(engines, ("dit_cond", "guided_step"))) == {"dit_cond", "guided_step"}


# ---------------------------------------------------------------------------------------------- profiles

def test_profile_selection(engines):
    profiles = _entry(engines)["profiles"]
    cond = lambda n, t, b=1: {"latents": (b, n, 128), "tau": (b,), "rope_cos": (b, t + n, 256),  # noqa: E731
                              "rope_sin": (b, t + n, 256), "text_features": (b, t, 832)}
    assert T.select_profile("dit_cond", profiles, cond(1024, 20)) == 0          # 512x512: 32x32 tokens
    assert T.select_profile("dit_cond", profiles, cond(1536, 64)) == 1          # 768x512 (or 512x768)
    with pytest.raises(ValueError) as e:
        T.select_profile("dit_cond", profiles, cond(1024, 65))                  # text longer than built for
    assert "no optimization profile admits" in str(e.value) and "text_features (1, 1…64, 832)" in str(e.value)
    assert "[512x512]" in str(e.value) and "make engines" in str(e.value)
    with pytest.raises(ValueError, match="no optimization profile"):
        T.select_profile("dit_cond", profiles, cond(1024, 20, b=2))             # batch range is 1…1
    with pytest.raises(ValueError, match="missing"):
        T.select_profile("dit_cond", profiles, {"latents": (1, 1024, 128)})


def test_check_size_lists_the_buckets(engines):
    entries = T.engine_entries(engines, ("dit_cond", "vae_decoder", "guided_step"))
    T.check_engine_size(engines, entries, 512, 512)
    T.check_engine_size(engines, entries, 512, 768)               # height 512, width 768
    with pytest.raises(ValueError) as e:                          # 512 wide x 768 high: the DiTs' token count
        T.check_engine_size(engines, entries, 768, 512)           # exists, the VAE's 48x32 grid does not
    msg = str(e.value)
    assert "512x768 (WxH) is outside every engine profile (vae_decoder)" in msg
    assert "512x512, 768x512" in msg and "BUCKETS=512x512,768x512,512x768" in msg
    with pytest.raises(ValueError, match=r"\(dit_cond, vae_decoder, guided_step\)"):
        T.check_engine_size(engines, entries, 1024, 1024)


# ---------------------------------------------------------------------------------------------- refusals

def test_version_and_module_refusals(engines):
    import tensorrt_rtx
    e = _entry(engines)
    T.check_builder(e, "dit_cond", "tensorrt_rtx", tensorrt_rtx.__version__)
    with pytest.raises(T.EngineMismatch) as err:
        T.check_builder(e, "dit_cond", "tensorrt_rtx", "1.8.0.1")
    assert f"built by tensorrt-rtx {tensorrt_rtx.__version__}" in str(err.value) and "1.8.0.1" in str(err.value)
    assert "rebuild with `make engines`" in str(err.value)
    with pytest.raises(T.EngineMismatch, match="cannot be loaded by tensorrt"):
        T.check_builder(e, "dit_cond", "tensorrt", "10.13.0")
    assert issubclass(T.EngineMismatch, backends.BackendUnavailable)       # `auto` falls back


def test_backend_refuses_another_version_before_touching_the_gpu(engines):
    raw = copy.deepcopy(engines.raw)
    for e in raw["engines"]["components"].values():
        e["builder"]["version"] = "0.9.0"
    m = type(engines)(engines.root, raw)
    with pytest.raises(T.EngineMismatch, match="0.9.0"):
        T.TensorRTBackend(m, components=("dit_cond",))
    raw["engines"]["builder"]["name"] = "tensorrt"
    with pytest.raises(backends.BackendUnavailable, match="were built by tensorrt, not tensorrt-rtx"):
        backends.create("tensorrt-rtx", m, components=("dit_cond",))


def test_architecture_refusals(engines):
    dit, vae = _entry(engines), _entry(engines, "vae_decoder")
    assert dit["targets"]["compute_capabilities"] == ["8.9", "12.0"]      # FP8: the builder dropped 8.0 and 8.6
    for cc in ((8, 9), (12, 0), (12, 1)):                                 # 12.1: later than every target, RTX default
        T.check_architecture(dit, "dit_cond", cc)
    with pytest.raises(T.EngineMismatch) as e:
        T.check_architecture(dit, "dit_cond", (9, 0), "GPU 0 (NVIDIA H100 80GB HBM3, compute capability 9.0)")
    assert "Hopper" in str(e.value) and "onnxruntime-cuda" in str(e.value) and "8.9, 12.0" in str(e.value)
    assert T.has_fp8(engines, "dit_cond", dit) and not T.has_fp8(engines, "vae_decoder", vae)
    with pytest.raises(T.EngineMismatch) as e:                            # an RTX 3090: no FP8 build can run there
        T.check_architecture(dit, "dit_cond", (8, 6), fp8=True)
    assert "FP8 weights, which need compute capability 8.9 or later" in str(e.value)
    assert "onnxruntime-cuda" in str(e.value) and "--compute-capabilities" not in str(e.value)
    T.check_architecture(vae, "vae_decoder", (8, 6))                       # no FP8 in the VAE: 8.6 kept
    bf16 = copy.deepcopy(vae)                                             # explicit targets without 8.6: rebuild
    bf16["targets"] = {"compute_capabilities": ["8.9"], "forward_compatible": False}
    with pytest.raises(T.EngineMismatch, match="--compute-capabilities=8.6"):
        T.check_architecture(bf16, "vae_decoder", (8, 6))
    explicit = copy.deepcopy(dit)
    explicit["targets"]["forward_compatible"] = False
    with pytest.raises(T.EngineMismatch):
        T.check_architecture(explicit, "dit_cond", (12, 1))
    full = copy.deepcopy(dit)
    full["builder"] = {"name": "tensorrt", "module": "tensorrt", "version": "10.13.0"}
    full["targets"] = {"compute_capabilities": ["9.0"], "forward_compatible": False}
    T.check_architecture(full, "dit_cond", (9, 0))
    with pytest.raises(T.EngineMismatch, match="BUILDER=tensorrt` on this GPU"):
        T.check_architecture(full, "dit_cond", (8, 9))


def test_memory_refusal(engines):
    entries = T.engine_entries(engines, ("dit_cond", "vae_decoder"))
    need, parts = T.memory_estimate(entries)
    assert need == sum(e["bytes"] + e["activation_bytes"] for e in entries.values()) and "dit_cond" in parts
    T.check_memory(entries, free=2 * need, total=4 * need)
    with pytest.raises(T.EngineMismatch) as e:
        T.check_memory(entries, free=need // 2, total=4 * need, gpu="GPU 0")
    assert "insufficient GPU memory on GPU 0" in str(e.value) and "BUCKETS" in str(e.value)


def test_checksum_refusal(engines):
    e = _entry(engines)
    data = bytearray((engines.root / e["file"]).read_bytes())
    T.verify_engine(e, "dit_cond", data, engines.root / e["file"])
    data[len(data) // 2] ^= 1
    with pytest.raises(T.EngineChecksumError, match="sha256 mismatch") as err:
        T.verify_engine(e, "dit_cond", data, engines.root / e["file"])
    assert isinstance(err.value, ManifestError)
    with pytest.raises(T.EngineChecksumError, match="truncated"):
        T.verify_engine(e, "dit_cond", data[:-10], engines.root / e["file"])


def test_unavailable_here_and_auto_falls_back(engines):
    """No GPU here: the backend refuses with the reason and `auto` moves on (to onnxruntime)."""
    with pytest.raises(backends.BackendUnavailable) as e:
        backends.create("tensorrt", engines, components=("dit_cond", "vae_decoder", "guided_step"))
    assert any(w in str(e.value) for w in ("CUDA", "cuda-bindings", "GPU")), str(e.value)
    be = backends.create("auto", engines, components=("guided_step",))
    assert be.name.startswith("onnxruntime")


# ---------------------------------------------------------------------------------------------- execution (GPU)

def _execution_unavailable() -> str | None:
    """None where these engines can run: an importable TensorRT module of the engines' kind, cuda-bindings, and a
    GPU of a compute capability the TensorRT-RTX engines target. Otherwise the reason."""
    if not HAVE_RTX:
        return NO_RTX
    try:
        from cuda.bindings import runtime as rt
    except ImportError:
        return "cuda-bindings is not installed (no GPU runtime here)"
    err, n = rt.cudaGetDeviceCount()
    if err != rt.cudaError_t.cudaSuccess or n == 0:
        return f"no CUDA GPU here ({getattr(err, 'name', err)})"
    major = rt.cudaDeviceGetAttribute(rt.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor, 0)[1]
    minor = rt.cudaDeviceGetAttribute(rt.cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor, 0)[1]
    if (major, minor) not in ((8, 9), (12, 0), (12, 1)):
        return (f"GPU compute capability {major}.{minor}: TensorRT-RTX FP8 engines run on 8.9 / 12.x only "
                "(Hopper 9.0 is refused by TensorRT-RTX)")
    return None


NO_EXEC = _execution_unavailable()
needs_gpu = pytest.mark.skipif(NO_EXEC is not None, reason=f"execution needs a supported GPU: {NO_EXEC}")


@pytest.fixture(scope="module")
def full_engines(tiny_checkpoint, tmp_path_factory):
    from ideogram4_engine.export import engines as E
    from ideogram4_engine.export.to_onnx import ExportOptions, export
    out = tmp_path_factory.mktemp("trtexec") / "tiny"
    export(tiny_checkpoint, out, ExportOptions(progress=False), log=lambda s: None)
    E.build_engines(out, "tensorrt-rtx", E.BuildOptions(buckets=E.parse_buckets(BUCKETS), max_text_tokens=64),
                    say=lambda s: None)
    return out


@needs_gpu
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_pipeline_on_tensorrt_matches_onnxruntime(full_engines, cuda_graphs):
    from ideogram4_engine.runtime.pipeline import Pipeline
    ref = Pipeline(full_engines, backend="onnxruntime-cpu").generate("a red apple", width=512, height=512, steps=3,
                                                                    guidance=4.0, seed=1)
    pipe = Pipeline(full_engines, backend="tensorrt", cuda_graphs=cuda_graphs)
    out = pipe.generate("a red apple", width=512, height=512, steps=3, guidance=4.0, seed=1)
    rel = np.linalg.norm(out.latents - ref.latents) / np.linalg.norm(ref.latents)
    assert rel < 2e-2, rel
    a, b = np.asarray(out.images[0], np.int16), np.asarray(ref.images[0], np.int16)
    assert (np.abs(a - b) <= 2).mean() > 0.99
    with pytest.raises(ValueError, match="outside every engine profile"):
        pipe.generate("a red apple", width=1024, height=1024, steps=1, guidance=1.0)


@needs_gpu
def test_device_round_trip(full_engines):
    be = backends.create("tensorrt", load_manifest(full_engines))
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    assert np.array_equal(be.download(be.upload(x)), x)
    be.close()
