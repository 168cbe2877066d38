"""First-block cache (the FBCache / cache-dit "F1B0" idea) over the DiT pieces the exporter cuts
(export/graphs/cache.py): per step both DiTs run their head (block 0); when block 0's residual has changed
little since the last fully computed step, the body (every other block) is skipped and its last residual
reused: the tail (final layer) runs on hidden + that residual. Opt-in; numbers change when a step is reused.

One decision per step for every DiT that runs in it (the largest relative change decides), so CFG-parallel
stays in step and cond/uncond never mix a reused and a fresh body. Threshold 0 never reuses: every step runs
head + body, whose velocity is the full graph's bit for bit. No torch; the decision is pure functions below.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

PIECES = ("head", "body", "tail")
OPS = {"change": "residual_change", "extrapolate": "residual_extrapolate"}   # per-DiT name -> manifest graph
DITS = ("dit_cond", "dit_uncond")
THRESHOLD_MAX = 10.0


@dataclass(frozen=True)
class CacheOptions:
    """threshold: reuse a body when max over the DiTs of Σ|r − r_ref| / Σ|r_ref| (r = block 0's residual,
    r_ref = the same at the last fully computed step) is below it; 0 computes every step (bit-identical to no
    cache). warmup: executed steps always computed first. max_consecutive: reused steps in a row at most
    before one is computed again. taylor: extrapolate the reused residual to first order from the last two
    computed steps (TaylorSeer) instead of reusing it as it is."""
    threshold: float = 0.0
    warmup: int = 2
    max_consecutive: int = 3
    taylor: bool = False

    def __post_init__(self) -> None:
        t = self.threshold
        if not (isinstance(t, numbers.Real) and not isinstance(t, bool) and math.isfinite(t) and 0 <= t <= THRESHOLD_MAX):
            raise ValueError(f"cache threshold={t!r} outside the allowed range; allowed: a number in [0, {THRESHOLD_MAX:g}]")
        for name, v, lo in (("warmup", self.warmup, 0), ("max_consecutive", self.max_consecutive, 1)):
            if not (isinstance(v, numbers.Integral) and not isinstance(v, bool) and lo <= v <= 1000):
                raise ValueError(f"cache {name}={v!r} outside the allowed range; allowed: an integer in {lo}…1000")
        if not isinstance(self.taylor, bool):
            raise ValueError(f"cache taylor={self.taylor!r}; allowed: True or False")

    def pieces(self) -> tuple[str, ...]:
        return PIECES + ("change",) + (("extrapolate",) if self.taylor else ())


# ---------------------------------------------------------------------------------------------- decision

def may_reuse(step: int, consecutive: int, opts: CacheOptions) -> bool:
    """Whether step `step` (0 = first executed) may reuse at all, before any residual is compared."""
    return opts.threshold > 0 and step >= opts.warmup and consecutive < opts.max_consecutive


def relative_change(change_l1: float, reference_l1: float) -> float:
    return change_l1 / reference_l1 if reference_l1 > 0 else math.inf


def reuse(changes: list[tuple[float, float]], threshold: float) -> bool:
    """One decision for all DiTs of the step: the largest relative change must be below the threshold."""
    return bool(changes) and max(relative_change(c, r) for c, r in changes) < threshold


def taylor_weight(step: int, last_full: int, previous_full: int) -> float:
    """w of latest + w·(latest − previous): steps since the latest computed step over the gap between the
    two computed steps (first-order finite difference in step units)."""
    return (step - last_full) / (last_full - previous_full)


# ---------------------------------------------------------------------------------------------- manifest

def piece_names(raw: dict) -> list[str]:
    """The pseudo-components of an export's cache graphs ("dit_cond.head", …, "dit_uncond.change")."""
    if "first_block_cache" not in raw:
        return []
    return [f"{d}.{p}" for d in DITS if "first_block_cache" in raw["components"].get(d, {})
            for p in (*PIECES, *OPS)]


def piece_component(raw: dict, name: str) -> dict | None:
    """A cache pseudo-component in the shape of a manifest component (graphs per variant, the DiT's weight
    file and load-time dequantization, inputs, outputs), or None if `name` is not one."""
    dit, _, piece = name.partition(".")
    parent = raw.get("components", {}).get(dit)
    if parent is None or "first_block_cache" not in parent or "first_block_cache" not in raw:
        return None
    if piece in PIECES:
        p = parent["first_block_cache"][piece]
        return {"graphs": p["graphs"], "inputs": p["inputs"], "outputs": p["outputs"],
                **({"data": parent["data"]} if parent.get("data") else {}),
                **({"dequantize": parent["dequantize"], "dequantize_inputs": p.get("dequantize_inputs", {})}
                   if parent.get("dequantize") else {})}
    if piece in OPS:
        op = raw["first_block_cache"][OPS[piece]]
        return {"graphs": {v: op["graph"] for v in parent["first_block_cache"]["head"]["graphs"]},
                "inputs": op["inputs"], "outputs": op["outputs"]}
    return None


def check_sections(raw: dict, fail: Callable[[str], None], file_entry: Callable) -> None:
    """Shape of the optional cache sections (exporter >= 11); the files are checked with the rest. Any shape of
    input gets a message, never a crash (tests/runtime/test_manifest_schema.py mutates every field)."""
    top = raw.get("first_block_cache")
    if top is None:
        return
    if not isinstance(top, dict):
        fail("`first_block_cache` must be an object")
    for op in OPS.values():
        entry = top.get(op)
        file_entry(entry.get("graph") if isinstance(entry, dict) else None, f"first_block_cache.{op}.graph")
    for d in DITS:
        comp = raw["components"].get(d)
        sec = comp.get("first_block_cache") if isinstance(comp, dict) else None
        if sec is None:
            continue
        for p in PIECES:
            piece = sec.get(p) if isinstance(sec, dict) else None
            graphs = piece.get("graphs") if isinstance(piece, dict) else None
            if not isinstance(graphs, dict) or not graphs:
                fail(f"`components.{d}.first_block_cache.{p}.graphs` must be an object of file entries")
            for v, e in graphs.items():
                file_entry(e, f"components.{d}.first_block_cache.{p}.graphs.{v}")


def cache_label(cache) -> str:
    """The first-block cache's settings as the PNG metadata and reports record them ("off" without)."""
    if cache is None:
        return "off"
    return (f"threshold={cache.threshold!r},warmup={cache.warmup},max_consecutive={cache.max_consecutive},"
            f"taylor={cache.taylor}")


# ---------------------------------------------------------------------------------------------- running

@dataclass
class _State:
    """One DiT's cache within one request (device values)."""
    reference: Any = None        # block 0's residual at the last computed step
    residual: Any = None         # the body's residual then
    previous: Any = None         # the body's residual at the computed step before (TaylorSeer)
    last_full: int = -1
    previous_full: int = -1


@dataclass
class FirstBlockCache:
    """The cache of one request's denoising loop: `velocities` replaces running the DiTs for a step."""
    backend: Any
    opts: CacheOptions
    run_pair: Callable[[list], list]
    states: dict[str, _State] = field(default_factory=lambda: {d: _State() for d in DITS})
    consecutive: int = 0
    reused: list[int] = field(default_factory=list)
    changes: dict[int, float] = field(default_factory=dict)    # step -> the largest relative change compared

    def velocities(self, step: int, calls: list[tuple[str, dict]]) -> list[Any]:
        """`calls`: (DiT, its inputs) for the DiTs this step runs; returns their velocities in that order."""
        heads = self.run_pair([(f"{d}.head", inputs) for d, inputs in calls])
        states = [self.states[d] for d, _ in calls]
        hit = False
        if may_reuse(step, self.consecutive, self.opts) and all(s.residual is not None for s in states):
            outs = self.run_pair([(f"{d}.change", {"residual": h["first_residual"], "reference": s.reference})
                                  for (d, _), h, s in zip(calls, heads, states)])
            changes = [(float(self.backend.download(o["change_l1"])), float(self.backend.download(o["reference_l1"])))
                       for o in outs]
            hit = reuse(changes, self.opts.threshold)
            self.changes[step] = max(relative_change(c, r) for c, r in changes)
        passed = [{**inputs, **{k: v for k, v in h.items() if k != "first_residual"}} for (_, inputs), h in zip(calls, heads)]
        if hit:
            self.consecutive += 1
            self.reused.append(step)
            residuals = [self._residual(d, s, step) for (d, _), s in zip(calls, states)]
            tails = self.run_pair([(f"{d}.tail", {**p, "body_residual": r})
                                   for (d, _), p, r in zip(calls, passed, residuals)])
            return [t["velocity"] for t in tails]
        self.consecutive = 0
        bodies = self.run_pair([(f"{d}.body", p) for (d, _), p in zip(calls, passed)])
        for s, h, b in zip(states, heads, bodies):
            s.previous, s.previous_full = s.residual, s.last_full
            s.reference, s.residual, s.last_full = h["first_residual"], b["body_residual"], step
        return [b["velocity"] for b in bodies]

    def _residual(self, dit: str, s: _State, step: int) -> Any:
        if not self.opts.taylor or s.previous is None:
            return s.residual
        w = np.array([taylor_weight(step, s.last_full, s.previous_full)], np.float32)
        return self.backend.run(f"{dit}.extrapolate", {"latest": s.residual, "previous": s.previous,
                                                      "weight": w})["extrapolated"]
