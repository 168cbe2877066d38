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
                 components: tuple[str, ...] | None = None,
                 arena_extend_strategy: str | None = None, dequantize_at_load: bool = False,
                 uncond_device_id: int | None = None):
        """Constant folding is off unless dequantize_at_load: the FP8 weights stay FP8 in memory, and nothing
        else in the graphs is worth folding.
        arena_extend_strategy: CUDA arena growth, "kNextPowerOfTwo" (onnxruntime's default) or
        "kSameAsRequested" (less memory held).
        dequantize_at_load=True: bf16 weights folded once at session creation (onnxruntime folds on the CPU,
        so the load is slow), 2x the FP8 weight memory, no per-run dequantization.
        uncond_device_id (CUDA): run dit_uncond on this GPU, concurrently with dit_cond ("CFG-parallel")."""
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendUnavailable(f"onnxruntime is not installed ({e})") from None
        if PROVIDER[device] not in ort.get_available_providers():
            raise BackendUnavailable(f"{PROVIDER[device]} is not available in this onnxruntime build "
                                     f"(available: {', '.join(ort.get_available_providers())})")
        if uncond_device_id is not None and device != "cuda":
            raise ValueError("uncond_device_id needs the CUDA provider (onnxruntime-cuda)")
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
        else:
            opts.add_session_config_entry("optimization.disable_specified_optimizers", "ConstantFolding")
        names = components or tuple(manifest.components)
        self.devices = {c: uncond_device_id if c == "dit_uncond" and uncond_device_id is not None else device_id
                        for c in names}
        self.sessions = {}
        for c in names:
            path = manifest.graph_path(c, self.graph_variant)
            cuda_opts = {"device_id": self.devices[c]}
            if arena_extend_strategy:
                cuda_opts["arena_extend_strategy"] = arena_extend_strategy
            providers = [(PROVIDER[device], cuda_opts)] if device == "cuda" else [PROVIDER[device]]
            try:
                self.sessions[c] = ort.InferenceSession(str(path), opts, providers=providers)
            except Exception as e:  # noqa: BLE001 -- surface which graph failed and why
                raise BackendUnavailable(f"{self.name} cannot load {path.name}: {str(e).splitlines()[0]}") from None
            if device == "cuda" and self.sessions[c].get_providers()[0] != PROVIDER[device]:
                raise BackendUnavailable(f"{path.name} did not get the CUDA provider")
        self._outputs = {c: [o.name for o in s.get_outputs()] for c, s in self.sessions.items()}
        self.parallel = len(set(self.devices.values())) > 1      # CFG-parallel: graphs on two GPUs
        self._pool = None
        if self.parallel:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ort-cfg")

    def upload(self, array: np.ndarray, *, component: str | None = None) -> Any:
        """To the device of `component` (default: the main device)."""
        dev = self.devices.get(component, self.device_id)
        return self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, dev)

    def download(self, value: Any) -> np.ndarray:
        return value.numpy() if hasattr(value, "numpy") else np.asarray(value)

    def _on(self, value: Any, component: str) -> Any:
        """`value` as an OrtValue on `component`'s device; crossing GPUs goes through the host (a few MB of
        latents and velocities per step)."""
        if not isinstance(value, self.ort.OrtValue):
            return self.upload(value, component=component)
        if self.parallel and value.device_name() == "cuda":
            dev = self.devices.get(component, self.device_id)
            if value._ortvalue.__dlpack_device__()[1] != dev:     # (DLPack device type, device id)
                return self.upload(value.numpy(), component=component)
        return value

    def run(self, component: str, inputs: dict[str, Any]) -> dict[str, Any]:
        sess = self.sessions[component]
        dev = self.devices.get(component, self.device_id)
        binding = sess.io_binding()
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, self._on(value, component))
        for name in self._outputs[component]:
            binding.bind_output(name, self.device, dev)
        sess.run_with_iobinding(binding)
        return dict(zip(self._outputs[component], binding.get_outputs()))

    def run_concurrently(self, calls: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        """Several independent graphs; on different GPUs they run at the same time (onnxruntime releases
        the GIL while it runs), otherwise one after the other."""
        if not self.parallel:
            return [self.run(c, i) for c, i in calls]
        futures = [self._pool.submit(self.run, c, i) for c, i in calls]
        return [f.result() for f in futures]
