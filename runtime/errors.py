"""Exit codes of the commands (`ideogram4`, `python -m ideogram4_engine.export`, the reference CLI) and which
failure maps to which. The table is the one fact the CLI epilog, docs/runtime.md and the tests all read.

Every failure the commands expect ends as one `error:` line on stderr and one of these codes, with nothing
half-written: outputs are written under a temporary name and renamed, and temporaries are removed on the
way out (a SIGKILL leaves one behind; the next export removes those of dead processes).
"""
from __future__ import annotations

import errno

OK, INTERNAL, USAGE, ARTIFACTS, BACKEND, NUMERICS, WRITE, TERMINATED, INTERRUPTED = 0, 1, 2, 3, 4, 5, 6, 143, 130

EXIT_CODES: tuple[tuple[int, str], ...] = (
    (OK, "success"),
    (INTERNAL, "unexpected internal error (a bug: the traceback is printed; please report it)"),
    (USAGE, "bad argument or prompt (argparse's usage errors included); refused before anything is loaded"),
    (ARTIFACTS, "engines folder or checkpoint unusable: missing, incomplete, truncated, tampered (sha256 mismatch, "
                "tokenizer and chat template included) or a chat template that fails, renders nothing or exceeds "
                "its time/size bounds"),
    (BACKEND, "no backend can run here, or out of memory while loading"),
    (NUMERICS, "the sampler state became NaN/Inf (no image is written)"),
    (WRITE, "an output could not be written (disk full, read-only, I/O error); nothing is left behind and a "
            "previous export is untouched"),
    (INTERRUPTED, "interrupted (Ctrl-C / SIGINT); nothing is left behind"),
    (TERMINATED, "terminated (SIGTERM); nothing is left behind"),
)


class OutputWriteError(OSError):
    """Writing an output failed; the message names the file and says nothing was left behind."""


class Terminated(BaseException):
    """SIGTERM, turned into an exception so that cleanup (`finally`, temp folders) runs as for Ctrl-C."""


def describe_os_error(e: OSError, with_file: bool = False) -> str:
    """`[Errno 28] No space left on device: 'x'` as `disk full (No space left on device)` (`: x` with_file)."""
    what = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
            errno.EACCES: "permission denied"}.get(e.errno, "I/O error")
    where = f": {e.filename}" if with_file and e.filename else ""
    return f"{what} ({e.strerror or e}){where}"


def exit_code(e: BaseException) -> int:
    """The documented exit code of a failure; INTERNAL for anything unexpected (a bug)."""
    from .backends.base import BackendUnavailable
    from .cli_args import PromptSourceError
    from .manifest import ManifestError
    from .tokenizer import PromptError, TokenizerFilesError

    for types, code in (((KeyboardInterrupt,), INTERRUPTED), ((Terminated,), TERMINATED),
                        ((OutputWriteError,), WRITE), ((ManifestError, TokenizerFilesError), ARTIFACTS),
                        ((BackendUnavailable, MemoryError), BACKEND), ((FloatingPointError,), NUMERICS),
                        ((PromptError, PromptSourceError, ValueError), USAGE)):
        if isinstance(e, types):
            return code
    return INTERNAL


def message(e: BaseException) -> str:
    """The text after `error: ` for a failure."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted (Ctrl-C); nothing was written"
    if isinstance(e, Terminated):
        return "terminated (SIGTERM); nothing was written"
    return str(e) or type(e).__name__


def epilog(width: int = 100) -> str:
    """The exit-code table for `--help`."""
    import textwrap
    return "exit codes:\n" + "\n".join(textwrap.fill(meaning, width, initial_indent=f"  {code:<5d}",
                                                     subsequent_indent=" " * 7) for code, meaning in EXIT_CODES)


_pending: list[int] = []     # signals received whose exception may have been swallowed (raised inside a __del__)


def install_signal_handlers():
    """SIGINT raises KeyboardInterrupt and SIGTERM `Terminated` in the main thread (a plain SIGTERM would skip
    every cleanup). Python ignores an exception raised inside a destructor, so a signal that lands in one would
    be lost: each is also remembered, and `check_interrupted()` at the commands' commit points (before an
    export replaces its folder, before PNGs are renamed) raises it again. Returns a function that restores the
    previous handlers (for callers that run a command in-process)."""
    import signal
    import sys
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    _pending.clear()

    def handler(signum, frame):
        _pending.append(signum)
        raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated()

    def unraisable(u):          # the swallowed signal is remembered above: no "Exception ignored" traceback
        if not isinstance(u.exc_value, (KeyboardInterrupt, Terminated)):
            previous_hook(u)
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable

    def restore():
        _pending.clear()
        sys.unraisablehook = previous_hook
        for sig, h in previous.items():
            signal.signal(sig, h)
    return restore


def check_interrupted() -> None:
    """Raise the exception of a signal received earlier whose exception was swallowed."""
    import signal
    if _pending:
        raise KeyboardInterrupt() if _pending[0] == signal.SIGINT else Terminated()
