"""On the GPU machine (H100/H200): what the TensorRT backend does there, for real. Writes $OUT/rtx_check.json.

Usage (device call carrying the engines folder and the tensorrt-rtx / cuda-bindings wheels):
    ENGINES=<engines folder built by `make engines`> python3 scripts/gpu_engine_check.py
"""
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

res = {}
out = Path(os.environ.get("OUT", "."))


def step(name):
    def deco(f):
        t = time.perf_counter()
        try:
            res[name] = {"ok": True, "value": f()}
        except BaseException as e:  # noqa: BLE001
            res[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()[-1500:]}
        res[name]["s"] = round(time.perf_counter() - t, 3)
        print(name, json.dumps(res[name])[:600], flush=True)
        return f
    return deco


import tensorrt_rtx as trt  # noqa: E402
from ideogram4_engine.runtime import backends  # noqa: E402
from ideogram4_engine.runtime.backends import tensorrt as T  # noqa: E402
from ideogram4_engine.runtime.manifest import Manifest  # noqa: E402

res["versions"] = {"tensorrt_rtx": trt.__version__, "python": sys.version.split()[0]}
eng = Path(os.environ.get("ENGINES", ".device/rtx/eng")).absolute()
raw = json.loads((eng / "manifest.json").read_text())
m = Manifest(eng, raw)


@step("cuda_plumbing")
def _():
    cuda = T._Cuda()
    cc, gpu = cuda.device(0)
    be = object.__new__(T.TensorRTBackend)          # the real upload/download methods, no engine needed
    be.cuda, be.stream = cuda, cuda.stream()
    x = np.random.default_rng(0).standard_normal((3, 1024, 128), dtype=np.float32)
    d = be.upload(x)
    y = be.download(d)
    d2 = T.DeviceArray(cuda, be.stream, x.shape, x.dtype)
    cuda.copy(d2.ptr, d.ptr, d.nbytes, "d2d", be.stream)
    # CUDA graph capture/replay of a device copy into a third buffer
    d3 = T.DeviceArray(cuda, be.stream, x.shape, x.dtype)
    cuda.sync(be.stream)
    cuda.begin_capture(be.stream)
    cuda.copy(d3.ptr, d2.ptr, d.nbytes, "d2d", be.stream)
    graph, ex = cuda.end_capture(be.stream)
    cuda.launch(ex, be.stream)
    z = be.download(d3)
    cuda.destroy_graph(graph, ex)
    ids = np.arange(12, dtype=np.int64).reshape(2, 6)
    free, total = cuda.mem_info()
    return {"gpu": gpu, "cc": cc, "roundtrip_equal": bool(np.array_equal(x, y)), "graph_copy_equal":
            bool(np.array_equal(x, z)), "int64_equal": bool(np.array_equal(be.download(be.upload(ids)), ids)),
            "free_gib": round(free / 2**30, 2), "total_gib": round(total / 2**30, 2)}


@step("backend_create_tensorrt")
def _():
    try:
        backends.create("tensorrt", m, components=("dit_cond", "vae_decoder", "guided_step"))
    except backends.BackendUnavailable as e:
        return {"refused": type(e).__name__, "message": str(e)}
    return {"refused": None}


@step("backend_auto")
def _():
    try:
        b = backends.create("auto", m, components=("guided_step",))
        return {"picked": b.name}
    except backends.BackendUnavailable as e:
        return {"none": str(e)}


def _collecting_logger(msgs: list[str], max_severity: int | None = None):
    """A TensorRT logger that appends "severity: message" to `msgs` (up to `max_severity` if given)."""
    class L(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, sev, msg):
            if max_severity is None or int(sev) <= max_severity:
                msgs.append(f"{sev}: {msg}")
    return L()


@step("rtx_own_checks")
def _():
    msgs = []
    lg = _collecting_logger(msgs)
    rt = trt.Runtime(lg)
    data = (eng / "dit_cond.engine").read_bytes()
    validity, diag = rt.get_engine_validity(data[: max(rt.engine_header_size, 64)])
    names = [n for n, v in trt.EngineInvalidityDiagnostics.__members__.items() if int(diag) & int(v)]
    engine = rt.deserialize_cuda_engine(data)
    return {"validity": str(validity), "diagnostics": names, "deserialized": engine is not None, "log": msgs[-6:]}


@step("rtx_build_on_gpu_host")
def _():
    from ideogram4_engine.export import engines as E  # noqa: F401  (needs onnx, jsonschema: may be missing)
    msgs = []
    lg = _collecting_logger(msgs, max_severity=2)
    b = trt.Builder(lg)
    net = b.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    p = trt.OnnxParser(net, lg)
    ok = p.parse_from_file(str(eng / "dit_cond.onnx"))
    cfg = b.create_builder_config()
    prof = b.create_optimization_profile()
    for n, s in raw["engines"]["components"]["dit_cond"]["profiles"][0]["shapes"].items():
        prof.set_shape(n, s["min"], s["opt"], s["max"])
    cfg.add_optimization_profile(prof)
    t = time.perf_counter()
    ser = b.build_serialized_network(net, cfg)
    return {"parsed": ok, "built": ser is not None, "bytes": ser.nbytes if ser else None,
            "s": round(time.perf_counter() - t, 2), "log": msgs[-6:]}


(out / "rtx_check.json").write_text(json.dumps(res, indent=1))
