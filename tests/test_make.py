"""The README's `make` entry points as a user runs them: `make run` passes any prompt byte for byte (the PNG
metadata records exactly the bytes given; nothing in a prompt is ever executed), and the venv's interpreter
is the first Python >= 3.11 found, or one line saying how to choose one."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make")
PREFIX = Path(sys.prefix)
INSTALLED = PREFIX / "bin" / ".installed"
PY312 = Path(os.path.expanduser("~/.pyenv/versions/3.12.1/bin/python3.12"))

pytestmark = pytest.mark.skipif(MAKE is None, reason="GNU make is not installed")


def make(*args, env=None, timeout=600):
    return subprocess.run([MAKE, "-s", "--no-print-directory", "-C", str(ROOT), *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


# ------------------------------------------------------------------------------------------- make run

HOSTILE = 'A neon sign that says "OPEN" for $5 `touch {pwn}` $(shell touch {pwn}2) $$HOME \'q\' # \\ 😀 ' \
          '{{"high_level_description": "red cube", "style": photo}}'


@pytest.fixture(scope="module")
def run_env(tiny_checkpoint, tmp_path_factory):
    if not INSTALLED.exists():
        pytest.skip(f"{INSTALLED} is absent: the interpreter running the tests was not set up by `make`")
    return tmp_path_factory.mktemp("makerun"), tiny_checkpoint


def make_run(run_env, name, extra=(), env=None):
    root, ckpt = run_env
    out = root / f"{name}.png"
    r = make("-o", str(INSTALLED), "run", f"VENV={PREFIX}", f"CHECKPOINT={ckpt}", f"ENGINES={root / 'engines'}",
             f"OUTPUT={out}", "WIDTH=256", "HEIGHT=256", "PRESET=V4_TURBO_12", *extra,
             env={**os.environ, **(env or {})})
    assert r.returncode == 0, r.stdout + r.stderr
    return Image.open(out).text["prompt"]


@pytest.mark.parametrize("name,prompt", [
    ("shell_and_make", HOSTILE),
    ("lines_tabs_dash", "--output evil.png\nsecond line\twith a tab\r\nand a CRLF; rm -rf x & echo |cat"),
])
def test_make_run_passes_a_command_line_prompt_byte_for_byte(run_env, name, prompt):
    root, _ = run_env
    prompt = prompt.format(pwn=root / "pwned")
    assert make_run(run_env, name, [f"PROMPT={prompt}"]) == prompt
    assert not (root / "pwned").exists() and not (root / "pwned2").exists()
    assert not (root / "evil.png").exists() and not (ROOT / "evil.png").exists()


def test_make_run_takes_the_prompt_from_the_environment_and_from_a_file(run_env):
    root, _ = run_env
    spaced = "   leading and trailing blanks kept   "
    assert make_run(run_env, "env", env={"PROMPT": spaced}) == spaced
    caption = '  {"a": "$(x)", "b": "`y`"}\n'
    (root / "caption.json").write_bytes(caption.encode())
    assert make_run(run_env, "file", [f"PROMPT_FILE={root / 'caption.json'}"]) == caption


def test_make_reference_passes_the_prompt_byte_for_byte(run_env):
    root, ckpt = run_env
    prompt = HOSTILE.format(pwn=root / "pwned_ref") + "\nsecond line"
    out = root / "ref.png"
    r = make("-o", str(INSTALLED), "reference", f"VENV={PREFIX}", f"CHECKPOINT={ckpt}", f"OUTPUT={out}", "WIDTH=256",
             "HEIGHT=256", "PRESET=V4_TURBO_12", f"PROMPT={prompt}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert Image.open(out).text["prompt"] == prompt
    assert not (root / "pwned_ref").exists() and not (root / "pwned_ref2").exists()


# ------------------------------------------------------------------------------------------- interpreter

def _bin(tmp_path, **tools) -> Path:
    """A PATH folder holding only the given interpreters (name -> target file or script text)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for name, target in tools.items():
        p = folder / name
        if isinstance(target, Path):
            p.symlink_to(target)
        else:
            p.write_text(target)
            p.chmod(0o755)
    return folder


OLD = "#!/bin/sh\nexit 1\n"           # answers the version check like a Python 3.10 would (exit status 1)


@pytest.mark.skipif(not PY312.exists(), reason=f"{PY312} (pyenv's 3.12.1) is not on this machine")
def test_only_python312_on_path_is_chosen(tmp_path):
    folder = _bin(tmp_path, **{"python3.12": PY312, "python3.11": OLD, "python3": OLD})
    r = make("python", env={"PATH": str(folder), "HOME": os.environ.get("HOME", "/root")})
    assert r.returncode == 0 and r.stdout.strip() == "python3.12", r.stderr


def test_no_suitable_python_says_how_to_set_py(tmp_path):
    folder = _bin(tmp_path, python3=OLD)
    r = make("python", env={"PATH": str(folder)})
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.splitlines()[0] == ("error: no Python >= 3.11 found (tried python3.11 python3.12 python3.13 "
                                        "python3.14 python3); install one or pass PY=/path/to/python3.11+")


def test_py_override_is_checked(tmp_path):
    folder = _bin(tmp_path, oldpython=OLD)
    r = make("python", f"PY={folder / 'oldpython'}")
    assert r.returncode != 0
    assert r.stderr.splitlines()[0] == (f"error: PY={folder / 'oldpython'} is not a working Python >= 3.11; pass "
                                        "PY=/path/to/python3.11+")
    r = make("python", f"PY={sys.executable}")
    assert r.returncode == 0 and r.stdout.strip() == sys.executable
