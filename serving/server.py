"""The gRPC runner: one bundle on one backend behind our API, KServe v2, health and reflection.

    running = build_server(ServeOptions(bundle="bundles/tiny", port=0))   # in-process (tests)
    running.port                                                         # the bound port
    running.stop()

    serve(ServeOptions(bundle="bundles/tiny"))   # blocks; SIGTERM/SIGINT stop it; returns 0

The server is ``grpc.aio`` on an event loop of its own thread: a stream is a coroutine awaiting
its scheduler row, so no OS thread is tied to a waiting client and health answers under load.

Startup: bind the port and start with health NOT_SERVING (so liveness answers while loading) ->
load the backend and start its scheduler -> parity canary -> health SERVING. A failing canary
keeps health NOT_SERVING, logs why and refuses inference requests with UNAVAILABLE while
ModelInfo and CheckParity keep answering (``--parity warn``, the default), or refuses to start
(``--parity strict``). Shutdown: health NOT_SERVING -> ``server.stop(grace)`` lets in-flight
streams finish -> scheduler, shadow parity and backends closed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from export.deps import MissingDependencyError
from export.errors import OptionsError
from export.manifest import Bundle, BundleError
from serving.backends import REGISTRY, backend_options, create_backend
from serving.backends.base import Backend
from serving.errors import Cancelled, ServingError
from serving.grpc_errors import ErrorInterceptor
from serving.kserve import KServeServicer
from serving.metrics import ServerMetrics
from serving.proto import gpt2_deploy_pb2, grpc_service_pb2
from serving.runtime import (
    CANARY_REFERENCES,
    NOT_SERVING,
    PARITY_MODES,
    SERVING,
    STOPPING,
    ModelRuntime,
    summary,
)
from serving.scheduler import SchedulerOptions
from serving.security import SecurityOptions, auth_interceptor, server_credentials
from serving.servicer import Gpt2DeployServicer
from serving.wire import MemoryTrimmer, add_servicer

log = logging.getLogger("serving.server")

_API = gpt2_deploy_pb2.DESCRIPTOR.services_by_name["Gpt2Deploy"]
_KSERVE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
API_SERVICE, KSERVE_SERVICE = _API.full_name, _KSERVE.full_name
HEALTH_SERVICES = ("", API_SERVICE, KSERVE_SERVICE)
# SERVING from the moment the port is bound until shutdown, whatever the canary says: for a
# Kubernetes liveness probe (a replica whose canary failed stays up, not ready, not restarted).
LIVENESS_SERVICE = "liveness"

# Exit codes of `gpt2-deploy serve`: 4 = stopped at the hard deadline (calls were cut).
EXIT_OK, EXIT_STARTUP, EXIT_PARITY, EXIT_FORCED = 0, 2, 3, 4
# After --grace, how long a stop may still take (cancelled calls unwinding, a forward finishing)
# before the process gives up on them: SIGTERM always ends it within grace + this.
STOP_MARGIN_S = 5.0


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
        trust_engine_host_code: tensorrt only: load an engine that carries executable host code
            (a version-compatible plan with the lean runtime inside); off by default.
        host: Interface to bind. Defaults to 127.0.0.1 (local only); 0.0.0.0 or [::] to expose.
        port: TCP port; 0 picks a free one (``RunningServer.port`` tells which).
        max_request_mb: Largest request, MiB: bigger ones are refused (RESOURCE_EXHAUSTED naming
            this limit) before they are decoded. Prompts and token lists are bounded by the
            context far below it; the KServe forward's tensors are the large requests.
        max_message_mb: Largest gRPC message in either direction, MiB. The default 256 holds the
            full-vocabulary logits of ~1,300 positions of GPT-2 (B*S*50257*4 bytes).
        grace_s: On shutdown, how long in-flight streams may take to finish (after the drain
            delay); calls still running then are cancelled, and the stop ends within grace plus
            ``STOP_MARGIN_S`` whatever they do.
        drain_delay_s: On shutdown, how long health says NOT_SERVING while the port still accepts
            and serves (load balancers and Kubernetes endpoints catch up) before new calls are
            refused.
        max_connection_age_s: Close each client connection after this long (clients reconnect,
            and behind a Kubernetes Service spread over the replicas); None: never.
        max_connection_age_grace_s: How long calls on a connection being closed may still run.
        parity: Startup canary: off, warn (default: a failure keeps health NOT_SERVING and logs
            why) or strict (a failure refuses to start).
        canary_reference: What the canary compares with: auto (default: the bundle's golden
            record when it has one, else the torch reference), golden or torch.
        shadow_rate: Fraction of finished generations re-checked against the reference, off the
            hot path. 0 (default) disables.
        metrics_port: Prometheus /metrics on this port (on ``host``); 0 (default) disables.
        threads: Backend intra-op threads; None lets the runtime decide.
        max_new_tokens_limit: Largest max_new_tokens a request may ask for (>= 1).
        reference_device: Device of the torch reference for parity checks.
        max_batch_size: Rows the scheduler steps together (capped by the backend, e.g. an
            engine's max batch).
        max_batch_tokens: Padded tokens a decode step may hold (rows x (past width + 1)).
        max_prefill_tokens: Padded tokens of one prefill forward (rows x longest prompt).
        max_wait_ms: How long waiting requests may wait to be grouped into one join.
        max_queue: Requests waiting for the model; one more gets RESOURCE_EXHAUSTED.
        max_prompt_bytes: Prompt text refused before tokenising; None: what the context can hold.
        tls_cert, tls_key: PEM certificate chain and key: serve TLS (``serving.security``).
        tls_client_ca: PEM CA bundle: require client certificates it signed (mutual TLS).
        auth_token_file: Accepted bearer tokens, one per line (re-read when it changes): every
            call needs ``authorization: Bearer <token>`` except health and reflection.
        auth_health, auth_reflection: Require the token for health / reflection too.
    """

    bundle: Path | str
    backend: str = "onnxruntime"
    device: str | None = None
    engine: str | None = None
    trt_runtime: str = "auto"
    trust_engine_host_code: bool = False
    host: str = "127.0.0.1"
    port: int = 50051
    max_message_mb: int = 256
    max_request_mb: int = 4
    grace_s: float = 10.0
    drain_delay_s: float = 0.0
    max_connection_age_s: float | None = None
    max_connection_age_grace_s: float = 60.0
    parity: str = "warn"
    canary_reference: str = "auto"
    shadow_rate: float = 0.0
    metrics_port: int = 0
    threads: int | None = None
    max_new_tokens_limit: int = 4096
    reference_device: str = "cpu"
    max_batch_size: int = SchedulerOptions.max_batch_size
    max_batch_tokens: int = SchedulerOptions.max_batch_tokens
    max_prefill_tokens: int = SchedulerOptions.max_prefill_tokens
    max_wait_ms: float = SchedulerOptions.max_wait_ms
    max_queue: int = SchedulerOptions.max_queue
    max_prompt_bytes: int | None = None
    tls_cert: Path | str | None = None
    tls_key: Path | str | None = None
    tls_client_ca: Path | str | None = None
    auth_token_file: Path | str | None = None
    auth_health: bool = False
    auth_reflection: bool = False

    def security_options(self) -> SecurityOptions:
        return SecurityOptions(
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
            tls_client_ca=self.tls_client_ca,
            auth_token_file=self.auth_token_file,
            auth_health=self.auth_health,
            auth_reflection=self.auth_reflection,
        )

    def scheduler_options(self) -> SchedulerOptions:
        return SchedulerOptions(
            max_batch_size=self.max_batch_size,
            max_batch_tokens=self.max_batch_tokens,
            max_prefill_tokens=self.max_prefill_tokens,
            max_wait_ms=self.max_wait_ms,
            max_queue=self.max_queue,
        )

    def check(self) -> None:
        """Raise OptionsError listing every option out of range."""
        problems = []
        if self.backend not in REGISTRY:
            problems.append(f"backend must be one of {', '.join(REGISTRY)}, got {self.backend!r}")
        if self.parity not in PARITY_MODES:
            problems.append(f"parity must be one of {', '.join(PARITY_MODES)}, got {self.parity!r}")
        if self.canary_reference not in CANARY_REFERENCES:
            allowed = ", ".join(CANARY_REFERENCES)
            problems.append(f"canary_reference must be one of {allowed}, got {self.canary_reference!r}")
        if not 0.0 <= self.shadow_rate <= 1.0:
            problems.append(f"shadow_rate must be in [0, 1], got {self.shadow_rate}")
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                problems.append(f"{name} must be in [0, 65535], got {getattr(self, name)}")
        if not 1 <= self.max_request_mb <= self.max_message_mb:
            problems.append(
                f"max_request_mb must be in [1, max_message_mb = {self.max_message_mb}], "
                f"got {self.max_request_mb}"
            )
        if not 2 <= self.max_message_mb <= 2047:
            problems.append(
                f"max_message_mb must be in [2, 2047] (1 MiB is kept for the message "
                f"around a tensor; gRPC's limit is 2 GiB), got {self.max_message_mb}"
            )
        if self.max_new_tokens_limit < 1:
            problems.append(f"max_new_tokens_limit must be >= 1, got {self.max_new_tokens_limit}")
        if self.max_prompt_bytes is not None and self.max_prompt_bytes < 1:
            problems.append(f"max_prompt_bytes must be >= 1, got {self.max_prompt_bytes}")
        if self.grace_s < 0:
            problems.append(f"grace_s must be >= 0, got {self.grace_s}")
        if not 0 <= self.drain_delay_s <= 600:
            problems.append(f"drain_delay_s must be in [0, 600], got {self.drain_delay_s}")
        if self.max_connection_age_s is not None and self.max_connection_age_s <= 0:
            problems.append(f"max_connection_age_s must be > 0 (or unset), got {self.max_connection_age_s}")
        if self.max_connection_age_grace_s < 0:
            problems.append(f"max_connection_age_grace_s must be >= 0, got {self.max_connection_age_grace_s}")
        try:
            self.scheduler_options().check()
        except OptionsError as e:
            problems.append(str(e).removeprefix("invalid scheduler options: "))
        try:
            self.security_options().check()
        except OptionsError as e:
            problems.append(str(e).removeprefix("invalid security options: "))
        if problems:
            raise OptionsError("invalid serve options: " + "; ".join(problems))


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class _LoopThread:
    """An asyncio event loop running on a thread of its own (the gRPC server lives on it)."""

    def __init__(self, name: str = "grpc-aio"):
        self.loop = asyncio.new_event_loop()
        self.trim_task: asyncio.Task | None = None  # housekeeping that runs as long as the loop
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        """Run ``coro`` on the loop and wait for its result (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        if self.trim_task is not None:
            task = self.trim_task

            async def cancel() -> None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

            try:
                self.run(cancel(), 2.0)
            except TimeoutError:
                log.warning("a housekeeping task did not stop")
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


class RunningServer:
    """A started server. ``stop()`` (or leaving the ``with`` block) shuts it down in order."""

    def __init__(
        self,
        server: grpc.aio.Server,
        port: int,
        options: ServeOptions,
        runtime: ModelRuntime,
        health_servicer: HealthServicer,
        metrics: ServerMetrics,
        metrics_port: int | None,
        loop: _LoopThread,
    ):
        self.server = server
        self.port = port
        self.options = options
        self.runtime = runtime
        self.health = health_servicer
        self.metrics = metrics
        self.metrics_port = metrics_port
        self._loop = loop
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self.forced = False  # the last stop hit its hard deadline
        runtime.on_not_serving = self._on_not_serving

    @property
    def address(self) -> str:
        """``host:port`` to give a client."""
        return _hostport(self.options.host, self.port)

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )

        async def set_all() -> None:
            for name in HEALTH_SERVICES:
                await self.health.set(name, status)

        self._loop.run(set_all())
        self.metrics.ready.set(1 if serving else 0)

    def _on_not_serving(self, reason: str, restart: bool) -> None:
        """The runtime stopped serving (repeated backend failures): health follows, and with
        ``restart`` the liveness service too, so an orchestrator replaces this replica."""
        self.set_serving(False)
        if restart:
            self._loop.run(self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING))

    def stop(self, grace: float | None = None, drain_delay: float | None = None) -> bool:
        """Health NOT_SERVING -> keep serving for ``drain_delay`` -> refuse new calls, let in-flight
        ones finish within ``grace`` -> close the scheduler, shadow parity, backends and metrics.

        Always returns within drain_delay + grace + ``STOP_MARGIN_S``: calls still running at the
        grace deadline are cancelled, and whatever has not unwound by the margin is left behind
        (``forced``). Idempotent. Returns True for a clean stop, False when it was forced.
        """
        with self._stop_lock:
            if self._stopped.is_set():
                return not self.forced
            grace = self.options.grace_s if grace is None else grace
            delay = self.options.drain_delay_s if drain_delay is None else drain_delay
            log.info(
                "shutting down: health NOT_SERVING, draining %.1f s, then up to %.1f s for in-flight RPCs",
                delay,
                grace,
            )
            self.runtime.state = STOPPING
            self.metrics.ready.set(0)
            self._loop.run(self.health.enter_graceful_shutdown(), STOP_MARGIN_S)
            if delay > 0:  # load balancers see NOT_SERVING while calls still succeed
                self._stopped.wait(delay)
            try:
                self._loop.run(self.server.stop(grace), grace + STOP_MARGIN_S)
            except TimeoutError:
                self.forced = True
                log.error(
                    "in-flight calls did not end within --grace %.1f s + %.1f s; stopping without them",
                    grace,
                    STOP_MARGIN_S,
                )
            self.runtime.close(timeout=STOP_MARGIN_S if self.forced else None)
            self.metrics.stop_http()
            self._loop.close()
            self._stopped.set()
            log.info("stopped%s", " (forced)" if self.forced else "")
            return not self.forced

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stopped (by ``stop`` from another thread); True if it was."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _connection_age(opts: ServeOptions) -> list[tuple[str, int]]:
    if opts.max_connection_age_s is None:
        return []
    return [
        ("grpc.max_connection_age_ms", int(opts.max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(opts.max_connection_age_grace_s * 1000)),
    ]


async def _start_grpc(opts: ServeOptions, runtime: ModelRuntime, metrics: ServerMetrics):
    """Create, bind and start the aio server on the running loop; (server, port, health, trim task)."""
    max_bytes = opts.max_message_mb << 20
    interceptor = ErrorInterceptor(on_request=metrics.request, on_error=metrics.error)
    security = opts.security_options()
    auth = auth_interceptor(security, on_denied=lambda m: metrics.error(m, "UNAUTHENTICATED"))
    server = grpc.aio.server(
        interceptors=[interceptor] if auth is None else [auth, interceptor],  # auth first
        options=[
            ("grpc.max_send_message_length", max_bytes),
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.so_reuseport", 0),
            *_connection_age(opts),
        ],
    )
    kserve = KServeServicer(runtime, metrics)
    trimmer = MemoryTrimmer()
    max_request = opts.max_request_mb << 20
    for service, servicer in ((_API, Gpt2DeployServicer(runtime, kserve.models)), (_KSERVE, kserve)):
        add_servicer(server, service, servicer, max_request_bytes=max_request, trimmer=trimmer)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (
            API_SERVICE,
            KSERVE_SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = _hostport(opts.host, opts.port)
    try:
        credentials = server_credentials(security)
        port = (
            server.add_insecure_port(address)
            if credentials is None
            else server.add_secure_port(address, credentials)
        )
    except RuntimeError as e:  # grpcio raises on a failed bind
        raise OSError(f"cannot listen on {address}: {e} (port in use, or not a local address?)") from None
    if port == 0:
        raise OSError(f"cannot listen on {address} (port in use, or not a local address?)")
    log.info("%s: %s", address, security.describe())
    await server.start()
    trim = asyncio.get_running_loop().create_task(_trim_memory(trimmer))  # lives as long as the loop
    return server, port, health_servicer, trim


async def _trim_memory(trimmer: MemoryTrimmer, every_s: float = 1.0) -> None:
    """After large requests went through, hand the heap grpcio's threads freed back to the OS."""
    while True:
        await asyncio.sleep(every_s)
        if trimmer.pending >= trimmer.threshold:
            await asyncio.to_thread(trimmer.maybe_trim)


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
        OptionsError: invalid options or an unknown backend name.
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
                trust_engine_host_code=opts.trust_engine_host_code,
            ),
        )

    metrics = ServerMetrics()
    runtime = ModelRuntime(  # the tolerance comes from the backend once it is loaded
        bundle,
        backend,
        metrics=metrics,
        scheduler=opts.scheduler_options(),
        max_new_tokens_limit=opts.max_new_tokens_limit,
        reference_device=opts.reference_device,
        max_response_bytes=(opts.max_message_mb << 20) - (1 << 20),  # headroom around the tensor
        parity_mode=opts.parity,
        canary_reference=opts.canary_reference,
        max_prompt_bytes=opts.max_prompt_bytes,
    )
    loop = _LoopThread()
    try:
        server, port, health_servicer, loop.trim_task = loop.run(_start_grpc(opts, runtime, metrics))
    except BaseException:
        loop.close()
        raise
    metrics_port = metrics.start_http(opts.metrics_port, opts.host) if opts.metrics_port else None
    running = RunningServer(server, port, opts, runtime, health_servicer, metrics, metrics_port, loop)
    running.set_serving(False)
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
    except Exception as e:
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
    start, 4 when calls did not end by the hard deadline (``RunningServer.stop``).
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
        except (OptionsError, OSError, RuntimeError, BundleError, MissingDependencyError, ServingError) as e:
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
        if running.stop():
            return EXIT_OK
        logging.shutdown()  # flush the log: threads stuck in calls must not keep the process alive
        os._exit(EXIT_FORCED)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
