"""Facts of the engines contract that both halves use: one home, torch-free, imported by export/ and runtime/.

The manifest (export writes it, runtime/manifest.py checks it) carries these facts to other readers; here they
are the constants both sides compute from, so a change happens in one place."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

LATENT_CHANNELS = 32                # VAE latent channels
PATCH = 2                           # 2×2 latent patch per image token
TOKEN_CHANNELS = LATENT_CHANNELS * PATCH * PATCH   # 128 per image token, ordered (ph, pw, c) with c fastest
MAX_TEXT_TOKENS = 2048              # per prompt, chat template included (spec §3.2)

TRT_MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}   # TensorRT builder name -> Python module

HASH_CHUNK = 8 << 20                # bytes read per call while hashing (one reused buffer)


def sha256_file(path: Path | str, chunk: int = HASH_CHUNK) -> str:
    """sha256 of a file, streamed through one reused buffer (multi-GB weight files are never held whole)."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def file_identity(path: Path | str) -> tuple[str, int, int, int, int, int]:
    """(resolved path, device, inode, size, mtime_ns, ctime_ns): a file whose identity is unchanged need not be
    hashed again (the caches of runtime/verify.verify and of the exporter's checkpoint hashes)."""
    st = os.stat(path)
    return (str(Path(path).resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
