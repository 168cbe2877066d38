"""Chat templates from an engines folder are bounded (runtime/template_bounds.py): no include/import, a render
deadline, a size cap on every value and on the output; and the ordinary template features still work."""
from __future__ import annotations

import sys
import threading
import time

import pytest

from ideogram4_engine.runtime.tokenizer import ChatTemplateError, PromptError, PromptTokenizer

TIMEOUT = 0.3


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    return PromptTokenizer.from_folder(tiny_checkpoint / "tokenizer")


def make(tok, template, timeout=TIMEOUT):
    return PromptTokenizer(tok.tokenizer, template, tok.special_tokens, tok.max_tokens, "test template",
                           render_timeout_s=timeout)


TEXT = "{{ messages[0].content[0].text }}"


@pytest.mark.parametrize("template,msg", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}" + TEXT,
     "rendering took longer than 0.3 s"),
    ("{% for c in 'x' * 100000 %}{% for d in 'y' * 100000 %}{% endfor %}{% endfor %}" + TEXT,
     "rendering took longer than 0.3 s"),
    ("{{ 'x' * 50000000 }}", "str * 50000000 would hold 5e+07 items"),
    ("{{ 50000000 * 'x' }}", "str * 50000000 would hold 5e+07 items"),
    ("{{ ['a'] * 50000000 }}", "list * 50000000 would hold 5e+07 items"),
    ("{{ 2 ** 100000000 }}", "2 ** 100000000 has more than 65536 bits"),
    ("{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     "namespace attribute 's' would hold"),
    ("{% macro f(s, n) %}{% if n %}{{ f(s ~ s, n - 1) }}{% else %}{{ s }}{% endif %}{% endmacro %}{{ f('x', 60) }}",
     "an argument of Macro would hold"),
    ("{{ 'x'.ljust(1000000000) }}", "str.ljust got the integer 1000000000"),
    ("{{ 'x'|center(1000000000) }}", "filter center got the integer 1000000000"),
    ("{{ '{:>1000000000}'.format('a') }}", "a str.format with a width of 10^7 or more"),
    ("{{ '%1000000000d' % 1 }}", "a %-format with a width of 10^7 or more"),
    ("{{ ('x' * 1000000)|replace('x', 'yyyyyyyyyy') }}", "replace would hold 1.1e+07 items"),
    ("{{ ('y' * 4000000).join(range(2000)|map('string')) }}", "str.join would hold 8e+09 items"),
    ("{{ range(5000)|map('string')|join('z' * 1000) }}", "join would hold 5e+06 items"),
    ("{% include 'other.jinja' %}", "uses {% include %}"),
    ("{% import 'macros.jinja' as m %}", "uses {% import %}"),
    ("{% from 'macros.jinja' import m %}", "uses {% from … import %}"),
    ("{% extends 'base.jinja' %}", "uses {% extends %}"),
    ("", "rendered nothing"),
    ("  {# a comment #}\n ", "rendered only whitespace"),
    ("{{ 'hello' }}", "dropped or rewrote the prompt"),
    ("{{ messages[0].content[0].text | upper }}", "dropped or rewrote the prompt"),
    ("{{ 1 / 0 }}", "failed while rendering: ZeroDivisionError"),
    ("{{ nothing.here }}", "failed while rendering: 'nothing' is undefined"),
    ("{% macro r() %}{{ r() }}{% endmacro %}{{ r() }}", "recursion too deep"),
    ("{% set ns = namespace() %}{% set ns._secret = 1 %}" + TEXT, "broke the sandbox's rules"),
])
def test_bounded_and_faulty_templates_are_chat_template_errors(tok, template, msg):
    t0 = time.monotonic()
    with pytest.raises(ChatTemplateError, match=None) as e:
        make(tok, template).encode("a fox")
    assert msg in str(e.value) and "test template" in str(e.value)
    assert time.monotonic() - t0 < TIMEOUT + 5        # the bound stops it (generous for a loaded machine)


def test_raise_exception_refuses_the_prompt(tok):
    with pytest.raises(PromptError, match="the chat template refused the prompt: no tools"):
        make(tok, "{{ raise_exception('no tools') }}").encode("a fox")


@pytest.mark.parametrize("template", [
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% for p in m.content %}{{ p.text }}{% endfor %}<|im_end|>\n"
    "{% endfor %}<|im_start|>assistant\n",
    "{{ ['<|im_start|>user', messages[0].content[0].text]|join('\n') }}{{ ' ' * 3 }}{{ 'ab'|replace('b', 'c') }}",
    "{% set ns = namespace(t='') %}{% for p in messages[0].content %}{% set ns.t = ns.t ~ p.text %}{% endfor %}"
    "{{ ns.t|indent(2) }}{{ '%s' % 'x' }}{{ '{}'.format('y') }}{{ 2 ** 10 }}{{ range(3)|list|length }}",
])
def test_ordinary_templates_still_render(tok, template):
    text = make(tok, template).render("a fox in snow")
    assert "a fox in snow" in text


def test_the_tracer_is_restored_and_threads_are_independent(tok):
    """The deadline's trace function is set only while rendering and only on the rendering thread."""
    def outer(frame, event, arg):
        return None
    sys.settrace(outer)
    try:
        make(tok, TEXT).render("a fox")
        assert sys.gettrace() is outer
    finally:
        sys.settrace(None)
    results = []
    slow = make(tok, "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}" + TEXT)
    fast = make(tok, TEXT)

    def render(t):
        try:
            results.append(t.render("a fox"))
        except ChatTemplateError as e:
            results.append(e)
    threads = [threading.Thread(target=render, args=(t,)) for t in (slow, fast)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(isinstance(r, ChatTemplateError) for r in results) == 1 and "a fox" in results[[isinstance(r, str)
                                                                                              for r in results].index(True)]
