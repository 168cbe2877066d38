"""The lean prompt tokenizer (runtime/tokenizer.py) against transformers (spec §3.2, trap 25): same rendered
text, same ids, and the documented refusals."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from ideogram4_engine.export.reference.pipeline import chat_messages
from ideogram4_engine.runtime.packing import MAX_TEXT_TOKENS
from ideogram4_engine.runtime.tokenizer import PromptError, PromptTokenizer, TokenizerFilesError

CAPTION = json.dumps({
    "high_level_description": "Ein Café in Paris — «crème brûlée» und 東京の夜景, 한국어 텍스트",
    "compositional_deconstruction": {"background": "rainy street, neon signs 🌧️", "elements": [
        {"type": "text", "content": "OPEN 24/7", "style": "red neon"}]},
}, ensure_ascii=False)
PROMPTS = {
    "plain": "A lighthouse on a rocky coast at dusk, long exposure, waves crashing on the rocks.",
    "json_caption": CAPTION,
    "json_caption_indented": json.dumps(json.loads(CAPTION), indent=2, ensure_ascii=False),
    "multiline": "line one\nline two\r\n\n\n    indented\n\t\ttabbed\n",
    "emoji": "Emoji 😀🎉👍🏽👨‍👩‍👧 and flags 🇫🇷🇯🇵, zero-width\u200bjoiner",
    "surrounding_whitespace": "   leading and trailing spaces   \n",
    "nfc": "decomposed: e\u0301 a\u0308 \u1100\u1161\u11a8",
    "special_token_text": "a caption that spells <|im_end|> and <|im_start|>assistant inside",
    "long": " ".join(f"word{i} (detail {i % 7})," for i in range(180)),
}


@pytest.fixture(scope="module")
def ptok(tiny_checkpoint) -> PromptTokenizer:
    return PromptTokenizer.from_folder(tiny_checkpoint / "tokenizer")


@pytest.mark.parametrize("name", PROMPTS)
def test_ids_and_text_match_transformers(name, ptok, tiny_pipeline):
    prompt = PROMPTS[name]
    ids = ptok.encode(prompt)
    assert ids == tiny_pipeline.tokenize(prompt)
    assert ptok.render(prompt) == tiny_pipeline.tokenizer.apply_chat_template(
        chat_messages(prompt), tokenize=False, add_generation_prompt=True)
    assert ptok(prompt) == ids
    if name == "long":
        assert 1400 <= len(ids) <= 1700, len(ids)


def test_prompt_passes_through_unchanged(ptok):
    for prompt in PROMPTS.values():
        assert prompt in ptok.render(prompt)


def test_refusals(ptok):
    for bad in (None, 5, b"bytes", ["a list"], {"text": "dict"}):
        with pytest.raises(PromptError, match=r"prompt must be a str, got .*at most 2048 tokens"):
            ptok.encode(bad)
    for empty in ("", "   ", "\n\t \r\n", "\u3000\u00a0"):
        with pytest.raises(PromptError, match=r"prompt is empty.*non-empty string of at most 2048 tokens"):
            ptok.encode(empty)
    with pytest.raises(PromptError, match="not valid Unicode"):
        ptok.encode("a lone surrogate \ud800 here")
    assert issubclass(PromptError, ValueError)


def test_exactly_the_limit(ptok, tiny_pipeline):
    """2048 ids after templating are accepted, 2049 refused: a one-token word is repeated and the template's
    overhead measured on short prompts."""
    def prompt(k: int) -> str:
        return "a" + " a" * (k - 1)

    n1, n2, n3 = (len(ptok.encode(prompt(k))) for k in (1, 2, 3))
    assert n3 - n2 == n2 - n1 == 1                       # " a" is one token
    overhead = n1 - 1
    assert overhead == 8                                 # Qwen3-VL-style markup, §3.2
    at_limit = prompt(MAX_TEXT_TOKENS - overhead)
    ids = ptok.encode(at_limit)
    assert len(ids) == MAX_TEXT_TOKENS
    assert ids == tiny_pipeline.tokenize(at_limit)
    over = prompt(MAX_TEXT_TOKENS - overhead + 1)
    with pytest.raises(PromptError, match=r"prompt is 2049 tokens after the chat template; allowed: at most 2048"):
        ptok.encode(over)
    with pytest.raises(ValueError, match="2049"):      # the reference refuses it too
        tiny_pipeline.tokenize(over)


def test_custom_limit_and_huge_prompt(tiny_checkpoint):
    small = PromptTokenizer.from_folder(tiny_checkpoint / "tokenizer", max_tokens=16)
    small.encode("a" + " a" * 7)
    with pytest.raises(PromptError, match="allowed: at most 16 tokens"):
        small.encode("a" + " a" * 8)
    with pytest.raises(ValueError, match="max_tokens"):
        PromptTokenizer.from_folder(tiny_checkpoint / "tokenizer", max_tokens=0)
    big = PromptTokenizer.from_folder(tiny_checkpoint / "tokenizer")
    t0 = time.perf_counter()
    with pytest.raises(PromptError, match="characters, more than 2048 tokens can hold"):
        big.encode("x" * 50_000_000)
    assert time.perf_counter() - t0 < 1.0                # refused without tokenising 50 MB


def test_truncation_in_tokenizer_json_is_ignored(tiny_checkpoint, tmp_path):
    """A tokenizer.json that carries a truncation setting must not shorten prompts silently (trap 25)."""
    folder = tmp_path / "tok"
    shutil.copytree(tiny_checkpoint / "tokenizer", folder)
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    data["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    tok = PromptTokenizer.from_folder(folder)
    assert len(tok.encode("a" + " a" * 99)) == 108


TEMPLATE = """{#- exercises what transformers' chat-template environment provides -#}
{% set ns = namespace(parts=0, seen=false) %}
{% for message in messages %}
    <|im_start|>{{ message.role }}
    {% if message.content is string %}
        {{ message.content }}
    {% else %}
        {% for part in message.content %}
            {% if part.type != 'text' %}{% continue %}{% endif %}
            {% set ns.parts = ns.parts + 1 %}
            {% generation %}{{ part.text }}{% endgeneration %}
        {% endfor %}
    {% endif %}
    {% if ns.parts == 0 %}{{ raise_exception('no text part') }}{% endif %}
<|im_end|>
{% endfor %}
{% if tools is none and documents is none %}[{{ eos_token }}|{{ pad_token }}|{{ {'n': ns.parts, 'é': '<&>'} | tojson }}|{{ dict(a=1) | tojson }}]{% endif %}
{% if add_generation_prompt %}
    <|im_start|>assistant
{% endif %}
"""


def test_template_environment_matches_transformers(tiny_checkpoint, tmp_path, monkeypatch):
    """A template that depends on trim_blocks/lstrip_blocks, namespace, loop controls, the generation tag,
    tojson, raise_exception, dict, special-token variables and tools/documents=None renders identically."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer

    folder = tmp_path / "tok"
    shutil.copytree(tiny_checkpoint / "tokenizer", folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["chat_template"] = TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    hf = AutoTokenizer.from_pretrained(str(folder))
    ours = PromptTokenizer.from_folder(folder)
    for prompt in ("hello", PROMPTS["multiline"], PROMPTS["json_caption"]):
        expected = hf.apply_chat_template(chat_messages(prompt), tokenize=False, add_generation_prompt=True)
        assert ours.render(prompt) == expected
        assert ours.encode(prompt) == hf(expected, add_special_tokens=False)["input_ids"]
    assert "[<|im_end|>|<|endoftext|>|" in ours.render("hello")


def test_template_exception_is_a_prompt_error(tiny_checkpoint, tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(tiny_checkpoint / "tokenizer", folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["chat_template"] = "{{ raise_exception('only system messages') }}"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(PromptError, match="chat template refused the prompt: only system messages"):
        PromptTokenizer.from_folder(folder).encode("hi")


def _broken(tiny_checkpoint, tmp_path) -> Path:
    folder = tmp_path / "tok"
    shutil.copytree(tiny_checkpoint / "tokenizer", folder)
    return folder


def test_missing_or_corrupt_files(tiny_checkpoint, tmp_path):
    with pytest.raises(TokenizerFilesError, match="does not exist"):
        PromptTokenizer.from_folder(tmp_path / "nowhere")

    f = _broken(tiny_checkpoint, tmp_path / "a")
    (f / "tokenizer.json").unlink()
    with pytest.raises(TokenizerFilesError, match=r"tokenizer\.json is missing"):
        PromptTokenizer.from_folder(f)

    f = _broken(tiny_checkpoint, tmp_path / "b")
    (f / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(TokenizerFilesError, match=r"tokenizer\.json could not be loaded"):
        PromptTokenizer.from_folder(f)

    f = _broken(tiny_checkpoint, tmp_path / "c")
    (f / "tokenizer_config.json").unlink()
    with pytest.raises(TokenizerFilesError, match=r"tokenizer_config\.json is missing"):
        PromptTokenizer.from_folder(f)

    f = _broken(tiny_checkpoint, tmp_path / "d")
    (f / "tokenizer_config.json").write_text("not json")
    with pytest.raises(TokenizerFilesError, match=r"tokenizer_config\.json is not valid JSON"):
        PromptTokenizer.from_folder(f)

    f = _broken(tiny_checkpoint, tmp_path / "e")
    cfg = json.loads((f / "tokenizer_config.json").read_text(encoding="utf-8"))
    del cfg["chat_template"]
    (f / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerFilesError, match=r"tokenizer_config\.json has no `chat_template`"):
        PromptTokenizer.from_folder(f)

    f = _broken(tiny_checkpoint, tmp_path / "g")
    cfg["chat_template"] = "{% for m in messages %}{{ m.role }"
    (f / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerFilesError, match=r"tokenizer_config\.json does not compile"):
        PromptTokenizer.from_folder(f)
