"""The Ray Serve application: an `Ingress` deployment (HTTP + gRPC, validation, metrics, drain) in front of
the `Generator` deployment (serve/worker.py: one Pipeline per replica, one replica per GPU or GPU pair).

    client ── HTTP :8000 / gRPC :9000 ──> Ray Serve proxy ──> Ingress ──handle──> Generator replicas
                                                      checks, 400 here      queue (max_queued_requests) → 429

Requests are checked in the Ingress before they are queued; the queue is Ray Serve's own (the Ingress's
handle to the Generator, bounded by max_queued_requests; autoscaling follows its length). Cancellation
(client gone, deadline) goes through Ray's request cancellation to the replica, which stops between steps.
"""
# no `from __future__ import annotations`: FastAPI reads the route signatures' annotations as types
import asyncio
import base64
import math
import time
from dataclasses import dataclass, field

import grpc
from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError

from .metrics import CONTENT_TYPE_LATEST, Metrics
from .pb import ideogram4_pb2 as pb
from .request import InvalidRequest, Limits, Request, Validator, from_json, from_proto
from .worker import Cancelled, DeadlineExceeded, Worker

APP_NAME = "ideogram4"
INGRESS = "Ingress"
GENERATOR = "Generator"
GRPC_SERVICER = "ideogram4_engine.serve.pb.ideogram4_pb2_grpc.add_ImageGenerationServicer_to_server"
READY_CACHE_S = 1.0
INGRESS_SPARE = 256          # Ingress slots beyond the admitted requests (probes, refusals), and its own queue

HTTP_STATUS = {"invalid": 400, "queue_full": 429, "deadline": 504, "cancelled": 499, "replica_crashed": 503,
               "draining": 503, "internal": 500}
GRPC_STATUS = {"invalid": grpc.StatusCode.INVALID_ARGUMENT, "queue_full": grpc.StatusCode.RESOURCE_EXHAUSTED,
               "deadline": grpc.StatusCode.DEADLINE_EXCEEDED, "cancelled": grpc.StatusCode.CANCELLED,
               "replica_crashed": grpc.StatusCode.UNAVAILABLE, "draining": grpc.StatusCode.UNAVAILABLE,
               "internal": grpc.StatusCode.INTERNAL}


@dataclass
class ServeConfig:
    """Everything `ideogram4 serve` configures (docs/serving.md lists the flags)."""
    engines: str
    backend: str = "auto"
    pipeline_options: dict = field(default_factory=dict)
    replicas: int = 1
    max_replicas: int | None = None           # set: autoscale between replicas and max_replicas on queue length
    target_ongoing: float = 2.0               # autoscaling: requests per replica (running + queued) to aim for
    gpus_per_replica: float | None = None     # None: 1 (2 with CFG-parallel) when the cluster has GPUs
    cpus_per_replica: float = 1.0
    max_queue: int = 16                       # requests waiting for a replica; beyond: 429 / RESOURCE_EXHAUSTED
    limits: Limits = field(default_factory=Limits)
    warmup: tuple[int, int] | None = None     # default: the default size


class ServeError(Exception):
    """A failed request: its kind (metrics.ERROR_KINDS), one-line message and optional Retry-After seconds."""

    def __init__(self, kind: str, message: str, retry_after: int | None = None):
        super().__init__(kind, message, retry_after)       # all in args: it survives pickling (Ray)
        self.kind, self.message, self.retry_after = kind, message, retry_after

    def __str__(self) -> str:
        return self.message


def _one_line(e: BaseException) -> str:
    """The original message of an exception that crossed a process boundary (Ray wraps it with a traceback)."""
    cause = e.cause if isinstance(e, RayTaskError) and getattr(e, "cause", None) is not None else e
    text = str(cause).strip() or type(cause).__name__
    return text.splitlines()[0] if isinstance(cause, (ValueError, Cancelled, DeadlineExceeded)) else \
        f"{type(cause).__name__}: {text.splitlines()[-1] if text else ''}"


api = FastAPI(title="Ideogram 4", docs_url=None, redoc_url=None, openapi_url=None)


@serve.ingress(api)
class Ingress:
    def __init__(self, generator, engines: str, limits: Limits, max_queue: int):
        self.generator = generator
        self.validator = Validator(engines)        # the runtime's checks: manifest + tokenizer, no backend
        self.synthetic = bool(self.validator.manifest.synthetic)
        self.limits, self.max_queue = limits, max_queue
        self.metrics = Metrics()
        self.draining = False
        self.inflight = 0
        self.service_s = 0.0                       # moving average of a request's time on a replica
        self._ready = (0.0, False, "not checked yet")

    # ----------------------------------------------------------------------------------- shared core

    def _admit(self, parse, protocol: str) -> Request:
        """The checked request, or ServeError (counted) before anything is queued."""
        try:
            if self.draining:
                raise ServeError("draining", "the server is shutting down (draining): no new requests; retry on "
                                 "another instance", retry_after=1)
            try:
                return self.validator.check(parse()).request
            except InvalidRequest as e:
                raise ServeError("invalid", str(e)) from None
        except ServeError as e:
            self.metrics.error(protocol, e.kind)
            raise

    def _retry_after(self) -> int:
        return max(1, math.ceil(self.service_s or 1.0))

    def _classify(self, e: BaseException, started: bool) -> ServeError:
        if isinstance(e, BackPressureError):
            return ServeError("queue_full", f"the queue is full ({self.max_queue} requests waiting); retry after "
                              f"{self._retry_after()} s", retry_after=self._retry_after())
        cause = e.cause if isinstance(e, RayTaskError) and getattr(e, "cause", None) is not None else e
        if isinstance(cause, DeadlineExceeded):
            return ServeError("deadline", _one_line(e))
        if isinstance(cause, Cancelled):
            return ServeError("cancelled", _one_line(e))
        if isinstance(e, (RayActorError, ActorDiedError, ActorUnavailableError)) and not isinstance(e, RayTaskError):
            return ServeError("replica_crashed", "the replica running this request crashed " +
                              ("during the run" if started else "before it started") + "; Ray restarts it: retry",
                              retry_after=self._retry_after())
        if isinstance(cause, ValueError):           # a check only the backend can make (e.g. engine profiles)
            return ServeError("invalid", _one_line(e))
        return ServeError("internal", _one_line(e))

    async def _events(self, req: Request, protocol: str, progress: bool):
        """The Generator's events for one admitted request; failures become ServeError (counted)."""
        arrival = time.time()
        deadline = arrival + req.timeout_s
        stream = self.generator.options(stream=True).generate.remote(req, deadline, progress)
        self.inflight += 1
        self.metrics.admitted.inc()
        self.metrics.queued.inc()
        started = None
        try:
            while True:
                try:
                    event = await asyncio.wait_for(stream.__anext__(), max(deadline - time.time(), 1e-3))
                except StopAsyncIteration:
                    raise ServeError("internal", "the replica ended the request without a result") from None
                except asyncio.TimeoutError:
                    stream.cancel()
                    where = "while it was queued" if started is None else "while it was running"
                    raise ServeError("deadline", f"the deadline ({req.timeout_s:g} s) passed {where}") from None
                if event["type"] == "started":
                    started = time.time()
                    self.metrics.queued.dec()
                    self.metrics.running.inc()
                elif event["type"] == "result":
                    now = time.time()
                    self.service_s = 0.8 * self.service_s + 0.2 * (now - started) if self.service_s else now - started
                    event["timings"]["queue_s"] = started - arrival
                    event["timings"]["total_s"] = now - arrival
                    self.metrics.result(protocol, event, started - arrival, now - arrival)
                yield event
                if event["type"] == "result":
                    return
        except ServeError as e:
            self.metrics.error(protocol, e.kind)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            stream.cancel()                       # the client went away: Ray cancels the run on the replica
            self.metrics.error(protocol, "cancelled")
            raise
        except Exception as e:                    # noqa: BLE001 -- every failure is reported, by kind
            err = self._classify(e, started is not None)
            self.metrics.error(protocol, err.kind)
            raise err from None
        finally:
            self.inflight -= 1
            (self.metrics.queued if started is None else self.metrics.running).dec()

    async def _result(self, req: Request, protocol: str) -> dict:
        result = None
        async for event in self._events(req, protocol, progress=False):    # to its end: nothing left open
            if event["type"] == "result":
                result = event
        return result

    # ----------------------------------------------------------------------------------- HTTP

    @staticmethod
    def _http_error(e: ServeError) -> JSONResponse:
        headers = {"Retry-After": str(e.retry_after)} if e.retry_after else {}
        return JSONResponse({"error": {"message": e.message, "type": e.kind, "code": HTTP_STATUS[e.kind]}},
                            status_code=HTTP_STATUS[e.kind], headers=headers)

    @api.post("/v1/images/generations")
    async def generations(self, http: HttpRequest) -> Response:
        body = await http.body()
        try:
            req = self._admit(lambda: from_json(body, self.limits), "http")
            r = await self._result(req, "http")
        except ServeError as e:
            return self._http_error(e)
        return JSONResponse({
            "created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(img).decode("ascii")} for img in r["images"]],
            "output_format": req.output_format, "size": f"{r['width']}x{r['height']}",
            "ideogram4": {k: r[k] for k in ("seed", "preset", "steps", "guidance", "synthetic", "timings",
                                            "replica")}})

    @api.get("/healthz")
    async def healthz(self) -> Response:
        return JSONResponse({"status": "draining" if self.draining else "ok"})

    @api.get("/readyz")
    async def readyz(self) -> Response:
        ready, why = await self.ready()
        return JSONResponse({"ready": ready, "reason": why}, status_code=200 if ready else 503)

    @api.get("/metrics")
    async def metrics(self) -> Response:
        ready, _ = await self.ready()
        self.metrics.ready.set(1 if ready else 0)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # ----------------------------------------------------------------------------------- gRPC

    def _grpc_fail(self, context, e: ServeError) -> None:
        context.set_code(GRPC_STATUS[e.kind])
        context.set_details(e.message)
        if e.retry_after:
            context.set_trailing_metadata([("retry-after", str(e.retry_after))])

    @staticmethod
    def _proto_result(r: dict):
        t = r["timings"]
        return pb.GenerateResponse(
            images=[pb.Image(data=img, mime_type=r["mime_type"]) for img in r["images"]], seed=r["seed"],
            preset=r["preset"], steps=r["steps"], guidance=r["guidance"], width=r["width"], height=r["height"],
            synthetic=r["synthetic"], replica=r["replica"],
            timings=pb.Timings(**{k: t[k] for k in ("queue_s", "text_encoder_s", "denoise_s", "vae_s",
                                                     "encode_s", "total_s")}))

    # gRPC methods: no annotations naming protobuf classes (Ray pickles the class when it deploys it)
    async def Generate(self, request, grpc_context):
        try:
            req = self._admit(lambda: from_proto(request, self.limits), "grpc")
            return self._proto_result(await self._result(req, "grpc"))
        except ServeError as e:
            # returned, not raised: Ray Serve's gRPC proxy then sends the code, details and trailing
            # metadata (retry-after) set on the context; the empty message is discarded by the client
            self._grpc_fail(grpc_context, e)
            return pb.GenerateResponse()

    async def GenerateStream(self, request, grpc_context):
        try:
            req = self._admit(lambda: from_proto(request, self.limits), "grpc")
            yield pb.GenerateEvent(queued=pb.Queued())
            async for event in self._events(req, "grpc", progress=True):
                if event["type"] == "progress":
                    yield pb.GenerateEvent(progress=pb.Progress(step=event["step"], total=event["total"]))
                elif event["type"] == "result":
                    yield pb.GenerateEvent(result=self._proto_result(event))
        except ServeError as e:
            # a stream's trailing metadata is only sent with a message; the message text says when to retry
            self._grpc_fail(grpc_context, e)
            raise

    # ----------------------------------------------------------------------------------- lifecycle

    async def ready(self) -> tuple[bool, str]:
        """Ready = not draining and at least one Generator replica running (= loaded and warmed)."""
        if self.draining:
            return False, "draining"
        checked, ready, why = self._ready
        if time.monotonic() - checked > READY_CACHE_S:
            try:
                status = await asyncio.to_thread(serve.status)
                dep = status.applications[serve.get_replica_context().app_name].deployments[GENERATOR]
                running = dep.replica_states.get("RUNNING", 0)
                ready, why = running > 0, f"{running} generator replica(s) running" + (
                    "" if running else f" ({dep.status.value}: {dep.message or 'loading and warming up'})").replace("\n", " ")
            except Exception as e:               # noqa: BLE001 -- a probe reports, never raises
                ready, why = False, f"status unavailable: {e}"
            self._ready = (time.monotonic(), ready, why)
        return ready, why

    def drain(self) -> int:
        """Refuse new requests from now on; returns how many are still in flight (queued or running)."""
        self.draining = True
        return self.inflight

    def in_flight(self) -> int:
        return self.inflight


def build(config: ServeConfig):
    """The Ray Serve application for `config` (what `serve.run` deploys)."""
    limits = config.limits
    warmup = config.warmup or (limits.default_width, limits.default_height)
    generator = serve.deployment(Worker, name=GENERATOR).options(
        ray_actor_options={"num_cpus": config.cpus_per_replica, "num_gpus": config.gpus_per_replica},
        max_ongoing_requests=1, max_queued_requests=config.max_queue,
        graceful_shutdown_timeout_s=limits.timeout_s, health_check_period_s=5, health_check_timeout_s=30,
        **({"autoscaling_config": {"min_replicas": config.replicas, "max_replicas": config.max_replicas,
                                   "target_ongoing_requests": config.target_ongoing}}
           if config.max_replicas else {"num_replicas": config.replicas}))
    # the Ingress holds every admitted request (queued or running) plus probes and refusals in progress; a flood
    # beyond that waits at the proxy, bounded too (429 with Retry-After from Ray Serve itself)
    ingress = serve.deployment(Ingress, name=INGRESS).options(
        num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=config.max_queue + (config.max_replicas or config.replicas) + INGRESS_SPARE,
        max_queued_requests=INGRESS_SPARE, backpressure_config=BackpressureConfig(status_code=429, retry_after_s=1),
        graceful_shutdown_timeout_s=limits.timeout_s)
    return ingress.bind(generator.bind(config.engines, config.backend, config.pipeline_options, warmup),
                        config.engines, limits, config.max_queue)


def with_gpu_default(config: ServeConfig, cluster_gpus: float) -> ServeConfig:
    """GPUs per replica when not given: 1 (2 with CFG-parallel) on a cluster with GPUs, else 0."""
    if config.gpus_per_replica is None:
        cfg = "uncond_device_id" in config.pipeline_options
        config.gpus_per_replica = (2.0 if cfg else 1.0) if cluster_gpus else 0.0
    return config
