"""GPU memory per loading mode: which engines are resident together, what that needs (an estimate from the
manifest: engine bytes — weights plus compiled code — and the activation bytes the build recorded), the refusal
when the GPU has less free, and the lines `ideogram4 info` prints.

Modes (backend option `memory_mode`):
  resident               every engine loaded at start (fastest; the default)
  release_text_encoder   the text encoder is loaded for encoding and released before the denoising engines load;
                         every request swaps them (the text encoder and the DiTs are never resident together)
  on_demand              one stage at a time: text encoder, then the two DiTs and guided_step, then the VAE
Weight streaming (option `weight_streaming_budget`, engines built with `--weight-streaming`) keeps only part of
each streamable engine's weights on the GPU and composes with every mode."""
from __future__ import annotations

from .errors import EngineMismatch

MEMORY_MODES = ("resident", "release_text_encoder", "on_demand")
_ALL = ("text_encoder", "dit_cond", "dit_uncond", "guided_step", "vae_decoder")
_GROUPS = {
    "resident": (_ALL,),
    "release_text_encoder": (("text_encoder",), ("dit_cond", "dit_uncond", "guided_step", "vae_decoder")),
    "on_demand": (("text_encoder",), ("dit_cond", "dit_uncond", "guided_step"), ("vae_decoder",)),
}
MEMORY_MARGIN = 1.05            # free GPU memory must exceed the estimate by this factor
GiB = 2**30


def check_mode(mode: str) -> str:
    if mode not in MEMORY_MODES:
        raise ValueError(f"memory_mode {mode!r} is not one of {', '.join(MEMORY_MODES)}")
    return mode


def load_groups(mode: str, components) -> list[tuple[str, ...]]:
    """The engines resident together in `mode`, in pipeline order; only one group is loaded at a time. Components
    outside the known stages join the last group."""
    names = list(components)
    groups = [tuple(c for c in g if c in names) for g in _GROUPS[check_mode(mode)]]
    extra = tuple(c for c in names if c not in _ALL)
    if extra:
        groups[-1] = groups[-1] + extra
    return [g for g in groups if g]


def streaming_shares(entries: dict[str, dict], budget: int | None) -> dict[str, int]:
    """Weight bytes kept on the GPU per streamable engine when `budget` bytes are allowed in total: split in
    proportion to each engine's weight bytes, never more than it has."""
    streamable = {c: int(e.get("weights_bytes") or 0) for c, e in entries.items() if e.get("weight_streaming")}
    total = sum(streamable.values())
    if budget is None or not total:
        return {}
    return {c: min(w, int(budget * w / total)) for c, w in streamable.items()}


def engine_need(entry: dict, kept_weights: int | None = None) -> int:
    """Bytes one loaded engine needs on the GPU: its file (weights + code) and its activations; with weight
    streaming only `kept_weights` of its weights (the streaming scratch buffer is not known before loading)."""
    need = int(entry["bytes"]) + int(entry.get("activation_bytes") or 0)
    if kept_weights is not None:
        need -= max(int(entry.get("weights_bytes") or 0) - kept_weights, 0)
    return need


def memory_estimate(entries: dict[str, dict], mode: str = "resident",
                    budget: int | None = None) -> tuple[int, str]:
    """Peak bytes in `mode` (the largest group) and the per-engine parts in GiB, for messages."""
    shares = streaming_shares(entries, budget)
    need = {c: engine_need(e, shares.get(c)) for c, e in entries.items()}
    groups = load_groups(mode, entries)
    peak = max((sum(need[c] for c in g) for g in groups), default=0)
    return peak, ", ".join(f"{c} {need[c] / GiB:.2f}" for c in entries)


def check_memory(entries: dict[str, dict], free: int, total: int, gpu: str = "this GPU", mode: str = "resident",
                 budget: int | None = None) -> None:
    need, parts = memory_estimate(entries, mode, budget)
    if need * MEMORY_MARGIN <= free:
        return
    better = [f"memory_mode={m!r} needs about {memory_estimate(entries, m, budget)[0] / GiB:.2f} GiB"
              for m in MEMORY_MODES if m != mode and memory_estimate(entries, m, budget)[0] < need]
    raise EngineMismatch(f"insufficient GPU memory on {gpu}: the engines need about {need / GiB:.2f} GiB in memory_mode "
                   f"{mode!r} ({parts} GiB, weights + code + activations), {free / GiB:.2f} GiB of "
                   f"{total / GiB:.2f} GiB are free. Free the GPU"
                   + (f", or use {'; '.join(better)}" if better else "")
                   + ", or rebuild with fewer/smaller buckets (`make engines BUCKETS=...`) or with "
                     "`--weight-streaming` and set weight_streaming_budget")


def _component_estimates(manifest) -> tuple[dict[str, dict], bool]:
    """Per component {bytes, activation_bytes, weights_bytes, weight_streaming}: the built engines where the
    manifest has them, else the exported weight bytes alone (activations unknown before `make engines`)."""
    raw = getattr(manifest, "raw", manifest)
    built = (raw.get("engines") or {}).get("components") or {}
    out = {}
    for c, comp in raw["components"].items():
        if c in built:
            out[c] = built[c]
        else:
            w = int(comp.get("initializer_bytes") or 0)
            out[c] = {"bytes": max(w, 1), "weights_bytes": w, "activation_bytes": None}
    return out, all(c in built for c in raw["components"])


def memory_report(manifest, budget: int | None = None) -> list[str]:
    """`ideogram4 info` lines: GPU memory each TensorRT mode needs for this engines folder (an estimate)."""
    entries, built = _component_estimates(manifest)
    src = ("engine bytes + the activation bytes recorded by `make engines`" if built else
           "the exported weight bytes only: activations are known after `make engines`")
    lines = [f"TensorRT GPU memory per memory_mode (ESTIMATE from the manifest: {src}; plus the CUDA context):"]
    what = {"resident": "all engines loaded at once (fastest)",
            "release_text_encoder": "text encoder released before the DiTs load (both reload per request)",
            "on_demand": "one stage at a time: text encoder | DiTs + guided_step | VAE (all reload per request)"}
    for m in MEMORY_MODES:
        lines.append(f"  {m:21s} {memory_estimate(entries, m)[0] / GiB:7.2f} GiB  {what[m]}")
    streamable = [c for c, e in entries.items() if e.get("weight_streaming")]
    if streamable:
        floor = memory_estimate(entries, "resident", 0)[0]
        lines.append(f"  weight streaming      {floor / GiB:7.2f} GiB + the budget (resident; {', '.join(streamable)} "
                     "stream the rest of their weights from host memory, plus a scratch buffer)")
    elif built:
        lines.append("  weight streaming      not available: these engines were built without `--weight-streaming`")
    else:
        lines.append("  weight streaming      needs engines built with `make engines ENGINE_FLAGS=--weight-streaming`")
    return lines
