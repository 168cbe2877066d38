"""The reference CLI end to end through a subprocess: a PNG with metadata, and refusals that write nothing."""
import subprocess
import sys

import pytest
from PIL import Image

CLI = [sys.executable, "-m", "ideogram4_engine.export.reference"]


def run(*args):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_writes_png_with_metadata(tiny_checkpoint, tmp_path):
    out = tmp_path / "img.png"
    r = run("--checkpoint", tiny_checkpoint, "--prompt", "a red fox", "--width", 384, "--height", 256,
            "--sampler-preset", "V4_TURBO_12", "--seed", 5, "--output", out)
    assert r.returncode == 0, r.stderr
    img = Image.open(out)
    assert img.size == (384, 256) and img.mode == "RGB"
    assert img.text["prompt"] == "a red fox" and img.text["seed"] == "5" and "SYNTHETIC" in img.text["model"]
    assert "SYNTHETIC" in r.stderr and "step 12/12" in r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["img.png"]          # no temporary left behind


@pytest.mark.parametrize("args,msg", [(("--width", 1000), "width=1000 must be a multiple of 16"),
                                      (("--height", 4096), "height=4096 outside the supported range"),
                                      (("--seed", -1), "seed=-1 outside 0…2^64-1"),
                                      (("--output", "/nonexistent/dir/x.png"), "not a writable directory")])
def test_bad_input_is_refused_before_work(tiny_checkpoint, tmp_path, args, msg):
    r = run("--checkpoint", tiny_checkpoint, "--prompt", "x", "--output", tmp_path / "o.png", *args)
    assert r.returncode == 2 and msg in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_bad_checkpoint_is_refused(tmp_path):
    r = run("--checkpoint", tmp_path, "--prompt", "x", "--output", tmp_path / "o.png")
    assert r.returncode == 3 and "missing component folder(s)" in r.stderr
    assert list(tmp_path.iterdir()) == []
