"""A real `ideogram4 serve` in a subprocess for the serving tests, and plain HTTP / gRPC clients for it.

Not a test module: test_serve*.py import it. The server runs the tiny engines on onnxruntime CPU with its own
local Ray; ports are picked free; stdout/stderr go to files shown when something fails.
"""
from __future__ import annotations

import http.client
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).with_name("ideogram4"))
READY_TIMEOUT_S = 240


def have_serve() -> tuple[bool, str]:
    missing = [m for m in ("ray", "grpc", "fastapi", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        return False, f"the serve extra is not installed (no {', '.join(missing)}): `make test` installs it"
    return True, ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """pid and every process below it (Ray's GCS, raylet and workers are children of the server)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class Server:
    def __init__(self, engines: Path, folder: Path, *flags: str):
        self.port, self.grpc_port = free_port(), free_port()
        self.folder = folder
        self.out, self.err = folder / "server.out", folder / "server.err"
        cmd = [CLI, "serve", "--engines", str(engines), "--backend", "onnxruntime-cpu", "--default-size", "256x256",
               "--port", str(self.port), "--grpc-port", str(self.grpc_port), *flags]
        with open(self.out, "w") as o, open(self.err, "w") as e:
            self.proc = subprocess.Popen(cmd, stdout=o, stderr=e, start_new_session=True)
        end = time.monotonic() + READY_TIMEOUT_S
        while "ready in" not in self.out.read_text():
            if self.proc.poll() is not None or time.monotonic() > end:
                self.kill()
                pytest.fail(f"the server did not start (exit code {self.proc.returncode}):\n{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self, n: int = 40) -> str:
        text = self.out.read_text(errors="replace") + self.err.read_text(errors="replace")
        return "\n".join(text.splitlines()[-n:])

    # ---------------------------------------------------------------------------------------------- HTTP

    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 120):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            c.request(method, path, body, {"Content-Type": "application/json"} if body is not None else {})
            r = c.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            c.close()

    def generate(self, payload, timeout: float = 120):
        """POST /v1/images/generations: (status, headers, parsed JSON)."""
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        status, headers, data = self.request("POST", "/v1/images/generations", body, timeout)
        return status, headers, json.loads(data)

    def metrics(self) -> dict[str, float]:
        """GET /metrics as {'name{label="v",...}': value} (labels sorted as the server writes them)."""
        from prometheus_client.parser import text_string_to_metric_families

        status, _, body = self.request("GET", "/metrics")
        assert status == 200
        out = {}
        for fam in text_string_to_metric_families(body.decode()):
            for s in fam.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def wait_ready(self, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while self.request("GET", "/readyz")[0] != 200:
            assert time.monotonic() < end, f"not ready after {timeout} s:\n{self.log_tail()}"
            time.sleep(0.5)

    # ---------------------------------------------------------------------------------------------- gRPC

    def stub(self):
        import grpc

        from ideogram4_engine.serve.pb import ideogram4_pb2_grpc

        self._channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        return ideogram4_pb2_grpc.ImageGenerationStub(self._channel)

    # ---------------------------------------------------------------------------------------------- lifecycle

    def processes(self) -> list[int]:
        return descendants(self.proc.pid)

    def terminate(self, timeout: float = 120) -> int:
        """SIGTERM to the server process only (as Kubernetes and systemd's KillMode=mixed do); its exit code."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the server did not exit {timeout} s after SIGTERM:\n{self.log_tail()}")

    def kill(self) -> None:
        pids = self.processes()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in pids:                      # Ray's own processes started by this server
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(30)
