"""Shared fixtures: one tiny synthetic checkpoint per test session, and the reference pipeline over it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# The verified-digest cache (runtime/verify.py) off for the whole session, subprocesses (CLI, server) included:
# tests never write to the user's cache folder and every process hashes what it loads, as the tests of the
# checks expect. tests/test_runtime_verify.py turns it on, with a file of its own.
os.environ["IDEOGRAM4_VERIFY_CACHE"] = "off"


def _tensorrt_rtx() -> tuple[bool, str]:
    """Whether TensorRT-RTX (the CI engine builder) imports here, and why not."""
    try:
        import tensorrt_rtx  # noqa: F401
        return True, ""
    except Exception as e:  # noqa: BLE001
        return False, f"tensorrt-rtx is not installed ({e}): `make test` installs it (the trt-rtx extra)"


HAVE_RTX, NO_RTX = _tensorrt_rtx()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The 'tiny' synthetic checkpoint (seed 0), written once per session (~3 s)."""
    from ideogram4_engine.export.synthetic.writer import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_checkpoint):
    """ReferencePipeline over the tiny checkpoint (CPU). Shared: tests must not mutate it."""
    from ideogram4_engine.export.reference.pipeline import ReferencePipeline

    return ReferencePipeline.from_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_engines(tiny_checkpoint, tmp_path_factory) -> Path:
    """`make export` of the tiny checkpoint (ONNX graphs + manifest), once per session. Read-only: tests that
    corrupt or rebuild an engines folder copy it or export their own."""
    from ideogram4_engine.export.to_onnx import ExportOptions, export

    out = tmp_path_factory.mktemp("engines") / "tiny"
    export(tiny_checkpoint, out, ExportOptions(progress=False), log=lambda s: None)
    return out


@pytest.fixture(scope="session")
def tiny_w8a8_engines(tiny_checkpoint, tmp_path_factory) -> Path:
    """The same export with `--precision w8a8` (adds the cuda_w8a8 and cuda_fused_w8a8 graphs). Read-only."""
    from ideogram4_engine.export.to_onnx import ExportOptions, export

    out = tmp_path_factory.mktemp("engines") / "tiny_w8a8"
    export(tiny_checkpoint, out, ExportOptions(progress=False, precision="w8a8"), log=lambda s: None)
    return out


HEAVY = ("torch", "transformers", "onnx", "jsonschema")     # what the runtime must never import (ARCHITECTURE.md)


@pytest.fixture(scope="session")
def heavy_imports():
    """heavy_imports(code) -> the HEAVY packages loaded after running `code` in a fresh interpreter (it must
    succeed): the one check that the runtime stays lean."""
    import subprocess
    import sys

    def run(code: str) -> list[str]:
        probe = (f"{code}\nimport sys\n"
                 f"print('LOADED', sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
        r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return eval(r.stdout.rsplit("LOADED", 1)[1])
    return run
