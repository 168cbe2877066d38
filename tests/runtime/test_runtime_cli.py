"""`ideogram4` end to end through a subprocess: PNG + metadata, --json, identical bytes across runs, `info`,
and refusals that leave no file behind."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image


CLI = [str(Path(sys.executable).with_name("ideogram4"))]


@pytest.fixture(scope="module")
def engines(tiny_engines):
    return tiny_engines


def run(*args):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300)


def generate(engines, out, *extra):
    return run("generate", "--engines", engines, "--prompt", "a red fox in the snow", "--width", 384, "--height",
               256, "--steps", 2, "--guidance", "3,7", "--seed", 9, "--backend", "onnxruntime-cpu", "--output", out,
               *extra)


def test_generate_json_and_identical_bytes(engines, tmp_path):
    digests = []
    for i in range(3):                           # the third run dequantizes the FP8 weights once at load
        out = tmp_path / f"img{i}.png"
        r = generate(engines, out, "--json", *(["--dequantize-at-load"] if i == 2 else []))
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert report["outputs"] == [str(out)] and report["backend"] == "onnxruntime-cpu"
        assert report["synthetic"] is True and report["steps"] == 2 and report["precision"] == "faithful"
        assert {"load_s", "text_encoder_s", "denoise_s", "vae_s", "total_s"} <= set(report["timings"])
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert len(set(digests)) == 1                                   # same seed and backend: same bytes
    img = Image.open(tmp_path / "img0.png")
    assert img.size == (384, 256)
    assert img.text["prompt"] == "a red fox in the snow" and img.text["seed"] == "9"
    assert img.text["backend"] == "onnxruntime-cpu" and "SYNTHETIC" in img.text["model"]
    assert img.text["guidance"] == "3.0,7.0" and img.text["size"] == "384x256"
    assert img.text["precision"] == "faithful"


def test_batch_of_prompts_writes_one_file_each(engines, tmp_path):
    r = run("generate", "--engines", engines, "--prompt", "a", "--prompt", "b c", "--width", 256, "--height", 256,
            "--steps", 1, "--guidance", "7", "--output", tmp_path / "x.png", "--backend", "onnxruntime-cpu")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-0.png", "x-1.png"]
    assert "SYNTHETIC" in r.stderr and "wrote" in r.stdout


def test_info(engines):
    r = run("info", "--engines", engines)
    assert r.returncode == 0, r.stderr
    for word in ("dit_cond", "vae_decoder", "SYNTHETIC", "V4_DEFAULT_20", "onnxruntime-cpu: available",
                 "onnxruntime-cuda: unavailable"):
        assert word in r.stdout, word


@pytest.mark.parametrize("case,msg,code", [
    ("missing", "does not exist", 3),
    ("no_manifest", "manifest.json is missing", 3),
    ("garbage", "not valid JSON", 3),
    ("old_export", "`format_version` is 1; this runtime reads version(s) 3", 3),
    ("unwritable", "not a writable directory", 2),
    ("size", "height=250 must be a multiple of 16", 2),
    ("preset", "unknown sampler preset 'NOPE'", 2),
    ("cfg_parallel_on_cpu", "--uncond-device needs --backend onnxruntime-cuda", 2),
    ("dequantize_on_tensorrt", "--dequantize-at-load needs --backend onnxruntime-cuda or onnxruntime-cpu", 2),
    ("w8a8_on_cpu", "--precision w8a8 needs --backend onnxruntime-cuda", 2),
])
def test_refusals_write_nothing(engines, tmp_path, case, msg, code):
    import shutil
    eng, out, extra = engines, tmp_path / "out" / "o.png", []
    (tmp_path / "out").mkdir()
    if case == "missing":
        eng = tmp_path / "nowhere"
    elif case in ("no_manifest", "garbage", "old_export"):
        eng = tmp_path / "eng"
        shutil.copytree(engines, eng)
        if case == "no_manifest":
            (eng / "manifest.json").unlink()
        elif case == "garbage":
            (eng / "manifest.json").write_text("{not json")
        else:       # an export from before the bf16 rotary table (manifest format 1): refused, never used
            raw = json.loads((eng / "manifest.json").read_text())
            raw["format_version"] = 1
            (eng / "manifest.json").write_text(json.dumps(raw))
    elif case == "unwritable":
        out = tmp_path / "no" / "such" / "o.png"
    elif case == "size":
        extra = ["--height", "250"]
    elif case == "preset":
        extra = ["--sampler-preset", "NOPE"]
    elif case == "cfg_parallel_on_cpu":
        extra = ["--uncond-device", "1"]
    elif case == "w8a8_on_cpu":
        extra = ["--precision", "w8a8"]
    backend = "onnxruntime-cpu"
    if case == "dequantize_on_tensorrt":
        backend, extra = "tensorrt-rtx", ["--dequantize-at-load"]
    r = run("generate", "--engines", eng, "--prompt", "a fox", "--output", out, "--backend", backend, *extra)
    assert r.returncode == code and msg in r.stderr, r.stderr
    if case == "old_export":
        assert "re-run `make export`" in r.stderr, r.stderr
    assert list((tmp_path / "out").iterdir()) == []


def test_out_of_memory_at_load_is_an_error_line_and_no_file(engines, tmp_path, monkeypatch, capsys):
    """`--dequantize-at-load` on a GPU too small (injected: the CPU has no such limit) ends with exit code 4 and
    the backend's MemoryError as one `error:` line, not a traceback, and writes no image."""
    import onnxruntime as ort
    from ideogram4_engine.runtime.cli import main
    real = ort.InferenceSession.run_with_iobinding

    def run_oom(self, binding, run_options=None):
        if self._model_path.endswith("dequantize.onnx"):
            raise RuntimeError("Error in execution: bfc_arena.cc:360 Failed to allocate memory for requested buffer")
        return real(self, binding, run_options)

    monkeypatch.setattr(ort.InferenceSession, "run_with_iobinding", run_oom)
    out = tmp_path / "o.png"
    rc = main(["generate", "--engines", str(engines), "--prompt", "a red fox", "--width", "256", "--height", "256",
               "--steps", "2", "--guidance", "7", "--backend", "onnxruntime-cpu", "--dequantize-at-load",
               "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 4
    assert err.splitlines()[-1].startswith("error: dequantize_at_load: cpu:0 is out of memory at text_encoder weight "), err
    assert "Traceback" not in err and not out.exists()
