"""`ideogram4 serve` under load and at shutdown: two replicas, 8 concurrent clients x 25 requests (zero errors,
p50/p95 printed, both replicas used, host memory flat), then SIGTERM with requests in flight (they finish, new
ones are refused, exit code 0, every Ray process gone). The drain test stops the server: keep it last."""
import threading
import time

import numpy as np
import pytest

from serve_server import Server, have_serve, rss_bytes

pytestmark = pytest.mark.skipif(not have_serve()[0], reason=have_serve()[1])

CLIENTS, PER_CLIENT, WARM = 8, 25, 50
# Growth allowed between request WARM and the last one: the application's processes (Ingress, Generator
# replicas), where one leaked 256² image per request would add ~30 MB over the 150 requests measured, and every
# process of the server (Ray's own buffers grow by a few MB while they fill; measured 16 MB here).
APP_SLACK_BYTES = 12 << 20
ALL_SLACK_BYTES = 32 << 20
REQUEST = {"size": "256x256", "steps": 1, "guidance": 4}


@pytest.fixture(scope="module")
def server(tiny_engines, tmp_path_factory):
    s = Server(tiny_engines, tmp_path_factory.mktemp("serve-load"), "--replicas", "2", "--max-queue", str(CLIENTS))
    yield s
    if s.proc.poll() is None:
        s.kill()


def test_load_8_clients_25_requests(server, capsys):
    latencies, errors, replicas, lock = [], [], set(), threading.Lock()
    done = [0]
    memory: dict[str, int] = {}

    def client(c: int) -> None:
        for i in range(PER_CLIENT):
            t = time.perf_counter()
            status, _, r = server.generate({"prompt": f"client {c} request {i}", **REQUEST, "seed": c * 1000 + i})
            elapsed = time.perf_counter() - t
            with lock:
                if status != 200 or len(r.get("data", [])) != 1:
                    errors.append((status, r.get("error")))
                else:
                    latencies.append(elapsed)
                    replicas.add(r["ideogram4"]["replica"])
                done[0] += 1
                if done[0] == WARM:
                    memory["warm"], memory["app_warm"] = _memory(server)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    memory["end"], memory["app_end"] = _memory(server)
    assert errors == []
    assert len(latencies) == CLIENTS * PER_CLIENT
    p50, p95 = np.percentile(latencies, [50, 95])
    with capsys.disabled():
        print(f"\n  serve load: {CLIENTS}x{PER_CLIENT} requests (256², 1 step, 2 replicas, CPU) in {wall:.1f} s: "
              f"p50 {p50:.2f} s, p95 {p95:.2f} s, {len(latencies) / wall:.2f} images/s; server RSS "
              f"{memory['warm'] / 2**20:.0f} MiB after {WARM} requests, {memory['end'] / 2**20:.0f} MiB after "
              f"{len(latencies)} (Ingress + replicas {memory['app_warm'] / 2**20:.0f} -> "
              f"{memory['app_end'] / 2**20:.0f} MiB)")
    assert len(replicas) == 2                                           # Ray spread the work over both
    assert memory["app_end"] - memory["app_warm"] < APP_SLACK_BYTES, memory
    assert memory["end"] - memory["warm"] < ALL_SLACK_BYTES, memory
    m = server.metrics()
    assert m["ideogram4_images_total"] >= CLIENTS * PER_CLIENT and m["ideogram4_images_per_second"] > 0
    assert m['ideogram4_stage_seconds_count{stage="denoise"}'] >= CLIENTS * PER_CLIENT
    assert m["ideogram4_queue_depth"] == 0 and m["ideogram4_running"] == 0


def test_sigterm_drains(server):
    results, lock = [], threading.Lock()

    def request(i: int) -> None:
        out = server.generate({"prompt": f"in flight {i}", "size": "256x256", "steps": 12, "guidance": 4})
        with lock:
            results.append(out)

    threads = [threading.Thread(target=request, args=(i,)) for i in range(3)]   # 2 running + 1 queued
    for t in threads:
        t.start()
    end = time.monotonic() + 30
    while server.metrics()["ideogram4_running"] < 2:
        assert time.monotonic() < end, "the requests never started"
        time.sleep(0.1)
    pids = server.processes()
    exit_code = {}
    waiter = threading.Thread(target=lambda: exit_code.update(rc=server.terminate(180)))
    waiter.start()
    end = time.monotonic() + 10
    while True:                                   # refused from now on, with a clear message
        status, headers, r = server.generate({"prompt": "too late", **REQUEST})
        if status == 503:
            break
        assert time.monotonic() < end, f"new requests still accepted after SIGTERM: {status}"
    assert r["error"]["type"] == "draining" and "shutting down" in r["error"]["message"], r
    assert server.request("GET", "/readyz")[0] == 503                     # load balancers stop sending
    for t in threads:
        t.join(120)
    assert [s for s, _, _ in results] == [200, 200, 200], [r.get("error") for _, _, r in results]
    waiter.join(200)
    assert exit_code["rc"] == 0, server.log_tail()
    assert "drained, stopped" in server.err.read_text()
    time.sleep(2)
    alive = [p for p in pids if _alive(p)]
    assert alive == [], f"processes of the server still running after it exited: {alive}"


def _memory(server) -> tuple[int, int]:
    """RSS of every process of the server, and of the application's own (Ray Serve replicas)."""
    pids = server.processes()
    app = [p for p in pids if "ServeReplica:ideogram4" in _cmdline(p)]
    return rss_bytes(pids), rss_bytes(app)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
