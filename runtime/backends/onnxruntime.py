"""onnxruntime backend: CPU (`*.cpu.onnx`) or CUDA (`*.cuda.onnx`) execution provider, through IO binding.

Inputs and outputs are OrtValues on the provider's device: static inputs (text features, RoPE tables) are
uploaded once per request and the sampler state never leaves the GPU between steps.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .base import BackendUnavailable

VARIANT = {"cpu": "cpu", "cuda": "cuda"}
PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class OnnxRuntimeBackend:
    def __init__(self, manifest, device: str = "cpu", device_id: int = 0, threads: int | None = None,
                 components: tuple[str, ...] | None = None, constant_folding: bool = True,
                 arena_extend_strategy: str | None = None, dequantize_at_load: bool = False):
        """constant_folding=False keeps onnxruntime from folding the weight dequantization at session creation
        (the e4m3 weights then stay e4m3 in memory and are dequantized on every run).
        arena_extend_strategy: CUDA arena growth, "kNextPowerOfTwo" (onnxruntime's default) or
        "kSameAsRequested" (less memory held).
        dequantize_at_load=True lets constant folding fold the weight dequantization (onnxruntime skips
        DequantizeLinear unless its QDQ handling is off): bf16 weights once at session creation, 2x the FP8
        weight memory, no per-run dequantization."""
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendUnavailable(f"onnxruntime is not installed ({e})") from None
        if PROVIDER[device] not in ort.get_available_providers():
            raise BackendUnavailable(f"{PROVIDER[device]} is not available in this onnxruntime build "
                                     f"(available: {', '.join(ort.get_available_providers())})")
        self.ort = ort
        self.name = f"onnxruntime-{device}"
        self.graph_variant = VARIANT[device]
        self.device, self.device_id = device, device_id
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        if dequantize_at_load:
            opts.add_session_config_entry("session.disable_quant_qdq", "1")
        if not constant_folding:
            opts.add_session_config_entry("optimization.disable_specified_optimizers", "ConstantFolding")
        cuda_opts = {"device_id": device_id}
        if arena_extend_strategy:
            cuda_opts["arena_extend_strategy"] = arena_extend_strategy
        providers = [(PROVIDER[device], cuda_opts)] if device == "cuda" else [PROVIDER[device]]
        names = components or tuple(manifest.components)
        self.sessions = {}
        for c in names:
            path = manifest.graph_path(c, self.graph_variant)
            try:
                self.sessions[c] = ort.InferenceSession(str(path), opts, providers=providers)
            except Exception as e:  # noqa: BLE001 -- surface which graph failed and why
                raise BackendUnavailable(f"{self.name} cannot load {path.name}: {str(e).splitlines()[0]}") from None
            if device == "cuda" and self.sessions[c].get_providers()[0] != PROVIDER[device]:
                raise BackendUnavailable(f"{path.name} did not get the CUDA provider")
        self._outputs = {c: [o.name for o in s.get_outputs()] for c, s in self.sessions.items()}

    def upload(self, array: np.ndarray) -> Any:
        return self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, self.device_id)

    def download(self, value: Any) -> np.ndarray:
        return value.numpy() if hasattr(value, "numpy") else np.asarray(value)

    def run(self, component: str, inputs: dict[str, Any]) -> dict[str, Any]:
        sess = self.sessions[component]
        binding = sess.io_binding()
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, value if isinstance(value, self.ort.OrtValue) else self.upload(value))
        for name in self._outputs[component]:
            binding.bind_output(name, self.device, self.device_id)
        sess.run_with_iobinding(binding)
        return dict(zip(self._outputs[component], binding.get_outputs()))
