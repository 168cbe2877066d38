"""Prompt → token ids without transformers (spec §3.2, trap 25).

The engines folder ships the checkpoint's `tokenizer/` folder verbatim: `tokenizer.json` (a `tokenizers`
pipeline) and `tokenizer_config.json` whose `chat_template` is a Jinja template. Encoding a prompt is:

1. one user message whose content is `[{"type": "text", "text": prompt}]`;
2. the chat template rendered with `add_generation_prompt=True` -- in the same sandboxed Jinja environment
   transformers uses for chat templates (trim_blocks, lstrip_blocks, loop controls, its `tojson`,
   `raise_exception`, `strftime_now`, `namespace`, `dict`) and the same variables (`messages`, `tools=None`,
   `documents=None`, `add_generation_prompt`, the special tokens of tokenizer_config.json);
3. `tokenizer.encode(text, add_special_tokens=False).ids`, with any truncation or padding stored in
   tokenizer.json switched off (transformers does not apply them unless asked).

Prompt policy (all `PromptError`, a `ValueError`, raised before any model work): the prompt must be a `str`,
must not be empty or whitespace-only (refused, never rewritten: the official code would tokenise an empty
prompt and SGLang replaces it by a space), must be valid Unicode (no lone surrogates), and must be at most
`max_tokens` ids after templating (2048 by default, template tokens included; never truncated). Plain text
and JSON captions pass through unchanged -- including text that spells special tokens such as `<|im_end|>`,
which, as in the official code, is tokenised as that special token.

The chat template is data from the engines folder: `from_manifest` checks the sha256 of every tokenizer file
against the manifest on the bytes it then parses, and rendering is bounded (template_bounds.py: no include or
import, a deadline, a size cap). A template that fails, renders nothing, drops the prompt or exceeds a bound is
a ChatTemplateError (the folder's fault, not the prompt's); `raise_exception` in a template refuses the prompt
(PromptError).
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import hashlib

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from tokenizers import Tokenizer, models, normalizers

from .packing import MAX_TEXT_TOKENS
from .template_bounds import (DEFAULT_MAX_CHARS, RENDER_TIMEOUT_S, BoundedSandbox, TemplateBoundsError, check_value,
                              forbidden_tags, render_bounded)

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"   # transformers >= 4.43 may save the template here; it then wins
# Special-token variables transformers passes to every chat template (its `special_tokens_map`).
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
NFC_SHRINK = 8     # NFC composes at most ~4 code points into one; 8 leaves a margin


class PromptError(ValueError):
    """A prompt the model cannot take (wrong type, empty, invalid Unicode, too long)."""


class TokenizerFilesError(ValueError):
    """The tokenizer folder is missing a file or a file is unreadable/corrupt/tampered; the message names it."""


class ChatTemplateError(TokenizerFilesError):
    """The chat template fails, renders nothing, drops the prompt, reads other files or exceeds its bounds."""


def chat_messages(prompt: str) -> list[dict]:
    """The one-message chat of §3.2: the prompt unchanged, as the single text part of a user turn."""
    return [{"role": "user", "content": [{"type": "text", "text": prompt}]}]


# ------------------------------------------------------------------------------ Jinja environment

class _TemplateRefusal(jinja2.exceptions.TemplateError):
    """`raise_exception(...)` in a template: it refuses this prompt (any other template error is a template bug)."""


def _raise_exception(message):
    raise _TemplateRefusal(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' override: no HTML escaping, non-ASCII kept, and a few json.dumps options exposed
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` for templates without exposing the real type."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore-prefixed attributes (no route to CPython internals)."""

    def __init__(*args, **kwargs):                      # noqa: N805 -- Jinja's own signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        check_value(f"namespace attribute {name!r}", value)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}…{% endgeneration %}` (assistant-mask markup some templates carry): rendered as its
    body, as transformers does when no assistant mask is requested."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller):
        return caller()


def chat_template_environment(max_chars: int = DEFAULT_MAX_CHARS) -> BoundedSandbox:
    """The environment transformers compiles chat templates in (utils/chat_template_utils.py), with the size
    bounds of template_bounds.py (`max_chars` per value and for the output)."""
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_TemplateNamespace)
    env.max_chars = max_chars
    return env.seal()


# ------------------------------------------------------------------------------ files

class _FolderReader:
    """Reads each tokenizer file once, as bytes; with `checksums` (file name -> manifest entry {sha256, bytes}) a
    file is checked on exactly the bytes that are then parsed, and a file the manifest does not cover is refused
    instead of read (a chat_template.jinja dropped in after export would otherwise win over the config's)."""

    def __init__(self, folder: Path, checksums: dict[str, dict] | None = None):
        self.folder, self.checksums = folder, checksums

    def exists(self, name: str) -> bool:
        return (self.folder / name).is_file() or (self.checksums is not None and name in self.checksums)

    def read(self, name: str, what: str = "tokenizer file") -> bytes:
        path = self.folder / name
        if not path.is_file():
            raise TokenizerFilesError(f"{what} {path} is missing")
        if self.checksums is not None and name not in self.checksums:
            raise TokenizerFilesError(f"{what} {path} is not covered by the manifest's sha256 (added after the "
                                      "export?): remove it or re-run `make export`")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise TokenizerFilesError(f"{what} {path} is unreadable: {e}") from None
        if self.checksums is not None:
            entry = self.checksums[name]
            actual = hashlib.sha256(data).hexdigest()
            if actual != entry["sha256"]:
                raise TokenizerFilesError(f"{path}: sha256 mismatch: expected {entry['sha256']} ({entry['bytes']} "
                                          f"bytes), actual {actual} ({len(data)} bytes); the file was modified after "
                                          "export (re-copy or re-run `make export`)")
        return data

    def json(self, name: str) -> dict:
        data = self.read(name)
        path = self.folder / name
        try:
            data = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TokenizerFilesError(f"tokenizer file {path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise TokenizerFilesError(f"tokenizer file {path} must hold a JSON object, got {type(data).__name__}")
        return data


def _template_from(config: dict, config_path: Path, reader: _FolderReader) -> tuple[str, Path]:
    jinja_file = reader.folder / TEMPLATE_FILE
    if reader.exists(TEMPLATE_FILE):
        try:
            return reader.read(TEMPLATE_FILE, "chat template file").decode("utf-8"), jinja_file
        except UnicodeDecodeError as e:
            raise TokenizerFilesError(f"chat template file {jinja_file} is unreadable: {e}") from None
    template = config.get("chat_template")
    if isinstance(template, list):           # named templates: [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str) or not template:
        raise TokenizerFilesError(f"tokenizer file {config_path} has no `chat_template` string "
                                  f"(and there is no {TEMPLATE_FILE} beside it)")
    return template, config_path


def _special_tokens(config: dict) -> dict[str, str]:
    out = {}
    for key in SPECIAL_TOKEN_KEYS:
        value = config.get(key)
        if isinstance(value, dict):          # serialised AddedToken
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


def _chars_per_token(tokenizer: Tokenizer) -> int | None:
    """An upper bound on the prompt characters one id can stand for, where one is provable: a BPE without
    fused unknowns (byte-level or not) behind no normaliser or NFC. A token string of the vocabulary covers at
    most len(token) characters (byte-level: len = bytes >= characters). None: no bound, no early refusal."""
    model, norm = tokenizer.model, tokenizer.normalizer
    if not isinstance(model, models.BPE) or (model.unk_token is not None and model.fuse_unk):
        return None
    if norm is not None and not isinstance(norm, normalizers.NFC):
        return None
    return max(1, max(len(t) for t in tokenizer.get_vocab(with_added_tokens=True))) * NFC_SHRINK


# ------------------------------------------------------------------------------ tokenizer

def check_prompt_text(prompt: Any, max_tokens: int = MAX_TEXT_TOKENS) -> str:
    """The prompt checks that need no tokenizer: a str, not empty or whitespace-only, valid Unicode."""
    if not isinstance(prompt, str):
        raise PromptError(f"prompt must be a str, got {type(prompt).__name__}; allowed: a non-empty string "
                          f"of at most {max_tokens} tokens including the chat template")
    if not prompt.strip():
        raise PromptError(f"prompt is empty{' (whitespace only)' if prompt else ''}; allowed: a non-empty "
                          f"string of at most {max_tokens} tokens including the chat template "
                          "(prompts are never rewritten)")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PromptError(f"prompt is not valid Unicode (lone surrogate {prompt[e.start]!r} at index "
                          f"{e.start}); allowed: a string of Unicode characters") from None
    return prompt


class PromptTokenizer:
    def __init__(self, tokenizer: Tokenizer, chat_template: str, special_tokens: dict[str, str] | None = None,
                 max_tokens: int = MAX_TEXT_TOKENS, template_source: str = "chat_template",
                 render_timeout_s: float = RENDER_TIMEOUT_S):
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        tokenizer.no_truncation()      # trap 25: overflow raises, it is never truncated away
        tokenizer.no_padding()
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        self.max_tokens = max_tokens
        self.template_source = template_source
        self.render_timeout_s = render_timeout_s
        self._chars_per_token = _chars_per_token(tokenizer)
        # text longer than max_tokens * chars_per_token cannot fit; twice that (plus the markup) bounds what a
        # template may build from an admissible prompt
        cap = 2 * max_tokens * self._chars_per_token + 65536 if self._chars_per_token else DEFAULT_MAX_CHARS
        self._env = chat_template_environment(cap)
        try:
            tags = forbidden_tags(self._env, chat_template)
            self._template = self._env.from_string(chat_template)
        except jinja2.exceptions.TemplateError as e:
            raise TokenizerFilesError(f"chat template from {template_source} does not compile: {e}") from None
        if tags:
            raise ChatTemplateError(f"chat template from {template_source} uses {{% {tags[0]} %}}: a chat template "
                                    "cannot read other templates or files; allowed: one self-contained template")

    @classmethod
    def from_folder(cls, folder: Path | str, max_tokens: int = MAX_TEXT_TOKENS,
                    checksums: dict[str, dict] | None = None) -> "PromptTokenizer":
        """Load tokenizer.json, tokenizer_config.json and the chat template (chat_template.jinja wins over the
        config's `chat_template`, as in transformers). checksums: see _FolderReader."""
        folder = Path(folder)
        if not folder.is_dir():
            raise TokenizerFilesError(f"tokenizer folder {folder} does not exist")
        reader = _FolderReader(folder, checksums)
        tok_path = folder / TOKENIZER_FILE
        raw = reader.read(TOKENIZER_FILE)
        try:
            tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:               # tokenizers raises a bare Exception on bad JSON / schema
            raise TokenizerFilesError(f"tokenizer file {tok_path} could not be loaded: {e}") from None
        config_path = folder / CONFIG_FILE
        config = reader.json(CONFIG_FILE)
        template, source = _template_from(config, config_path, reader)
        return cls(tokenizer, template, _special_tokens(config), max_tokens, str(source))

    @classmethod
    def from_manifest(cls, manifest) -> "PromptTokenizer":
        """The engines folder's tokenizer, every file checked against the manifest's sha256 before use."""
        return cls.from_folder(manifest.tokenizer_folder, max_tokens=manifest.limits["max_text_tokens"],
                               checksums=manifest.tokenizer_checksums)

    # -------------------------------------------------------------------------- prompt → text → ids

    def check_prompt(self, prompt: Any) -> str:
        """Type / emptiness / Unicode checks and the provable length bound (everything without tokenisation)."""
        check_prompt_text(prompt, self.max_tokens)
        if self._chars_per_token and len(prompt) > self.max_tokens * self._chars_per_token:
            # provably over the limit: refuse without tokenising megabytes
            raise PromptError(f"prompt has {len(prompt)} characters, more than {self.max_tokens} tokens can hold; "
                              f"allowed: at most {self.max_tokens} tokens, template included")
        return prompt

    def render(self, prompt: str) -> str:
        """The chat-templated text (generation prompt appended), exactly as transformers renders it, within the
        bounds of template_bounds.py."""
        self.check_prompt(prompt)
        where = f"chat template from {self.template_source}"
        try:
            text = render_bounded(self._env, self._template, self.render_timeout_s, messages=chat_messages(prompt),
                                  tools=None, documents=None, add_generation_prompt=True, **self.special_tokens)
        except TemplateBoundsError as e:
            raise ChatTemplateError(f"{where}: {e}") from None
        except jinja2.exceptions.SecurityError as e:
            raise ChatTemplateError(f"{where} broke the sandbox's rules: {e}") from None
        except _TemplateRefusal as e:
            raise PromptError(f"the chat template refused the prompt: {e}") from None
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"{where} failed while rendering: {e}") from None
        except RecursionError:
            raise ChatTemplateError(f"{where}: recursion too deep while rendering") from None
        except Exception as e:               # noqa: BLE001 -- a template bug (TypeError, ZeroDivisionError …)
            raise ChatTemplateError(f"{where} failed while rendering: {type(e).__name__}: {e}") from None
        if not text.strip():
            raise ChatTemplateError(f"{where} rendered {'only whitespace' if text else 'nothing'}; a chat template "
                                    "must wrap the prompt in the model's markup")
        if prompt.strip() not in text:
            raise ChatTemplateError(f"{where} dropped or rewrote the prompt (its output does not contain it); the "
                                    "prompt must reach the model unchanged")
        return text

    def encode(self, prompt: str) -> list[int]:
        """Token ids of the templated prompt; PromptError if it is refused (see module docstring)."""
        ids = self.tokenizer.encode(self.render(prompt), add_special_tokens=False).ids
        if len(ids) > self.max_tokens:
            raise PromptError(f"prompt is {len(ids)} tokens after the chat template; allowed: at most "
                              f"{self.max_tokens} tokens, template included (prompts are never truncated)")
        return ids

    def __call__(self, prompt: str) -> list[int]:
        return self.encode(prompt)
