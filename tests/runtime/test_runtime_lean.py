"""The runtime never imports torch, transformers, onnx or jsonschema: not on import of any of its modules, not
while it generates an image (the conftest fixture `heavy_imports` runs each case in a fresh interpreter)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _runtime_modules() -> list[str]:
    out = []
    for f in sorted((ROOT / "runtime").rglob("*.py")):
        parts = f.relative_to(ROOT / "runtime").with_suffix("").parts
        out.append(".".join(("ideogram4_engine.runtime", *(parts[:-1] if parts[-1] == "__init__" else parts))))
    return out


def test_every_runtime_module_imports_lean(heavy_imports):
    mods = _runtime_modules()
    assert "ideogram4_engine.runtime.backends.tensorrt.backend" in mods and len(mods) > 20
    assert heavy_imports("\n".join(f"import {m}" for m in mods if not m.endswith(".__main__"))) == []


def test_generating_an_image_imports_nothing_heavy(heavy_imports, tiny_engines):
    assert heavy_imports(f"""
from ideogram4_engine.runtime.pipeline import Pipeline
p = Pipeline({str(tiny_engines)!r}, backend="onnxruntime-cpu")
assert p.generate("a fox", width=256, height=256, steps=1, guidance=7.0).images[0].size == (256, 256)
""") == []
