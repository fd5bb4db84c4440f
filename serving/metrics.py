"""Prometheus metrics of one server, in its own registry (two servers in a process never mix).

    gpt2_deploy_requests_total{method}                  RPCs started
    gpt2_deploy_errors_total{method,code}               RPCs (or in-stream requests) that failed
    gpt2_deploy_generations_total{finish_reason}        length|stop|eos|cancelled|error
    gpt2_deploy_prompt_tokens_total / _generated_tokens_total
    gpt2_deploy_time_to_first_token_seconds             histogram
    gpt2_deploy_time_per_output_token_seconds           histogram (one sample per decoded token)
    gpt2_deploy_parity_checks_total{kind,result}        kind: canary|shadow|rpc, result: pass|fail
    gpt2_deploy_parity_max_abs{kind}                    max|Δlogits| of the latest check
    gpt2_deploy_shadow_dropped_total                    shadow checks dropped (queue full)
    gpt2_deploy_inflight_generations                    gauge
    gpt2_deploy_ready                                   1 when health is SERVING
    gpt2_deploy_queue_depth                             requests waiting for the scheduler (gauge)
    gpt2_deploy_queue_wait_seconds                      histogram, submit -> admitted into a batch
    gpt2_deploy_batch_size{kind}                        histogram of rows per forward (prefill|decode)
    gpt2_deploy_step_seconds{kind}                      histogram of forward durations
    gpt2_deploy_rows_joined_total / _rows_removed_total rows that entered / left the running batch
    gpt2_deploy_tokens_per_second                       decoded tokens/s over the last ~5 s (gauge)
    gpt2_deploy_backend_failures_total                  forwards that raised (fault isolation)

``start_http(port)`` exposes them at ``http://host:port/metrics``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

_NS = "gpt2_deploy"

# Seconds; CPU tiny models decode in ~1 ms, 124M on CPU ~25-50 ms, prefill up to seconds.
_TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
_RATE_WINDOW_S = 5.0


class _ShadowDropped:
    """Reads the shadow checker's dropped counter at scrape time (it owns the count)."""

    def __init__(self, read: Callable[[], int]):
        self._read = read

    def collect(self) -> Iterable[CounterMetricFamily]:
        yield CounterMetricFamily(
            f"{_NS}_shadow_dropped",
            "Shadow parity checks dropped because the queue was full",
            value=self._read(),
        )

    def describe(self) -> Iterable[CounterMetricFamily]:
        return []


class ServerMetrics:
    """The metrics of one server. Methods are cheap and thread-safe."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(f"{_NS}_requests", "RPCs started", ["method"], registry=r)
        self.errors = Counter(
            f"{_NS}_errors", "Failed requests by status code", ["method", "code"], registry=r
        )
        self.generations = Counter(
            f"{_NS}_generations", "Finished generations", ["finish_reason"], registry=r
        )
        self.prompt_tokens = Counter(f"{_NS}_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generated_tokens = Counter(f"{_NS}_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            f"{_NS}_time_to_first_token_seconds", "Time to first token", buckets=_TTFT_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            f"{_NS}_time_per_output_token_seconds",
            "Latency of each decoded token after the first",
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.parity = Counter(
            f"{_NS}_parity_checks", "Parity checks against the reference", ["kind", "result"], registry=r
        )
        self.parity_max_abs = Gauge(
            f"{_NS}_parity_max_abs", "max|Δlogits| of the latest check", ["kind"], registry=r
        )
        self.inflight = Gauge(f"{_NS}_inflight_generations", "Generations in progress", registry=r)
        self.ready = Gauge(f"{_NS}_ready", "1 when health is SERVING", registry=r)
        self.queue_depth = Gauge(f"{_NS}_queue_depth", "Requests waiting for the scheduler", registry=r)
        self.queue_wait_s = Histogram(
            f"{_NS}_queue_wait_seconds",
            "From submit to admission into a batch",
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            f"{_NS}_batch_size", "Rows per forward", ["kind"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.step_s = Histogram(
            f"{_NS}_step_seconds", "Duration of one forward", ["kind"], buckets=_TTFT_BUCKETS, registry=r
        )
        self.backend_failures = Counter(f"{_NS}_backend_failures", "Forwards that raised", registry=r)
        self.joined = Counter(f"{_NS}_rows_joined", "Rows that joined the running batch", registry=r)
        self.removed = Counter(f"{_NS}_rows_removed", "Rows that left the running batch", registry=r)
        self.tokens_per_s = Gauge(
            f"{_NS}_tokens_per_second", "Decoded tokens per second (last ~5 s)", registry=r
        )
        self._rate_lock = threading.Lock()
        self._decoded: deque[tuple[float, int]] = deque()  # (time, rows) of recent decode steps
        self._decoded_rows = 0  # the sum of their rows
        self._shadow_dropped: _ShadowDropped | None = None
        self._http: Any = None

    # --- recording -----------------------------------------------------------------------------
    def request(self, method: str) -> None:
        self.requests.labels(method=method).inc()

    def error(self, method: str, code: str) -> None:
        self.errors.labels(method=method, code=code).inc()

    def generation(
        self,
        finish_reason: str,
        prompt_tokens: int,
        completion_tokens: int,
        ttft_s: float | None,
        per_token_s: Iterable[float],
    ) -> None:
        self.generations.labels(finish_reason=finish_reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(completion_tokens)
        if ttft_s is not None and completion_tokens > 0:
            self.ttft.observe(ttft_s)
        for t in per_token_s:
            self.tpot.observe(t)

    def step(self, kind: str, rows: int, seconds: float) -> None:
        """One forward of the scheduler: ``kind`` is prefill or decode."""
        self.batch_size.labels(kind=kind).observe(rows)
        self.step_s.labels(kind=kind).observe(seconds)
        if kind == "decode":
            now = time.monotonic()
            with self._rate_lock:
                self._decoded.append((now, rows))
                self._decoded_rows += rows
                while self._decoded and now - self._decoded[0][0] > _RATE_WINDOW_S:
                    self._decoded_rows -= self._decoded.popleft()[1]
                span = max(now - self._decoded[0][0], seconds, 1e-6)
                self.tokens_per_s.set(self._decoded_rows / span)

    def queue_wait(self, seconds: float) -> None:
        self.queue_wait_s.observe(seconds)

    def rows_joined(self, n: int) -> None:
        self.joined.inc(n)

    def rows_removed(self, n: int) -> None:
        self.removed.inc(n)

    def parity_result(self, kind: str, passed: bool, max_abs: float | None = None) -> None:
        self.parity.labels(kind=kind, result="pass" if passed else "fail").inc()
        if max_abs is not None:
            self.parity_max_abs.labels(kind=kind).set(max_abs)

    def track_shadow_dropped(self, read: Callable[[], int]) -> None:
        if self._shadow_dropped is None:
            self._shadow_dropped = _ShadowDropped(read)
            self.registry.register(self._shadow_dropped)

    # --- reading -------------------------------------------------------------------------------
    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's current value (0.0 when absent), e.g. ``value("gpt2_deploy_requests_total")``."""
        v = self.registry.get_sample_value(name, labels or {})
        return 0.0 if v is None else v

    # --- HTTP endpoint -------------------------------------------------------------------------
    def start_http(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``addr:port`` (0 picks a free port); return the bound port."""
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        self._http = server
        return server.server_address[1]

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
