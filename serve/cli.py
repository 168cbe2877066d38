"""`ideogram4 serve`: the Ray Serve application in the foreground, ready when every replica is loaded and warmed.

Exit codes: 0 after a clean drain (SIGTERM or SIGINT: refuse new requests, finish running and queued ones, stop),
2 for a bad configuration (one line on stderr, before Ray starts), 3 when requests were still in flight after
--drain-timeout, 1 when Ray or Serve failed. Imports nothing heavy until it runs: the plain runtime never
imports ray.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

DRAIN_POLL_S = 0.2


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="HTTP + gRPC server on Ray Serve (docs/serving.md)",
                       description="Serve an engines folder over HTTP (OpenAI-compatible POST /v1/images/generations, "
                                   "/healthz, /readyz, /metrics) and gRPC (proto/ideogram4.proto) through Ray Serve. "
                                   "Needs the `serve` extra.")
    s.add_argument("--engines", required=True, help="engines folder written by `make export`")
    s.add_argument("--backend", default="auto", help="auto, tensorrt, tensorrt-rtx, onnxruntime-cuda, onnxruntime-cpu")
    s.add_argument("--dequantize-at-load", action="store_true", help="onnxruntime: as for `ideogram4 generate`")
    s.add_argument("--cfg-parallel", action="store_true",
                   help="onnxruntime-cuda: two GPUs per replica, the unconditional DiT on the second")
    from ..runtime.cli_args import add_cache_arguments
    add_cache_arguments(s)
    s.add_argument("--address", default="local",
                   help="Ray cluster to join: 'local' (default: start Ray in this process), 'auto' (the cluster "
                        "this machine belongs to) or host:port of its head")
    s.add_argument("--host", default="127.0.0.1", help="HTTP/gRPC listen address (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000, help="HTTP port")
    s.add_argument("--grpc-port", type=int, default=9000, help="gRPC port")
    s.add_argument("--replicas", type=int, default=1, help="Generator replicas (the minimum when autoscaling)")
    s.add_argument("--max-replicas", type=int, default=None,
                   help="autoscale between --replicas and this on queue length (Ray Serve autoscaling)")
    s.add_argument("--gpus-per-replica", type=float, default=None,
                   help="default: 1 (2 with --cfg-parallel) when the cluster has GPUs, else 0")
    s.add_argument("--cpus-per-replica", type=float, default=1.0,
                   help="CPUs Ray reserves per replica (with --backend onnxruntime-cpu also its thread count)")
    s.add_argument("--max-queue", type=int, default=16,
                   help="requests waiting for a replica; more get 429 / RESOURCE_EXHAUSTED with Retry-After")
    s.add_argument("--max-n", type=int, default=4, help="images per request at most")
    s.add_argument("--default-size", default="1024x1024", help="WIDTHxHEIGHT when a request gives none")
    s.add_argument("--warmup-size", default=None, help="WIDTHxHEIGHT of the warm-up run (default: --default-size)")
    s.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds from arrival to answer, queue included: the default and the maximum timeout_s")
    s.add_argument("--drain-timeout", type=float, default=None,
                   help="on SIGTERM, seconds to wait for requests in flight (default: --request-timeout)")
    s.set_defaults(func=main)


def _config(args):
    """ServeConfig from the flags; ValueError with one line on anything wrong (before Ray starts)."""
    from ..runtime.manifest import load_manifest
    from ..runtime.packing import check_size
    from .request import InvalidRequest, Limits, parse_size

    load_manifest(args.engines)
    try:
        width, height = parse_size(args.default_size)
        warmup = parse_size(args.warmup_size) if args.warmup_size else None
    except InvalidRequest as e:
        raise ValueError(f"--default-size/--warmup-size: {e}") from None
    for w, h in [(width, height), *([warmup] if warmup else [])]:
        check_size(h, w)
    for name, v, lo in (("--port", args.port, 1), ("--grpc-port", args.grpc_port, 1), ("--replicas", args.replicas, 1),
                        ("--max-queue", args.max_queue, 0), ("--max-n", args.max_n, 1)):
        if v < lo or (name.endswith("port") and v > 65535):
            raise ValueError(f"{name}={v} outside {lo}…{65535 if name.endswith('port') else 'any'}")
    if args.max_replicas is not None and args.max_replicas < args.replicas:
        raise ValueError(f"--max-replicas={args.max_replicas} is below --replicas={args.replicas}")
    if not args.request_timeout > 0:
        raise ValueError(f"--request-timeout={args.request_timeout} must be > 0 seconds")
    options = {}
    if args.dequantize_at_load:
        options["dequantize_at_load"] = True
    from ..runtime import backends
    if args.cfg_parallel:
        if args.backend not in backends.taking("uncond_device_id"):
            raise ValueError(f"--cfg-parallel needs --backend {' or '.join(backends.taking('uncond_device_id'))} "
                             f"(got --backend {args.backend})")
        options["uncond_device_id"] = 1
    from ..runtime.cli_args import cache_options
    if cache_options(args) is not None:
        options["cache"] = cache_options(args)
    if args.backend == "onnxruntime-cpu":       # a CPU replica computes on the cores Ray reserved for it
        options["threads"] = max(1, int(args.cpus_per_replica))
    from .app import ServeConfig
    return ServeConfig(engines=str(args.engines), backend=args.backend, pipeline_options=options,
                       replicas=args.replicas, max_replicas=args.max_replicas, gpus_per_replica=args.gpus_per_replica,
                       cpus_per_replica=args.cpus_per_replica, max_queue=args.max_queue,
                       limits=Limits(width, height, args.max_n, args.request_timeout), warmup=warmup)


class _RaisingParser(argparse.ArgumentParser):
    """argparse that raises ValueError (one line) instead of printing usage and exiting."""

    def error(self, message):
        raise ValueError(f"ideogram4 serve options: {message}")


def config_from_mapping(options: dict):
    """ServeConfig from `ideogram4 serve` flags given as a mapping ({"engines": ..., "max_queue": 32,
    "cfg_parallel": True}): the same parser, defaults and checks as the command line."""
    ap = _RaisingParser(prog="ideogram4")
    add_parser(ap.add_subparsers(dest="cmd"))
    argv = ["serve"]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True or str(value).lower() == "true":
            argv.append(flag)
        elif value is not False and value is not None and str(value).lower() != "false":
            argv += [flag, str(value)]
    args = ap.parse_args(argv)
    return _config(args), args


def main(args) -> int:
    from ..runtime.manifest import ManifestError
    try:
        config = _config(args)
    except (ValueError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"error: `ideogram4 serve` needs the serve extra ({e}): pip install 'ideogram4-engine[serve]'",
              file=sys.stderr)
        return 2
    import ray
    from ray import serve

    from .app import APP_NAME, GRPC_SERVICER, build, with_gpu_default

    stop = threading.Event()
    starting = [True]

    def on_signal(*_):
        stop.set()
        if starting[0]:                     # nothing is in flight yet: abandon the start-up
            raise _Interrupted()

    t0 = time.perf_counter()
    try:
        ray.init(address=args.address, include_dashboard=False,
                 logging_level="WARNING", configure_logging=True)
        for sig in (signal.SIGTERM, signal.SIGINT):        # after ray.init, which installs its own handlers
            signal.signal(sig, on_signal)
        with_gpu_default(config, ray.cluster_resources().get("GPU", 0))
        serve.start(http_options={"host": args.host, "port": args.port},
                    grpc_options={"port": args.grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]},
                    logging_config={"log_level": "WARNING"})
        handle = serve.run(build(config), name=APP_NAME, route_prefix="/")
        starting[0] = False
    except _Interrupted:
        print("stopped before the server was ready (signal)", file=sys.stderr)
        _shutdown(args.address)
        return 0
    except Exception as e:                                    # noqa: BLE001 -- one line, then the exit code
        print(f"error: the server did not start: {_start_failure(e)}", file=sys.stderr)
        _shutdown(args.address)
        return 1
    synthetic = " -- SYNTHETIC weights: images are noise-like by design" if _synthetic(config.engines) else ""
    print(f"ready in {time.perf_counter() - t0:.1f} s: http://{args.host}:{args.port}/v1/images/generations, "
          f"grpc {args.host}:{args.grpc_port} ({config.replicas} replica(s), {config.gpus_per_replica:g} GPU "
          f"each){synthetic}", flush=True)
    while not stop.wait(1.0):
        if not ray.is_initialized():
            print("error: Ray stopped", file=sys.stderr)
            return 1
    return _drain(handle, config.limits.timeout_s if args.drain_timeout is None else args.drain_timeout, args.address)


class _Interrupted(Exception):
    """SIGTERM/SIGINT before the server was ready."""


def _start_failure(e: Exception) -> str:
    """Why the application did not deploy, in one line: a failed deployment's own error (the last line of the
    traceback Ray Serve keeps in its status) rather than Ray's summary."""
    from ray import serve

    from .app import APP_NAME
    try:
        for name, dep in serve.status().applications[APP_NAME].deployments.items():
            lines = [line.strip() for line in (dep.message or "").splitlines() if line.strip()]
            if dep.status.value in ("DEPLOY_FAILED", "UNHEALTHY") and lines:
                return f"{name}: {lines[-1]}"
    except Exception:                     # noqa: BLE001 -- fall back to Ray's own message
        pass
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"


def _synthetic(engines: str) -> bool:
    from ..runtime.manifest import load_manifest
    return bool(load_manifest(engines).synthetic)


def _drain(handle, timeout_s: float, address: str) -> int:
    """Refuse new requests, wait for those in flight, stop Serve (and the local Ray)."""
    left = handle.drain.remote().result()
    print(f"draining: {left} request(s) in flight", file=sys.stderr, flush=True)
    end = time.monotonic() + timeout_s
    while left and time.monotonic() < end:
        time.sleep(DRAIN_POLL_S)
        left = handle.in_flight.remote().result()
    _shutdown(address)
    if left:
        print(f"error: {left} request(s) still in flight after the drain timeout ({timeout_s:g} s)", file=sys.stderr)
        return 3
    print("drained, stopped", file=sys.stderr, flush=True)
    return 0


def _shutdown(address: str) -> None:
    """The local Ray: stop Serve and Ray. A joined cluster: remove this application only."""
    import ray
    from ray import serve

    from .app import APP_NAME
    try:
        if ray.is_initialized():
            serve.shutdown() if address == "local" else serve.delete(APP_NAME)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="ideogram4")
    add_parser(ap.add_subparsers(dest="cmd", required=True))
    a = ap.parse_args()
    sys.exit(a.func(a))


def app_builder(args: dict):
    """Application builder for Ray's own tooling (`serve run`, `serve deploy`, KubeRay's RayService):
    import_path `ideogram4_engine.serve.cli:app_builder`, args = the `ideogram4 serve` flags as a mapping
    (engines, backend, replicas, max_replicas, max_queue, default_size, ...), checked like the command line.
    HTTP/gRPC ports and the gRPC servicer are the cluster's Serve options (docs/serving.md)."""
    import ray

    from .app import build, with_gpu_default

    config, _ = config_from_mapping(dict(args))
    return build(with_gpu_default(config, ray.cluster_resources().get("GPU", 0)))
