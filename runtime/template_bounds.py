"""Bounds on rendering a chat template read from an engines folder: wall time, size, and no other files.

The template is data from the folder, so it is treated as untrusted code on top of Jinja's sandbox:
* no `{% include %}`, `{% import %}`, `{% from %}` or `{% extends %}` (refused when the template is compiled:
  a chat template has no loader, and must not read other files);
* a deadline: a trace function on the rendering thread (only while it renders) checks the clock at every line
  of the compiled template, so loops without calls (`range` nested three deep) stop too;
* a size cap on the output and on every value the template builds: binary operators (`*`, `+`, `**`, `%`),
  calls (macros, methods, `range`) and filters are checked before they allocate where the result size is
  predictable from the operands (repetition, joins, replacements, widths), and after otherwise; namespace
  attributes are checked on assignment.
A bound is enforced at the granularity of one operation: a single operation may allocate up to about the cap.
Exceeding a bound raises TemplateBoundsError (not a Jinja TemplateError: it is the template's fault, not the
prompt's).
"""
from __future__ import annotations

import functools
import math
import re
import sys
import threading
import time
from typing import Any, Callable

import jinja2
import jinja2.nodes
import jinja2.runtime
from jinja2.sandbox import ImmutableSandboxedEnvironment

RENDER_TIMEOUT_S = 2.0          # chat templates render in well under a millisecond
DEFAULT_MAX_CHARS = 1 << 24     # when the tokenizer gives no provable characters-per-token bound
MAX_POWER_BITS = 1 << 16        # `a ** b` on integers: at most this many bits
_FORBIDDEN_TAGS = {jinja2.nodes.Include: "include", jinja2.nodes.Import: "import",
                   jinja2.nodes.FromImport: "from … import", jinja2.nodes.Extends: "extends"}
_BIG_WIDTH = re.compile(r"\d{8,}")     # a width or precision of 10^7 or more inside a format string


class TemplateBoundsError(Exception):
    """Rendering exceeded its time or size bound, or the template uses a tag that reads other files."""


def forbidden_tags(env: jinja2.Environment, source: str) -> list[str]:
    """The file-reading tags a template uses (parsed, not rendered)."""
    ast = env.parse(source)
    return sorted({name for cls, name in _FORBIDDEN_TAGS.items() for _ in ast.find_all(cls)})


def _size(v) -> int:
    return len(v) if isinstance(v, (str, bytes, list, tuple, dict)) else 0


def _length(v) -> int:
    try:
        return len(v)
    except TypeError:
        return 0


def _listed(v):
    """An iterator as a list (bounded: its items come from bounded operations), a sized value as it is."""
    return v if hasattr(v, "__len__") or not hasattr(v, "__iter__") else list(v)


def _first_value(args) -> int:
    """Index of a filter's value among its arguments (after Jinja's context / environment, if passed)."""
    for i, a in enumerate(args):
        if not isinstance(a, (jinja2.runtime.Context, jinja2.Environment, jinja2.nodes.EvalContext)):
            return i
    return -1


_active = threading.local()      # the environment rendering on this thread (for namespace assignments)


def check_value(what: str, value) -> None:
    """Size check for values stored outside the sandbox's hooks (namespace attributes)."""
    env = getattr(_active, "env", None)
    if env is not None:
        env.over(what, _size(value))


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with the size checks above; `render_bounded` adds the deadline."""

    intercepted_binops = frozenset({"*", "+", "**", "%"})
    max_chars = DEFAULT_MAX_CHARS

    def seal(self) -> "BoundedSandbox":
        """Wrap every filter (call once the filters are final) in the size checks."""
        self.filters = {name: self._bounded(f, name) for name, f in self.filters.items()}
        return self

    # --------------------------------------------------------------------------- checks
    def over(self, what: str, n: float) -> None:
        if n > self.max_chars:
            raise TemplateBoundsError(f"{what} would hold {n:.3g} items, more than the {self.max_chars} allowed "
                                      "(the template's size bound)")

    def _check_args(self, what: str, args, kwargs) -> None:
        for a in [*args, *kwargs.values()]:
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > self.max_chars:
                raise TemplateBoundsError(f"{what} got the integer {a}, more than the {self.max_chars} allowed "
                                          "(sizes and widths are bounded)")
            self.over(f"an argument of {what}", _size(a))

    def _predict(self, what: str, obj, args, kwargs) -> None:
        """Sizes of results that a check afterwards would be too late for (one step multiplies)."""
        arg = lambda i, key: args[i] if len(args) > i else kwargs.get(key)  # noqa: E731
        if what in ("replace", "str.replace") and isinstance(obj, str):
            self.over(what, len(obj) * max(1, _size(arg(1, "new"))) + len(obj))
        elif what == "str.join" and isinstance(obj, str):
            self.over(what, len(obj) * _length(arg(0, "iterable")))
        elif what == "join":
            self.over(what, _size(arg(0, "d")) * _length(obj))
        elif what == "indent" and isinstance(obj, str):
            self.over(what, (obj.count("\n") + 1) * _size(arg(0, "width")) + len(obj))
        elif what == "format" and isinstance(obj, str) and _BIG_WIDTH.search(obj):
            raise TemplateBoundsError("a format filter with a width of 10^7 or more (the template's size bound)")
        elif what == "wordwrap" and isinstance(obj, str):
            self.over(what, (len(obj) + 1) * max(1, _size(arg(2, "wrapstring"))))

    def _bounded(self, f: Callable, name: str) -> Callable:
        @functools.wraps(f)         # keeps Jinja's pass_context / pass_environment marker
        def bounded(*args, **kwargs):
            if name == "join":      # an iterator's length is known only once it is a list
                args = tuple(_listed(a) if i == _first_value(args) else a for i, a in enumerate(args))
            values = [a for a in args if not isinstance(a, (jinja2.runtime.Context, jinja2.Environment,
                                                            jinja2.nodes.EvalContext))]
            self._check_args(f"filter {name}", values, kwargs)
            if values:
                self._predict(name, values[0], values[1:], kwargs)
            result = f(*args, **kwargs)
            self.over(f"the result of filter {name}", _size(result))
            return result
        return bounded

    # --------------------------------------------------------------------------- sandbox hooks
    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if _size(seq) and isinstance(n, int):
                    self.over(f"{type(seq).__name__} * {n}", _size(seq) * n)
        elif operator == "+":
            self.over("a concatenation", _size(left) + _size(right))
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            if right * math.log2(abs(left)) > MAX_POWER_BITS:
                raise TemplateBoundsError(f"{left} ** {right} has more than {MAX_POWER_BITS} bits (the template's "
                                          "size bound)")
        elif operator == "%" and isinstance(left, str) and _BIG_WIDTH.search(left):
            raise TemplateBoundsError("a %-format with a width of 10^7 or more (the template's size bound)")
        result = super().call_binop(context, operator, left, right)
        self.over(f"the result of {operator!r}", _size(result))
        return result

    def call(__self, __context, __obj, *args, **kwargs):     # noqa: N805 -- Jinja's own signature
        name = getattr(__obj, "__name__", type(__obj).__name__)
        owner = getattr(__obj, "__self__", None)
        what = f"str.{name}" if isinstance(owner, str) else name
        if what == "str.join" and args:
            args = (_listed(args[0]), *args[1:])
        __self._check_args(what, args, kwargs)
        __self._predict(what, owner, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        __self.over(f"the result of {what}", _size(result))
        return result

    def wrap_str_format(self, value):
        owner = getattr(value, "__self__", None)
        if isinstance(owner, str) and getattr(value, "__name__", "") in ("format", "format_map") \
                and _BIG_WIDTH.search(owner):
            raise TemplateBoundsError("a str.format with a width of 10^7 or more (the template's size bound)")
        return super().wrap_str_format(value)


def render_bounded(env: BoundedSandbox, template: jinja2.Template, timeout_s: float = RENDER_TIMEOUT_S,
                   **variables) -> str:
    """Render under the deadline and the output cap of `env`."""
    deadline = time.monotonic() + timeout_s

    def trace(frame, event, arg):
        if time.monotonic() > deadline:
            raise TemplateBoundsError(f"rendering took longer than {timeout_s:g} s (the template's time bound)")
        return trace

    previous = sys.gettrace()
    parts, total = [], 0
    _active.env = env
    sys.settrace(trace)
    try:
        for chunk in template.generate(**variables):
            total += len(chunk)
            env.over("the rendered text", total)
            parts.append(chunk)
    finally:
        sys.settrace(previous)
        _active.env = None
    return "".join(parts)
