"""The replica's run loop without Ray: the Pipeline's progress hook stops a run between steps (cancellation,
deadline), the replica is usable right after, and events come in order. Real Pipeline, tiny engines, CPU."""
import asyncio
import time

import numpy as np
import pytest

from ideogram4_engine.serve.request import Request
from ideogram4_engine.serve.worker import Cancelled, DeadlineExceeded, Worker

STEPS = 40


@pytest.fixture(scope="module")
def worker(tiny_engines):
    return Worker(str(tiny_engines), "onnxruntime-cpu", {"threads": 1}, warmup=(256, 256))


def request(steps=STEPS, timeout_s=60.0, seed=3):
    return Request("a red fox", 1, 256, 256, seed, steps=steps, guidance=4.0, timeout_s=timeout_s)


async def collect(gen, stop_after_progress=None):
    events = []
    async for e in gen:
        events.append(e)
        if stop_after_progress and sum(x["type"] == "progress" for x in events) == stop_after_progress:
            break
    return events


def test_the_progress_hook_the_server_relies_on(tiny_engines):
    """Pipeline.generate calls progress(done, total) after every step, and an exception raised there ends the
    run at once and leaves the Pipeline usable (serve/worker.py's cancellation depends on exactly this)."""
    from ideogram4_engine.runtime.pipeline import Pipeline

    pipe = Pipeline(tiny_engines, backend="onnxruntime-cpu")
    calls = []

    def hook(done, total):
        calls.append((done, total))
        if done == 2:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        pipe.generate("a", width=256, height=256, steps=5, guidance=4.0, seed=1, progress=hook)
    assert calls == [(1, 5), (2, 5)]
    a = pipe.generate("a", width=256, height=256, steps=2, guidance=4.0, seed=1)
    b = Pipeline(tiny_engines, backend="onnxruntime-cpu").generate("a", width=256, height=256, steps=2,
                                                                   guidance=4.0, seed=1)
    assert np.array_equal(a.latents, b.latents)


def test_events_in_order(worker):
    events = asyncio.run(collect(worker.generate(request(steps=3), time.time() + 60, progress=True)))
    assert [e["type"] for e in events] == ["started", "progress", "progress", "progress", "result"]
    assert [(e["step"], e["total"]) for e in events[1:4]] == [(1, 3), (2, 3), (3, 3)]
    r = events[-1]
    assert r["steps"] == 3 and r["seed"] == 3 and r["images"][0][:8] == b"\x89PNG\r\n\x1a\n"
    assert len(r["step_s"]) == 3 and r["timings"]["encode_s"] > 0


def test_cancel_stops_between_steps_and_frees_the_replica(worker, monkeypatch):
    ran = []                                          # the steps the Pipeline really ran (its progress calls)
    real = worker.pipe.generate
    monkeypatch.setattr(worker.pipe, "generate", lambda *a, progress, **k: real(
        *a, progress=lambda d, n: (ran.append(d), progress(d, n)), **k))

    async def scenario():
        task = asyncio.ensure_future(collect(worker.generate(request(), time.time() + 60)))
        while len(ran) < 2:
            await asyncio.sleep(0.01)
        before = len(ran)
        task.cancel()                                 # what Ray Serve does when the client goes away
        with pytest.raises(asyncio.CancelledError):
            await task                                # returns once the worker thread has stopped
        return before, len(ran)

    before, after = asyncio.run(scenario())
    assert after <= before + 1 and after < STEPS      # at most the step that was running finished
    time.sleep(0.5)
    assert len(ran) == after                          # nothing runs on in the background
    monkeypatch.undo()
    events = asyncio.run(collect(worker.generate(request(steps=1), time.time() + 60)))
    assert events[-1]["type"] == "result"             # the replica is free and works


def test_deadline_between_steps_and_in_the_queue(worker):
    t = time.perf_counter()
    with pytest.raises(DeadlineExceeded, match=r"the deadline \(0.5 s\) passed after step \d+ of 40"):
        asyncio.run(collect(worker.generate(request(timeout_s=0.5), time.time() + 0.5)))
    assert time.perf_counter() - t < 10
    with pytest.raises(DeadlineExceeded, match="passed while the request was queued"):
        asyncio.run(collect(worker.generate(request(timeout_s=1), time.time() - 0.1)))
