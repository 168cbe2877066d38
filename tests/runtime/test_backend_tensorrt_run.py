"""`TensorRTBackend.run()` and loading, on the CPU, over a recording double of TensorRT and cuda-bindings
(tests/runtime/trt_fakes.py): the backend's code runs for real, the doubles stand in for the GPU libraries underneath and
record the call order. Asserted: a plain execute after every shape/profile change before a CUDA graph is captured,
replay only while the shapes stay, fallback to plain execution when capture fails (the shape is not poisoned),
checked TensorRT return values, cudaSetDevice on every calling thread, the stream outliving held arrays, the
loading modes and weight streaming, and the driver / validity causes told apart."""
from __future__ import annotations

import gc
import hashlib
import json
import sys
import threading
import types

import numpy as np
import pytest

from ideogram4_engine.runtime.backends import BackendUnavailable
from ideogram4_engine.runtime.backends import tensorrt as T
from trt_fakes import FakeCudaRuntime, Trace, cuda_modules, fake_tensorrt

GiB = 2**30
SHAPE_A, SHAPE_B = (1, 4, 8), (1, 6, 8)        # profile 0 admits A, profile 1 admits B


def _profiles():
    return [{"buckets": ["512x512"], "shapes": {"x": {"min": list(SHAPE_A), "opt": list(SHAPE_A), "max": list(SHAPE_A)}}},
            {"buckets": ["768x512"], "shapes": {"x": {"min": list(SHAPE_B), "opt": list(SHAPE_B), "max": list(SHAPE_B)}}}]


def _manifest(tmp_path, trt, components=("guided_step",), sizes=None, streamable=()):
    """An engines folder with fake engine files (JSON specs the fake runtime deserializes) and their checksums."""
    sizes = sizes or {}
    builder = {"name": "tensorrt" if trt.__name__ == "tensorrt" else "tensorrt-rtx", "module": trt.__name__,
               "version": trt.__version__}
    entries, comps = {}, {}
    for c in components:
        spec = {"name": c, "profiles": 2, "streamable": 4096 if c in streamable else 0}
        data = json.dumps(spec).encode()
        (tmp_path / f"{c}.engine").write_bytes(data)
        need = sizes.get(c, 1 * GiB)
        entries[c] = {"file": f"{c}.engine", "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                      "builder": builder, "targets": {"compute_capabilities": ["9.0", "8.9", "12.0"],
                                                      "forward_compatible": False},
                      "profiles": _profiles(), "weights_bytes": need // 2, "activation_bytes": need - len(data)}
        if c in streamable:
            entries[c]["weight_streaming"] = True
        comps[c] = {"inputs": [{"name": "x", "shape": ["batch", "image_tokens", 8]}]}
    raw = {"engines": {"builder": builder, "components": entries}, "components": comps}
    return types.SimpleNamespace(root=tmp_path, raw=raw)


@pytest.fixture
def gpu(monkeypatch):
    """Install the doubles as `tensorrt` and `cuda.bindings.runtime`; returns (trace, trt, rt)."""
    trace = Trace()
    rt = FakeCudaRuntime(trace)
    trt = fake_tensorrt(trace, rt)
    for name, mod in cuda_modules(rt).items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trace, trt, rt


def _x(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _check(be, out, x, profile):
    np.testing.assert_array_equal(be.download(out["y"]), 2 * x + profile)


# ---------------------------------------------------------------------------------------------- CUDA graphs

def test_plain_execute_after_a_shape_change_then_capture_then_replay(gpu, tmp_path):
    trace, trt, rt = gpu
    be = T.TensorRTBackend(_manifest(tmp_path, trt), cuda_graphs=True)
    m = len(trace)
    x = _x(SHAPE_A, 0)
    _check(be, be.run("guided_step", {"x": x}), x, 0)
    first = [k for k in trace.since(m) if k in ("set_input_shape", "execute_async_v3", "begin_capture", "launch")]
    assert first == ["set_input_shape", "execute_async_v3"] and trace[-1] != ("execute_async_v3", "captured")
    m = len(trace)
    x2 = _x(SHAPE_A, 1)
    _check(be, be.run("guided_step", {"x": x2}), x2, 0)          # same shape: captured now, then replayed
    second = [t for t in trace[m:] if t[0] in ("set_input_shape", "execute_async_v3", "begin_capture", "launch")]
    assert [t[0] for t in second] == ["begin_capture", "execute_async_v3", "launch"]
    assert second[1] == ("execute_async_v3", "captured")
    m = len(trace)
    x3 = _x(SHAPE_A, 2)
    _check(be, be.run("guided_step", {"x": x3}), x3, 0)          # replay only: nothing is set or enqueued anew
    assert "launch" in trace.since(m)
    assert not {"set_input_shape", "execute_async_v3", "set_tensor_address", "begin_capture"} & set(trace.since(m))
    assert not any(g["tainted"] for g in rt.graphs.values())


def test_profile_switch_and_returning_shape_run_plain_before_capture(gpu, tmp_path):
    trace, trt, rt = gpu
    be = T.TensorRTBackend(_manifest(tmp_path, trt), cuda_graphs=True)
    for shape, seed in ((SHAPE_A, 0), (SHAPE_A, 1)):
        be.run("guided_step", {"x": _x(shape, seed)})
    captured_a = set(rt.graphs)
    m = len(trace)
    xb = _x(SHAPE_B, 2)
    _check(be, be.run("guided_step", {"x": xb}), xb, 1)           # another profile: plain, A's graph dropped
    kinds = trace.since(m)
    assert kinds.index("graph_destroy") < kinds.index("set_optimization_profile_async") \
        < kinds.index("set_input_shape") < kinds.index("execute_async_v3")
    assert ("execute_async_v3", "plain") in trace[m:] and "begin_capture" not in kinds
    m = len(trace)
    xb2 = _x(SHAPE_B, 3)
    _check(be, be.run("guided_step", {"x": xb2}), xb2, 1)         # B again: captured
    assert "begin_capture" in trace.since(m)
    m = len(trace)
    xa = _x(SHAPE_A, 4)
    _check(be, be.run("guided_step", {"x": xa}), xa, 0)           # back to A: plain first, never A's old graph
    assert "begin_capture" not in trace.since(m) and ("execute_async_v3", "plain") in trace[m:]
    assert not any(t[0] == "launch" and t[1] in captured_a for t in trace[m:])
    m = len(trace)
    xa2 = _x(SHAPE_A, 5)
    _check(be, be.run("guided_step", {"x": xa2}), xa2, 0)         # and then captured again
    assert "begin_capture" in trace.since(m)
    assert not any(g["tainted"] for g in rt.graphs.values())      # no profile copy / shape work inside a graph


def test_failed_capture_falls_back_to_plain_and_does_not_poison_the_shape(gpu, tmp_path, capsys):
    trace, trt, rt = gpu
    be = T.TensorRTBackend(_manifest(tmp_path, trt), cuda_graphs=True)
    be.run("guided_step", {"x": _x(SHAPE_A, 0)})
    rt.fail.add("cudaStreamEndCapture")                          # the next capture is invalidated
    m = len(trace)
    x = _x(SHAPE_A, 1)
    _check(be, be.run("guided_step", {"x": x}), x, 0)             # the call still succeeds, run plainly
    assert trace.since(m).count("begin_capture") == 1 and ("execute_async_v3", "plain") in trace[m:]
    assert all(s["capturing"] is None for s in rt.streams.values())          # the stream left capture mode
    assert "capture failed" in capsys.readouterr().err
    for seed in (2, 3):                                           # later calls: plain, no retry, no error
        m = len(trace)
        x = _x(SHAPE_A, seed)
        _check(be, be.run("guided_step", {"x": x}), x, 0)
        assert "begin_capture" not in trace.since(m) and ("execute_async_v3", "plain") in trace[m:]
    for seed in (4, 5):                                           # other shapes still get graphs
        be.run("guided_step", {"x": _x(SHAPE_B, seed)})
    assert "launch" in trace.since(m)


@pytest.mark.parametrize("call, words", [
    ("set_input_shape", ["set_input_shape(x, (1, 6, 8))", "outside profile"]),
    ("set_optimization_profile_async", ["set_optimization_profile_async(1)", "profile 1 refused"]),
    ("set_tensor_address", ["set_tensor_address(x)"]),
    ("execute_async_v3", ["execute_async_v3 failed", "enqueue failed"]),
])
def test_tensorrt_return_values_are_checked(gpu, tmp_path, call, words):
    trace, trt, rt = gpu
    be = T.TensorRTBackend(_manifest(tmp_path, trt))
    be.run("guided_step", {"x": _x(SHAPE_A, 0)})
    trt.fail.add(call)
    with pytest.raises(RuntimeError) as e:
        be.run("guided_step", {"x": _x(SHAPE_B, 1)})
    for w in words:
        assert w in str(e.value), str(e.value)
    trt.fail.clear()                                              # a later call binds afresh and works
    x = _x(SHAPE_B, 2)
    _check(be, be.run("guided_step", {"x": x}), x, 1)


# ---------------------------------------------------------------------------------------------- threads, stream

def test_every_calling_thread_selects_the_device(gpu, tmp_path):
    trace, trt, rt = gpu
    be = T.TensorRTBackend(_manifest(tmp_path, trt))
    result = {}

    def worker():
        x = _x(SHAPE_A, 7)
        result["ok"] = np.array_equal(be.download(be.run("guided_step", {"x": x})["y"]), 2 * x)
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert result["ok"]                          # the fake refuses memory on a thread without cudaSetDevice
    assert len({tid for kind, *rest in trace if kind == "cudaSetDevice" for tid in rest[1:]}) == 2


def test_close_keeps_the_stream_until_held_arrays_are_freed(gpu, tmp_path):
    trace, trt, rt = gpu
    be = T.TensorRTBackend(_manifest(tmp_path, trt))
    out = be.run("guided_step", {"x": _x(SHAPE_A, 0)})["y"]
    be.close()
    assert "cudaStreamDestroy" not in trace.kinds() and not trt.live        # engines gone, stream kept
    del out, be
    gc.collect()
    kinds = trace.kinds()
    assert "cudaStreamDestroy" in kinds and kinds.index("cudaStreamDestroy") > max(
        i for i, k in enumerate(kinds) if k == "cudaFreeAsync")


# ---------------------------------------------------------------------------------------------- memory modes

COMPONENTS = ("text_encoder", "dit_cond", "dit_uncond", "guided_step", "vae_decoder")
SIZES = {"text_encoder": 9 * GiB, "dit_cond": 10 * GiB, "dit_uncond": 10 * GiB, "guided_step": 1 * GiB,
         "vae_decoder": 3 * GiB}


@pytest.mark.parametrize("mode, groups", [
    ("resident", [set(COMPONENTS)]),
    ("release_text_encoder", [{"text_encoder"}, {"dit_cond", "dit_uncond", "guided_step", "vae_decoder"}]),
    ("on_demand", [{"text_encoder"}, {"dit_cond", "dit_uncond", "guided_step"}, {"vae_decoder"}]),
])
def test_memory_modes_load_one_group_at_a_time(gpu, tmp_path, mode, groups):
    trace, trt, rt = gpu
    be = T.TensorRTBackend(_manifest(tmp_path, trt, COMPONENTS, SIZES), memory_mode=mode)
    seen = []
    for _ in range(2):                                            # two requests: groups come back as needed
        for c in ("text_encoder", "dit_cond", "dit_uncond", "guided_step", "dit_cond", "vae_decoder"):
            x = _x(SHAPE_A, 0)
            _check(be, be.run(c, {"x": x}), x, 0)
            seen.append(set(trt.live))
    assert all(any(live <= g for g in groups) for live in seen), seen      # never two groups at once
    assert {frozenset(s) for s in seen} == {frozenset(g) for g in groups}
    peak = max(sum(SIZES[c] for c in g) for g in groups)
    assert T.memory_estimate(be.entries, mode)[0] == peak


def test_memory_refusal_names_the_modes_that_fit(gpu, tmp_path):
    trace, trt, rt = gpu
    rt.free_bytes = 24 * GiB                                      # a 24 GB card: 33 GiB resident does not fit
    with pytest.raises(T.EngineMismatch) as e:
        T.TensorRTBackend(_manifest(tmp_path, trt, COMPONENTS, SIZES))
    msg = str(e.value)
    assert "insufficient GPU memory" in msg and "memory_mode='on_demand' needs about 21.00 GiB" in msg
    be = T.TensorRTBackend(_manifest(tmp_path, trt, COMPONENTS, SIZES), memory_mode="on_demand")
    assert not trt.live                                           # nothing loaded before it is needed
    with pytest.raises(ValueError, match="memory_mode 'lazy' is not one of resident"):
        T.TensorRTBackend(_manifest(tmp_path, trt, COMPONENTS, SIZES), memory_mode="lazy")
    be.close()


def test_weight_streaming_budget_is_set_before_the_context(gpu, tmp_path):
    trace, trt, rt = gpu
    man = _manifest(tmp_path, trt, ("dit_cond", "guided_step"), SIZES, streamable=("dit_cond",))
    T.TensorRTBackend(man, weight_streaming_budget=2 * GiB)
    i = trace.index(("weight_streaming_budget_v2", "dit_cond", min(2 * GiB, SIZES["dit_cond"] // 2)))
    assert trace.index(("create_execution_context", "dit_cond")) > i
    assert not any(t[0] == "weight_streaming_budget_v2" and t[1] == "guided_step" for t in trace)
    with pytest.raises(ValueError, match="--weight-streaming"):
        T.TensorRTBackend(_manifest(tmp_path, trt, ("guided_step",)), weight_streaming_budget=GiB)
    with pytest.raises(ValueError, match="number of bytes"):
        T.TensorRTBackend(man, weight_streaming_budget=-1)
    man.raw["engines"]["components"]["guided_step"]["weight_streaming"] = True   # recorded, but not streamable
    with pytest.raises(T.EngineMismatch, match="guided_step.engine has no streamable weights"):
        T.TensorRTBackend(man, weight_streaming_budget="auto")


def test_memory_report_states_each_mode_as_an_estimate(tmp_path):
    trt = types.SimpleNamespace(__name__="tensorrt", __version__="10.15.1.29")
    lines = T.memory_report(_manifest(tmp_path, trt, COMPONENTS, SIZES))
    text = "\n".join(lines)
    assert "ESTIMATE" in lines[0]
    assert "resident                33.00 GiB" in text and "on_demand               21.00 GiB" in text
    assert "release_text_encoder    24.00 GiB" in text and "without `--weight-streaming`" in text
    man = _manifest(tmp_path, trt, COMPONENTS, SIZES)
    del man.raw["engines"]
    for c, s in SIZES.items():
        man.raw["components"][c]["initializer_bytes"] = s // 2
    assert "activations are known after `make engines`" in T.memory_report(man)[0]


# ---------------------------------------------------------------------------------------------- causes

def test_old_driver_says_update_the_driver(gpu, tmp_path):
    trace, trt, rt = gpu
    rt.device_count_error, rt.driver = rt.cudaError_t.cudaErrorInsufficientDriver, 12080
    with pytest.raises(T.DriverError) as e:
        T.TensorRTBackend(_manifest(tmp_path, trt))
    msg = str(e.value)
    assert "driver supports CUDA 12.8" in msg and "runtime in use is 13.0" in msg and "update the driver" in msg
    assert "rebuild" not in msg and isinstance(e.value, BackendUnavailable)
    rt.device_count_error = rt.cudaError_t.cudaErrorNoDevice
    with pytest.raises(BackendUnavailable, match="no usable CUDA GPU.*CUDA_VISIBLE_DEVICES"):
        T.TensorRTBackend(_manifest(tmp_path, trt))


@pytest.mark.parametrize("reasons, kind, words, absent", [
    (["OLD_CUDA_DRIVER"], T.DriverError, ["update the driver"], "rebuild"),
    (["INSUFFICIENT_GPU_MEMORY"], T.EngineMismatch, ["free the GPU", "on_demand"], "rebuild"),
    (["VERSION_MISMATCH"], T.EngineMismatch, ["rebuild with `make engines`"], None),
    (["UNSUPPORTED_CC"], T.EngineMismatch, ["8.9 or later", "onnxruntime-cuda"], "rebuild"),
])
def test_rtx_validity_diagnostics_are_told_apart(monkeypatch, tmp_path, reasons, kind, words, absent):
    trace = Trace()
    rt = FakeCudaRuntime(trace, cc=(8, 9))
    trt = fake_tensorrt(trace, rt, version="1.7.1.116", name="tensorrt_rtx")
    diag = {n: 1 << i for i, n in enumerate(["VERSION_MISMATCH", "UNSUPPORTED_CC", "OLD_CUDA_DRIVER", "OLD_CUDA_RUNTIME",
                                             "INSUFFICIENT_GPU_MEMORY", "MALFORMED_ENGINE", "CUDA_ERROR"])}
    trt.EngineValidity = types.SimpleNamespace(VALID=0, INVALID=2)
    trt.EngineInvalidityDiagnostics = types.SimpleNamespace(__members__=diag)
    trt.Runtime.engine_header_size = 32
    trt.Runtime.get_engine_validity = lambda self, head: (2, sum(diag[r] for r in reasons))
    for name, mod in cuda_modules(rt).items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", trt)
    with pytest.raises(kind) as e:
        T.TensorRTBackend(_manifest(tmp_path, trt))
    for w in words:
        assert w in str(e.value), str(e.value)
    if absent:
        assert absent not in str(e.value)
    assert "deserialize_cuda_engine" not in trace.kinds()          # refused on the header, before deserializing


# ---------------------------------------------------------------------------------------------- auto and options

def test_auto_hands_tensorrt_only_its_options_and_names_the_rest(gpu, tmp_path):
    """`create("auto", m, dequantize_at_load=True)` once raised TypeError from TensorRTBackend; now TensorRT (chosen:
    it runs here) gets only its own options and one warning names the ignored ones."""
    from ideogram4_engine.runtime import backends
    trace, trt, rt = gpu
    with pytest.warns(backends.OptionsIgnored) as w:
        be = backends.create("auto", _manifest(tmp_path, trt), dequantize_at_load=True, uncond_device_id=1,
                             cuda_graphs=True, shared_arena=True)
    assert isinstance(be, T.TensorRTBackend) and be.cuda_graphs is True
    assert [str(x.message) for x in w] == ["backend auto chose tensorrt, which does not take dequantize_at_load, "
                                           "uncond_device_id: ignored"]      # shared_arena=True is the default
    with pytest.raises(ValueError, match=r"dequantize_at_load=True needs backend onnxruntime-cuda or "
                                         r"onnxruntime-cpu \(not tensorrt\)"):
        backends.create("tensorrt", _manifest(tmp_path, trt), dequantize_at_load=True)
