"""Serving overhead, cold start and memory per replica (issue 20's GPU measurements; docs/serving.md).

1. In process: Pipeline load, one warm-up, then --requests timed `Pipeline.generate` calls and their PNG
   encoding (the server encodes too), one after the other.
2. The server: `ideogram4 serve` in a subprocess (its own local Ray, one replica); cold start = process start to
   /readyz 200; then the same requests over HTTP and over gRPC (unary), one after the other; GPU memory
   (nvidia-smi) and host RSS of the server's processes when idle and at the peak.
Overhead = median server latency - median in-process (generate + encode). One JSON object per line to --out.
3. With --uncached-start: one more server start with an empty verified-digest cache (the first start after an
   export or a copy: every file hashed), to /readyz, then SIGTERM.
Every process here shares one digest cache file next to --out (runtime/verify.py): the in-process run fills it,
so the measured server start is a restart's. The replica's own load and warm-up times come from its log line.

    python3 scripts/serve_bench.py --engines /tmp/ideogram4_bench/engines --backend onnxruntime-cuda \\
        --size 1024x1024 --preset V4_DEFAULT_20 --requests 5 --out $OUT/serve_bench.jsonl
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

PROMPT = "A lighthouse on a rocky coast at dusk, long exposure, waves crashing on the rocks."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpu_used_mib() -> dict[str, int]:
    if not shutil.which("nvidia-smi"):
        return {}
    out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout
    return {i.strip(): int(m) for i, m in (line.split(",") for line in out.splitlines() if "," in line)}


def tree_rss_mib(pid: int) -> float:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                children.setdefault(int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]), []).append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            total += next(int(line.split()[1]) for line in Path(f"/proc/{p}/status").read_text().splitlines()
                          if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total / 1024


class Peak:
    """Samples GPU memory and the server's host RSS every 0.5 s until stopped; keeps the maxima."""

    def __init__(self, pid: int | None = None):
        self.pid, self.gpu, self.rss, self._stop = pid, {}, 0.0, threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self):
        while not self._stop.wait(0.5):
            for k, v in gpu_used_mib().items():
                self.gpu[k] = max(self.gpu.get(k, 0), v)
            if self.pid:
                self.rss = max(self.rss, tree_rss_mib(self.pid))

    def stop(self):
        self._stop.set()
        self._t.join()
        return self


def in_process(args, width, height, emit):
    import io

    from ideogram4_engine.runtime.pipeline import Pipeline

    gpu0 = gpu_used_mib()
    t = time.perf_counter()
    pipe = Pipeline(args.engines, backend=args.backend)
    emit({"what": "in_process_load", "load_s": time.perf_counter() - t, "backend": pipe.backend.name})
    pipe.generate(PROMPT, width=width, height=height, preset=args.preset, seed=0)          # warm-up
    gen, enc = [], []
    for i in range(args.requests):
        t = time.perf_counter()
        r = pipe.generate(PROMPT, width=width, height=height, preset=args.preset, seed=i + 1)
        t1 = time.perf_counter()
        buf = io.BytesIO()
        r.images[0].save(buf, format="PNG", compress_level=1)      # as the server encodes (serve/worker.py)
        enc.append(time.perf_counter() - t1)
        gen.append(t1 - t)
    emit({"what": "in_process", "generate_s": gen, "encode_s": enc, "median_generate_s": statistics.median(gen),
          "median_total_s": statistics.median([a + b for a, b in zip(gen, enc)]),
          "gpu_used_mib": gpu_used_mib(), "gpu_used_before_mib": gpu0})
    del pipe, r
    return statistics.median(gen), statistics.median([a + b for a, b in zip(gen, enc)])


def http_generate(port, body, timeout=600):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/images/generations", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


REPLICA_LINE = re.compile(r"ideogram4 replica \S+: loaded in ([\d.]+) s, warmed up in ([\d.]+) s")


def start_server(args, width, height, log_name: str, env: dict):
    """`ideogram4 serve` in a subprocess, waited for until /readyz says 200: (process, ports, seconds, log path)."""
    port, grpc_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "ideogram4_engine.serve.cli", "serve", "--engines", args.engines, "--backend",
           args.backend, "--default-size", f"{width}x{height}", "--port", str(port), "--grpc-port", str(grpc_port),
           *args.serve_flag]
    log_path = Path(args.out).with_suffix(log_name)
    log = open(log_path, "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}); see {log_path}")
        time.sleep(0.1)
    return proc, port, grpc_port, time.perf_counter() - t0, log_path, cmd


def replica_times(log_path: Path) -> dict:
    """The replica's Pipeline load and warm-up seconds, from its log line (serve/worker.py)."""
    time.sleep(1.0)                  # Ray forwards the replica's stderr to the driver's log asynchronously
    m = REPLICA_LINE.findall(log_path.read_text(errors="replace"))
    return {"replica_load_s": float(m[-1][0]), "replica_warmup_s": float(m[-1][1])} if m else {}


def stop_server(proc, emit, what: str) -> None:
    t = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(300)
    emit({"what": what, "exit_code": rc, "drain_and_stop_s": time.perf_counter() - t})


def server(args, width, height, base_generate, base_total, emit, env):
    gpu0 = gpu_used_mib()
    proc, port, grpc_port, cold, log_path, cmd = start_server(args, width, height, ".server.log", env)
    peak = Peak(proc.pid)
    try:
        idle = {"gpu_used_mib": gpu_used_mib(), "gpu_used_before_mib": gpu0, "host_rss_mib": tree_rss_mib(proc.pid)}
        rep = replica_times(log_path)
        emit({"what": "server_cold_start", "ready_s": cold, **rep, "digest_cache": "filled by the in-process run",
              **idle, "command": " ".join(cmd)})
        body = {"prompt": PROMPT, "size": f"{width}x{height}", "preset": args.preset}
        http_generate(port, {**body, "seed": 0})                                   # first request
        lat, server_timings = [], []
        for i in range(args.requests):
            t = time.perf_counter()
            r = http_generate(port, {**body, "seed": i + 1})
            lat.append(time.perf_counter() - t)
            server_timings.append(r["ideogram4"]["timings"])
            assert len(base64.b64decode(r["data"][0]["b64_json"])) > 0
        emit({"what": "server_http", "latency_s": lat, "median_s": statistics.median(lat),
              "overhead_vs_generate_s": statistics.median(lat) - base_generate,
              "overhead_vs_generate_and_encode_s": statistics.median(lat) - base_total,
              "overhead_fraction": (statistics.median(lat) - base_total) / base_total, "timings": server_timings})
        lat_g = grpc_requests(grpc_port, width, height, args)
        if lat_g:
            emit({"what": "server_grpc", "latency_s": lat_g, "median_s": statistics.median(lat_g),
                  "overhead_vs_generate_and_encode_s": statistics.median(lat_g) - base_total,
                  "overhead_fraction": (statistics.median(lat_g) - base_total) / base_total})
        peak.stop()
        emit({"what": "server_memory", "idle": idle, "peak_gpu_used_mib": peak.gpu, "peak_host_rss_mib": peak.rss,
              "per_replica_gpu_mib": {k: v - gpu0.get(k, 0) for k, v in peak.gpu.items()}})
        stop_server(proc, emit, "server_stop")
    finally:
        peak.stop() if not peak._stop.is_set() else None
        if proc.poll() is None:
            proc.kill()


def uncached_start(args, width, height, emit, env):
    """A start with an empty digest cache: every file the replica loads is hashed (a first start)."""
    fresh = Path(args.out).with_suffix(".uncached-digests.json")
    fresh.unlink(missing_ok=True)
    proc, _, _, cold, log_path, _ = start_server(args, width, height, ".server-uncached.log",
                                                 {**env, "IDEOGRAM4_VERIFY_CACHE": str(fresh)})
    try:
        emit({"what": "server_cold_start_uncached", "ready_s": cold, **replica_times(log_path)})
        stop_server(proc, emit, "server_stop_uncached")
    finally:
        if proc.poll() is None:
            proc.kill()


def grpc_requests(port, width, height, args):
    try:
        import grpc

        from ideogram4_engine.serve.pb import ideogram4_pb2 as pb, ideogram4_pb2_grpc as pbg
    except ImportError:
        return []
    stub = pbg.ImageGenerationStub(grpc.insecure_channel(f"127.0.0.1:{port}",
                                                         options=[("grpc.max_receive_message_length", 1 << 30)]))
    out = []
    for i in range(args.requests):
        t = time.perf_counter()
        stub.Generate(pb.GenerateRequest(prompt=PROMPT, width=width, height=height, preset=args.preset, seed=i + 1),
                      timeout=600)
        out.append(time.perf_counter() - t)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", required=True)
    ap.add_argument("--backend", default="onnxruntime-cuda")
    ap.add_argument("--size", default="1024x1024")
    ap.add_argument("--preset", default="V4_DEFAULT_20")
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--serve-flag", action="append", default=[], help="extra `ideogram4 serve` flag (repeatable)")
    ap.add_argument("--skip-in-process", action="store_true")
    ap.add_argument("--uncached-start", action="store_true", help="also time a start with an empty digest cache")
    ap.add_argument("--in-process-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "serve_bench.jsonl"))
    args = ap.parse_args()
    width, height = (int(x) for x in args.size.split("x"))

    def emit(rec):
        rec = {"size": args.size, "preset": args.preset, **rec}
        print(json.dumps(rec), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")

    if args.in_process_only:
        in_process(args, width, height, emit)
        return 0
    env = {**os.environ, "IDEOGRAM4_VERIFY_CACHE": os.environ.get("IDEOGRAM4_VERIFY_CACHE")
           or str(Path(args.out).with_suffix(".digests.json"))}
    base = (float("nan"), float("nan"))
    if not args.skip_in_process:     # in a child process: its GPU memory is gone before the server loads
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--in-process-only"], check=True, env=env)
        last = [json.loads(line) for line in open(args.out) if '"what": "in_process"' in line][-1]
        base = (last["median_generate_s"], last["median_total_s"])
    server(args, width, height, *base, emit, env)
    if args.uncached_start:
        uncached_start(args, width, height, emit, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
