"""The benchmark chart: step time, image time and GPU memory per path, as one SVG drawn from the bench records
(`scripts/bench.py report`). Plain SVG text, so no plotting library is needed (none is installed here)."""
from __future__ import annotations

from html import escape

PANELS = (("step ms", "step_ms"), ("image s", "image_s"), ("GPU memory GiB", "memory_gib"))
BAR_W, ROW_H, LABEL_W, GAP = 220, 22, 380, 40


def chart_rows(records: list[dict]) -> list[dict]:
    """One row per path (the last record of each kind at each size and preset) with the charted values."""
    latest = {}
    for r in records:
        if r["kind"].startswith("runtime") or r["kind"] in ("reference-eager", "reference-compiled"):
            latest[(r["kind"], r["width"], r["height"], r["preset"])] = r
    rows = []
    for (kind, w, h, preset), r in latest.items():
        mem = r["peak_gpu_bytes"] / 2**30 if r.get("peak_gpu_bytes") else \
            r["gpu_mem_used_mib"] / 1024 if r.get("gpu_mem_used_mib") else None
        rows.append({"label": f"{kind} · {w}×{h} {preset}", "step_ms": r["step_ms"], "image_s": r["image_s"],
                     "memory_gib": mem})
    return rows


def svg_chart(rows: list[dict], title: str) -> str:
    """Three panels of horizontal bars side by side, one bar per row, each labelled with its value."""
    height = 50 + ROW_H * len(rows) + 20
    width = LABEL_W + len(PANELS) * (BAR_W + GAP)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           'font-size="12">', f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="8" y="18" font-size="14" font-weight="bold">{escape(title)}</text>']
    for i, r in enumerate(rows):
        out.append(f'<text x="8" y="{50 + ROW_H * i + 15}">{escape(r["label"])}</text>')
    for p, (name, key) in enumerate(PANELS):
        x0 = LABEL_W + p * (BAR_W + GAP)
        top = max((r[key] for r in rows if r[key] is not None), default=1.0) or 1.0
        out.append(f'<text x="{x0}" y="40" font-weight="bold">{escape(name)}</text>')
        for i, r in enumerate(rows):
            y = 50 + ROW_H * i
            if r[key] is None:
                out.append(f'<text x="{x0}" y="{y + 15}" fill="#888">–</text>')
                continue
            w = BAR_W * r[key] / top
            out.append(f'<rect x="{x0}" y="{y + 3}" width="{w:.1f}" height="{ROW_H - 6}" fill="#4a7ab5"/>')
            out.append(f'<text x="{x0 + w + 4:.1f}" y="{y + 15}">{r[key]:.3g}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
