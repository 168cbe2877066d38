"""The backend interface: declared options and capabilities, and `auto` with any option (it works, or one warning
names what the chosen backend ignored)."""
from __future__ import annotations

import warnings

import pytest

from ideogram4_engine.runtime import backends
from ideogram4_engine.runtime.backends.base import Backend
from ideogram4_engine.runtime.manifest import load_manifest

# one non-default value for every option any backend declares (a new option must be added here)
EXAMPLES = {"device_id": 0, "components": ("guided_step",), "threads": 1, "arena_extend_strategy": "kSameAsRequested",
            "dequantize_at_load": True, "uncond_device_id": 1, "shared_arena": False, "fused_kernels": False,
            "kernels_library": "/nowhere.so", "precision": "w8a8", "cuda_graph": True, "cuda_graphs": True,
            "runtime_cache": False, "verify_engines": False, "memory_mode": "on_demand",
            "weight_streaming_budget": "auto", "parallel_load": False}


def test_every_backend_declares_its_options_with_types():
    assert set(backends.options("auto")) == set(EXAMPLES)
    for name in backends.BACKENDS:
        cls = backends.backend_class(name)
        assert issubclass(cls, Backend) and name in cls.NAMES
        for p in cls.options(name).values():
            assert p.annotation is not p.empty and p.default is not p.empty, (name, p)
    assert "uncond_device_id" in backends.options("onnxruntime-cuda")
    assert "uncond_device_id" not in backends.options("onnxruntime-cpu")
    assert backends.taking("dequantize_at_load") == ["onnxruntime-cuda", "onnxruntime-cpu"]
    assert backends.taking("memory_mode") == ["tensorrt", "tensorrt-rtx"]


@pytest.mark.parametrize("option", sorted(EXAMPLES))
def test_auto_with_any_option_works_or_says_what_it_ignored(tiny_engines, option):
    """No GPU here: auto ends on onnxruntime-cpu; an option it takes is applied, any other is named once."""
    m = load_manifest(tiny_engines)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        be = backends.create("auto", m, **{option: EXAMPLES[option]})
    assert be.name == "onnxruntime-cpu"
    ignored = [str(x.message) for x in w if issubclass(x.category, backends.OptionsIgnored)]
    if option in backends.options("onnxruntime-cpu"):
        assert ignored == []
    else:
        assert ignored == [f"backend auto chose onnxruntime-cpu, which does not take {option}: ignored"]


def test_unknown_option_is_refused_in_one_line(tiny_engines):
    m = load_manifest(tiny_engines)
    for name in ("auto", "onnxruntime-cpu"):
        with pytest.raises(ValueError, match=r"^unknown backend option 'dequantise_at_load'; allowed: "):
            backends.create(name, m, dequantize_at_load=True, dequantise_at_load=True)


def test_capabilities_are_declared(tiny_engines):
    be = backends.create("onnxruntime-cpu", load_manifest(tiny_engines))
    assert (be.parallel, be.verifies_own_files, be.precision) == (False, False, "faithful")
    assert type(be).takes_before_load and backends.backend_class("tensorrt").verifies_own_files
