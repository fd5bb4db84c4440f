"""The gRPC runner: one bundle on one backend behind our API, KServe v2, health and reflection.

    running = build_server(ServeOptions(bundle="bundles/tiny", port=0))   # in-process (tests)
    running.port                                                         # the bound port
    running.stop()

    serve(ServeOptions(bundle="bundles/tiny"))   # blocks; SIGTERM/SIGINT stop it; returns 0

Startup: bind the port and start with health NOT_SERVING (so liveness answers while loading) ->
load the backend -> parity canary against the torch reference -> health SERVING. A failing
canary keeps health NOT_SERVING, logs why and refuses inference requests with UNAVAILABLE while
ModelInfo and CheckParity keep answering (``--parity warn``, the default), or refuses to start
(``--parity strict``). Shutdown: health NOT_SERVING -> ``server.stop(grace)`` lets in-flight
streams finish -> shadow parity and backends closed.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from export.deps import MissingDependencyError
from export.manifest import Bundle, BundleError
from serving.backends import backend_options, create_backend
from serving.backends.base import Backend
from serving.errors import Cancelled, ServingError
from serving.grpc_errors import ErrorInterceptor
from serving.kserve import KServeServicer
from serving.metrics import ServerMetrics
from serving.proto import gpt2_deploy_pb2, grpc_service_pb2
from serving.proto import gpt2_deploy_pb2_grpc as api_grpc
from serving.proto import grpc_service_pb2_grpc as kserve_grpc
from serving.runtime import NOT_SERVING, PARITY_MODES, SERVING, STOPPING, ModelRuntime, summary
from serving.servicer import Gpt2DeployServicer

log = logging.getLogger("serving.server")

API_SERVICE = gpt2_deploy_pb2.DESCRIPTOR.services_by_name["Gpt2Deploy"].full_name
KSERVE_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH_SERVICES = ("", API_SERVICE, KSERVE_SERVICE)

# Exit codes of `gpt2-deploy serve`.
EXIT_OK, EXIT_STARTUP, EXIT_PARITY = 0, 2, 3


class ParityRefused(RuntimeError):
    """``--parity strict`` and the startup canary failed: the server refuses to start."""


class StartupCancelled(Exception):
    """The stop event was set (SIGTERM/SIGINT) while the server was still starting."""


@dataclass
class ServeOptions:
    """How to serve a bundle.

    Args:
        bundle: The bundle directory (from ``gpt2-deploy export``).
        backend: onnxruntime (default), torch or tensorrt.
        device: cpu, cuda or cuda:N; None (default) means cuda for tensorrt, cpu otherwise.
        engine: TensorRT engine (bundle-relative or absolute); None picks the newest that can run.
        trt_runtime: TensorRT runtime for the tensorrt backend: auto, tensorrt or tensorrt_lean.
        host: Interface to bind. Defaults to 127.0.0.1 (local only); 0.0.0.0 or [::] to expose.
        port: TCP port; 0 picks a free one (``RunningServer.port`` tells which).
        max_message_mb: Largest gRPC message in either direction, MiB. The default 256 holds the
            full-vocabulary logits of ~1,300 positions of GPT-2 (B*S*50257*4 bytes).
        grace_s: On shutdown, how long in-flight streams may take to finish.
        parity: Startup canary: off, warn (default: a failure keeps health NOT_SERVING and logs
            why) or strict (a failure refuses to start).
        shadow_rate: Fraction of finished generations re-checked against the reference, off the
            hot path. 0 (default) disables.
        metrics_port: Prometheus /metrics on this port (on ``host``); 0 (default) disables.
        workers: gRPC worker threads (concurrent RPCs).
        threads: Backend intra-op threads; None lets the runtime decide.
        max_new_tokens_limit: Largest max_new_tokens a request may ask for (>= 1).
        reference_device: Device of the torch reference for parity checks.
        kv_slots: tensorrt only: KV caches (so generations) live at once; None = the backend's
            default (2). Requests beyond it wait up to ``admission_timeout_s`` for a free one.
        admission_timeout_s: How long a request waits for a free KV cache before UNAVAILABLE.
    """

    bundle: Path | str
    backend: str = "onnxruntime"
    device: str | None = None
    engine: str | None = None
    trt_runtime: str = "auto"
    host: str = "127.0.0.1"
    port: int = 50051
    max_message_mb: int = 256
    grace_s: float = 10.0
    parity: str = "warn"
    shadow_rate: float = 0.0
    metrics_port: int = 0
    workers: int = 16
    threads: int | None = None
    max_new_tokens_limit: int = 4096
    reference_device: str = "cpu"
    kv_slots: int | None = None
    admission_timeout_s: float = 30.0

    def check(self) -> None:
        """Raise ValueError listing every option out of range."""
        problems = []
        if self.parity not in PARITY_MODES:
            problems.append(f"parity must be one of {', '.join(PARITY_MODES)}, got {self.parity!r}")
        if not 0.0 <= self.shadow_rate <= 1.0:
            problems.append(f"shadow_rate must be in [0, 1], got {self.shadow_rate}")
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                problems.append(f"{name} must be in [0, 65535], got {getattr(self, name)}")
        if not 2 <= self.max_message_mb <= 2047:
            problems.append(
                f"max_message_mb must be in [2, 2047] (1 MiB is kept for the message "
                f"around a tensor; gRPC's limit is 2 GiB), got {self.max_message_mb}"
            )
        if self.max_new_tokens_limit < 1:
            problems.append(f"max_new_tokens_limit must be >= 1, got {self.max_new_tokens_limit}")
        if self.kv_slots is not None and self.kv_slots < 1:
            problems.append(f"kv_slots must be >= 1, got {self.kv_slots}")
        if self.admission_timeout_s < 0:
            problems.append(f"admission_timeout_s must be >= 0, got {self.admission_timeout_s}")
        if self.grace_s < 0:
            problems.append(f"grace_s must be >= 0, got {self.grace_s}")
        if self.workers < 1:
            problems.append(f"workers must be >= 1, got {self.workers}")
        if problems:
            raise ValueError("invalid serve options: " + "; ".join(problems))


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class RunningServer:
    """A started server. ``stop()`` (or leaving the ``with`` block) shuts it down in order."""

    def __init__(
        self,
        server: grpc.Server,
        port: int,
        options: ServeOptions,
        runtime: ModelRuntime,
        health_servicer: health.HealthServicer,
        metrics: ServerMetrics,
        metrics_port: int | None,
    ):
        self.server = server
        self.port = port
        self.options = options
        self.runtime = runtime
        self.health = health_servicer
        self.metrics = metrics
        self.metrics_port = metrics_port
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    @property
    def address(self) -> str:
        """``host:port`` to give a client."""
        return _hostport(self.options.host, self.port)

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in HEALTH_SERVICES:
            self.health.set(name, status)
        self.metrics.ready.set(1 if serving else 0)

    def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING -> stop accepting, let in-flight RPCs finish within ``grace`` ->
        close shadow parity, backends and the metrics endpoint. Idempotent."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            grace = self.options.grace_s if grace is None else grace
            log.info("shutting down: health NOT_SERVING, waiting up to %.1f s for in-flight RPCs", grace)
            self.runtime.state = STOPPING
            self.metrics.ready.set(0)
            self.health.enter_graceful_shutdown()
            self.server.stop(grace).wait()
            self.runtime.close()
            self.metrics.stop_http()
            self._stopped.set()
            log.info("stopped")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stopped (by ``stop`` from another thread); True if it was."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def build_server(
    opts: ServeOptions, *, backend: Backend | None = None, stop: threading.Event | None = None
) -> RunningServer:
    """Open the bundle, start the gRPC server, load the backend, run the canary.

    Args:
        opts: What to serve and how.
        backend: Serve this (constructed, not necessarily loaded) backend instead of creating
            ``opts.backend`` (tests use it to serve a deliberately perturbed real backend).
        stop: Checked between the startup phases (load, canary, shadow) and during the canary;
            when set, startup is abandoned (the server stopped) with StartupCancelled.

    Raises:
        ValueError: invalid options or an unknown backend name.
        BundleError: the bundle is missing or corrupt.
        MissingDependencyError / BackendUnavailable: the backend cannot run here.
        OSError: the port cannot be bound.
        ParityRefused: ``parity="strict"`` and the canary failed.
        StartupCancelled: ``stop`` was set during startup.
    """
    opts.check()
    bundle = Bundle.open(opts.bundle)
    if backend is None:
        backend = create_backend(
            opts.backend,
            bundle,
            backend_options(
                opts.backend,
                opts.device,
                threads=opts.threads,
                engine=opts.engine,
                trt_runtime=opts.trt_runtime,
                kv_slots=opts.kv_slots,
            ),
        )

    metrics = ServerMetrics()
    max_bytes = opts.max_message_mb << 20
    runtime = ModelRuntime(  # the tolerance comes from the backend once it is loaded
        bundle,
        backend,
        metrics=metrics,
        max_new_tokens_limit=opts.max_new_tokens_limit,
        reference_device=opts.reference_device,
        max_response_bytes=max_bytes - (1 << 20),  # headroom for the message around the tensor
        parity_mode=opts.parity,
        admission_timeout_s=opts.admission_timeout_s,
    )

    interceptor = ErrorInterceptor(on_request=metrics.request, on_error=metrics.error)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=opts.workers, thread_name_prefix="grpc"),
        interceptors=[interceptor],
        options=[
            ("grpc.max_send_message_length", max_bytes),
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    kserve = KServeServicer(runtime, metrics)
    api_grpc.add_Gpt2DeployServicer_to_server(Gpt2DeployServicer(runtime, kserve.models), server)
    kserve_grpc.add_GRPCInferenceServiceServicer_to_server(kserve, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (API_SERVICE, KSERVE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )

    try:
        port = server.add_insecure_port(_hostport(opts.host, opts.port))
    except RuntimeError as e:  # grpcio raises on a failed bind
        raise OSError(
            f"cannot listen on {_hostport(opts.host, opts.port)}: {e} (port in use, or not a local address?)"
        ) from None
    if port == 0:
        raise OSError(
            f"cannot listen on {_hostport(opts.host, opts.port)} (port in use, or not a local address?)"
        )

    metrics_port = metrics.start_http(opts.metrics_port, opts.host) if opts.metrics_port else None
    running = RunningServer(server, port, opts, runtime, health_servicer, metrics, metrics_port)
    running.set_serving(False)
    server.start()
    log.info("listening on %s (loading %s on %s)", running.address, bundle.name, backend.name)
    stopping = stop.is_set if stop is not None else (lambda: False)

    def check_stop(phase: str) -> None:
        if stopping():
            raise StartupCancelled(f"stop requested {phase}; startup abandoned")

    try:
        check_stop("before loading")
        runtime.load()
        check_stop("after loading")
        try:
            runtime.state = SERVING if _canary(runtime, opts.parity, stopping) else NOT_SERVING
        except Cancelled:
            raise StartupCancelled("stop requested during the startup canary; startup abandoned") from None
        check_stop("after the canary")
        if opts.shadow_rate > 0:
            runtime.start_shadow(opts.shadow_rate)
            check_stop("after starting shadow parity")
    except BaseException:
        running.stop(grace=0)
        raise
    running.set_serving(runtime.state == SERVING)
    log.info(
        "%s: %s on %s, health %s",
        running.address,
        bundle.name,
        backend.name,
        "SERVING" if runtime.ready else "NOT_SERVING",
    )
    return running


def _canary(runtime: ModelRuntime, mode: str, cancelled=None) -> bool:
    """Run the startup canary per ``mode``; True if the server may report SERVING.

    Raises:
        ParityRefused: strict mode and the canary failed (or could not run).
        Cancelled: ``cancelled()`` turned True during the canary.
    """
    if mode == "off":
        runtime.canary = "off"
        return True
    try:
        report = runtime.run_canary(cancelled)
    except Cancelled:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. torch missing for the reference
        if mode == "strict":
            raise ParityRefused(f"--parity strict: the startup canary could not run: {e}") from e
        runtime.canary = f"skipped: {e}"
        log.warning("startup canary skipped (%s); serving without a parity check", e)
        return True
    if report:
        log.info("startup canary passed: %s", summary(report))
        return True
    message = f"startup canary FAILED for backend {runtime.backend.name!r}: {summary(report)}"
    if mode == "strict":
        raise ParityRefused(f"{message}; --parity strict refuses to serve\n{report}")
    log.error(
        "%s; health stays NOT_SERVING and inference requests get UNAVAILABLE (--parity warn; "
        "--parity off serves anyway)\n%s",
        message,
        report,
    )
    return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for tests and the demo)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve(opts: ServeOptions) -> int:
    """Serve until SIGTERM/SIGINT, then shut down gracefully. Returns the process exit code.

    0 after a clean shutdown (also when SIGTERM/SIGINT arrives during startup), 2 when the
    server cannot start (bundle, backend, port, options), 3 when ``--parity strict`` refuses to
    start.
    """
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum, frame):
        received.append(signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            running = build_server(opts, stop=stop)
        except StartupCancelled as e:
            log.info("received %s: %s", received[0] if received else "stop", e)
            return EXIT_OK
        except ParityRefused as e:
            log.error("%s", e)
            return EXIT_PARITY
        except (ValueError, OSError, RuntimeError, BundleError, MissingDependencyError, ServingError) as e:
            log.error("cannot start: %s", e)  # startup errors become a message and an exit code
            return EXIT_STARTUP
        extra = f", metrics on :{running.metrics_port}/metrics" if running.metrics_port else ""
        log.info(
            "serving %s with %s on %s%s; SIGTERM or Ctrl-C stops",
            running.runtime.name,
            running.runtime.backend.name,
            running.address,
            extra,
        )
        while not stop.wait(0.5):
            pass
        log.info("received %s", received[0] if received else "stop")
        running.stop()
        return EXIT_OK
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
