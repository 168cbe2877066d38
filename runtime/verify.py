"""The sha256 check of the engines folder's files, done once per file rather than once per process.

`verify(manifest, files)` hashes each file (streamed) the first time it is needed. After a match, the file's
identity — resolved path, device, inode, size, mtime_ns, ctime_ns — together with the manifest's sha256 for it
is remembered for this process and in a digest cache file, so that later processes (a restarted server, the
next `ideogram4 generate`) skip the file while that identity is unchanged. A file whose identity changed is
hashed again. Threads may call `verify` at the same time (the backends hash one component while the session
of another is created); hashlib releases the GIL.

Trust assumption, plainly: an unchanged identity is taken to mean unchanged contents. Every write through the
file system moves mtime and ctime; mtime can be put back (`os.utime`, `touch -d`, `rsync -t`, `tar`) but ctime
cannot be set by any user-level call, and replacing the file changes its inode. Not caught: writes that bypass
the file system (the raw block device, a disk image edited offline), a network file system whose server does
not update ctime, and whoever can write the cache file. The cache lives in the user's own cache folder, so that
user could as well rewrite the engines and their manifest: the checksums guard against corruption, truncation
and mix-ups, not against an attacker with write access. A file changed less than RACY_NS before it was hashed
is checked but not remembered across processes (two writes within one timestamp tick would look alike).

The cache file: $IDEOGRAM4_VERIFY_CACHE, else $XDG_CACHE_HOME/ideogram4-engine/verified-sha256.json
(~/.cache when XDG_CACHE_HOME is unset). IDEOGRAM4_VERIFY_CACHE=off forces full verification: every process
hashes every file it loads (and writes no cache). Written under a temporary name and renamed; an unreadable or
corrupt cache costs one warning and is ignored (then rewritten), never a failure.
"""
from __future__ import annotations

import json
import os
import threading
import time
import warnings
from pathlib import Path

from .contract import HASH_CHUNK, file_identity, sha256_file
from .manifest import Manifest, ManifestError
from .tempfiles import remove_stale_temps, temp_name

CACHE_ENV = "IDEOGRAM4_VERIFY_CACHE"
CACHE_OFF = ("off", "0", "none", "false")
CACHE_FORMAT = "ideogram4-engine/verified-sha256"
CACHE_VERSION = 1
CACHE_MAX_ENTRIES = 4096        # an engines folder has ~40 files: room for many folders and re-exports
RACY_NS = 1_000_000_000         # a file changed this recently (ns) before hashing is not remembered on disk

_verified: set[tuple] = set()   # identities (path, dev, ino, size, mtime_ns, ctime_ns, sha256) hashed OK here
_lock = threading.Lock()        # _verified and the cache file's read-modify-write
_warned: set[str] = set()


class DigestCacheIgnored(RuntimeWarning):
    """The verified-digest cache could not be read or written; files are hashed as without it."""


def cache_path() -> Path | None:
    """The digest cache file, or None when switched off (IDEOGRAM4_VERIFY_CACHE=off)."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if value.lower() in CACHE_OFF:
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ideogram4-engine" / "verified-sha256.json"


def _sha256(path: Path, chunk: int | None = None) -> str:
    return sha256_file(path, chunk or HASH_CHUNK)


def _identity(path: Path, digest: str) -> tuple:
    return (*file_identity(path), digest)


def _warn_once(where: Path, what: str) -> None:
    key = f"{where}:{what.split(':')[0]}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"verified-digest cache {where}: {what}", DigestCacheIgnored, stacklevel=4)


def _valid(entry) -> bool:
    return (isinstance(entry, list) and len(entry) == 7 and isinstance(entry[0], str) and isinstance(entry[6], str)
            and all(isinstance(x, int) and not isinstance(x, bool) for x in entry[1:6]))


def read_cache(path: Path | None) -> list[tuple]:
    """The identities in the cache file, oldest first; [] (with one warning) when it is unreadable or corrupt."""
    if path is None:
        return []
    try:
        raw = json.loads(path.read_bytes())
    except (FileNotFoundError, NotADirectoryError):
        return []
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        _warn_once(path, f"ignored, cannot be read ({type(e).__name__}: {e}); every file is hashed")
        return []
    if not (isinstance(raw, dict) and raw.get("format") == CACHE_FORMAT and raw.get("version") == CACHE_VERSION
            and isinstance(raw.get("entries"), list) and all(_valid(e) for e in raw["entries"])):
        _warn_once(path, f"ignored: not a {CACHE_FORMAT} version {CACHE_VERSION} file; every file is hashed")
        return []
    return [tuple(e) for e in raw["entries"]]


def _write_cache(path: Path, new: list[tuple]) -> None:
    """Merge `new` into the cache file (what other processes wrote meanwhile is kept; the newest entry per path
    wins; at most CACHE_MAX_ENTRIES), atomically: temporary name, then rename."""
    entries: dict[tuple, None] = {}
    by_path = {k[0]: k for k in new}
    for k in [*read_cache(path), *new]:
        if by_path.get(k[0], k) == k:
            entries.pop(k, None)
            entries[k] = None
    keep = list(entries)[-CACHE_MAX_ENTRIES:]
    text = json.dumps({"format": CACHE_FORMAT, "version": CACHE_VERSION, "entries": [list(k) for k in keep]})
    tmp = path.with_name(temp_name(path.name))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path.parent, path.name)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        _warn_once(path, f"not written ({e}); the next process hashes the files again")


def _select(manifest: Manifest, files: list[str] | None) -> list[dict]:
    entries = {e["file"]: e for e in [*manifest.file_entries(), *manifest.tokenizer_entries]}
    if files is None:
        return list(entries.values())
    selected = []
    for name in files:
        if name in manifest.components:
            selected += manifest.file_entries(name)
        elif name in entries:
            selected.append(entries[name])
        else:
            raise ManifestError(f"{manifest.path}: {name!r} is neither a file nor a component of the manifest; "
                                f"files: {', '.join(entries)}")
    return selected


def verify(manifest: Manifest, files: list[str] | None = None) -> list[str]:
    """Check the sha256 of `files` (file names as in the manifest, or component names for all of a component's
    files; default: every graph, weight and tokenizer file) against the manifest, skipping those verified before
    with an unchanged identity (this process or the digest cache). Returns the names hashed this time; raises
    ManifestError naming the file, expected and actual hash on a mismatch."""
    todo = []
    for entry in _select(manifest, files):
        path = manifest.root / entry["file"]
        try:
            key = _identity(path, entry["sha256"])
        except FileNotFoundError:
            raise ManifestError(f"{manifest.path}: file {path} named by the manifest is missing") from None
        if key not in _verified:
            todo.append((entry, path, key))
    if not todo:
        return []
    cache = cache_path()
    with _lock:
        known = set(read_cache(cache))
    hashed, remember = [], []
    for entry, path, key in todo:
        if key in known:
            with _lock:
                _verified.add(key)
            continue
        start = time.time_ns()
        actual = _sha256(path)
        hashed.append(entry["file"])
        if actual != entry["sha256"]:
            if remember and cache is not None:
                with _lock:
                    _write_cache(cache, remember)
            raise ManifestError(f"{path}: sha256 mismatch: expected {entry['sha256']} ({entry['bytes']} bytes), "
                                f"actual {actual} ({key[3]} bytes); the file was modified or truncated after export "
                                "(re-copy or re-run `make export`)")
        if _identity(path, entry["sha256"]) == key:     # unchanged while it was read
            with _lock:
                _verified.add(key)
            if key[5] < start - RACY_NS:      # ctime: no user-level call sets it
                remember.append(key)
    if remember and cache is not None:
        with _lock:
            _write_cache(cache, remember)
    return hashed


def forget_verified() -> None:
    """Drop this process's memory of verified files (tests, or after replacing files in place); the digest
    cache file is untouched (IDEOGRAM4_VERIFY_CACHE=off, or delete it, to hash everything again)."""
    with _lock:
        _verified.clear()
