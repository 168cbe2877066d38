"""The bad-input and fault matrix (issue 16): every row runs the real command (in-process `main`), asserts the
one `error:` line (no traceback), the documented exit code, and that nothing was written or left behind (the
output folder stays empty, the engines/checkpoint folder and its parent keep exactly their files).

Rows marked `loads=False` must fail before anything is hashed or loaded: the sha256 routine and backend
creation are replaced by functions that fail the test if called. Faults that cannot be produced on this machine
(a full disk, Ctrl-C at a given moment) are injected in-process at the real call (PIL's PNG write, the ONNX
save of the export, the backend's run) with the real exception; the subprocess tests in test_faults.py send
real signals.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from ideogram4_engine.runtime import errors
from ideogram4_engine.runtime.cli import main as cli_main
from ideogram4_engine.runtime.verify import forget_verified

BASE = ["--width", "256", "--height", "256", "--backend", "onnxruntime-cpu"]
QUICK = ["--steps", "1", "--guidance", "7"]        # rows that get as far as generating


@dataclass
class Row:
    id: str
    args: list[str]                      # appended to `generate --engines E --output O` (+ --prompt unless given)
    code: int
    msg: str
    loads: bool = False                  # may hash / load graphs before failing
    setup: Callable | None = None        # setup(ctx) -> None: breaks a private copy, patches, sets env
    prompt: bool = True                  # add --prompt "a red fox"
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- setups

def _copy(ctx):
    dst = ctx.tmp / "eng"
    shutil.copytree(ctx.shared, dst)
    ctx.engines = dst
    return dst


def _rechecksum(eng: Path, name: str) -> None:
    """Record `tokenizer/<name>`'s new sha256 in the manifest: the folder an export of a checkpoint with this
    tokenizer file would have written (a legitimate folder with a faulty template, not a tampered one)."""
    raw = json.loads((eng / "manifest.json").read_text())
    data = (eng / "tokenizer" / name).read_bytes()
    entries = [e for e in raw["tokenizer"]["files"] if e["file"] != f"tokenizer/{name}"]
    entries.append({"file": f"tokenizer/{name}", "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)})
    raw["tokenizer"]["files"] = entries
    (eng / "manifest.json").write_text(json.dumps(raw))


def _template(template: str, checksummed: bool = True):
    def setup(ctx):
        eng = _copy(ctx)
        cfg_path = eng / "tokenizer" / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["chat_template"] = template
        cfg_path.write_text(json.dumps(cfg), encoding="utf-8")
        if checksummed:
            _rechecksum(eng, "tokenizer_config.json")
    return setup


def _edit_manifest(change):
    def setup(ctx):
        eng = _copy(ctx)
        raw = json.loads((eng / "manifest.json").read_text())
        change(raw)
        (eng / "manifest.json").write_text(json.dumps(raw))
    return setup


def _missing(ctx):
    ctx.engines = ctx.tmp / "nowhere"


def _no_manifest(ctx):
    (_copy(ctx) / "manifest.json").unlink()


def _garbage(ctx):
    (_copy(ctx) / "manifest.json").write_text("{not json")


def _flip_graph(ctx):
    p = _copy(ctx) / "dit_cond.cpu.onnx"
    b = bytearray(p.read_bytes())
    b[100:400] = b"\xff" * 300                  # same size: only the sha256 can tell; ONNX would say "Invalid model"
    p.write_bytes(bytes(b))


def _truncate_weights(ctx):
    p = _copy(ctx) / "vae_decoder.onnx.data"
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size - 64)


def _tamper_template(ctx):
    _template("{{ '<|im_start|>user\\nsomething else entirely<|im_end|>\\n<|im_start|>assistant\\n' }}",
              checksummed=False)(ctx)


def _tamper_template_same_size(ctx):
    """One byte of the template changed: the size check cannot tell, the sha256 must."""
    p = _copy(ctx) / "tokenizer" / "tokenizer_config.json"
    raw = p.read_bytes()
    i = raw.index(b"add_generation_prompt")
    p.write_bytes(raw[:i] + b"bdd" + raw[i + 3:])


def _extra_template_file(ctx):
    eng = _copy(ctx)
    (eng / "tokenizer" / "chat_template.jinja").write_text("{{ 'ignored prompt' }}")


def _env(name, value: bytes):
    def setup(ctx):
        ctx.monkeypatch.setitem(os.environb, name.encode(), value)
    return setup


def _file(content: bytes | None):
    def setup(ctx):
        p = ctx.tmp / "prompt.txt"
        if content is not None:
            p.write_bytes(content)
        ctx.args += ["--prompt-file", str(p)]
    return setup


def _output(name, make_dir=False):
    def setup(ctx):
        ctx.output = ctx.out_dir / name
        if make_dir:
            ctx.output.mkdir()
            ctx.expect_out = [name]
    return setup


def _oserror(code):
    def setup(ctx):
        from PIL import Image

        def full_disk(self, fp, *a, **k):
            Path(fp).write_bytes(b"\x89PNG partial")      # the part that fitted, then the disk is full
            raise OSError(code, os.strerror(code), str(fp))
        ctx.monkeypatch.setattr(Image.Image, "save", full_disk)
    return setup


def _interrupt_in(component: str, exc: BaseException):
    def setup(ctx):
        from ideogram4_engine.runtime.backends.onnxruntime import OnnxRuntimeBackend
        real = OnnxRuntimeBackend.run

        def run(self, name, inputs):
            if name == component:
                raise exc
            return real(self, name, inputs)
        ctx.monkeypatch.setattr(OnnxRuntimeBackend, "run", run)
    return setup


def _oom_at_load(ctx):
    import onnxruntime as ort
    real = ort.InferenceSession.run_with_iobinding

    def run_oom(self, binding, run_options=None):
        if self._model_path.endswith("dequantize.onnx"):
            raise RuntimeError("Error in execution: bfc_arena.cc:360 Failed to allocate memory for requested buffer")
        return real(self, binding, run_options)
    ctx.monkeypatch.setattr(ort.InferenceSession, "run_with_iobinding", run_oom)


def _no_cuda(ctx):
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime's CUDA provider is available here: the row needs a machine without it")


SLOW_LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"

ROWS = [
    # ---- usage (2): refused before anything is hashed or loaded
    Row("width_multiple", ["--width", "1000"], 2, "width=1000 must be a multiple of 16"),
    Row("width_small", ["--width", "128"], 2, "width=128 outside the supported range 256…2048"),
    Row("height_big", ["--height", "4096"], 2, "height=4096 outside the supported range 256…2048"),
    Row("aspect", ["--width", "256", "--height", "1600"], 2, "aspect ratio 256x1600 exceeds 6:1"),
    Row("width_not_int", ["--width", "abc"], 2, "argument --width: invalid int value: 'abc'"),
    Row("seed_negative", ["--seed", "-1"], 2, "seed=-1 outside 0…2^64-1"),
    Row("seed_big", ["--seed", str(2**64)], 2, f"seed={2**64} outside 0…2^64-1"),
    Row("seed_not_int", ["--seed", "1.5"], 2, "argument --seed: invalid int value: '1.5'"),
    Row("preset", ["--sampler-preset", "NOPE"], 2, "unknown sampler preset 'NOPE'; allowed: V4_QUALITY_48"),
    Row("steps_zero", ["--steps", "0", "--guidance", "7"], 2, "steps=0 must be an integer >= 1"),
    Row("steps_many", ["--steps", "1001", "--guidance", "7"], 2, "steps=1001 must be an integer >= 1 (at most 1000)"),
    Row("steps_without_guidance", ["--steps", "5"], 2, "also give guidance"),
    Row("guidance_length", ["--steps", "3", "--guidance", "7,3"], 2,
        "guidance schedule has 2 entries, expected one per step (3)"),
    Row("guidance_nan", ["--guidance", "nan"], 2, "argument --guidance: 'nan': 'nan' is not a finite number"),
    Row("guidance_inf", ["--steps", "2", "--guidance", "3,inf"], 2, "'inf' is not a finite number"),
    Row("guidance_text", ["--guidance", "abc"], 2, "'abc' is not a number"),
    Row("guidance_range", ["--steps", "1", "--guidance", "1000"], 2,
        "guidance[0]=1000.0 outside the allowed range; allowed: a finite number in [-100, 100]"),
    Row("mu_nan", ["--mu", "nan"], 2, "argument --mu: 'nan' is not a finite number"),
    Row("mu_inf", ["--mu=-inf"], 2, "argument --mu: '-inf' is not a finite number"),
    Row("mu_text", ["--mu", "0,5"], 2, "argument --mu: '0,5' is not a number"),
    Row("mu_range", ["--mu", "50"], 2, "mu=50.0 outside the allowed range; allowed: a finite number in [-20, 20]"),
    Row("std_zero", ["--std", "0"], 2, "std=0.0 outside the allowed range; allowed: a finite number in (0, 20]"),
    Row("std_negative", ["--std", "-1.5"], 2, "std=-1.5 outside the allowed range"),
    Row("std_inf", ["--std", "inf"], 2, "argument --std: 'inf' is not a finite number"),
    Row("prompt_empty", ["--prompt", ""], 2, "prompt is empty; allowed: a non-empty string", prompt=False),
    Row("prompt_blank", ["--prompt", " \n\t"], 2, "prompt is empty (whitespace only)", prompt=False),
    Row("prompt_none", [], 2, "no prompt given: pass --prompt TEXT, --prompt-env NAME or --prompt-file PATH",
        prompt=False),
    Row("prompt_too_long", ["--prompt", "word " * 2100], 2, "allowed: at most 2048 tokens", prompt=False),
    Row("prompt_env_unset", ["--prompt-env", "I4_TEST_UNSET"], 2,
        "--prompt-env I4_TEST_UNSET: the environment variable I4_TEST_UNSET is not set", prompt=False),
    Row("prompt_env_not_utf8", ["--prompt-env", "I4_TEST_BAD"], 2,
        "the prompt in environment variable I4_TEST_BAD is not valid UTF-8 (byte 0xff at offset 2)", prompt=False,
        setup=_env("I4_TEST_BAD", b"ab\xffcd")),
    Row("prompt_file_missing", [], 2, "cannot read it (No such file or directory)", prompt=False,
        setup=_file(None)),
    Row("prompt_file_not_utf8", [], 2, "is not valid UTF-8 (byte 0xc3 at offset 1)", prompt=False,
        setup=_file(b"a\xc3(")),
    Row("output_jpg", [], 2, "only PNG is written; allowed: a file name ending in .png", setup=_output("x.jpg")),
    Row("output_no_suffix", [], 2, "only PNG is written", setup=_output("image")),
    Row("output_folder_missing", [], 2, "is not a writable directory", setup=_output("no/such/x.png")),
    Row("output_is_folder", [], 2, "it is a directory", setup=_output("d.png", make_dir=True)),
    Row("cfg_parallel_on_cpu", ["--uncond-device", "1"], 2, "--uncond-device needs --backend onnxruntime-cuda"),
    Row("dequantize_on_tensorrt", ["--backend", "tensorrt-rtx", "--dequantize-at-load"], 2,
        "--dequantize-at-load needs --backend onnxruntime-cuda or onnxruntime-cpu"),
    Row("batch_index_negative", ["--batch-index", "-1"], 2, "batch_index=-1 outside 0…1023"),
    Row("batch_index_big", ["--batch-index", "5000"], 2, "batch_index=5000 outside 0…1023"),
    Row("backend_unknown", ["--backend", "nope"], 2, "argument --backend: invalid choice: 'nope' (choose from 'auto'"),
    # ---- engines folder unusable (3)
    Row("engines_missing", [], 3, "does not exist (run `make export`)", setup=_missing),
    Row("manifest_missing", [], 3, "manifest.json is missing", setup=_no_manifest),
    Row("manifest_garbage", [], 3, "is not valid JSON", setup=_garbage),
    Row("manifest_v2", [], 3, "`format_version` is 2; this runtime reads version(s) 3",
        setup=_edit_manifest(lambda r: r.update(format_version=2))),
    Row("manifest_without_tokenizer_sums", [], 3, "`tokenizer` lacks 'files'",
        setup=_edit_manifest(lambda r: r["tokenizer"].pop("files"))),
    Row("graph_corrupt", [], 3, "dit_cond.cpu.onnx: sha256 mismatch", loads=True, setup=_flip_graph),
    Row("weights_truncated", [], 3, "vae_decoder.onnx.data is", setup=_truncate_weights),
    Row("template_replaced", [], 3, r"tokenizer_config\.json is \d+ bytes, the manifest says \d+ \(truncated or "
        r"replaced", setup=_tamper_template, extra={"regex": True}),
    Row("template_tampered", [], 3, "tokenizer_config.json: sha256 mismatch", setup=_tamper_template_same_size),
    Row("template_file_unlisted", [], 3, "chat_template.jinja is not covered by the manifest's sha256",
        setup=_extra_template_file),
    Row("template_renders_nothing", [], 3, "rendered nothing", setup=_template("{# nothing #}")),
    Row("template_include", [], 3, "uses {% include %}: a chat template cannot read other templates or files",
        setup=_template("{% include 'other.jinja' %}")),
    Row("template_slow", [], 3, "rendering took longer than 2 s (the template's time bound)",
        setup=_template(SLOW_LOOP)),
    Row("template_huge", [], 3, "str * 50000000 would hold 5e+07 items",
        setup=_template("{{ 'x' * 50000000 }}")),
    Row("template_drops_prompt", [], 3, "dropped or rewrote the prompt",
        setup=_template("{{ '<|im_start|>user\\na cat<|im_end|>\\n' }}")),
    Row("template_bug", [], 3, "failed while rendering: ZeroDivisionError", setup=_template("{{ 1 / 0 }}")),
    Row("template_sandbox", [], 3, "broke the sandbox's rules",
        setup=_template("{% set ns = namespace() %}{% set ns._x = 1 %}{{ messages }}")),
    # ---- backend (4)
    Row("no_cuda", ["--backend", "onnxruntime-cuda"], 4, "CUDAExecutionProvider is not available", loads=True,
        setup=_no_cuda),
    Row("out_of_memory_at_load", ["--dequantize-at-load"], 4, "dequantize_at_load: cpu:0 is out of memory",
        loads=True, setup=_oom_at_load),
    # ---- output write (6), interrupts (130, 143)
    Row("png_disk_full", [], 6, "disk full (No space left on device); nothing was written", loads=True,
        setup=_oserror(errno.ENOSPC)),
    Row("png_read_only", [], 6, "read-only file system", loads=True, setup=_oserror(errno.EROFS)),
    Row("ctrl_c_denoising", [], 130, "interrupted (Ctrl-C); nothing was written", loads=True,
        setup=_interrupt_in("dit_uncond", KeyboardInterrupt())),
    Row("sigterm_decoding", [], 143, "terminated (SIGTERM); nothing was written", loads=True,
        setup=_interrupt_in("vae_decoder", errors.Terminated())),
]


class Ctx:
    def __init__(self, shared, tmp, monkeypatch):
        self.shared, self.engines, self.tmp, self.monkeypatch = shared, shared, tmp, monkeypatch
        self.out_dir = tmp / "out"
        self.out_dir.mkdir()
        self.output = self.out_dir / "o.png"
        self.args: list[str] = []
        self.expect_out: list[str] = []


def _tree(folder: Path) -> list[str]:
    if not folder.exists():
        return []
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def _forbid_loading(monkeypatch):
    from ideogram4_engine.runtime import backends, verify

    def fail(*a, **k):
        raise AssertionError("the request was not refused before hashing/loading")
    monkeypatch.setattr(verify, "_sha256", fail)
    monkeypatch.setattr(backends, "create", fail)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_generate_refusals(row, tiny_engines, tmp_path, monkeypatch, capsys):
    forget_verified()
    ctx = Ctx(tiny_engines, tmp_path, monkeypatch)
    if row.setup:
        row.setup(ctx)
    if not row.loads:
        _forbid_loading(monkeypatch)
    watched = ctx.engines if ctx.engines.exists() else ctx.tmp
    before, before_parent = _tree(watched), sorted(os.listdir(watched.parent))
    argv = ["generate", "--engines", str(ctx.engines), "--output", str(ctx.output), *BASE,
            *(QUICK if row.loads else []), *ctx.args, *row.args]
    if row.prompt:
        argv += ["--prompt", "a red fox"]
    try:
        rc = cli_main(argv)
    except SystemExit as e:                         # argparse's usage errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == row.code, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    found = re.search(row.msg, lines[0]) if row.extra.get("regex") else row.msg in lines[0]
    assert len(lines) == 1 and found, err
    assert sorted(os.listdir(ctx.out_dir)) == ctx.expect_out        # nothing written, no temporary left
    assert _tree(watched) == before and sorted(os.listdir(watched.parent)) == before_parent


def test_matrix_covers_every_exit_code():
    """Every documented failure code has at least one row here or in test_faults.py (NUMERICS: exported NaN
    weights; the subprocess signals)."""
    covered = {r.code for r in ROWS} | {errors.NUMERICS}
    documented = {code for code, _ in errors.EXIT_CODES} - {errors.OK, errors.INTERNAL}
    assert documented <= covered, documented - covered
    assert len(ROWS) >= 40


def test_exit_codes_documented_identically():
    """docs/runtime.md's table and the --help epilog are errors.EXIT_CODES, row for row."""
    import textwrap
    from ideogram4_engine.runtime.cli import build_parser
    docs = (Path(__file__).resolve().parents[2] / "docs" / "runtime.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d+) \| (.+?) \|$", docs.split("## Exit codes", 1)[1].split("\n## ", 1)[0], re.M)
    assert [(int(c), m) for c, m in rows] == list(errors.EXIT_CODES)
    helptext = " ".join(build_parser().format_help().split())
    for code, meaning in errors.EXIT_CODES:
        assert f"{code} {' '.join(textwrap.wrap(meaning, 10**6))}" in helptext, code
