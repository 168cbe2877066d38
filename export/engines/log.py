"""The builder's log: an ILogger that keeps what the build records need (the verbose layer list, memory totals,
dropped targets) and echoes warnings and errors."""
from __future__ import annotations

import re
from typing import Callable


class CapturedLog:
    """An ILogger that keeps what the build records need (the verbose layer list and memory totals, warnings,
    errors) and forwards warnings and errors to `say`."""

    KEEP = ("Layers:", "Total Weights Memory", "Total Activation Memory", "Max Scratch Memory",
            "will not be able to run on target", "Engine generation completed", "After Myelin optimization",
            "Engine Layer Information")

    def __init__(self, trt, say: Callable[[str], None], verbose: bool = False):
        outer = self

        class _Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)

            def log(self, severity, msg):
                outer._log(int(severity), msg)

        self.trt = trt
        self.logger = _Logger()
        self.say, self.verbose = say, verbose
        self.kept: list[tuple[int, str]] = []
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self._warning = int(trt.ILogger.WARNING)
        self._error = int(trt.ILogger.ERROR)
        self.muted = False          # while probing for a GPU (engine inspector): expected errors are not echoed

    def _log(self, severity: int, msg: str) -> None:
        if severity <= self._error:
            self.errors.append(msg)
            if not self.muted:
                self.say(f"  [TensorRT error] {msg}")
        elif severity <= self._warning:
            self.warnings.append(msg)
            if self.verbose:
                self.say(f"  [TensorRT warning] {msg}")
        if any(k in msg for k in self.KEEP):
            self.kept.append((severity, msg))
        elif self.verbose and severity > self._warning:
            self.say(f"  [TensorRT] {msg[:300]}")

    def find(self, key: str) -> str | None:
        for _, m in self.kept:
            if key in m:
                return m
        return None

    def number(self, key: str) -> int | None:
        m = self.find(key)
        hit = re.search(re.escape(key) + r":\s*(\d+)", m or "")
        return int(hit.group(1)) if hit else None

    def removed_targets(self) -> list[str]:
        out: list[str] = []
        for _, m in self.kept:
            hit = re.search(r"will not be able to run on target\(s\):\s*([^,]*(?:,\s*sm\d+)*)", m)
            if hit:
                for sm in re.findall(r"sm(\d+)", hit.group(1)):
                    cc = f"{sm[:-1]}.{sm[-1]}"
                    if cc not in out:
                        out.append(cc)
        return out

    def removed_reason(self) -> str:
        m = self.find("will not be able to run on target") or ""
        hit = re.search(r"because (.*?)\.?$", m.strip())
        return hit.group(1) if hit else "see the builder log"

    def layer_dump(self) -> str | None:
        return self.find("Layers:")
