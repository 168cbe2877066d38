"""Temporary names of atomic writes (`.NAME.tmp-PID`, `.NAME.old-PID`) and removing those left by dead processes.

A process that is SIGKILLed (or loses power) mid-write leaves its temporary behind: GBs for an export of the
real model. The next writer of the same NAME removes the temporaries whose PID is no longer running, never
one of a live process (it may still be writing). PIDs are those of this host: a folder shared between hosts
over a network file system can hold another host's live temporary, which this cannot tell apart.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

KINDS = ("tmp", "old")


def temp_name(name: str, kind: str = "tmp", pid: int | None = None) -> str:
    return f".{name}.{kind}-{os.getpid() if pid is None else pid}"


def pid_alive(pid: int) -> bool:
    """True if a process with this PID exists here (also when it belongs to another user)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temps(parent: Path, name: str) -> list[Path]:
    """Temporaries of `name` in `parent` whose writer process is dead."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.(?:{'|'.join(KINDS)})-(\d+)$")
    out = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return []
    for p in entries:
        m = pattern.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            out.append(p)
    return sorted(out)


def remove_stale_temps(parent: Path, name: str) -> list[Path]:
    """Remove the dead writers' temporaries of `name` (files or folders); returns what was removed."""
    removed = []
    for p in stale_temps(parent, name):
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:                 # another process removed it first, or it is not ours to remove
            continue
    return removed
