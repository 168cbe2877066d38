"""Faults that need more than one command or a real signal: NaN weights through a real export, the export's
refusals and write failures, Ctrl-C / SIGTERM / SIGKILL on real processes, stale temporaries, and reproducing
one image of a batch from its PNG metadata alone."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from ideogram4_engine.export.__main__ import main as export_main
from ideogram4_engine.runtime import errors
from ideogram4_engine.runtime.cli import main as cli_main

CLI = str(Path(sys.executable).with_name("ideogram4"))
QUICK = ["--width", "256", "--height", "256", "--steps", "1", "--guidance", "7", "--backend", "onnxruntime-cpu"]


def _listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def _err_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def ckpt_copy(tiny_checkpoint, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, dst)
    return dst


# ------------------------------------------------------------------------------------------- numerics

def test_nan_weights_end_as_exit_5_and_no_image(ckpt_copy, tmp_path, capsys):
    """A checkpoint with a NaN norm gain exports fine (the graphs are right) and the runtime refuses to turn the
    non-finite sampler state into an image."""
    from safetensors.torch import load_file, save_file
    folder = ckpt_copy / "transformer"
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())["weight_map"]
    key = "layers.0.attention_norm1.weight"
    shard = folder / index[key]
    tensors = load_file(shard)
    tensors[key][:] = float("nan")
    save_file(tensors, shard)
    eng = tmp_path / "eng"
    assert export_main(["--checkpoint", str(ckpt_copy), "--out", str(eng), "--no-progress"]) == 0
    out = tmp_path / "out"
    out.mkdir()
    capsys.readouterr()
    rc = cli_main(["generate", "--engines", str(eng), "--prompt", "a red fox", "--output", str(out / "o.png"), *QUICK])
    line = _err_line(capsys.readouterr().err)
    assert rc == errors.NUMERICS == 5
    assert "the sampler state became non-finite" in line
    assert _listing(out) == []


# ------------------------------------------------------------------------------------------- export

def _export(ckpt, out, capsys):
    rc = export_main(["--checkpoint", str(ckpt), "--out", str(out), "--no-progress"])
    return rc, capsys.readouterr().err


def test_export_refuses_a_truncated_shard(ckpt_copy, tmp_path, capsys):
    shard = next((ckpt_copy / "transformer").glob("*-00002-of-*.safetensors"))
    with open(shard, "r+b") as f:                 # the header is intact, the data is short
        f.truncate(shard.stat().st_size - 1000)
    rc, err = _export(ckpt_copy, tmp_path / "eng", capsys)
    assert rc == errors.ARTIFACTS
    assert f"{shard}: file is truncated: " in _err_line(err) and "the header describes" in err
    assert _listing(tmp_path) == ["ckpt"]


def test_export_refuses_tensors_missing_from_the_index(ckpt_copy, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    shard = next((ckpt_copy / "transformer").glob("*-00001-of-*.safetensors"))
    tensors = load_file(shard)
    tensors["layers.0.extra_bias"] = next(iter(tensors.values())).clone()
    save_file(tensors, shard)
    rc, err = _export(ckpt_copy, tmp_path / "eng", capsys)
    assert rc == errors.ARTIFACTS
    assert "tensor 'layers.0.extra_bias' is in " in _err_line(err) and "but not in the index" in err
    assert _listing(tmp_path) == ["ckpt"]


def test_export_refuses_a_missing_checkpoint(tmp_path, capsys):
    rc, err = _export(tmp_path / "nowhere", tmp_path / "eng", capsys)
    assert rc == errors.ARTIFACTS and "not a directory" in _err_line(err)
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("fault,code,msg", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), errors.WRITE, "disk full (No space left on device)"),
    (KeyboardInterrupt(), errors.INTERRUPTED, "interrupted (Ctrl-C); nothing was written"),
])
def test_export_fault_leaves_previous_output_and_no_temporary(tiny_checkpoint, tiny_engines, tmp_path, monkeypatch,
                                                              capsys, fault, code, msg):
    """Disk full (ENOSPC at the first twin written) or Ctrl-C in the middle of an export: one error line, the
    temporary folder removed, the previous export untouched."""
    import onnx
    out = tmp_path / "eng"
    shutil.copytree(tiny_engines, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    real = onnx.save

    def failing_save(model, path, *a, **k):
        real(model, path, *a, **k)               # a partial write, then the fault
        raise fault
    monkeypatch.setattr(onnx, "save", failing_save)
    raw = json.loads((out / "manifest.json").read_text())
    raw["components"]["dit_cond"]["cache_key"] = "changed"     # force a rebuild of one component
    (out / "manifest.json").write_text(json.dumps(raw))
    before["manifest.json"] = (out / "manifest.json").stat().st_mtime_ns
    rc, err = _export(tiny_checkpoint, out, capsys)
    assert rc == code and msg in _err_line(err)
    assert _listing(tmp_path) == ["eng"]                        # no .eng.tmp-PID
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def _wait_for(predicate, timeout=240.0, step=0.05):
    t = time.monotonic() + timeout
    while time.monotonic() < t:
        if predicate():
            return True
        time.sleep(step)
    return False


def _export_process(ckpt, out):
    return subprocess.Popen([sys.executable, "-m", "ideogram4_engine.export", "--checkpoint", str(ckpt), "--out",
                             str(out), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _temps(parent: Path, name: str) -> list[str]:
    return [p for p in _listing(parent) if p.startswith(f".{name}.")]


def test_killed_export_leaves_a_temporary_that_the_next_export_removes(tiny_checkpoint, tmp_path):
    """SIGKILL leaves `.eng.tmp-PID` (nothing can clean up); the next export removes it because that PID is dead,
    but keeps the temporary of a process that is still alive."""
    out = tmp_path / "eng"
    p = _export_process(tiny_checkpoint, out)
    tmp = tmp_path / f".eng.tmp-{p.pid}"
    assert _wait_for(lambda: (tmp / "text_encoder.onnx").exists()), p.communicate()
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert tmp.is_dir() and not out.exists()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        live = tmp_path / f".eng.tmp-{sleeper.pid}"
        live.mkdir()
        r = subprocess.run([sys.executable, "-m", "ideogram4_engine.export", "--checkpoint", str(tiny_checkpoint),
                            "--out", str(out), "--no-progress"], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        assert f"removed .eng.tmp-{p.pid}, left by a killed export" in r.stderr
        assert _temps(tmp_path, "eng") == [live.name] and (out / "manifest.json").is_file()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_replacement_killed_halfway_is_undone(tiny_checkpoint, tiny_engines, tmp_path, capsys):
    """Killed between moving the old export aside and moving the new one in: the next export puts the old one
    back first (so its unchanged components are reused) instead of deleting it as a stale temporary."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = tmp_path / f".eng.old-{dead.pid}"
    shutil.copytree(tiny_engines, old)
    rc, err = _export(tiny_checkpoint, tmp_path / "eng", capsys)
    assert rc == 0, err
    assert "unchanged since the last export, reused" in err
    assert _listing(tmp_path) == ["eng"]


@pytest.mark.parametrize("sig,code,msg", [(signal.SIGINT, 130, "interrupted (Ctrl-C)"),
                                          (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_signal_during_export_removes_the_temporary(tiny_checkpoint, tmp_path, sig, code, msg):
    out = tmp_path / "eng"
    p = _export_process(tiny_checkpoint, out)
    assert _wait_for(lambda: (tmp_path / f".eng.tmp-{p.pid}" / "text_encoder.onnx").exists()), p.communicate()
    p.send_signal(sig)
    _, err = p.communicate(timeout=300)
    assert p.returncode == code, err
    assert msg in _err_line(err)
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("sig,code,msg", [(signal.SIGINT, 130, "error: interrupted (Ctrl-C); nothing was written"),
                                          (signal.SIGTERM, 143, "error: terminated (SIGTERM); nothing was written")])
def test_signal_while_denoising(tiny_engines, tmp_path, sig, code, msg):
    out = tmp_path / "out"
    out.mkdir()
    p = subprocess.Popen([CLI, "generate", "--engines", str(tiny_engines), "--prompt", "a red fox", "--width", "256",
                          "--height", "256", "--steps", "200", "--guidance", "7", "--backend", "onnxruntime-cpu",
                          "--output", str(out / "o.png"), "--progress"], stderr=subprocess.PIPE, text=True)
    seen = ""
    while "denoising" not in seen:                   # the loop has started
        ch = p.stderr.read(1)
        assert ch, seen
        seen += ch
    p.send_signal(sig)
    rest = p.stderr.read()
    p.wait(timeout=120)
    err = seen + rest
    assert p.returncode == code, err
    assert err.splitlines()[-1] == msg and "Traceback" not in err
    assert _listing(out) == []


# ------------------------------------------------------------------------------------------- metadata

def test_one_image_of_a_batch_is_reproduced_from_its_metadata(tiny_engines, tmp_path):
    """Batch of three (two prompts share a token length, so they run as one batch); image 2's PNG holds all it
    takes: re-running its prompt alone with the recorded seed, batch_index, size and sampling gives the same
    pixels (its own length group of one, so bit for bit)."""
    prompts = ["a red fox", "a blue fox", "a lighthouse on a cliff at dusk, long exposure"]
    r = subprocess.run([CLI, "generate", "--engines", str(tiny_engines), *sum((["--prompt", p] for p in prompts), []),
                        "--width", "256", "--height", "256", "--steps", "2", "--guidance", "3,7", "--seed", "11",
                        "--backend", "onnxruntime-cpu", "--output", str(tmp_path / "b.png")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    meta = Image.open(tmp_path / "b-2.png").text
    assert meta["batch_index"] == "2" and meta["batch_size"] == "3" and meta["prompt"] == prompts[2]
    assert [Image.open(tmp_path / f"b-{i}.png").text["batch_index"] for i in range(3)] == ["0", "1", "2"]
    (tmp_path / "p.txt").write_text(meta["prompt"], encoding="utf-8")
    width, height = meta["size"].split("x")
    r = subprocess.run([CLI, "generate", "--engines", str(tiny_engines), "--prompt-file", str(tmp_path / "p.txt"),
                        "--seed", meta["seed"], "--batch-index", meta["batch_index"], "--width", width, "--height",
                        height, "--steps", meta["steps"], "--guidance", meta["guidance"], "--mu", meta["mu"],
                        "--std", meta["std"], "--backend", meta["backend"], "--output", str(tmp_path / "again.png")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    again, orig = Image.open(tmp_path / "again.png"), Image.open(tmp_path / "b-2.png")
    assert again.tobytes() == orig.tobytes()
    assert Image.open(tmp_path / "b-0.png").tobytes() != orig.tobytes()


def test_seeded_noise_rows_are_the_batch_rows():
    """Row i of one (B, N, 128) draw is what batch_index=i draws alone (the stream is consumed row by row)."""
    import numpy as np
    from ideogram4_engine.runtime.request import seeded_noise
    full = seeded_noise(5, (4, 48, 128))
    for i in range(4):
        assert np.array_equal(seeded_noise(5, (1, 48, 128), batch_index=i)[0], full[i])
    assert np.array_equal(seeded_noise(5, (2, 48, 128), batch_index=1), full[1:3])


def test_png_write_removes_dead_writers_temporaries_only(tmp_path):
    """A PNG write of NAME removes `.NAME.tmp-PID` of dead processes, keeps a live one's, and leaves no temporary
    of its own."""
    import numpy as np
    from ideogram4_engine.runtime.image import save_pngs
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        (tmp_path / f".o.png.tmp-{dead.pid}").write_bytes(b"half a png")
        (tmp_path / f".o.png.tmp-{sleeper.pid}").write_bytes(b"being written")
        (tmp_path / f".other.png.tmp-{dead.pid}").write_bytes(b"another name: not ours to judge")
        save_pngs([(np.zeros((16, 16, 3), np.uint8), tmp_path / "o.png", {"prompt": "a\x00b\n😀"})])
        assert _listing(tmp_path) == sorted([f".o.png.tmp-{sleeper.pid}", f".other.png.tmp-{dead.pid}", "o.png"])
        assert Image.open(tmp_path / "o.png").text["prompt"] == "a\x00b\n😀"
    finally:
        sleeper.kill()
        sleeper.wait()
