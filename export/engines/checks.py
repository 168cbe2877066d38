"""The checks of a layer report (`<c>.layers.json`), computed from the report alone: FP8 weights kept, attention
fused into one kernel per block, in every optimization profile the report covers."""
from __future__ import annotations

import re

FP8_WEIGHT_BOUND = 1.10       # engine weight bytes / graph initializer bytes
# An attention kernel by its kernel or tactic name (TensorRT-RTX 1.7: `_gemm_mha_v2`). Matched after the ONNX node
# names a layer carries are removed, so a plain layer named after an `Attention` node does not count.
ATTENTION_KERNEL = re.compile(r"mha|fmha|flash|attention", re.IGNORECASE)
_FOREIGN = re.compile(r"\{ForeignNode\[.*?\]\}")
_PROFILE = (re.compile(r"_myl(\d+)_\d+$"),          # TensorRT-RTX 1.7 builder log: one region per profile
            re.compile(r" \[profile (\d+)\]"))        # TensorRT: layers of profile k > 0 are suffixed


def layer_profile(layer: dict) -> int:
    """Which optimization profile a layer belongs to: the `profile` the inspection tagged it with, else what its
    name says (`…_myl<profile>_<n>` in TensorRT-RTX, `… [profile <k>]` in TensorRT), else 0."""
    if isinstance(layer.get("profile"), int):
        return layer["profile"]
    for pattern in _PROFILE:
        hit = pattern.search(layer.get("name", ""))
        if hit:
            return int(hit.group(1))
    return 0


def kernel_text(layer: dict) -> str:
    """A layer's kernel and tactic names without the ONNX node names it carries."""
    name = _FOREIGN.sub(" ", layer.get("name", ""))
    for node in layer.get("metadata", []):
        name = name.replace(node, " ")
    return f"{name} {layer.get('tactic', '')}"


def opaque(layer: dict) -> bool:
    """A fused region that does not say which kernels it runs (full TensorRT's Myelin `ForeignNode`)."""
    return (bool(re.search(r"myelin|foreignnode", layer.get("type", ""), re.IGNORECASE))
            or "ForeignNode" in layer.get("name", "")) and not ATTENTION_KERNEL.search(layer.get("tactic", ""))


def _fp8_check(graph: dict, summary: dict, parsed: list[dict], by_profile: dict[int, list[dict]]) -> dict:
    init = graph["initializer_bytes"]
    weights = summary.get("weights_memory_bytes")
    listed = any(la.get("constants") for la in parsed)          # full TensorRT's inspector lists no constants
    fp8_per_profile = {}
    for prof, lays in sorted(by_profile.items()):
        seen, total = set(), 0
        for la in lays:
            for c in la["constants"]:
                if c["dtype"] != "FP8" or c["name"] in seen:
                    continue
                seen.add(c["name"])
                n = 1
                for d in c["shape"]:
                    n *= max(d, 0)
                total += n
        fp8_per_profile[prof] = int(total)
    fp8_graph = graph["fp8_initializer_bytes"]
    engine_bytes = summary["engine_bytes"]
    fp8 = {"initializer_bytes": init, "fp8_initializer_bytes": fp8_graph, "engine_weights_bytes": weights,
           "engine_fp8_constant_bytes_per_profile": list(fp8_per_profile.values()),
           "engine_bytes": engine_bytes,
           "engine_bytes_ratio": round(engine_bytes / init, 4) if init else None,
           "weights_ratio": round(weights / init, 4) if weights and init else None,
           "bound": FP8_WEIGHT_BOUND, "profiles": len(by_profile)}
    if not init:
        fp8.update(status="n/a", detail="the graph has no weights")
    elif weights is None or not parsed:
        fp8.update(status="unverified", detail="the layer report has no weight total / layer list")
    else:
        ok_total = weights <= FP8_WEIGHT_BOUND * init
        ok_fp8 = not listed or all(abs(v - fp8_graph) <= 0.01 * fp8_graph for v in fp8_per_profile.values())
        fp8["status"] = "pass" if ok_total and ok_fp8 else "fail"
        per = sorted(set(fp8_per_profile.values()))
        constants = (f"FP8 constants per profile {'/'.join(map(str, per))} B vs FP8 initializers {fp8_graph} B "
                     f"({len(by_profile)} profile(s))" if listed else
                     "this layer source lists no constants (full TensorRT's inspector): decided on the weight total "
                     "alone, which FP8 expanded to bf16 would exceed")
        fp8["detail"] = (f"engine weights {weights} B = {weights / init:.3f}x the graph's initializers "
                         f"(bound {FP8_WEIGHT_BOUND}x); {constants}; engine file {engine_bytes} B "
                         f"= {engine_bytes / init:.2f}x the initializers (includes the compiled code of every profile)")
    return fp8


def _attention_check(blocks: list[dict], parsed: list[dict], by_profile: dict[int, list[dict]],
                     n_profiles: int | None) -> dict:
    results = []
    for b in blocks:
        core = set(b["core"])
        per_profile = {}
        for prof, lays in sorted(by_profile.items()):
            touching = [la for la in lays if core & set(la["metadata"])]
            kernels = [la for la in touching if ATTENTION_KERNEL.search(kernel_text(la))
                       and core <= set(la["metadata"])]
            per_profile[prof] = {"fused": len(kernels) == 1, "kernel": kernels[0]["name"] if len(kernels) == 1 else None,
                                 "unknown": not kernels and bool(touching) and all(opaque(la) for la in touching),
                                 "layers": [la["name"] for la in touching]}
        fused = bool(per_profile) and all(r["fused"] for r in per_profile.values())
        first = per_profile.get(min(per_profile)) if per_profile else {"kernel": None, "layers": []}
        result = {"block": b["anchor"], "form": b["form"], "fused": fused, "kernel": first["kernel"],
                  "layers": first["layers"], "fused_profiles": sum(r["fused"] for r in per_profile.values()),
                  "profiles": len(per_profile)}
        if any(r["unknown"] for r in per_profile.values()) and all(r["fused"] or r["unknown"]
                                                                  for r in per_profile.values()):
            result["unknown"] = True            # only inside opaque regions: neither fused nor shown unfused
        results.append(result)
    att = {"blocks": len(blocks), "fused": sum(r["fused"] for r in results), "per_block": results}
    covered = n_profiles is None or len(by_profile) >= n_profiles
    failed = [r for r in results if not r["fused"] and not r.get("unknown")]
    if not blocks:
        att.update(status="n/a", detail="the graph has no attention block")
    elif not parsed:
        att.update(status="unverified", detail="the layer report has no layer list")
    elif failed:
        att.update(status="fail", detail="; ".join(
            f"{r['block']} is one fused kernel in {r['fused_profiles']} of {r['profiles']} profile(s); profile 0 "
            f"computes it with {len(r['layers'])} layer(s): {', '.join(r['layers'][:6])}" for r in failed))
    elif any(r.get("unknown") for r in results):
        n = sum(bool(r.get("unknown")) for r in results)
        att.update(status="unverified",
                   detail=f"{n} block(s) sit in fused regions that do not name their kernels (Myelin ForeignNode)")
    elif not covered:
        att.update(status="unverified", detail=f"fused in the {len(by_profile)} profile(s) the layer report covers; "
                                               f"the engine has {n_profiles}")
    else:
        att.update(status="pass", detail=f"{len(blocks)} attention block(s), each one fused kernel "
                                         f"({results[0]['kernel']}, …) in each of {len(by_profile)} profile(s)")
    return att


def run_checks(report: dict, n_profiles: int | None = None) -> dict:
    """The checks, computed from a layer report alone (`n_profiles`: the engine's profile count, when known, so a
    report that covers fewer profiles cannot pass the per-profile attention check).

    fp8_weights: the engine's weight memory (the builder's 'Total Weights Memory', weights stored once for all
    profiles) is at most 1.1x the graph's initializer bytes, and — where the layer source lists constants — in each
    profile the FP8 constants add up to the graph's FP8 initializer bytes (FP8 weights neither expanded nor dropped).
    The engine file's size is reported beside it: on tiny graphs the compiled code is a large fixed share.
    attention: every attention block of the graph (an ONNX Attention node, or MatMul→softmax→MatMul) is computed,
    in each profile, by exactly one fused attention kernel (a layer whose kernel or tactic name, not its ONNX node
    names, is an MHA/flash kernel and that implements all of the block's core nodes). Layers that only move the
    block's inputs or outputs are allowed beside it; a block inside an opaque fused region is 'unverified'."""
    graph, summary, layers = report["graph"], report["summary"], report["layers"]
    parsed = [la for la in layers if "raw" not in la]
    by_profile: dict[int, list[dict]] = {}
    for la in parsed:
        by_profile.setdefault(layer_profile(la), []).append(la)
    return {"fp8_weights": _fp8_check(graph, summary, parsed, by_profile),
            "attention": _attention_check(graph["attention_blocks"], parsed, by_profile, n_profiles)}
