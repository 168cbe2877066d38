"""`make export`: checkpoint folder → engines/<name>/ with ONNX graphs and manifest.json (the contract).

Each component is exported to a canonical bf16 graph `<c>.onnx` (for TensorRT / TensorRT-RTX) and two
per-backend twins (graphs/rewrite.py): `<c>.cuda.onnx` for onnxruntime's CUDA provider (bf16, with the few
ops it has no bf16 kernel for run in fp32) and `<c>.cpu.onnx` for its CPU provider (fp32 compute with bf16
rounding after every op). All three read the same weight file `<c>.onnx.data`. Everything is written into a temporary folder that replaces the
output folder only when complete; components whose inputs are unchanged since the last export are reused.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import onnx
import torch
from tqdm import tqdm

from ..runtime import latents as latent_tables
from ..runtime.manifest import FORMAT_VERSIONS, FUSED, LOAD_DEQUANTIZED  # _dql: <c>.<twin>_dql.onnx, FP8 weights as bf16 inputs
from ..runtime.packing import MAX_ASPECT, MAX_SIDE, MAX_TEXT_TOKENS, MIN_SIDE, PIXELS_PER_TOKEN
from ..runtime.schedule import DEFAULT_PRESET, PRESETS, TAU_MAX, TAU_MIN
from ..runtime.errors import check_interrupted
from ..runtime.tempfiles import temp_name
from .checkpoint import Checkpoint, Component, TensorSource, open_checkpoint
from .dit import rope_inv_freq
from .files import recover_dir, replace_dir, sha256_file
from .first_block_cache import write_ops, write_pieces
from .fp8 import quantize_rows
from .graphs.builder import IR_VERSION, OPSET, GraphBuilder
from .graphs.rewrite import (bf16_to_fp32_emulation, cpu_dequantized_at_load, cuda_dequantized_at_load, for_cuda,
                             fp8_weights)
from .graphs.fuse import cuda_fused_dequantized_at_load, for_cuda_fused, kernels_section
from .graphs.w8a8 import for_cuda_fused_w8a8, for_cuda_w8a8
from .inventory import scale_name

EXPORTER_VERSION = 11         # bump whenever the graphs an unchanged checkpoint exports would change (9: cuda_fused twins; 10: bf16 MRoPE table; 11: first-block cache pieces, the other graphs unchanged)
COMPONENTS = ("text_encoder", "dit_cond", "dit_uncond", "vae_decoder")
CACHED = ("dit_cond", "dit_uncond")      # cut into head / body / tail for the first-block cache (graphs/cache.py)
SOURCE = {"text_encoder": "text_encoder", "dit_cond": "transformer", "dit_uncond": "unconditional_transformer",
          "vae_decoder": "vae"}
WEIGHT_MODES = ("fp8", "keep")
PRECISIONS = ("faithful", "w8a8")       # w8a8: also the cuda_w8a8 twins (FP8 activations; numerics change)
PRECISION_VARIANTS = {"faithful": {}, "w8a8": {"cuda_w8a8": for_cuda_w8a8, "cuda_fused_w8a8": for_cuda_fused_w8a8}}
SCHEMA = Path(__file__).with_name("manifest.schema.json")
VARIANTS = {"cuda": for_cuda, "cpu": bf16_to_fp32_emulation,       # graph file suffix -> rewrite of the bf16 graph
            "cuda" + LOAD_DEQUANTIZED: cuda_dequantized_at_load, "cpu" + LOAD_DEQUANTIZED: cpu_dequantized_at_load,
            "cuda" + FUSED: for_cuda_fused, "cuda" + FUSED + LOAD_DEQUANTIZED: cuda_fused_dequantized_at_load}
GRAPH_USE = {"bf16": "canonical bf16 graph: TensorRT / TensorRT-RTX engines are built from it",
             "cuda": "onnxruntime CUDAExecutionProvider (bf16; ops without bf16 CUDA kernels run in fp32; FP8 linears "
                     "as com.microsoft.MatMulBlockQuantizedFp8Weight, onnxruntime-gpu >= 1.31; the DiTs' attention "
                     "as com.microsoft.MultiHeadAttention)",
             "cpu": "onnxruntime CPUExecutionProvider (fp32 compute, bf16 rounding after every op)",
             "cuda_dql": "the cuda twin with every FP8 weight a bf16 input, dequantized once at load by the "
                         "component's `dequantize` graph (onnxruntime `dequantize_at_load`)",
             "cpu_dql": "the cpu twin with every FP8 weight a bf16 input (as cuda_dql)",
             "cuda_fused": "the cuda twin with its elementwise chains (modulation, gated residuals, q/k norm + "
                           "rotation, SiLU-up) as the ideogram4 fused CUDA ops of the kernels library (see `kernels`)",
             "cuda_fused_dql": "the cuda_dql twin with the same fused ops",
             "cuda_w8a8": "opt-in (`--precision w8a8`): the cuda twin with the DiT blocks' linears as W8A8 — per-token "
                          "e4m3 activations x the stored e4m3 weights on FP8 tensor cores (ideogram4 ops of the kernels "
                          "library, see `kernels`); numerics differ from the faithful graphs",
             "cuda_fused_w8a8": "opt-in (`--precision w8a8`): the cuda_fused twin with the same W8A8 linears, the "
                                "per-token quantization inside the fused kernels that produce the activations"}


@dataclass(frozen=True)
class ExportOptions:
    attention_form: str = "op"     # "op": opset-23 Attention; "matmul": MatMul→Softmax→MatMul
    weights: str = "fp8"           # fp8: float (unquantized) Linears are quantized to e4m3 at export with
                                   # the per-row RTN formula; FP8 ones are kept. keep: float Linears stay bf16
    progress: bool = True
    precision: str = "faithful"    # w8a8: also write the cuda_w8a8 twins (docs/export.md)


class QuantizingSource:
    """A TensorSource view that serves float Linear weights as e4m3 + per-row fp32 scale, quantized on the
    fly with the same round-to-nearest formula as the synthetic writer (`fp8.quantize_rows`)."""

    def __init__(self, src: TensorSource, float_linears: set[str]):
        self.src, self.float_linears = src, float_linears
        self._last: tuple[str, tuple] | None = None

    def _quantized(self, weight: str):
        if self._last is None or self._last[0] != weight:
            self._last = (weight, quantize_rows(self.src.get(weight)))
        return self._last[1]

    def get(self, name: str):
        if name in self.float_linears:
            return self._quantized(name)[0]
        if name.endswith("_scale") and name[: -len("_scale")] in self.float_linears:
            return self._quantized(name[: -len("_scale")])[1]
        return self.src.get(name)


def _source(comp: Component, inventory: dict, weights: str):
    src = TensorSource(comp.files)
    if weights == "keep":
        return src, "kept-dtype"
    float_linears = {k for k, s in inventory.items() if s.kind == "linear" and k not in comp.quantized}
    if not float_linears:
        return src, "checkpoint"
    return QuantizingSource(src, float_linears), "fp8-quantized-at-export"


def _io(name, dtype, shape, meaning):
    return {"name": name, "dtype": dtype, "shape": shape, "meaning": meaning}


def component_io(name: str, ckpt: Checkpoint) -> tuple[list, list, str]:
    dit = ckpt.components["transformer"].config
    F, hd = dit.llm_features_dim, dit.head_dim
    rope = _io("rope_cos", "float32", ["batch", "sequence", hd], "")
    if name == "text_encoder":
        return ([_io("input_ids", "int64", ["batch", "text_tokens"],
                     "ids of the chat-templated prompt (see tokenizer); rows of one batch have equal length, no padding")],
                [_io("text_features", "float32", ["batch", "text_tokens", F],
                     "residual stream after the 13 tapped decoder layers, hidden-major / tap-minor (f = d*13 + j)")],
                "once per prompt; the features do not depend on size, seed or step")
    if name in ("dit_cond", "dit_uncond"):
        seq = "sequence" if name == "dit_cond" else "image_tokens"
        ins = [_io("latents", "float32", ["batch", "image_tokens", dit.in_channels],
                   "sampler state z in normalised token space, raster order (token n = r*grid_w + c)"),
               _io("tau", "float32", ["batch"], "model time of the step (rounded to bf16 inside the graph)"),
               {**rope, "shape": ["batch", seq, hd],
                "meaning": "cos of the MRoPE angles, rope section; rows = " +
                           ("[text tokens; image tokens]" if name == "dit_cond" else "image tokens")},
               {**rope, "name": "rope_sin", "shape": ["batch", seq, hd], "meaning": "sin of the same angles"}]
        if name == "dit_cond":
            ins.append(_io("text_features", "float32", ["batch", "text_tokens", F],
                           "text_encoder output; sequence = text_tokens + image_tokens"))
        outs = [_io("velocity", "float32", ["batch", "image_tokens", dit.in_channels], "predicted velocity v")]
        call = ("every step, at the step's tau: " + ("conditional branch v_c" if name == "dit_cond" else
                "unconditional branch v_u (image tokens only, separate weights)"))
        return ins, outs, call
    return ([_io("latents", "float32", ["batch", "grid_h", "grid_w", 128],
                 "final sampler state z (batch, grid_h*grid_w, 128) viewed as a grid; de-normalised and "
                 "unpatchified inside the graph")],
            [_io("image", "uint8", ["batch", "height", "width", 3], "RGB pixels, height = 16*grid_h, width = 16*grid_w")],
            "once per image after the last step")


def _build(name: str, ckpt: Checkpoint, path: Path, opts: ExportOptions, progress: Callable) -> tuple[GraphBuilder, str]:
    comp = ckpt.components[SOURCE[name]]
    if name == "text_encoder":
        from .graphs.text_encoder import build_text_encoder
        from .text_encoder import text_encoder_inventory
        src, mode = _source(comp, text_encoder_inventory(comp.config.text_config, True), opts.weights)
        return build_text_encoder(comp.config.text_config, src, path, attention_form=opts.attention_form,
                                  progress=progress), mode
    if name in ("dit_cond", "dit_uncond"):
        from .dit import dit_inventory
        from .graphs.dit import build_dit
        src, mode = _source(comp, dit_inventory(comp.config), opts.weights)
        return build_dit(comp.config, src, path, text=name == "dit_cond", attention_form=opts.attention_form,
                         progress=progress), mode
    from .graphs.vae import build_vae_decoder
    return build_vae_decoder(comp.config, TensorSource(comp.files), path, attention_form=opts.attention_form,
                             progress=progress), "checkpoint"


def exporter_fingerprint() -> str:
    """sha256 over the exporter's own source: an edited graph builder invalidates every cached component even
    if EXPORTER_VERSION was not bumped."""
    h = hashlib.sha256()
    root = Path(__file__).parent
    # engines/ builds from the exported graphs and keeps its own build keys: not part of the graphs' source
    for f in sorted(p for p in root.rglob("*.py") if p.relative_to(root).parts[0] != "engines") + [SCHEMA]:
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _cache_key(name: str, ckpt: Checkpoint, opts: ExportOptions, file_hashes: dict[str, str]) -> str:
    comp = ckpt.components[SOURCE[name]]
    cfg = comp.config.to_dict() if hasattr(comp.config, "to_dict") else comp.config.__dict__
    blob = json.dumps({"exporter": EXPORTER_VERSION, "source": exporter_fingerprint(), "component": name,
                       "attention": opts.attention_form,
                       "weights": opts.weights, "config": cfg, "files": file_hashes,
                       **({"precision": opts.precision} if opts.precision != "faithful" else {})},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _file_entry(path: Path) -> dict:
    return {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def _tools() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "onnx": onnx.__version__}
    for pkg in ("transformers", "safetensors", "onnxruntime", "ideogram4-engine"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _model_section(ckpt: Checkpoint) -> dict:
    from .text_encoder import tap_layers
    dit = ckpt.components["transformer"].config
    te = ckpt.components["text_encoder"].config.text_config
    return {"dit": {**dit.to_json_dict(), "head_dim": dit.head_dim},
            "text_encoder": {"hidden_size": te.hidden_size, "num_hidden_layers": te.num_hidden_layers,
                             "taps": list(tap_layers(te.num_hidden_layers)), "vocab_size": te.vocab_size},
            "vae": ckpt.components["vae"].config.to_json_dict()}


def _static_sections(ckpt: Checkpoint) -> dict:
    dit = ckpt.components["transformer"].config
    return {
        "tokenizer": {"folder": "tokenizer", "max_text_tokens": MAX_TEXT_TOKENS, "add_generation_prompt": True,
                      "add_special_tokens": False,
                      "message": [{"role": "user", "content": [{"type": "text", "text": "<prompt>"}]}],
                      "chat_template": "tokenizer_config.json: chat_template (Jinja), rendered verbatim"},
        "sampler": {
            "presets": {n: {"steps": p.steps, "guidance": list(p.guidance), "mu": p.mu, "std": p.std}
                        for n, p in PRESETS.items()},
            "default_preset": DEFAULT_PRESET, "tau_min": TAU_MIN, "tau_max": TAU_MAX,
            "schedule": "u_k = linspace(0, 1, steps+1) (float32, torch semantics); mu = mu_base + 0.5*ln(H*W/512^2); "
                        "tau(u) = clamp(1 - sigmoid(mu + std*ndtri(u)), tau_min, tau_max) in float64, cast to float32",
            "loop": "for i = steps-1 .. 0: tau = tau(u[i+1]), dt = float32(tau(u[i]) - tau); v_c = dit_cond, "
                    "v_u = dit_uncond; g = guidance[i] (index 0 = last step); z += (g*v_c + (1-g)*v_u)*dt, all float32; "
                    "z0 ~ N(0, 1) of shape (batch, image_tokens, 128)",
        },
        "latents": {"token_channels": latent_tables.TOKEN_CHANNELS,
                    "channel_order": "k = (ph*2 + pw)*32 + c; applied inside vae_decoder",
                    "shift": [float(x) for x in latent_tables.LATENT_SHIFT],
                    "scale": [float(x) for x in latent_tables.LATENT_SCALE]},
        "rope": {"head_dim": dit.head_dim, "theta": dit.rope_theta, "mrope_section": list(dit.mrope_section),
                 "inv_freq": [float(x) for x in rope_inv_freq(dit.head_dim, dit.rope_theta)],
                 "image_position_offset": 65536,
                 "tables": "text token p: position (p,p,p); image token (r,c): (65536, 65536+r, 65536+c); slot i of "
                           "head_dim/2 takes axis h if i%3==1 and i<3*sec[1], w if i%3==2 and i<3*sec[2], else t; "
                           "inv_freq[i] = float32(bfloat16(1 / theta^(2i/head_dim) in float32)) (spec 2.6); "
                           "angle = float32(pos[axis]) * inv_freq[i] (one float32 product); "
                           "cos/sin of [angles, angles] (runtime: float64 evaluation, rounded to float32)"},
        "limits": {"min_side": MIN_SIDE, "max_side": MAX_SIDE, "multiple": PIXELS_PER_TOKEN,
                   "max_aspect": MAX_ASPECT, "max_text_tokens": MAX_TEXT_TOKENS},
    }


def validate_manifest(manifest: dict) -> None:
    import jsonschema
    jsonschema.validate(manifest, json.loads(SCHEMA.read_text()))


def export(checkpoint: Path | str, out: Path | str, opts: ExportOptions = ExportOptions(),
           log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict:
    """Export every component; returns the manifest. Raises before writing anything if the checkpoint or the
    options are bad."""
    if opts.attention_form not in ("op", "matmul"):
        raise ValueError(f"attention form {opts.attention_form!r}; allowed: op, matmul")
    if opts.weights not in WEIGHT_MODES:
        raise ValueError(f"weights mode {opts.weights!r}; allowed: {', '.join(WEIGHT_MODES)}")
    if opts.precision not in PRECISIONS:
        raise ValueError(f"precision {opts.precision!r}; allowed: {', '.join(PRECISIONS)}")
    rewrites = {**VARIANTS, **PRECISION_VARIANTS[opts.precision]}
    graph_use = {v: GRAPH_USE[v] for v in ("bf16", *rewrites)}
    ckpt = open_checkpoint(checkpoint)
    log(ckpt.describe())
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in recover_dir(out):
        log(f"removed {stale.name}, left by a killed export (its process is gone)")
    old = _read_old_manifest(out)
    tmp = out.parent / temp_name(out.name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        hashes: dict[str, dict[str, str]] = {}
        known = _known_hashes(old)
        components = {}
        dequantize = _write_dequantize(tmp)
        for name in COMPONENTS:
            check_interrupted()
            comp = ckpt.components[SOURCE[name]]
            if SOURCE[name] not in hashes:
                hashes[SOURCE[name]] = {f.name: _hash(f, known) for f in comp.files.files}
            key = _cache_key(name, ckpt, opts, hashes[SOURCE[name]])
            reused = _reuse(old, out, tmp, name, key)
            if reused is not None:
                log(f"{name}: unchanged since the last export, reused")
                if "dequantize" in reused:      # the shared graph is written afresh above
                    reused["dequantize"]["graph"] = dequantize
                components[name] = reused
                continue
            t0 = time.perf_counter()
            graph = tmp / f"{name}.onnx"
            with tqdm(desc=f"export {name}", unit="layer", disable=not opts.progress, file=sys.stderr) as bar:
                def progress(done: int, total: int) -> None:
                    bar.total = total
                    bar.n = done
                    bar.refresh()
                builder, mode = _build(name, ckpt, graph, opts, progress)
                model = builder.save(graph)
            paths: dict[str, Path] = {}
            written: dict[bytes, Path] = {}         # a derived variant with nothing to change shares its twin's file
            twins: dict[str, onnx.ModelProto] = {}
            for variant, rewrite in rewrites.items():
                twins[variant] = rewrite(model)
                data = twins[variant].SerializeToString()
                if (FUSED in variant or variant in PRECISION_VARIANTS[opts.precision]) and data in written:
                    paths[variant] = written[data]
                    continue
                paths[variant] = tmp / f"{name}.{variant}.onnx"
                paths[variant].write_bytes(data)
                written.setdefault(data, paths[variant])
            ins, outs, call = component_io(name, ckpt)
            components[name] = {
                "graphs": {"bf16": _file_entry(graph), **{v: _file_entry(p) for v, p in paths.items()}},
                "data": _file_entry(tmp / f"{name}.onnx.data"),
                "inputs": ins, "outputs": outs, "call": call, "cache_key": key,
                "weights": mode, "initializer_bytes": builder.weight_bytes,
                "checkpoint_bytes": comp.files.nbytes, "export_seconds": round(time.perf_counter() - t0, 3),
            }
            table = _fp8_weight_table(model)
            if table:
                components[name]["dequantize"] = {"graph": dequantize, "weights": table}
            if name in CACHED:
                components[name]["first_block_cache"] = write_pieces(name, twins, builder.marks, ins, outs, table, tmp)
            log(f"{name}: {builder.weight_bytes / 1e6:.1f} MB of weights "
                f"({builder.weight_bytes / comp.files.nbytes:.3f}x the checkpoint's), "
                f"{time.perf_counter() - t0:.1f} s")
        components["guided_step"] = _write_guided_step(tmp, graph_use)
        cache_ops = write_ops(tmp)
        engines = _carry_engines(old, out, tmp)
        shutil.copytree(ckpt.root / "tokenizer", tmp / "tokenizer")
        static = _static_sections(ckpt)
        static["tokenizer"]["files"] = _tokenizer_files(tmp, static["tokenizer"]["folder"])
        manifest = {
            "format": "ideogram4-engine/manifest", "format_version": FORMAT_VERSIONS[-1],
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "exporter": {"version": EXPORTER_VERSION, "opset": OPSET, "ir_version": IR_VERSION,
                         "attention_form": opts.attention_form,
                         "weights": _weights_summary({c["weights"] for c in components.values()}),
                         "precision": [p for p in PRECISIONS if p in ("faithful", opts.precision)],
                         "tools": _tools()},
            "source": {"checkpoint": str(ckpt.root), "synthetic": ckpt.synthetic,
                       "files": _source_files(ckpt, hashes)},
            "graph_variants": graph_use,
            "model": _model_section(ckpt),
            **static,
            "components": components,
        }
        manifest["kernels"] = kernels_section(opts.precision)
        manifest["first_block_cache"] = cache_ops
        if engines:
            manifest["engines"] = engines
        validate_manifest(manifest)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        check_interrupted()     # a Ctrl-C swallowed by a destructor must not let the export commit
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _tokenizer_files(tmp: Path, folder: str) -> list[dict]:
    """sha256 entries of every file copied into the tokenizer folder (the runtime checks them before use)."""
    root = tmp / folder
    return [{"file": f.relative_to(tmp).as_posix(), "sha256": sha256_file(f), "bytes": f.stat().st_size}
            for f in sorted(root.rglob("*")) if f.is_file()]


def _write_dequantize(folder: Path) -> dict:
    """The load-time dequantization graph (graphs/dequantize.py), shared by every component."""
    from .graphs.dequantize import dequantize_model
    path = folder / "dequantize.onnx"
    onnx.save(dequantize_model(), str(path))
    return _file_entry(path)


def _fp8_weight_table(model: onnx.ModelProto) -> list[dict]:
    """Where each FP8 weight and its scale lie in `<c>.onnx.data`, so the runtime can dequantize them at load
    without parsing ONNX: one entry per bf16 input of the `*_dql` graphs, in their input order."""
    inits = {i.name: i for i in model.graph.initializer}

    def where(name: str) -> dict:
        t = inits[name]
        ext = {e.key: e.value for e in t.external_data}
        if t.data_location != onnx.TensorProto.EXTERNAL or "offset" not in ext:
            raise ValueError(f"initializer {name!r} is not in the external data file")
        return {"offset": int(ext["offset"]), "bytes": int(ext["length"]), "shape": list(t.dims),
                "dtype": onnx.TensorProto.DataType.Name(t.data_type).lower()}
    return [{"input": q, "axis": axis, "weight": where(q), "scale": where(s)} for q, s, axis in fp8_weights(model)]


def _write_guided_step(folder: Path, graph_use: dict[str, str]) -> dict:
    """The Euler/CFG update graph (fp32, no weights): one file serves every backend."""
    from .graphs.step import build_guided_step
    path = folder / "guided_step.onnx"
    build_guided_step().save(path)
    entry = _file_entry(path)
    f32 = lambda n, m, shape=("batch", "image_tokens", 128): _io(n, "float32", list(shape), m)  # noqa: E731
    return {"graphs": {v: entry for v in graph_use},
            "inputs": [f32("latents", "z"), f32("velocity_cond", "dit_cond output"),
                       f32("velocity_uncond", "dit_uncond output"),
                       f32("guidance", "g = guidance[i]", [1]), f32("one_minus_guidance", "1 - g (formed in float64)", [1]),
                       f32("dt", "tau_next - tau (float32)", [1])],
            "outputs": [f32("next_latents", "z + (g*v_c + (1-g)*v_u)*dt")],
            "call": "every step after both DiTs (optional: the same update on the host gives identical numbers)",
            "cache_key": exporter_fingerprint(), "weights": "none", "initializer_bytes": 0, "checkpoint_bytes": 0}


def _carry_engines(old: dict | None, out: Path, tmp: Path) -> dict | None:
    """Keep the previous export's TensorRT engines and layer reports (hard links) and its manifest `engines`
    section: `python -m ideogram4_engine.export.engines` then reuses or rebuilds each by its own build key."""
    section = (old or {}).get("engines")
    if not section:
        return None
    for pattern in ("*.engine", "*.layers.json"):
        for f in out.glob(pattern):
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copy2(f, tmp / f.name)
    return section


def _weights_summary(modes: set[str]) -> str:
    for mode in ("fp8-quantized-at-export", "kept-dtype"):
        if mode in modes:
            return mode
    return "checkpoint"


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _known_hashes(old: dict | None) -> dict[str, str]:
    """Checkpoint file hashes recorded by the previous export, keyed by (path, size, mtime): re-exporting an
    unchanged 27 GB checkpoint then costs a stat per file instead of reading it all."""
    return {f["stat"]: f["sha256"] for f in ((old or {}).get("source", {}).get("files") or [])}


def _hash(path: Path, known: dict[str, str]) -> str:
    return known.get(_stat_key(path)) or sha256_file(path)


def _source_files(ckpt: Checkpoint, hashes: dict[str, dict[str, str]]) -> list[dict]:
    return [{"component": comp, "file": name, "sha256": h,
             "stat": _stat_key(ckpt.components[comp].files.folder / name)}
            for comp, files in hashes.items() for name, h in files.items()]


def _read_old_manifest(out: Path) -> dict | None:
    try:
        return json.loads((out / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _reuse(old: dict | None, out: Path, tmp: Path, name: str, key: str) -> dict | None:
    """Hard-link (or copy) an unchanged component's files from the previous export, if they are intact."""
    entry = (old or {}).get("components", {}).get(name)
    if not entry or entry.get("cache_key") != key:
        return None
    pieces = [e for p in (entry.get("first_block_cache") or {}).values() for e in p["graphs"].values()]
    files = list({f["file"]: f for f in [*entry["graphs"].values(), entry["data"], *pieces]}.values())
    if any(not (out / f["file"]).is_file() or (out / f["file"]).stat().st_size != f["bytes"] for f in files):
        return None
    for f in files:
        try:
            os.link(out / f["file"], tmp / f["file"])
        except OSError:
            shutil.copy2(out / f["file"], tmp / f["file"])
    return entry
