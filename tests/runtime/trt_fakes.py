"""Test doubles for what lies *under* the TensorRT backend: a fake `tensorrt` module (runtime, engine, execution
context) and a fake cuda-bindings runtime module, both recording every call in one trace. The backend's own code
(profile switching, buffer binding, CUDA-graph capture and fallback, loading modes, error checks) runs for real.

Fake semantics, chosen to make the documented TensorRT rules observable:
  * device memory is host memory (numpy buffers), so copies and results can be checked;
  * a profile switch enqueues a copy on the stream, and `set_input_shape` leaves deferred work that the next
    `execute_async_v3` performs: if that execute is being captured, the graph is marked `tainted` (what TensorRT's
    guidance — one plain execute after a shape/profile change, then capture — avoids);
  * the engine computes y = 2·x + profile, reading the addresses bound when it runs (or when captured);
  * failures are switches on the fakes (`fail`), so return-value checks and capture fallback can be exercised."""
from __future__ import annotations

import ctypes
import enum
import json
import threading
import types

import numpy as np


class Trace(list):
    def kinds(self) -> list[str]:
        return [t[0] for t in self]

    def since(self, mark: int) -> list[str]:
        return [t[0] for t in self[mark:]]


# ------------------------------------------------------------------------------------------------ cuda-bindings

class _Err(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100
    cudaErrorStreamCaptureInvalidated = 901


class FakeCudaRuntime(types.ModuleType):
    """The subset of `cuda.bindings.runtime` the backend calls, returning (error, value) tuples like the real one."""

    cudaError_t = _Err
    cudaStreamNonBlocking = 1

    class cudaMemcpyKind(enum.IntEnum):
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2
        cudaMemcpyDeviceToDevice = 3

    class cudaStreamCaptureMode(enum.IntEnum):
        cudaStreamCaptureModeThreadLocal = 1

    class cudaDeviceAttr(enum.IntEnum):
        cudaDevAttrComputeCapabilityMajor = 75
        cudaDevAttrComputeCapabilityMinor = 76

    def __init__(self, trace: Trace, cc=(9, 0), free=64 << 30, total=80 << 30, driver=13000, runtime=13000):
        super().__init__("cuda.bindings.runtime")
        self.trace, self.cc, self.free_bytes, self.total = trace, cc, free, total
        self.driver, self.runtime = driver, runtime
        self.device_count_error = _Err.cudaSuccess
        self.fail: set[str] = set()           # names of calls that return an error once
        self.mem: dict[int, np.ndarray] = {}
        self.streams: dict[int, dict] = {}    # handle -> {"capturing": [ops] | None, "alive": bool}
        self.graphs: dict[int, dict] = {}
        self.current = {}                     # thread id -> device
        self._next = 1

    def _id(self) -> int:
        self._next += 1
        return self._next

    def _failing(self, name: str) -> bool:
        if name in self.fail:
            self.fail.discard(name)
            return True
        return False

    # device
    def cudaGetDeviceCount(self):
        return (self.device_count_error, 0 if self.device_count_error else 1)

    def cudaDriverGetVersion(self):
        return (_Err.cudaSuccess, self.driver)

    def cudaRuntimeGetVersion(self):
        return (_Err.cudaSuccess, self.runtime)

    def cudaGetErrorString(self, err):
        return (_Err.cudaSuccess, err.name.encode())

    def cudaSetDevice(self, d):
        self.current[threading.get_ident()] = d
        self.trace.append(("cudaSetDevice", d, threading.get_ident()))
        return (_Err.cudaSuccess,)

    def cudaDeviceGetAttribute(self, attr, d):
        return (_Err.cudaSuccess, self.cc[0] if attr == self.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor
                else self.cc[1])

    def cudaGetDeviceProperties(self, d):
        return (_Err.cudaSuccess, types.SimpleNamespace(name=b"Fake GPU"))

    def cudaMemGetInfo(self):
        return (_Err.cudaSuccess, self.free_bytes, self.total)

    # streams and memory
    def cudaStreamCreateWithFlags(self, flags):
        h = self._id()
        self.streams[h] = {"capturing": None, "alive": True}
        return (_Err.cudaSuccess, h)

    def cudaStreamDestroy(self, h):
        self.streams[h]["alive"] = False
        self.trace.append(("cudaStreamDestroy", h))
        return (_Err.cudaSuccess,)

    def cudaStreamSynchronize(self, h):
        return (_Err.cudaSuccess,)

    def cudaMallocAsync(self, n, h):
        if self.current.get(threading.get_ident()) is None:
            raise AssertionError("cudaMallocAsync on a thread without cudaSetDevice")
        buf = np.zeros(int(n), np.uint8)
        self.mem[buf.ctypes.data] = buf
        return (_Err.cudaSuccess, buf.ctypes.data)

    def cudaFreeAsync(self, ptr, h):
        if not self.streams[h]["alive"]:
            raise AssertionError("cudaFreeAsync on a destroyed stream")
        self.mem.pop(ptr, None)
        self.trace.append(("cudaFreeAsync", ptr))
        return (_Err.cudaSuccess,)

    def enqueue(self, h, op, what: str) -> None:
        """Run `op` now, or record it into the graph being captured on stream `h`."""
        cap = self.streams[h]["capturing"]
        if cap is None:
            op()
        else:
            cap.append((what, op))

    def cudaMemcpyAsync(self, dst, src, n, kind, h):
        self.enqueue(h, lambda: ctypes.memmove(dst, src, n), "memcpy")
        return (_Err.cudaSuccess,)

    # graphs
    def cudaStreamBeginCapture(self, h, mode):
        self.trace.append(("begin_capture",))
        self.streams[h]["capturing"] = []
        return (_Err.cudaSuccess,)

    def cudaStreamEndCapture(self, h):
        ops, self.streams[h]["capturing"] = self.streams[h]["capturing"], None
        self.trace.append(("end_capture",))
        if self._failing("cudaStreamEndCapture"):
            return (_Err.cudaErrorStreamCaptureInvalidated, None)
        g = self._id()
        self.graphs[g] = {"ops": ops, "tainted": any(w != "kernel" and w != "memcpy" for w, _ in ops)}
        return (_Err.cudaSuccess, g)

    def cudaGraphInstantiate(self, g, flags):
        return (_Err.cudaSuccess, g)

    def cudaGraphLaunch(self, g, h):
        self.trace.append(("launch", g))
        for _, op in self.graphs[g]["ops"]:
            op()
        return (_Err.cudaSuccess,)

    def cudaGraphExecDestroy(self, g):
        self.trace.append(("graph_destroy", g))
        return (_Err.cudaSuccess,)

    def cudaGraphDestroy(self, g):
        return (_Err.cudaSuccess,)

    def read(self, ptr: int, nbytes: int) -> bytes:
        return ctypes.string_at(ptr, nbytes)


def cuda_modules(rt: FakeCudaRuntime) -> dict[str, types.ModuleType]:
    """sys.modules entries so that `from cuda.bindings import runtime` yields the fake."""
    cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    bindings.runtime, cuda.bindings = rt, bindings
    return {"cuda": cuda, "cuda.bindings": bindings, "cuda.bindings.runtime": rt}


# ------------------------------------------------------------------------------------------------ tensorrt

class FakeContext:
    def __init__(self, engine: "FakeEngine"):
        self.engine, self.trace, self.rt = engine, engine.trace, engine.rt
        self.active_optimization_profile = 0
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.pending = False            # deferred work from a profile or shape change

    def _log_error(self, msg: str) -> None:
        self.engine.logger.log(self.engine.trt.ILogger.ERROR, msg)

    def set_optimization_profile_async(self, idx, stream):
        self.trace.append(("set_optimization_profile_async", idx))
        if "set_optimization_profile_async" in self.engine.fail:
            self._log_error(f"profile {idx} refused")
            return False
        self.active_optimization_profile = idx
        self.rt.enqueue(stream, lambda: None, "profile-copy")
        self.pending = True
        return True

    def set_input_shape(self, name, shape):
        self.trace.append(("set_input_shape", name, tuple(shape)))
        if "set_input_shape" in self.engine.fail:
            self._log_error(f"shape {tuple(shape)} outside profile {self.active_optimization_profile}")
            return False
        self.shapes[name] = tuple(shape)
        self.pending = True
        return True

    def set_tensor_address(self, name, ptr):
        self.trace.append(("set_tensor_address", name))
        if "set_tensor_address" in self.engine.fail:
            return False
        self.addresses[name] = ptr
        return True

    def get_tensor_shape(self, name):
        return self.shapes["x"] if name == "y" else self.shapes[name]

    def execute_async_v3(self, stream):
        capturing = self.rt.streams[stream]["capturing"] is not None
        self.trace.append(("execute_async_v3", "captured" if capturing else "plain"))
        if "execute_async_v3" in self.engine.fail:
            self._log_error("enqueue failed")
            return False
        if self.pending:
            self.rt.enqueue(stream, lambda: None, "deferred-shape-work")
            self.pending = False
        n = int(np.prod(self.shapes["x"])) * 4
        src, dst, prof = self.addresses["x"], self.addresses["y"], self.active_optimization_profile

        def kernel():
            x = np.frombuffer(ctypes.string_at(src, n), np.float32)
            y = (2 * x + prof).astype(np.float32)
            ctypes.memmove(dst, y.ctypes.data, n)
        self.rt.enqueue(stream, kernel, "kernel")
        return True


class FakeEngine:
    def __init__(self, trt, spec: dict, logger):
        self.trt, self.trace, self.rt, self.logger = trt, trt.trace, trt.rt, logger
        self.spec, self.fail = spec, trt.fail
        self.num_optimization_profiles = spec["profiles"]
        self.num_io_tensors = 2
        self.streamable_weights_size = spec.get("streamable", 0)
        self._budget = -1
        trt.live.add(spec["name"])

    def get_tensor_name(self, i):
        return ("x", "y")[i]

    def get_tensor_mode(self, name):
        return self.trt.TensorIOMode.INPUT if name == "x" else self.trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return self.trt.DataType.FLOAT

    @property
    def weight_streaming_budget_v2(self):
        return self._budget

    @weight_streaming_budget_v2.setter
    def weight_streaming_budget_v2(self, v):
        self.trace.append(("weight_streaming_budget_v2", self.spec["name"], v))
        self._budget = v

    def get_weight_streaming_automatic_budget(self):
        return self.streamable_weights_size // 2

    def create_execution_context(self, *args):
        self.trace.append(("create_execution_context", self.spec["name"]))
        return FakeContext(self)

    def __del__(self):
        self.trt.live.discard(self.spec["name"])
        self.trace.append(("engine_freed", self.spec["name"]))


def fake_tensorrt(trace: Trace, rt: FakeCudaRuntime, version: str = "10.15.1.29",
                  name: str = "tensorrt") -> types.ModuleType:
    trt = types.ModuleType(name)
    trt.__version__, trt.trace, trt.rt, trt.fail, trt.live = version, trace, rt, set(), set()

    class ILogger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = 0, 1, 2, 3, 4

        def __init__(self):
            pass

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            spec = json.loads(bytes(data))
            trace.append(("deserialize_cuda_engine", spec["name"]))
            return FakeEngine(trt, spec, self.logger)

    trt.ILogger, trt.Runtime = ILogger, Runtime
    trt.TensorIOMode = enum.Enum("TensorIOMode", "INPUT OUTPUT")
    trt.DataType = enum.Enum("DataType", "FLOAT")
    trt.nptype = lambda dt: np.float32
    return trt
