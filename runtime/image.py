"""PNG output with text metadata, written atomically (temporary name, then rename)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin


def check_writable(path: Path) -> None:
    """Refuse an output path whose folder does not exist or is not writable, before any work is done."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"cannot write {path}: it is a directory")
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise ValueError(f"cannot write {path}: {path.parent} is not a writable directory")


def save_png(image: np.ndarray | Image.Image, path: Path | str, meta: dict[str, str]) -> None:
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    for k, v in meta.items():
        info.add_text(k, str(v))
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        img.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
