"""File helpers shared by the writers: streamed sha256, atomic replacement of an output folder, and recovery from a
writer that was killed (its temporaries removed, a half-done replacement undone)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..runtime.contract import sha256_file  # noqa: F401 -- the writers import it from here
from ..runtime.tempfiles import pid_alive, remove_stale_temps, temp_name


def recover_dir(out: Path) -> list[Path]:
    """Before writing `out`: if a killed writer had moved the previous `out` aside (`.out.old-PID`) but not yet
    put its new one in place, move the previous one back; then remove the dead writers' temporaries (never a
    live process's). Returns what was removed."""
    if not out.exists():
        for old in sorted(out.parent.glob(f".{out.name}.old-*")):
            pid = old.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not pid_alive(int(pid)) and old.is_dir():
                os.replace(old, out)
                break
    return remove_stale_temps(out.parent, out.name)


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` at `out`, replacing what was there only once `tmp` is complete."""
    if out.exists():
        old = out.parent / temp_name(out.name, "old")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
