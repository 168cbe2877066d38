"""CUDA-graph replay for the onnxruntime CUDA sessions of the DiTs (backend option `cuda_graph`, opt-in).

onnxruntime's CUDA provider (`enable_cuda_graph`) captures a session's kernels once and replays them with one
launch, which removes the host-side launch gaps between the ~1000 kernels of a DiT forward. Its rules, and how
this module meets them:
* every node on the CUDA provider, no CPU-side shape work: the cuda twins have none (onnxruntime refuses the
  session otherwise; that counts as a failed capture below);
* the same device addresses for inputs and outputs on every replay: one IO binding per input-shape set with
  persistent buffers; each call copies its inputs into them and the outputs out of them (an Identity session:
  a few MB per step, device to device), so callers keep the usual semantics (fresh outputs they may keep);
* one graph per input-shape set: the run option `gpu_graph_id` (0, 1, ...; -1 runs without capture, used for
  the first call of a shape to learn its output shapes);
* no allocation during capture and nothing else writing the memory the graph's intermediates live in between
  replays: such a session keeps its own arena (not the shared one other sessions allocate from).
A capture or replay that fails (an op that synchronises or allocates while capturing, e.g.) costs one warning;
the component then runs without capture, on a session created afresh without the option.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np

_NUMPY = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


class CudaGraphOff(RuntimeWarning):
    """A session could not be captured as a CUDA graph; it runs without capture."""


class GraphRunner:
    """Runs one component's session through CUDA-graph replay, falling back to plain runs (see the module doc).

    make_session(cuda_graph: bool) creates the component's session; plain_run(session, inputs) is the backend's
    ordinary run (IO binding, outputs on the device)."""

    def __init__(self, ort, component: str, device_id: int, make_session: Callable[[bool], Any],
                 plain_run: Callable[[Any, dict], dict]):
        self.ort, self.component, self.device_id = ort, component, device_id
        self._make, self._plain = make_session, plain_run
        self.failed: str | None = None
        self.session = None
        try:
            self.session = make_session(True)
        except Exception as e:  # noqa: BLE001 -- e.g. "cannot use the CUDA Graph feature": a node off the CUDA provider
            self._give_up(f"the session does not take enable_cuda_graph ({str(e).splitlines()[0][:300]})")
        self._graphs: dict[tuple, dict] = {}        # input shapes -> {id, binding, inputs, outputs}
        self._copy: dict[tuple, Any] = {}           # dtypes -> Identity session

    def run(self, inputs: dict[str, Any]) -> dict[str, Any]:
        if self.failed is not None:
            return self._plain(self.session, inputs)
        vals = {k: self._ortvalue(v) for k, v in inputs.items()}
        key = tuple(sorted((k, tuple(v.shape()), v.data_type()) for k, v in vals.items()))
        try:
            g = self._graphs.get(key)
            if g is None:
                g = self._graphs[key] = self._prepare(key, vals)
            self._copy_values([vals[k] for k in g["names"]], g["inputs"])
            ro = self.ort.RunOptions()
            ro.add_run_config_entry("gpu_graph_id", str(g["id"]))
            self.session.run_with_iobinding(g["binding"], ro)
            fresh = [self.ort.OrtValue.ortvalue_from_shape_and_type(v.shape(), _NUMPY[v.data_type()], "cuda",
                                                                    self.device_id) for v in g["outputs"]]
            self._copy_values(g["outputs"], fresh)
            return dict(zip(g["out_names"], fresh))
        except Exception as e:  # noqa: BLE001 -- onnxruntime's errors (capture invalidated, op not permitted, ...)
            self._give_up(f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            return self._plain(self.session, inputs)

    def _ortvalue(self, v):
        if isinstance(v, self.ort.OrtValue):
            return v
        return self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v), "cuda", self.device_id)

    def _prepare(self, key: tuple, vals: dict) -> dict:
        """Persistent buffers for this shape set and its graph id; one plain run learns the output shapes."""
        for k, v in vals.items():
            if v.data_type() not in _NUMPY:
                raise TypeError(f"input {k} is {v.data_type()}; CUDA-graph buffers support {', '.join(_NUMPY)}")
        plain = self.ort.RunOptions()
        plain.add_run_config_entry("gpu_graph_id", "-1")
        b = self.session.io_binding()
        for k, v in vals.items():
            b.bind_ortvalue_input(k, v)
        out_names = [o.name for o in self.session.get_outputs()]
        for name in out_names:
            b.bind_output(name, "cuda", self.device_id)
        self.session.run_with_iobinding(b, plain)
        shapes = [(o.shape(), o.data_type()) for o in b.get_outputs()]
        del b
        names = sorted(vals)
        alloc = lambda s, t: self.ort.OrtValue.ortvalue_from_shape_and_type(s, _NUMPY[t], "cuda", self.device_id)  # noqa: E731
        inputs = [alloc(vals[k].shape(), vals[k].data_type()) for k in names]
        outputs = [alloc(s, t) for s, t in shapes]
        binding = self.session.io_binding()
        for k, v in zip(names, inputs):
            binding.bind_ortvalue_input(k, v)
        for k, v in zip(out_names, outputs):
            binding.bind_ortvalue_output(k, v)
        return {"id": len(self._graphs), "names": names, "inputs": inputs, "outputs": outputs, "out_names": out_names,
                "binding": binding}

    def _copy_values(self, src: list, dst: list) -> None:
        """dst[i] <- src[i] on the device, through an Identity session (no host round trip)."""
        types = tuple(v.data_type() for v in src)
        sess = self._copy.get(types)
        if sess is None:
            sess = self._copy[types] = _identity_session(self.ort, types, self.device_id)
        b = sess.io_binding()
        for i, (s, d) in enumerate(zip(src, dst)):
            b.bind_ortvalue_input(f"x{i}", s)
            b.bind_ortvalue_output(f"y{i}", d)
        sess.run_with_iobinding(b)

    def _give_up(self, why: str) -> None:
        self.failed = why
        warnings.warn(f"CUDA graph off for {self.component}: {why}; running it without capture", CudaGraphOff,
                      stacklevel=4)
        self._graphs.clear()
        self.session = None         # released before its replacement is created (its arena goes with it)
        self.session = self._make(False)


def _identity_session(ort, types: tuple[str, ...], device_id: int):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(identity_model(types), so, providers=[("CUDAExecutionProvider", {"device_id": device_id})])


_ELEM = {"tensor(float)": 1, "tensor(int32)": 6, "tensor(int64)": 7}     # onnx TensorProto.DataType


def identity_model(types: tuple[str, ...]) -> bytes:
    """A serialized ONNX model (opset 17) with y_i = Identity(x_i) of the given element types, any shapes,
    written as protobuf by hand: the runtime does not depend on the onnx package."""
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            b, n = n & 0x7F, n >> 7
            out.append(b | (0x80 if n else 0))
            if not n:
                return bytes(out)

    def field(num: int, payload: bytes | int) -> bytes:
        if isinstance(payload, int):
            return varint(num << 3) + varint(payload)
        return varint(num << 3 | 2) + varint(len(payload)) + payload

    def value(name: str, t: str) -> bytes:        # ValueInfoProto{name, type{tensor_type{elem_type}}}
        return field(1, name.encode()) + field(2, field(1, field(1, _ELEM[t])))

    graph = b"".join(field(1, field(1, f"x{i}".encode()) + field(2, f"y{i}".encode()) + field(4, b"Identity"))
                     for i in range(len(types)))
    graph += field(2, b"copy")
    graph += b"".join(field(11, value(f"x{i}", t)) for i, t in enumerate(types))
    graph += b"".join(field(12, value(f"y{i}", t)) for i, t in enumerate(types))
    return field(1, 8) + field(8, field(1, b"") + field(2, 17)) + field(7, graph)
