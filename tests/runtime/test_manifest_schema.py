"""The manifest's two validators agree: the JSON schema (runtime/manifest.schema.json, what any reader validates
with, here through jsonschema) and the runtime's checker (runtime/manifest.py, no jsonschema) accept and refuse
the same manifests, over every deletion and wrong-typed value at every place of a real tiny export's manifest.
The only differences allowed are the cross-field rules a schema cannot state, which the checker adds."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from ideogram4_engine.runtime import manifest as M
from ideogram4_engine.runtime.schema import SCHEMA_FILE, schema_error

REPLACEMENTS = ("x", -1, 1.5, None, [], {}, True)
# (path pattern, mutation): refused by the checker only; "*" matches any one key
CROSS_FIELD = {
    (("components", "*", "graphs", "cuda_fused"), "delete"),        # kernels.variants names it
    (("components", "*", "graphs", "cuda_fused_dql"), "delete"),
    (("components", "*", "graphs", "cuda_w8a8"), "delete"),         # exporter.precision lists w8a8
    (("components", "*", "graphs", "cuda_fused_w8a8"), "delete"),
    (("sampler", "presets", "V4_DEFAULT_20"), "delete"),            # sampler.default_preset names it
}


MUTATED_COMPONENTS = ("dit_cond", "guided_step")    # the others have the same shape


def _places(o, path=()):
    yield path
    items = o.items() if isinstance(o, dict) else enumerate(o[:2]) if isinstance(o, list) else ()
    for k, v in items:
        if path == ("components",) and k not in MUTATED_COMPONENTS:
            continue
        yield from _places(v, (*path, k))


def _mutations(raw):
    for path in list(_places(raw))[1:]:
        parent = raw
        for k in path[:-1]:
            parent = parent[k]
        value = parent[path[-1]]
        if isinstance(parent, dict):
            yield path, "delete", None
        for r in REPLACEMENTS:
            if type(r) is not type(value):
                yield path, "set", r


def _apply(raw, path, kind, value):
    out = json.loads(json.dumps(raw))
    parent = out
    for k in path[:-1]:
        parent = parent[k]
    if kind == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return out


def _checker_accepts(raw) -> bool:
    try:
        M._check(raw, Path("manifest.json"))
        return True
    except M.ManifestError:
        return False


def _cross_field(path, kind) -> bool:
    return any(kind == k and len(p) == len(path) and all(a in ("*", b) for a, b in zip(p, path))
               for p, k in CROSS_FIELD)


@pytest.fixture(scope="module")
def raw(tiny_w8a8_engines):
    """The w8a8 export's manifest, each component's dequantize list cut to two weights (the same shape, a quarter
    of the size: jsonschema costs ~10 ms a run on it)."""
    raw = json.loads((tiny_w8a8_engines / "manifest.json").read_text())
    for comp in raw["components"].values():
        if "dequantize" in comp:
            comp["dequantize"]["weights"] = comp["dequantize"]["weights"][:2]
    return raw


def test_schema_and_checker_agree_on_every_mutation(raw):
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_FILE.read_text()))
    assert validator.is_valid(raw) and _checker_accepts(raw) and schema_error(raw) is None
    disagree, seen_cross, n = [], set(), 0
    for path, kind, value in _mutations(raw):
        n += 1
        m = _apply(raw, path, kind, value)
        by_schema, by_checker = validator.is_valid(m), _checker_accepts(m)    # the checker never crashes
        assert (schema_error(m) is None) == by_schema, (path, kind, value)     # the interpreter == jsonschema
        if by_schema == by_checker:
            continue
        if by_schema and not by_checker and _cross_field(path, kind):
            seen_cross.add(tuple("*" if i == 1 and path[0] == "components" else p for i, p in enumerate(path)))
            continue
        disagree.append((path, kind, value, by_schema, by_checker))
    assert n > 1000 and disagree == [], disagree[:10]
    assert seen_cross == {p for p, _ in CROSS_FIELD}       # each declared rule is still needed


def test_a_schema_refusal_is_one_line_naming_the_place(tiny_engines, tmp_path):
    import shutil
    eng = tmp_path / "eng"
    shutil.copytree(tiny_engines, eng)
    raw = json.loads((eng / "manifest.json").read_text())
    raw["latents"]["shift"] = raw["latents"]["shift"][:5]
    (eng / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(M.ManifestError, match=r"does not follow the manifest schema: `latents.shift` has 5 items, "
                                              r"allowed 128…128 \(re-run `make export`\)"):
        M.load_manifest(eng)
