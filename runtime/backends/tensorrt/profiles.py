"""Which optimization profile serves an input's shapes, and whether a resolution fits any profile (refused with
the buckets and the `make engines` line that adds it)."""
from __future__ import annotations

from ...packing import PIXELS_PER_TOKEN
from .checks import engines_section


def _fmt(lo, hi) -> str:
    return str(lo) if lo == hi else f"{lo}…{hi}"


def describe_profile(profile: dict) -> str:
    shapes = "; ".join(f"{n} ({', '.join(_fmt(a, b) for a, b in zip(s['min'], s['max']))})"
                       for n, s in profile["shapes"].items())
    return f"[{', '.join(profile['buckets']) or 'any size'}] {shapes}"


def select_profile(component: str, profiles: list[dict], shapes: dict[str, tuple[int, ...]]) -> int:
    """Index of the first profile whose min…max admits every input shape."""
    for i, p in enumerate(profiles):
        if set(p["shapes"]) != set(shapes):
            missing = set(p["shapes"]) - set(shapes)
            extra = set(shapes) - set(p["shapes"])
            raise ValueError(f"{component}: inputs {sorted(shapes)} do not match the engine's {sorted(p['shapes'])}"
                             + (f" (missing {sorted(missing)})" if missing else "")
                             + (f" (unexpected {sorted(extra)})" if extra else ""))
        if all(len(shapes[n]) == len(s["min"]) and
               all(lo <= d <= hi for d, lo, hi in zip(shapes[n], s["min"], s["max"]))
               for n, s in p["shapes"].items()):
            return i
    got = ", ".join(f"{n} {tuple(v)}" for n, v in shapes.items())
    raise ValueError(f"{component}: no optimization profile admits {got}; the engine has: "
                     + " | ".join(describe_profile(p) for p in profiles)
                     + ". Rebuild with other buckets / --max-text-tokens / --max-batch (`make engines`)")


def image_dims(height: int, width: int) -> dict[str, int]:
    gh, gw = height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN
    return {"image_tokens": gh * gw, "grid_h": gh, "grid_w": gw}


def size_fits(component_inputs: list[dict], profiles: list[dict], height: int, width: int) -> bool:
    """Does some profile admit the image-dependent axes of (height, width)? Other axes are not looked at."""
    dims = image_dims(height, width)
    axes = [(io["name"], k, dims[d]) for io in component_inputs for k, d in enumerate(io["shape"]) if d in dims]
    if not axes:
        return True
    return any(all(p["shapes"][n]["min"][k] <= v <= p["shapes"][n]["max"][k] for n, k, v in axes) for p in profiles)


def check_engine_size(manifest, entries: dict[str, dict], height: int, width: int) -> None:
    raw = getattr(manifest, "raw", manifest)
    bad = [c for c, e in entries.items() if not size_fits(raw["components"][c]["inputs"], e["profiles"], height, width)]
    if bad:
        buckets = engines_section(manifest).get("buckets") or sorted({b for e in entries.values()
                                                                      for p in e["profiles"] for b in p["buckets"]})
        raise ValueError(f"{width}x{height} (WxH) is outside every engine profile ({', '.join(bad)}); the engines were "
                         f"built for the buckets {', '.join(buckets)}. Pick one of them, or rebuild with it: "
                         f"`make engines BUCKETS={','.join([*buckets, f'{width}x{height}'])}`")
