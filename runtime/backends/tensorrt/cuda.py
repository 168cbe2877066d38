"""The few CUDA runtime calls the backend needs, through cuda-bindings (no torch): device selection, stream-ordered
memory, copies, the stream, CUDA-graph capture. Every call's status is checked; a failure names the call, the
CUDA error and, for the known causes (old driver, no GPU, driver mismatch), what to do."""
from __future__ import annotations

import threading

import numpy as np

from ..base import BackendUnavailable
from .errors import CUDA_ERROR_ADVICE, DriverError, cuda_error_hint, cuda_version


class CudaError(RuntimeError):
    def __init__(self, message: str, code: int = -1):
        super().__init__(message)
        self.code = code


def _handle(stream) -> object:
    return getattr(stream, "handle", stream)


class Stream:
    """A non-blocking CUDA stream. Arrays allocated on it hold a reference, so it is destroyed only after the last
    of them is freed (a caller may keep results after the backend is closed)."""

    def __init__(self, cuda: "Cuda"):
        self.cuda = cuda
        self.handle = cuda.call("cudaStreamCreateWithFlags",
                                cuda.rt.cudaStreamCreateWithFlags(cuda.rt.cudaStreamNonBlocking))

    def __int__(self) -> int:
        return int(self.handle)

    def __del__(self):
        try:
            self.cuda.rt.cudaStreamSynchronize(self.handle)
            self.cuda.rt.cudaStreamDestroy(self.handle)
        except Exception:  # noqa: BLE001 -- interpreter shutdown or a dead context
            pass


class Cuda:
    """cuda-bindings' runtime API for one device. `bind()` makes that device current on the calling thread (CUDA's
    current device is per thread; a server may call the backend from several)."""

    def __init__(self, rt=None):
        if rt is None:
            try:
                from cuda.bindings import runtime as rt
            except ImportError:
                try:
                    from cuda import cudart as rt          # cuda-python < 12.6 layout
                except ImportError as e:
                    raise BackendUnavailable(f"cuda-bindings is not installed ({e}); the TensorRT backend moves memory "
                                             "through it: pip install cuda-bindings (or '.[trt]')") from None
        self.rt = rt
        self.ok = rt.cudaError_t.cudaSuccess
        self.device_id = 0
        self._bound = threading.local()

    def call(self, what: str, result):
        err, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
        if err != self.ok:
            name = getattr(err, "name", str(err))
            try:
                desc = self.rt.cudaGetErrorString(err)[1].decode()
            except Exception:  # noqa: BLE001
                desc = ""
            code = int(getattr(err, "value", err))
            raise CudaError(f"{what}: {name}" + (f" ({desc})" if desc else "") + cuda_error_hint(code), code)
        return rest[0] if len(rest) == 1 else (rest or None)

    def _versions(self) -> str:
        try:
            drv = self.call("cudaDriverGetVersion", self.rt.cudaDriverGetVersion())
            run = self.call("cudaRuntimeGetVersion", self.rt.cudaRuntimeGetVersion())
            return (f"the driver supports CUDA {cuda_version(int(drv))}, the CUDA runtime in use is "
                    f"{cuda_version(int(run))}")
        except CudaError:
            return "versions unknown"

    def device(self, device_id: int) -> tuple[tuple[int, int], str]:
        """Select `device_id`; returns its compute capability and a label. Refuses with the cause: an old driver or
        mismatched driver libraries (`DriverError`: update the driver, not the engines), no GPU, a bad ordinal."""
        rt = self.rt
        try:
            count = self.call("cudaGetDeviceCount", rt.cudaGetDeviceCount())
        except CudaError as e:
            if e.code == 35:
                raise DriverError(f"the NVIDIA driver is too old for the installed CUDA runtime ({self._versions()}): "
                                  f"{CUDA_ERROR_ADVICE[35]}") from None
            if e.code in (803, 804):
                raise DriverError(f"CUDA cannot start: {e}") from None
            raise BackendUnavailable(f"no usable CUDA GPU: {e}") from None
        if count == 0:
            raise BackendUnavailable("no CUDA GPU is visible")
        if not 0 <= device_id < count:
            raise BackendUnavailable(f"device {device_id} does not exist ({count} GPU(s) visible)")
        self.device_id = device_id
        self._bound = threading.local()
        self.bind()
        attr = rt.cudaDeviceAttr
        major = self.call("cudaDeviceGetAttribute", rt.cudaDeviceGetAttribute(
            attr.cudaDevAttrComputeCapabilityMajor, device_id))
        minor = self.call("cudaDeviceGetAttribute", rt.cudaDeviceGetAttribute(
            attr.cudaDevAttrComputeCapabilityMinor, device_id))
        try:
            name = self.call("cudaGetDeviceProperties", rt.cudaGetDeviceProperties(device_id)).name
            name = name.decode(errors="replace").rstrip("\0") if isinstance(name, bytes) else str(name)
        except CudaError:
            name = "GPU"
        return (int(major), int(minor)), f"GPU {device_id} ({name}, compute capability {major}.{minor})"

    def bind(self) -> None:
        if getattr(self._bound, "device", None) != self.device_id:
            self.call("cudaSetDevice", self.rt.cudaSetDevice(self.device_id))
            self._bound.device = self.device_id

    def mem_info(self) -> tuple[int, int]:
        free, total = self.call("cudaMemGetInfo", self.rt.cudaMemGetInfo())
        return int(free), int(total)

    def stream(self) -> Stream:
        return Stream(self)

    def malloc(self, nbytes: int, stream) -> int:
        return int(self.call("cudaMallocAsync", self.rt.cudaMallocAsync(max(int(nbytes), 256), _handle(stream))))

    def free(self, ptr: int, stream) -> None:
        self.call("cudaFreeAsync", self.rt.cudaFreeAsync(ptr, _handle(stream)))

    def copy(self, dst: int, src: int, nbytes: int, kind: str, stream) -> None:
        k = {"h2d": self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, "d2h": self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
             "d2d": self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice}[kind]
        self.call(f"cudaMemcpyAsync({kind})", self.rt.cudaMemcpyAsync(dst, src, nbytes, k, _handle(stream)))

    def sync(self, stream) -> None:
        self.call("cudaStreamSynchronize", self.rt.cudaStreamSynchronize(_handle(stream)))

    def stream_handle(self, stream) -> int:
        return int(_handle(stream))

    # CUDA graphs (full TensorRT path)
    def begin_capture(self, stream) -> None:
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self.call("cudaStreamBeginCapture", self.rt.cudaStreamBeginCapture(_handle(stream), mode))

    def end_capture(self, stream):
        """End the capture (always, even after a failed enqueue: the stream must leave capture mode) and instantiate
        the graph; a graph that fails to instantiate is destroyed before the error is raised."""
        graph = self.call("cudaStreamEndCapture", self.rt.cudaStreamEndCapture(_handle(stream)))
        try:
            return graph, self.call("cudaGraphInstantiate", self.rt.cudaGraphInstantiate(graph, 0))
        except CudaError:
            self.rt.cudaGraphDestroy(graph)
            raise

    def launch(self, exec_graph, stream) -> None:
        self.call("cudaGraphLaunch", self.rt.cudaGraphLaunch(exec_graph, _handle(stream)))

    def destroy_graph(self, graph, exec_graph) -> None:
        self.rt.cudaGraphExecDestroy(exec_graph)
        self.rt.cudaGraphDestroy(graph)


_Cuda = Cuda       # the name scripts/gpu_engine_check.py uses


class DeviceArray:
    """A dense array in GPU memory (stream-ordered allocation, freed when dropped; keeps its stream alive)."""

    __slots__ = ("ptr", "shape", "dtype", "nbytes", "_cuda", "_stream", "__weakref__")

    def __init__(self, cuda: Cuda, stream, shape, dtype):
        self.shape, self.dtype = tuple(int(d) for d in shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self._cuda, self._stream = cuda, stream
        self.ptr = cuda.malloc(self.nbytes, stream)

    def __del__(self):
        try:
            self._cuda.free(self.ptr, self._stream)
        except Exception:  # noqa: BLE001 -- interpreter shutdown or a dead context: nothing left to free
            pass

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype}, ptr=0x{self.ptr:x})"
