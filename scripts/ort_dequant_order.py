"""When does onnxruntime dequantize constant FP8 weights? A chain of FP8 linears on the CPU provider, once as
exported before version 3 (DequantizeLinear on constants only) and once with each dequantization tied to
its input as the twins now do (graphs/rewrite.py: dequantize_when_needed). Prints the growth of peak RSS
during one run: how many dequantized weights the executor holds at once (docs/tuning.md §7).

    python scripts/ort_dequant_order.py [--size 2048] [--layers 16]
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys

import numpy as np
import onnx
from onnx import TensorProto as T, helper, numpy_helper


def chain(n: int, layers: int) -> onnx.ModelProto:
    from ideogram4_engine.export.graphs.rewrite import dequantize_when_needed
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        inits += [helper.make_tensor(f"q{i}", T.FLOAT8E4M3FN, [n, n], rng.integers(0, 100, n * n).astype(np.uint8).tobytes(), raw=True),
                  numpy_helper.from_array(np.full([n], 0.01, np.float32), f"s{i}")]
        nodes += [helper.make_node("DequantizeLinear", [f"q{i}", f"s{i}"], [f"w{i}"], axis=1, name=f"dq{i}"),
                  helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"], name=f"mm{i}")]
        x = f"y{i}"
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", T.FLOAT, ["b", n])],
                          [helper.make_tensor_value_info(x, T.FLOAT, ["b", n])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])
    m.ir_version = 11
    return m, dequantize_when_needed(m)


def measure(n: int, layers: int, tied: bool) -> float:
    import onnxruntime as ort
    model = chain(n, layers)[tied]
    o = ort.SessionOptions()
    o.add_session_config_entry("optimization.disable_specified_optimizers", "ConstantFolding")
    s = ort.InferenceSession(model.SerializeToString(), o, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((64, n)).astype(np.float32)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    s.run(None, {"x": x})
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--one", choices=["constant", "tied"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(measure(a.size, a.layers, a.one == "tied"))
        return
    weight = a.size * a.size * 4 / 2**20
    for form in ("constant", "tied"):        # one process each: peak RSS only grows
        r = subprocess.run([sys.executable, __file__, "--size", str(a.size), "--layers", str(a.layers), "--one", form],
                           capture_output=True, text=True, check=True)
        mib = float(r.stdout.split()[-1])
        print(f"{form:9s}: peak RSS +{mib:.0f} MiB during a run = {mib / weight:.1f} fp32 weights of {weight:.0f} MiB "
              f"({a.layers} layers)")


if __name__ == "__main__":
    main()
