"""ONNX graph builders: every component written op by op, FP8 weights kept as FP8 (DequantizeLinear → MatMul)."""
