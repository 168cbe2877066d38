"""The verified-digest cache (runtime/verify.py) and the backend's concurrent load (hash, then parse, per component)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ideogram4_engine.runtime import verify as verify_mod
from ideogram4_engine.runtime.manifest import ManifestError, load_manifest
from ideogram4_engine.runtime.verify import DigestCacheIgnored, forget_verified, read_cache, verify



@pytest.fixture()
def copy(tiny_engines, tmp_path) -> Path:
    dst = tmp_path / "tiny"
    shutil.copytree(tiny_engines, dst)
    return dst


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    """The digest cache on, in a file of this test; files count as settled 20 ms after their last change."""
    path = tmp_path / "cache" / "verified.json"
    monkeypatch.setenv("IDEOGRAM4_VERIFY_CACHE", str(path))
    monkeypatch.setattr(verify_mod, "RACY_NS", 20_000_000)
    forget_verified()
    yield path
    forget_verified()


def _all_files(m) -> list[str]:
    return [e["file"] for e in [*m.file_entries(), *m.tokenizer_entries]]


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def _verify_in_a_new_process(folder: Path, files: list[str] | None = None) -> subprocess.CompletedProcess:
    code = ("import json, sys; from ideogram4_engine.runtime.manifest import load_manifest; from ideogram4_engine.runtime.verify import verify; "
            "print(json.dumps(verify(load_manifest(sys.argv[1]), json.loads(sys.argv[2]))))")
    return subprocess.run([sys.executable, "-c", code, str(folder), json.dumps(files)], capture_output=True,
                          text=True, env=os.environ.copy())


def test_cache_skips_hashing_in_a_new_process(copy, cache):
    time.sleep(0.03)
    m = load_manifest(copy)
    assert verify(m) == _all_files(m)
    entries = read_cache(cache)
    assert len(entries) == len(_all_files(m))
    st = (copy / "dit_cond.onnx.data").stat()
    key = next(k for k in entries if k[0] == str((copy / "dit_cond.onnx.data").resolve()))
    assert key[1:] == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                       m.components["dit_cond"]["data"]["sha256"])
    r = _verify_in_a_new_process(copy)
    assert r.returncode == 0 and json.loads(r.stdout) == [], r.stderr        # nothing read again
    forget_verified()                                                          # as a new process would be here
    assert verify(m) == []


def test_tampered_with_mtime_put_back_is_hashed_again(copy, cache):
    time.sleep(0.03)
    m = load_manifest(copy)
    verify(m)
    data = copy / "dit_uncond.onnx.data"
    before = data.stat()
    time.sleep(0.03)
    _flip_byte(data, before.st_size // 2)
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))            # mtime and size as cached ...
    after = data.stat()
    assert (after.st_mtime_ns, after.st_size, after.st_ino) == (before.st_mtime_ns, before.st_size, before.st_ino)
    assert after.st_ctime_ns != before.st_ctime_ns                          # ... ctime cannot be put back
    r = _verify_in_a_new_process(copy, ["dit_uncond"])
    assert r.returncode != 0 and "dit_uncond.onnx.data: sha256 mismatch" in r.stderr
    forget_verified()
    with pytest.raises(ManifestError, match=r"dit_uncond\.onnx\.data: sha256 mismatch"):
        verify(m, ["dit_uncond"])
    assert verify(m, ["dit_cond"]) == []                                    # the others stay cached


@pytest.mark.parametrize("content", [b"\x00garbage{", b'{"format": "something else", "entries": []}',
                                     b'{"format": "ideogram4-engine/verified-sha256", "version": 1, '
                                     b'"entries": [["x", 1, 2, 3, 4, "not an int", "d"]]}'],
                         ids=["not-json", "other-format", "bad-entry"])
def test_corrupt_cache_is_ignored_with_a_warning(copy, cache, content):
    cache.parent.mkdir(parents=True)
    cache.write_bytes(content)
    time.sleep(0.03)
    m = load_manifest(copy)
    verify_mod._warned.clear()
    with pytest.warns(DigestCacheIgnored, match=rf"verified-digest cache {cache}: ignored"):
        assert verify(m, ["vae_decoder"]) == [e["file"] for e in m.file_entries("vae_decoder")]
    raw = json.loads(cache.read_text())                                      # rewritten, valid
    assert raw["format"] == verify_mod.CACHE_FORMAT and len(raw["entries"]) == len(m.file_entries("vae_decoder"))


def test_off_forces_full_verification(copy, cache, monkeypatch):
    monkeypatch.setenv("IDEOGRAM4_VERIFY_CACHE", "off")
    time.sleep(0.03)
    m = load_manifest(copy)
    assert verify(m, ["text_encoder"]) == [e["file"] for e in m.file_entries("text_encoder")]
    assert not cache.exists()
    forget_verified()
    assert verify(m, ["text_encoder"]) == [e["file"] for e in m.file_entries("text_encoder")]


def test_recently_changed_files_are_not_remembered(copy, cache, monkeypatch):
    monkeypatch.setattr(verify_mod, "RACY_NS", 3600 * 10**9)
    m = load_manifest(copy)
    assert verify(m, ["vae_decoder"]) != [] and verify(m, ["vae_decoder"]) == []      # in-process memo
    assert read_cache(cache) == []
    forget_verified()
    assert verify(m, ["vae_decoder"]) == [e["file"] for e in m.file_entries("vae_decoder")]


def test_unwritable_cache_warns_and_hashing_still_works(copy, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("IDEOGRAM4_VERIFY_CACHE", str(blocker / "verified.json"))     # its folder is a file
    monkeypatch.setattr(verify_mod, "RACY_NS", 0)
    forget_verified()
    verify_mod._warned.clear()
    time.sleep(0.01)
    m = load_manifest(copy)
    with pytest.warns(DigestCacheIgnored, match="not written"):
        assert verify(m, ["vae_decoder"]) == [e["file"] for e in m.file_entries("vae_decoder")]
    assert verify(m, ["vae_decoder"]) == []
    forget_verified()


def test_cache_merges_writers_and_keeps_one_entry_per_path(copy, cache):
    time.sleep(0.03)
    m = load_manifest(copy)
    verify(m, ["vae_decoder"])
    forget_verified()
    verify(m, ["dit_cond"])                       # a second writer: both components stay
    names = {Path(k[0]).name for k in read_cache(cache)}
    assert {e["file"] for e in [*m.file_entries("vae_decoder"), *m.file_entries("dit_cond")]} <= names
    data = copy / "vae_decoder.onnx.data"
    time.sleep(0.03)
    os.utime(data)                                # same bytes, new identity: hashed, and replaces the old entry
    time.sleep(0.03)
    forget_verified()
    assert verify(m, ["vae_decoder.onnx.data"]) == ["vae_decoder.onnx.data"]
    assert sum(1 for k in read_cache(cache) if k[0] == str(data.resolve())) == 1


# ------------------------------------------------------------------------------- concurrent load (backend)

class _Events:
    """When each file was hashed and each session created, from the real functions (wrapped, not replaced)."""

    def __init__(self, monkeypatch):
        from ideogram4_engine.runtime.backends.onnxruntime import OnnxRuntimeBackend
        self.hashed: dict[str, tuple[float, float]] = {}
        self.sessions: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()
        real_hash, real_session = verify_mod._sha256, OnnxRuntimeBackend._session

        def sha(path, *a):
            t = time.perf_counter()
            out = real_hash(path, *a)
            with self._lock:
                self.hashed[Path(path).name] = (t, time.perf_counter())
            return out

        def session(backend, path, *a, **k):
            t = time.perf_counter()
            out = real_session(backend, path, *a, **k)
            with self._lock:
                self.sessions[Path(path).name] = (t, time.perf_counter())
            return out
        monkeypatch.setattr(verify_mod, "_sha256", sha)
        monkeypatch.setattr(OnnxRuntimeBackend, "_session", session)


def test_parallel_load_hashes_each_component_before_parsing_it(tiny_engines, monkeypatch):
    from ideogram4_engine.runtime.pipeline import Pipeline
    forget_verified()
    ev = _Events(monkeypatch)
    pipe = Pipeline(tiny_engines, backend="onnxruntime-cpu")
    m = pipe.manifest
    loaded = tuple(pipe.backend.sessions)
    assert {"text_encoder", "dit_cond", "dit_uncond", "vae_decoder"} <= set(loaded)
    assert set(ev.sessions) == {m.graph_path(c, "cpu").name for c in loaded}
    for c in loaded:
        start = ev.sessions[m.graph_path(c, "cpu").name][0]
        for f in m.files_for_variant("cpu", [c]):
            assert ev.hashed[Path(f).name][1] <= start, f"{f} was parsed before it was hashed"
    te, dc = ev.sessions["text_encoder.cpu.onnx"], ev.sessions["dit_cond.cpu.onnx"]
    assert te[0] < dc[1] and dc[0] < te[1]                     # the two sessions were being created at once
    forget_verified()
    seq = Pipeline(tiny_engines, backend="onnxruntime-cpu", parallel_load=False)
    a, b = (p.generate("a red cube", width=256, height=256, steps=2, guidance=4.0, seed=3) for p in (pipe, seq))
    assert np.array_equal(a.latents, b.latents) and np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def test_parallel_load_fails_on_a_tampered_component_without_parsing_it(copy, monkeypatch):
    from ideogram4_engine.runtime.pipeline import Pipeline
    forget_verified()
    _flip_byte(copy / "vae_decoder.onnx.data", 100)
    ev = _Events(monkeypatch)
    with pytest.raises(ManifestError, match=r"vae_decoder\.onnx\.data: sha256 mismatch"):
        Pipeline(copy, backend="onnxruntime-cpu")
    assert "vae_decoder.cpu.onnx" not in ev.sessions and "vae_decoder.onnx.data" in ev.hashed
    forget_verified()
