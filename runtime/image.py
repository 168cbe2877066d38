"""PNG output with text metadata, written atomically (temporary names, then renames)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, PngImagePlugin

from .errors import OutputWriteError, describe_os_error
from .tempfiles import remove_stale_temps, temp_name

SUFFIX = ".png"


def check_writable(path: Path) -> None:
    """Refuse an output path that is not a .png, whose folder does not exist or is not writable, before any
    work is done (only PNG is written: its text chunks carry the metadata that reproduces the image)."""
    path = Path(path)
    if path.suffix.lower() != SUFFIX:
        raise ValueError(f"cannot write {path}: only PNG is written; allowed: a file name ending in .png")
    if path.is_dir():
        raise ValueError(f"cannot write {path}: it is a directory")
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise ValueError(f"cannot write {path}: {path.parent} is not a writable directory")


def save_pngs(items: Sequence[tuple[np.ndarray | Image.Image, Path | str, dict[str, str]]]) -> None:
    """Write every (image, path, metadata) under a temporary name first, then rename them all: an error or an
    interrupt leaves no new file and no temporary (OutputWriteError names the file and the cause)."""
    temps: list[Path] = []
    try:
        for image, path, meta in items:
            path = Path(path)
            remove_stale_temps(path.parent, path.name)
            info = PngImagePlugin.PngInfo()
            for k, v in meta.items():       # iTXt: UTF-8, so any prompt is stored byte for byte
                info.add_itxt(k, str(v))
            img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
            tmp = path.with_name(temp_name(path.name))
            temps.append(tmp)
            try:
                img.save(tmp, format="PNG", pnginfo=info)
            except OSError as e:
                raise OutputWriteError(f"cannot write {path}: {describe_os_error(e)}; nothing was written") from None
        for tmp, (_, path, _) in zip(temps, items):
            try:
                os.replace(tmp, path)
            except OSError as e:
                raise OutputWriteError(f"cannot write {path}: {describe_os_error(e)}") from None
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


def save_png(image: np.ndarray | Image.Image, path: Path | str, meta: dict[str, str]) -> None:
    save_pngs([(image, path, meta)])
