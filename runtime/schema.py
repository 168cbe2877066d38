"""The manifest's JSON schema (manifest.schema.json beside this file), applied without jsonschema.

The schema is the contract for every reader (a C++ service validates with it); the runtime applies the same
file with this small interpreter of the keywords it uses, after the hand-written checks of manifest.py (which
give the tailored messages and the cross-field rules a schema cannot state). A test mutates a real manifest
and asserts that jsonschema and the runtime refuse the same ones."""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

SCHEMA_FILE = Path(__file__).with_name("manifest.schema.json")
_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


@lru_cache(maxsize=1)
def schema() -> dict:
    return json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))


def _is(value, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[kind])


def schema_error(value, node: dict | None = None, where: str = "") -> str | None:
    """The first place `value` breaks the schema (`node` of it; default: the whole schema), as one phrase, or
    None. Keywords: type, const, enum, required, properties, additionalProperties, items, minItems, maxItems,
    uniqueItems, minimum, maximum, pattern, minProperties, dependentRequired, $ref (into $defs)."""
    node = schema() if node is None else node
    if "$ref" in node:
        node = schema()["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    at = f"`{where or 'manifest'}`"
    kinds = node.get("type")
    if kinds is not None and not any(_is(value, k) for k in ([kinds] if isinstance(kinds, str) else kinds)):
        return f"{at} must be of type {kinds}, found {type(value).__name__}"
    if "const" in node and value != node["const"]:
        return f"{at} must be {node['const']!r}, found {value!r}"
    if "enum" in node and value not in node["enum"]:
        return f"{at} must be one of {node['enum']}, found {value!r}"
    if isinstance(value, dict):
        missing = [k for k in node.get("required", ()) if k not in value]
        missing += [d for k, deps in node.get("dependentRequired", {}).items() if k in value for d in deps
                    if d not in value and d not in missing]
        if missing:
            return f"{at} lacks {', '.join(map(repr, missing))}"
        if len(value) < node.get("minProperties", 0):
            return f"{at} is empty"
        props, extra = node.get("properties", {}), node.get("additionalProperties")
        for k, v in value.items():
            sub = props.get(k, extra if isinstance(extra, dict) else None)
            if sub is not None and (e := schema_error(v, sub, f"{where}.{k}" if where else k)):
                return e
    if isinstance(value, list):
        if len(value) < node.get("minItems", 0) or len(value) > node.get("maxItems", len(value)):
            return f"{at} has {len(value)} items, allowed {node.get('minItems', 0)}…{node.get('maxItems', '∞')}"
        if node.get("uniqueItems") and len({json.dumps(v, sort_keys=True) for v in value}) < len(value):
            return f"{at} has repeated items"
        for i, v in enumerate(value):
            if "items" in node and (e := schema_error(v, node["items"], f"{where}[{i}]")):
                return e
    if _is(value, "number"):
        if value < node.get("minimum", value) or value > node.get("maximum", value):
            return f"{at}={value!r} outside {node.get('minimum', '-∞')}…{node.get('maximum', '∞')}"
    if isinstance(value, str) and "pattern" in node and not re.search(node["pattern"], value):
        return f"{at}={value!r} does not match {node['pattern']}"
    return None
