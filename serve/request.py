"""One generation request as the server sees it: parsed from HTTP JSON or gRPC, checked before it is queued.

Two layers of checks, both before anything is queued:
* the server's own fields (JSON shape and types, `n`, `size`, `response_format`, `output_format`, `timeout_s`),
  each refusal a one-line message naming the field, the bad value and what is allowed;
* the model's arguments (size, sampler preset/steps/guidance, prompt, seed) through the runtime's own checks
  (`runtime.request.check_arguments`, the tokenizer's prompt check and encoding), so the message is the runtime's.

No field names a file: a request cannot make the server read or write anything.
Pure Python (no ray), so the checks are tested without a server.
"""
from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass
from pathlib import Path

from ..runtime.manifest import Manifest, load_manifest
from ..runtime.request import Sampling, check_arguments
from ..runtime.tokenizer import PromptTokenizer

MODEL_ID = "ideogram-4-fp8"
OUTPUT_FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# HTTP JSON fields: OpenAI's images API (prompt, n, size, response_format, model, user) + the native ones
OPENAI_FIELDS = ("prompt", "n", "size", "response_format", "model", "user")
NATIVE_FIELDS = ("seed", "preset", "steps", "guidance", "mu", "std", "output_format", "timeout_s")
MAX_BODY_BYTES = 1 << 20


class InvalidRequest(ValueError):
    """A request refused before it is queued (HTTP 400, gRPC INVALID_ARGUMENT); the message is one line."""


@dataclass(frozen=True)
class Limits:
    """The server's request policy (its command-line flags)."""
    default_width: int = 1024
    default_height: int = 1024
    max_n: int = 4
    timeout_s: float = 600.0           # default and maximum per-request deadline, queue included


@dataclass(frozen=True)
class Request:
    prompt: str
    n: int
    width: int
    height: int
    seed: int
    preset: str | None = None
    steps: int | None = None
    guidance: float | tuple[float, ...] | None = None
    mu: float | None = None
    std: float | None = None
    output_format: str = "png"
    timeout_s: float = 600.0

    def generate_kwargs(self) -> dict:
        """Keyword arguments of `Pipeline.generate` (prompts excluded)."""
        return {"width": self.width, "height": self.height, "preset": self.preset, "steps": self.steps,
                "mu": self.mu, "std": self.std, "guidance": self.guidance, "seed": self.seed}


@dataclass
class Checked:
    """A request that passed every check, with what the checks resolved."""
    request: Request
    sampling: Sampling
    text_tokens: int


# ------------------------------------------------------------------------------------------- field types

def _describe(v) -> str:
    s = json.dumps(v) if isinstance(v, (str, int, float, bool, type(None), list)) else repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidRequest(f"{name}={_describe(v)} must be an integer")
    return v


def _number(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise InvalidRequest(f"{name}={_describe(v)} must be a finite number")
    return float(v)


def _str(name: str, v) -> str:
    if not isinstance(v, str):
        raise InvalidRequest(f"{name}={_describe(v)} must be a string")
    return v


def parse_size(v) -> tuple[int, int]:
    """OpenAI's "WIDTHxHEIGHT" → (width, height)."""
    text = _str("size", v)
    w, sep, h = text.partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        raise InvalidRequest(f"size={_describe(v)} must be WIDTHxHEIGHT in pixels, e.g. \"1024x1024\"")
    return int(w), int(h)


# ------------------------------------------------------------------------------------------- parsing

def build(fields: dict, limits: Limits) -> Request:
    """Native fields (already decoded from JSON or protobuf) → Request, with the server's defaults. The
    model's own checks come later (`Validator.check`)."""
    if "prompt" not in fields:
        raise InvalidRequest("prompt is missing; allowed: a non-empty string (text or a JSON caption)")
    n = _int("n", fields.get("n", 1))
    if not 1 <= n <= limits.max_n:
        raise InvalidRequest(f"n={n} outside 1…{limits.max_n} (the server's --max-n)")
    width = _int("width", fields.get("width", limits.default_width))
    height = _int("height", fields.get("height", limits.default_height))
    seed = fields.get("seed")
    seed = secrets.randbits(64) if seed is None else _int("seed", seed)
    preset = fields.get("preset")
    preset = None if preset in (None, "") else _str("preset", preset)
    steps = fields.get("steps")
    steps = None if steps is None else _int("steps", steps)
    guidance = fields.get("guidance")
    if isinstance(guidance, (list, tuple)):
        guidance = tuple(_number(f"guidance[{i}]", g) for i, g in enumerate(guidance)) or None
        if guidance is not None and len(guidance) == 1:
            guidance = guidance[0]
    elif guidance is not None:
        guidance = _number("guidance", guidance)
    mu = None if fields.get("mu") is None else _number("mu", fields["mu"])
    std = None if fields.get("std") is None else _number("std", fields["std"])
    fmt = fields.get("output_format") or "png"
    if fmt not in OUTPUT_FORMATS:
        raise InvalidRequest(f"output_format={_describe(fmt)} is not supported; allowed: {', '.join(OUTPUT_FORMATS)}")
    timeout = fields.get("timeout_s")
    timeout = limits.timeout_s if timeout is None else _number("timeout_s", timeout)
    if not 0 < timeout <= limits.timeout_s:
        raise InvalidRequest(f"timeout_s={timeout:g} outside (0, {limits.timeout_s:g}] seconds (the server's "
                             f"--request-timeout)")
    return Request(fields["prompt"], n, width, height, seed, preset, steps, guidance, mu, std, fmt, timeout)


def _reject_constant(name: str):
    raise InvalidRequest(f"the JSON body contains {name}; allowed: finite numbers only")


def from_json(body: bytes, limits: Limits) -> Request:
    """POST /v1/images/generations body → Request."""
    if len(body) > MAX_BODY_BYTES:
        raise InvalidRequest(f"the request body is {len(body)} bytes; allowed: at most {MAX_BODY_BYTES}")
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidRequest(f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"the request body must be a JSON object, got {type(data).__name__}")
    unknown = [k for k in data if k not in OPENAI_FIELDS + NATIVE_FIELDS]
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0]!r}; allowed: {', '.join(OPENAI_FIELDS + NATIVE_FIELDS)}")
    model = data.pop("model", None)
    if model is not None and model != MODEL_ID:
        raise InvalidRequest(f"model={_describe(model)} is not served here; allowed: {MODEL_ID}")
    fmt = data.pop("response_format", None)
    if fmt is not None and fmt != "b64_json":
        raise InvalidRequest(f"response_format={_describe(fmt)} is not supported (images are returned inline, "
                             "never stored); allowed: b64_json")
    data.pop("user", None)                                     # OpenAI's end-user tag: accepted, not used
    if "size" in data:
        data["width"], data["height"] = parse_size(data.pop("size"))
    return build(data, limits)


def from_proto(msg, limits: Limits) -> Request:
    """ideogram4.v1.GenerateRequest → Request (absent optional fields take the server's defaults)."""
    fields = {"prompt": msg.prompt, "preset": msg.preset, "output_format": msg.output_format}
    for name in ("n", "width", "height", "seed", "steps", "mu", "std", "timeout_s"):
        if msg.HasField(name):
            fields[name] = getattr(msg, name)
    if len(msg.guidance):
        fields["guidance"] = list(msg.guidance)
    return build(fields, limits)


# ------------------------------------------------------------------------------------------- model checks

class Validator:
    """The runtime's argument checks without a loaded backend: the manifest (presets, limits) and the
    tokenizer (prompt policy and length) are all they need."""

    def __init__(self, engines: Path | str):
        self.manifest: Manifest = load_manifest(engines)
        self.tokenizer = PromptTokenizer.from_folder(self.manifest.tokenizer_folder,
                                                     max_tokens=self.manifest.limits["max_text_tokens"])

    def check(self, req: Request) -> Checked:
        """InvalidRequest with the runtime's own message, in the order Pipeline.generate checks."""
        try:     # the runtime's own checks (runtime/request.py), in Pipeline.generate's order
            args = check_arguments(self.manifest, req.prompt, **req.generate_kwargs())
            ids = self.tokenizer.encode(self.tokenizer.check_prompt(req.prompt))
        except InvalidRequest:
            raise
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        return Checked(req, args.sampling, len(ids))
