"""The manifest side of the build: read the export's manifest, validate and write it with its `engines` section,
decide whether a recorded engine can be reused, and re-run the checks on recorded layer reports."""
from __future__ import annotations

import json
from pathlib import Path

from ...runtime.schema import SCHEMA_FILE
from ..files import sha256_file
from .checks import run_checks
from .common import EngineBuildError, atomic_write

SCHEMA = SCHEMA_FILE


def load(folder: Path) -> dict:
    from ...runtime.manifest import ManifestError, load_manifest
    try:
        return load_manifest(folder).raw
    except ManifestError as e:
        raise EngineBuildError(f"{e} (engines are built from an export: run `make export` first)") from None


def validate(manifest: dict) -> None:
    import jsonschema
    try:
        jsonschema.validate(manifest, json.loads(SCHEMA.read_text()))
    except jsonschema.ValidationError as e:
        raise EngineBuildError(f"the manifest with the engines section fails its schema: {e.message} at "
                               f"{'/'.join(map(str, e.absolute_path))}") from None


def write_manifest(folder: Path, manifest: dict) -> None:
    validate(manifest)
    atomic_write(folder / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())


def reusable(folder: Path, old: dict | None, key: str) -> bool:
    """A recorded engine whose build key matches and whose engine and report files still have their checksums."""
    if not old or old.get("build_key") != key:
        return False
    for entry in (old, old.get("inspection") or {}):
        p = folder / entry.get("file", "")
        if not p.is_file() or p.stat().st_size != entry.get("bytes") or sha256_file(p) != entry.get("sha256"):
            return False
    return True


def check_engines(folder: Path | str) -> dict[str, dict]:
    """Re-read every engine's layer report and recompute its checks (what CI asserts). Also verifies that each
    report belongs to the engine file now on disk."""
    folder = Path(folder).expanduser().absolute()
    manifest = load(folder)
    section = manifest.get("engines")
    if not section:
        raise EngineBuildError(f"{folder}/manifest.json has no engines section: run `make engines`")
    out = {}
    for c, entry in section["components"].items():
        report = json.loads((folder / entry["inspection"]["file"]).read_text())
        if report["engine"]["sha256"] != entry["sha256"]:
            raise EngineBuildError(f"{c}: {entry['inspection']['file']} describes another engine than {entry['file']}")
        out[c] = run_checks(report, len(entry["profiles"]))
    return out
