"""File helpers shared by the writers: streamed sha256 and atomic replacement of an output folder."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` at `out`, replacing what was there only once `tmp` is complete."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
