"""A thin ONNX graph builder that streams weights to an external-data file as they are added.

Why hand-built graphs rather than tracing: the exported graph must keep every quantized weight as an e4m3
initializer feeding DequantizeLinear → MatMul (no bf16 expansion, no constant folding), mirror the reference's
bf16 rounding points op for op, and carry the shapes and attention form the engines need. Writing the ops
directly makes each of those a line of code instead of a fight with a tracer.

Weights are written to `<graph>.onnx.data` the moment they are added, so a 9 GB DiT is exported without ever
holding it in memory twice; the graph file itself stays small.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

OPSET = 23          # opset-23 Attention and RMSNormalization exist from here
IR_VERSION = 11     # the IR that opset 23 needs; onnxruntime 1.31 reads IR <= 13
F32, BF16, F16, FP8, I64, BOOL, U8 = (TensorProto.FLOAT, TensorProto.BFLOAT16, TensorProto.FLOAT16,
                                      TensorProto.FLOAT8E4M3FN, TensorProto.INT64, TensorProto.BOOL,
                                      TensorProto.UINT8)
_TORCH_TO_ONNX = {torch.float32: F32, torch.bfloat16: BF16, torch.float16: F16,
                  torch.float8_e4m3fn: FP8, torch.int64: I64, torch.bool: BOOL, torch.uint8: U8}
_ALIGN = 64


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a CPU tensor of any dtype (bf16 and fp8 have no numpy dtype)."""
    t = t.detach().contiguous().cpu()
    return t.view(torch.uint8).numpy().tobytes() if t.element_size() == 1 else \
        t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).numpy().tobytes()


class GraphBuilder:
    def __init__(self, name: str, data_path: Path | None = None):
        """`data_path`: file that receives every initializer (external data, written as it is added); its
        name relative to the graph file's folder is what the graph records."""
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()
        self._counter = 0
        self.data_path = data_path
        self._data = open(data_path, "wb") if data_path else None
        self.weight_bytes = 0

    # ------------------------------------------------------------------------------------------ values

    def fresh(self, hint: str = "v") -> str:
        self._counter += 1
        return f"{hint}_{self._counter}"

    def input(self, name: str, elem_type: int, shape: Sequence[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: Sequence[int | str]) -> None:
        """Declare `value` a graph output called `name`: its producing node's output is renamed (no Identity,
        so e.g. a uint8 result is never an intermediate tensor, which TensorRT refuses)."""
        producer = next((n for n in reversed(self.nodes) if value in n.output), None)
        consumers = [n for n in self.nodes if value in n.input]
        if producer is None or consumers:
            self.op("Identity", value, out=name)
        else:
            producer.output[list(producer.output).index(value)] = name
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))

    def shape_hint(self, value: str, elem_type: int, shape: Sequence[int | str]) -> str:
        """Declare an intermediate's symbolic shape where inference cannot derive it (e.g. a Range as long as
        an input axis): onnxruntime's memory planner reuses buffers only between equal symbolic shapes, and
        without the hint every layer's tensors get fresh unknown dims (quadratic planning, no reuse)."""
        self.value_info.append(helper.make_tensor_value_info(value, elem_type, list(shape)))
        return value

    def op(self, op_type: str, *inputs: str | None, out: str | None = None, n_out: int = 1,
           name: str | None = None, **attrs) -> str | list[str]:
        outs = [out] if out else [self.fresh(op_type.lower()) for _ in range(n_out)]
        node_name = name or f"{op_type}_{self._counter}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, ["" if i is None else i for i in inputs], outs,
                                           name=node_name, **attrs))
        return outs[0] if n_out == 1 else outs

    # ------------------------------------------------------------------------------------- initializers

    def weight(self, name: str, t: torch.Tensor) -> str:
        """A named initializer from a torch tensor (any dtype incl. bf16/e4m3), streamed to external data."""
        if name in self._names:
            raise ValueError(f"duplicate initializer {name!r}")
        self._names.add(name)
        raw = tensor_bytes(t)
        tp = onnx.TensorProto(name=name, data_type=_TORCH_TO_ONNX[t.dtype], dims=list(t.shape))
        if self._data is None:
            tp.raw_data = raw
        else:
            pad = (-self._data.tell()) % _ALIGN
            self._data.write(b"\0" * pad)
            offset = self._data.tell()
            self._data.write(raw)
            tp.data_location = TensorProto.EXTERNAL
            for k, v in (("location", self.data_path.name), ("offset", str(offset)), ("length", str(len(raw)))):
                tp.external_data.add(key=k, value=v)
        self.initializers.append(tp)
        self.weight_bytes += len(raw)
        return name

    def const(self, value, dtype: torch.dtype = torch.float32, name: str | None = None) -> str:
        """A small constant (kept inline in the graph file)."""
        t = value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=dtype)
        name = name or self.fresh("const")
        self._names.add(name)
        self.initializers.append(onnx.TensorProto(name=name, data_type=_TORCH_TO_ONNX[t.dtype],
                                                  dims=list(t.shape), raw_data=tensor_bytes(t)))
        return name

    def i64(self, *values: int) -> str:
        return self.const(torch.tensor(list(values), dtype=torch.int64))

    # ------------------------------------------------------------------------------------------ output

    def model(self, doc: str = "") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers,
                                  doc_string=doc, value_info=self.value_info)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="ideogram4_engine.export")
        m.ir_version = IR_VERSION
        return m

    def save(self, path: Path, doc: str = "") -> onnx.ModelProto:
        """Write the graph (weights already in the data file) to `path`, atomically."""
        if self._data is not None:
            self._data.flush()
            os.fsync(self._data.fileno())
            self._data.close()
            self._data = None
        m = self.model(doc)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(m.SerializeToString())
        os.replace(tmp, path)
        return m
