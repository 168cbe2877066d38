"""`ideogram4 serve` end to end: one real server (local Ray, tiny engines, onnxruntime CPU, one replica) and real
HTTP, gRPC and C++ clients. Refusals, results equal to the in-process Pipeline, the bounded queue, deadlines,
cancellation on disconnect, a crashed replica. The last test kills the replica: keep it last."""
import base64
import io
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serve_server import Server, have_serve
from test_serve_request import MODEL_REFUSALS

pytestmark = pytest.mark.skipif(not have_serve()[0], reason=have_serve()[1])

ROOT = Path(__file__).resolve().parents[2]
MAX_QUEUE = 4
FAST = {"size": "256x256", "steps": 1, "guidance": 4}        # one step: the cheapest real request


@pytest.fixture(scope="module")
def server(tiny_engines, tmp_path_factory):
    s = Server(tiny_engines, tmp_path_factory.mktemp("serve"), "--max-queue", str(MAX_QUEUE), "--request-timeout",
               "60", "--max-n", "2")
    yield s
    if s.proc.poll() is None:
        assert s.terminate() == 0, s.log_tail()


@pytest.fixture(scope="module")
def pipe(tiny_engines):
    from ideogram4_engine.runtime.pipeline import Pipeline
    return Pipeline(tiny_engines, backend="onnxruntime-cpu")


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def grpc_error(call):
    import grpc
    try:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "images"):
            result = list(result)
        return None, result
    except grpc.RpcError as e:
        return e, None


# ------------------------------------------------------------------------------------------- probes, metrics

def test_health_ready_and_metric_families(server):
    assert server.request("GET", "/healthz")[:1] == (200,)
    status, _, body = server.request("GET", "/readyz")
    assert status == 200 and json.loads(body)["ready"] is True
    text = server.request("GET", "/metrics")[2].decode()
    for family in ("ideogram4_queue_depth gauge", "ideogram4_running gauge", "ideogram4_stage_seconds histogram",
                   "ideogram4_images_per_second gauge", "ideogram4_images_total counter",
                   "ideogram4_errors_total counter", "ideogram4_gpu_memory_bytes gauge", "ideogram4_ready gauge"):
        assert f"# TYPE {family}" in text, family
    m = server.metrics()
    assert m["ideogram4_ready"] == 1.0 and m["ideogram4_queue_depth"] == 0.0
    assert not any(k.startswith("ideogram4_gpu_memory_bytes{") for k in m)        # no GPU here: no samples


# ------------------------------------------------------------------------------------------- results

def test_http_result_equals_the_in_process_pipeline(server, pipe):
    status, _, r = server.generate({"prompt": "a red fox in the snow", "size": "384x256", "steps": 2,
                                    "guidance": [3, 5], "seed": 11, "n": 2})
    assert status == 200, r
    assert r["size"] == "384x256" and r["output_format"] == "png" and len(r["data"]) == 2
    meta = r["ideogram4"]
    assert (meta["seed"], meta["steps"], meta["guidance"], meta["preset"], meta["synthetic"]) == \
        (11, 2, [3.0, 5.0], "", True)
    assert {"queue_s", "text_encoder_s", "denoise_s", "vae_s", "encode_s", "total_s"} <= set(meta["timings"])
    images = [decode(d["b64_json"]) for d in r["data"]]
    assert all(im.format == "PNG" and im.size == (384, 256) for im in images)
    assert images[0].text["seed"] == "11" and "SYNTHETIC" in images[0].text["model"]
    direct = pipe.generate(["a red fox in the snow"] * 2, width=384, height=256, steps=2, guidance=(3.0, 5.0), seed=11)
    for served, local in zip(images, direct.images):
        assert np.array_equal(np.asarray(served), np.asarray(local))       # same pixels as in process
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))  # n=2: two different samples


def test_output_formats_and_random_seed(server):
    for fmt, pil in (("jpeg", "JPEG"), ("webp", "WEBP")):
        status, _, r = server.generate({"prompt": "a", **FAST, "output_format": fmt, "seed": 1})
        assert status == 200 and r["output_format"] == fmt
        assert decode(r["data"][0]["b64_json"]).format == pil
    seeds = {server.generate({"prompt": "a", **FAST})[2]["ideogram4"]["seed"] for _ in range(2)}
    assert len(seeds) == 2                                   # no seed given: a fresh one, reported back


def test_grpc_unary_and_stream(server):
    from ideogram4_engine.serve.pb import ideogram4_pb2 as pb

    stub = server.stub()
    req = pb.GenerateRequest(prompt="a lighthouse", width=256, height=256, steps=3, guidance=[4.0], seed=5)
    r = stub.Generate(req, timeout=120)
    assert (r.seed, r.steps, list(r.guidance), r.width, r.synthetic) == (5, 3, [4.0, 4.0, 4.0], 256, True)
    assert len(r.images) == 1 and r.images[0].mime_type == "image/png" and r.timings.total_s > 0
    events = list(stub.GenerateStream(req, timeout=120))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["queued", "progress", "progress", "progress", "result"]
    assert [(e.progress.step, e.progress.total) for e in events[1:4]] == [(1, 3), (2, 3), (3, 3)]
    assert events[-1].result.images[0].data == r.images[0].data            # same seed: same bytes


# ------------------------------------------------------------------------------------------- refusals

BAD_HTTP = [
    (b"{", "the request body is not valid JSON"),
    (json.dumps({"prompt": "a", "output": "/etc/passwd"}).encode(), "unknown field 'output'"),
    (json.dumps({"prompt": "../../etc/passwd", "output_format": "../x"}).encode(), "output_format=\"../x\""),
    (json.dumps({"prompt": "a", "n": 3}).encode(), "n=3 outside 1…2 (the server's --max-n)"),
    (json.dumps({"prompt": "a", "response_format": "url"}).encode(), "response_format=\"url\" is not supported"),
    (json.dumps({"prompt": "a", "timeout_s": 61}).encode(), "timeout_s=61 outside (0, 60] seconds"),
]


def _expected(pipe, kwargs) -> str:
    call = {"width": 256, "height": 256, "seed": 0, **kwargs}
    with pytest.raises(ValueError) as e:
        pipe.generate(call.pop("prompts", "a red fox"), **call)
    return str(e.value)


def test_http_bad_input_matrix(server, pipe):
    before = server.metrics()
    for fields, kwargs in MODEL_REFUSALS:                     # the runtime's own message, unchanged
        status, headers, r = server.generate({"prompt": "a red fox", "size": "256x256", **fields})
        assert status == 400 and r["error"]["type"] == "invalid", (fields, r)
        assert r["error"]["message"] == _expected(pipe, kwargs)
    for body, message in BAD_HTTP:
        status, _, r = server.generate(body)
        assert status == 400 and message in r["error"]["message"], (body, r)
    after = server.metrics()
    assert after["ideogram4_admitted_total"] == before["ideogram4_admitted_total"]      # nothing queued
    assert after['ideogram4_errors_total{kind="invalid"}'] - before['ideogram4_errors_total{kind="invalid"}'] == \
        len(MODEL_REFUSALS) + len(BAD_HTTP)
    assert server.request("GET", "/v1/images/generations")[0] == 405
    assert server.request("GET", "/etc/passwd")[0] == 404


def test_grpc_bad_input_matrix(server, pipe):
    import grpc

    from ideogram4_engine.serve.pb import ideogram4_pb2 as pb

    stub = server.stub()
    before = server.metrics()["ideogram4_admitted_total"]
    cases = []
    for fields, kwargs in MODEL_REFUSALS:
        f = {"prompt": "a red fox", "width": 256, "height": 256, **fields}
        if "size" in f:
            f["width"], f["height"] = map(int, f.pop("size").split("x"))
        if "guidance" in f:
            g = f.pop("guidance")
            f["guidance"] = g if isinstance(g, list) else [g]
        if f.get("seed", 0) < 0:                # uint64 cannot carry -1: covered over HTTP
            continue
        if f.get("seed", 0) >= 2**64:
            continue
        cases.append((pb.GenerateRequest(**f), _expected(pipe, kwargs)))
    cases += [(pb.GenerateRequest(prompt="a", n=0), "n=0 outside 1…2"),
              (pb.GenerateRequest(prompt="a", output_format="tiff"), "output_format=\"tiff\" is not supported"),
              (pb.GenerateRequest(prompt="a", mu=float("inf")), "mu=Infinity must be a finite number"),
              (pb.GenerateRequest(prompt="a", timeout_s=-1), "timeout_s=-1 outside")]
    for req, message in cases:
        for call in (lambda: stub.Generate(req, timeout=30), lambda: stub.GenerateStream(req, timeout=30)):
            err, events = grpc_error(call)
            assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT, (req, events)
            assert message in err.details() and "\n" not in err.details(), (err.details(), message)
    assert server.metrics()["ideogram4_admitted_total"] == before


# ------------------------------------------------------------------------------------------- limits

def test_bounded_queue_http_429_and_grpc_resource_exhausted(server):
    """Fill the replica and the queue with long requests (with deadlines), then every new one is refused."""
    import grpc

    from ideogram4_engine.serve.pb import ideogram4_pb2 as pb

    stub = server.stub()
    held = []
    threads = [threading.Thread(target=lambda t=t: held.append(server.generate(
        {"prompt": "hold", "size": "256x256", "steps": 400, "guidance": 4, "timeout_s": t})))
        for t in [10] + [5] * MAX_QUEUE]          # the queued ones expire while the first still runs
    for t in threads:               # one by one: Ray's router may refuse early when requests arrive together
        t.start()
        time.sleep(0.3)
    end = time.monotonic() + 8
    while (m := server.metrics())["ideogram4_running"] < 1 or m["ideogram4_queue_depth"] < MAX_QUEUE:
        assert time.monotonic() < end, m
        time.sleep(0.05)
    refused = []
    for _ in range(2):
        status, headers, r = server.generate({"prompt": "one more", **FAST})
        refused.append(("http", status, headers.get("retry-after"), r["error"]["message"]))
        try:
            stub.Generate(pb.GenerateRequest(prompt="one more", width=256, height=256, steps=1, guidance=[4]),
                          timeout=30)
            refused.append(("grpc", "OK", None, None))
        except grpc.RpcError as e:
            refused.append(("grpc", e.code(), dict(e.trailing_metadata() or ()).get("retry-after"), e.details()))
    for proto, status, retry, message in refused:
        assert status in (429, grpc.StatusCode.RESOURCE_EXHAUSTED), refused
        assert retry is not None and int(retry) >= 1, refused
        assert message.startswith(f"the queue is full ({MAX_QUEUE} requests waiting); retry after"), message
    for t in threads:
        t.join(60)
    assert sorted(status for status, _, _ in held) == [504] * (1 + MAX_QUEUE), [r for _, _, r in held]
    where = sorted(r["error"]["message"].rsplit(" ", 1)[-1] for _, _, r in held)
    assert where == ["queued"] * MAX_QUEUE + ["running"], where       # the deadline covers the queue too


def test_deadline(server):
    import grpc

    from ideogram4_engine.serve.pb import ideogram4_pb2 as pb

    t = time.monotonic()
    status, _, r = server.generate({"prompt": "slow", "size": "256x256", "steps": 200, "guidance": 4,
                                    "timeout_s": 1.5})
    assert status == 504 and r["error"]["type"] == "deadline", r
    assert "the deadline (1.5 s) passed" in r["error"]["message"] and time.monotonic() - t < 10
    err, _ = grpc_error(lambda: server.stub().Generate(pb.GenerateRequest(
        prompt="slow", width=256, height=256, steps=200, guidance=[4], timeout_s=1.5), timeout=60))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "the deadline (1.5 s) passed" in err.details()
    status, _, r = server.generate({"prompt": "next", **FAST})          # the replica stopped between steps
    assert status == 200 and r["ideogram4"]["timings"]["queue_s"] < 3.0, r["ideogram4"]["timings"]


def test_client_disconnect_cancels_between_steps(server):
    from ideogram4_engine.serve.pb import ideogram4_pb2 as pb

    before = server.metrics()['ideogram4_errors_total{kind="cancelled"}']
    body = json.dumps({"prompt": "long", "size": "256x256", "steps": 300, "guidance": 4}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    time.sleep(2.0)
    sock.close()                                               # 300 steps would take a minute or more here
    status, _, r = server.generate({"prompt": "after http", **FAST})
    assert status == 200 and r["ideogram4"]["timings"]["queue_s"] < 3.0, r["ideogram4"]["timings"]
    stream = server.stub().GenerateStream(pb.GenerateRequest(prompt="long", width=256, height=256, steps=300,
                                                             guidance=[4]), timeout=120)
    seen = 0
    for event in stream:
        seen += event.WhichOneof("event") == "progress"
        if seen == 2:
            stream.cancel()                                   # a gRPC client cancelling mid-run
            break
    status, _, r = server.generate({"prompt": "after grpc", **FAST})
    assert status == 200 and r["ideogram4"]["timings"]["queue_s"] < 3.0, r["ideogram4"]["timings"]
    end = time.monotonic() + 10
    while server.metrics()['ideogram4_errors_total{kind="cancelled"}'] < before + 2:
        assert time.monotonic() < end, server.metrics()
        time.sleep(0.2)


# ------------------------------------------------------------------------------------------- C++ client

def test_cpp_client(server, tmp_path):
    """clients/cpp built by `make test` with Debian's gRPC (private folder or the system's)."""
    binary = ROOT / "build" / "cpp" / "ideogram4_client"
    reason = ROOT / "build" / "cpp" / "UNAVAILABLE"
    if not binary.exists():
        if reason.exists():
            pytest.skip(f"C++ client not built: {reason.read_text().strip()}")
        pytest.fail("build/cpp/ideogram4_client is missing: `make test` builds it (make cpp-client)")
    target = f"127.0.0.1:{server.grpc_port}"
    out = tmp_path / "cpp.png"
    r = subprocess.run([str(binary), "--target", target, "--prompt", "a lighthouse", "--width", "256", "--height",
                        "256", "--steps", "3", "--guidance", "4", "--seed", "5", "--output", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["seed"] == 5 and report["steps"] == 3 and report["synthetic"] is True
    img = Image.open(out)
    assert img.format == "PNG" and img.size == (256, 256)
    _, _, h = server.generate({"prompt": "a lighthouse", "size": "256x256", "steps": 3, "guidance": 4, "seed": 5})
    assert out.read_bytes() == base64.b64decode(h["data"][0]["b64_json"])     # the C++ client got the same file
    r = subprocess.run([str(binary), "--target", target, "--prompt", "a lighthouse", "--width", "256", "--height",
                        "256", "--steps", "3", "--guidance", "4", "--stream", "--output", str(tmp_path / "s.png")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert [line for line in r.stderr.splitlines() if line.startswith("step ")] == \
        ["step 1/3", "step 2/3", "step 3/3"]
    r = subprocess.run([str(binary), "--target", target, "--prompt", "a", "--width", "100"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == "error: INVALID_ARGUMENT: width=100 must be a multiple of 16"


# ------------------------------------------------------------------------------------------- crash (last)

def test_crashed_replica_is_restarted_and_its_request_fails_clearly(server):
    status, _, r = server.generate({"prompt": "who", **FAST})
    pid = int(r["ideogram4"]["replica"].rsplit(":", 1)[1])
    assert pid in server.processes()                            # a process of this server, on this machine
    result = {}
    t = threading.Thread(target=lambda: result.update(r=server.generate(
        {"prompt": "doomed", "size": "256x256", "steps": 300, "guidance": 4})))
    t.start()
    time.sleep(2.0)
    os.kill(pid, signal.SIGKILL)
    t.join(60)
    assert not t.is_alive(), "the request caught in the crash hung"
    status, headers, r = result["r"]
    assert status == 503 and r["error"]["type"] == "replica_crashed" and "retry" in r["error"]["message"], r
    assert int(headers["retry-after"]) >= 1
    server.wait_ready(180)
    status, _, r = server.generate({"prompt": "again", **FAST}, timeout=180)
    assert status == 200 and int(r["ideogram4"]["replica"].rsplit(":", 1)[1]) != pid
    assert server.metrics()['ideogram4_errors_total{kind="replica_crashed"}'] >= 1
