"""What a server serves: one bundle on one backend, with its tokenizer, generator and parity.

The gRPC servicers (``serving.servicer`` for our API, ``serving.kserve`` for KServe v2) are thin
translations of protobuf messages to calls on a ``ModelRuntime``; everything they share lives
here: readiness, the per-step backend lock, metrics of finished generations, the lazily loaded
torch reference for ``CheckParity``, the startup canary and shadow parity.

Concurrency: requests run on the server's worker threads. The backend is entered by one thread at
a time (``_lock``) but only for one forward step at a time, so concurrent streams interleave
token by token instead of waiting for each other to finish.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from export.compare import Tolerance
from export.manifest import Bundle
from serving.backends.base import Backend
from serving.errors import OutOfRange, Unavailable
from serving.generation import FinalEvent, GenerationRequest, Generator, ScoreResult, TokenEvent
from serving.metrics import ServerMetrics
from serving.tokenizer import Tokenizer

log = logging.getLogger("serving.runtime")

PARITY_MODES = ("off", "warn", "strict")

# Lifecycle states (``ModelRuntime.state``).
LOADING, SERVING, NOT_SERVING, STOPPING, STOPPED = (
    "loading", "serving", "not_serving", "stopping", "stopped")


class ModelRuntime:
    """One bundle served by one backend.

    Args:
        bundle: The opened bundle.
        backend: A backend for it (constructed; ``load()`` loads it).
        metrics: Where generations and parity results are recorded.
        tolerance: What "matches the reference" means for this backend (canary, CheckParity,
            shadow).
        max_new_tokens_limit: Largest max_new_tokens a request may ask for.
        reference_device: Device of the torch reference used by the parity checks.
        max_response_bytes: Largest response the server may send (full-vocabulary logits are
            checked against it before they are computed).
        parity_mode: off, warn or strict (reported by ModelInfo; the server acts on it).
    """

    def __init__(self, bundle: Bundle, backend: Backend, *, metrics: ServerMetrics,
                 tolerance: Tolerance, max_new_tokens_limit: int = 4096,
                 reference_device: str = "cpu", max_response_bytes: int = 256 << 20,
                 parity_mode: str = "warn"):
        self.bundle = bundle
        self.backend = backend
        self.metrics = metrics
        self.tolerance = tolerance
        self.max_new_tokens_limit = max_new_tokens_limit
        self.reference_device = reference_device
        self.max_response_bytes = max_response_bytes
        self.parity_mode = parity_mode
        self.tokenizer: Tokenizer | None = None
        self.generator: Generator | None = None
        self.state = LOADING
        self.canary: str = "not run"
        self.canary_report: Any = None
        self.shadow: Any = None  # serving.parity.ShadowParity when --shadow-rate > 0
        self._lock = threading.Lock()  # one forward at a time on the served backend
        self._ref_lock = threading.Lock()
        self._reference: Backend | None = None

    # --- lifecycle -----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def loaded(self) -> bool:
        return self.generator is not None

    @property
    def ready(self) -> bool:
        """Loaded and passing (or not running) the canary: what health SERVING means."""
        return self.state == SERVING

    def load(self) -> None:
        """Load the backend and the tokenizer (the slow part of startup)."""
        self.backend.load()
        self.tokenizer = Tokenizer.from_dir(self.bundle.tokenizer_dir)
        self.generator = Generator(self.backend, self.tokenizer,
                                   max_new_tokens_limit=self.max_new_tokens_limit)
        log.info("loaded %s on %s", self.name, self.backend.info())

    def reference(self) -> Backend:
        """The torch reference backend, loaded on first use (imports torch).

        Raises:
            MissingDependencyError: torch/transformers are not installed.
        """
        with self._ref_lock:
            if self._reference is None:
                from serving.parity import reference_backend

                self._reference = reference_backend(self.bundle, device=self.reference_device)
            return self._reference

    def start_shadow(self, rate: float, queue_size: int = 64) -> None:
        """Start re-running a fraction ``rate`` of finished generations on the reference.

        The worker teacher-forces each sampled request through the reference and the served
        backend (logit-level comparison). It takes the served backend's lock one step at a time,
        like a live stream, so it never runs a forward concurrently with one.
        """
        from serving.parity import ShadowParity

        def on_result(report: Any) -> None:
            self.metrics.parity_result("shadow", bool(report), getattr(report, "max_abs", None))

        self.shadow = ShadowParity(self.reference(), self.tolerance, rate, queue_size=queue_size,
                                   on_result=on_result, served=_Locked(self.backend, self._lock))
        self.metrics.track_shadow_dropped(lambda: int(self.shadow.dropped))
        self.shadow.start()

    def close(self) -> None:
        """Stop shadow parity and close the backends (after the server stopped)."""
        self.state = STOPPED
        if self.shadow is not None:
            self.shadow.stop()
        # A stream cut at the end of the grace period may still be inside a step: let it finish
        # (its next step sees the cancel) before the backend goes away.
        locked = self._lock.acquire(timeout=30)
        try:
            self.backend.close()
        finally:
            if locked:
                self._lock.release()
        with self._ref_lock:
            if self._reference is not None:
                self._reference.close()
                self._reference = None

    def _require_loaded(self) -> Generator:
        if self.generator is None or self.state in (LOADING, STOPPED):
            raise Unavailable(f"model {self.name!r} is {self.state}; retry when health is SERVING")
        return self.generator

    # --- parity --------------------------------------------------------------------------------
    def run_canary(self) -> Any:
        """Teacher-force the canary prompts through the served backend and the reference."""
        from serving.parity import run_canary

        reference = self.reference()
        with self._lock:
            report = run_canary(self.backend, reference, self.tokenizer, self.tolerance)
        self.canary_report = report
        self.canary = "passed" if report else "failed"
        self.metrics.parity_result("canary", bool(report), getattr(report, "max_abs", None))
        return report

    def check_parity(self, prompt_ids: list[int], max_new_tokens: int) -> Any:
        """Whole-generation teacher-forced parity for one prompt (the CheckParity RPC)."""
        from serving.parity import check_generation_parity

        generator = self._require_loaded()
        generator.validate(GenerationRequest(prompt_ids=prompt_ids, max_new_tokens=max_new_tokens))
        reference = self.reference()
        with self._lock:
            report = check_generation_parity(self.backend, reference, self.tokenizer, prompt_ids,
                                             max_new_tokens, self.tolerance)
        self.metrics.parity_result("rpc", bool(report), getattr(report, "max_abs", None))
        return report

    # --- requests ------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        self._require_loaded()
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        self._require_loaded()
        return self.tokenizer.decode(ids)

    def generate(self, req: GenerationRequest,
                 cancelled: Callable[[], bool] = lambda: False) -> Iterator[TokenEvent | FinalEvent]:
        """Validate ``req`` (raising before anything is streamed), then stream its events.

        The KV cache is freed as soon as the generation ends, is cancelled, or this iterator is
        closed (a client that goes away closes it).
        """
        generator = self._require_loaded()
        generator.validate(req)
        return self._generate(generator, req, cancelled)

    def _generate(self, generator: Generator, req: GenerationRequest,
                  cancelled: Callable[[], bool]) -> Iterator[TokenEvent | FinalEvent]:
        events = generator.stream(req, cancelled)
        final: FinalEvent | None = None
        n_tokens = 0
        outcome = "cancelled"  # unless it finishes or fails: the consumer went away between steps
        self.metrics.inflight.inc()
        try:
            while True:
                with self._lock:  # one step: the prefill, or one decoded token
                    event = next(events, None)
                if event is None:
                    break
                if isinstance(event, FinalEvent):
                    final = event
                else:
                    n_tokens += len(event.token_ids)
                yield event
        except Exception:
            outcome = "error"
            raise
        finally:
            events.close()  # drops the request's KV cache now, not at garbage collection
            self.metrics.inflight.dec()
            if final is None:
                self.metrics.generation(outcome, len(req.prompt_ids), n_tokens, None, [])
            else:
                self.metrics.generation(final.finish_reason, final.prompt_tokens,
                                        final.completion_tokens, final.time_to_first_token_s,
                                        final.per_token_s)
                if self.shadow is not None and final.finish_reason != "cancelled" and final.token_ids:
                    self.shadow.maybe_submit(list(req.prompt_ids), list(final.token_ids),
                                             greedy=req.sampling.greedy)

    def score(self, ids: list[int], top_k: int = 0) -> ScoreResult:
        generator = self._require_loaded()
        if top_k == 0:
            self._check_response_size(len(ids) * self.bundle.dims.vocab_size * 4, "Score logits",
                                      "ask for top_k > 0 instead of the full logits")
        with self._lock:
            return generator.score(ids, top_k)

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray | None) -> np.ndarray:
        """Logits (B, S, V) float32 of one forward without a past (KServe's single forward).

        Left padding is expressed by ``attention_mask``; position ids count real tokens only.
        """
        self._require_loaded()
        b, s = input_ids.shape
        self._check_response_size(b * s * self.bundle.dims.vocab_size * 4, "logits",
                                  "send fewer tokens per request")
        if attention_mask is None:
            attention_mask = np.ones_like(input_ids, dtype=np.int64)
        position_ids = np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None)
        with self._lock:
            out = self.backend.forward(input_ids, attention_mask, position_ids, None)
        return out.logits

    def _check_response_size(self, nbytes: int, what: str, hint: str) -> None:
        if nbytes > self.max_response_bytes:
            raise OutOfRange(f"{what} would take {nbytes / 2**20:.1f} MiB, above the server's "
                             f"message limit of {self.max_response_bytes / 2**20:.0f} MiB; {hint} "
                             "(or start the server with a larger --max-message-mb)")

    # --- info ----------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        m = self.bundle.manifest
        backend_info = self.backend.info() if self.backend.is_loaded else {"backend": self.backend.name}
        return {"name": m.name, "source": m.source, "precision": m.precision,
                "backend": self.backend.name, "device": self.backend.options.device,
                "dims": m.dims, "state": self.state, "canary": self.canary,
                "backend_info": backend_info}


def summary(report: Any) -> str:
    """One line for logs: verdict, max|Δlogits|, top-1 agreement, first diverging step."""
    return report.summary() if hasattr(report, "summary") else str(report).splitlines()[0]


class _Locked:
    """The served backend as the shadow checker sees it: each forward under the server's lock."""

    def __init__(self, backend: Backend, lock: threading.Lock):
        self._backend = backend
        self._lock = lock
        self.name = backend.name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self._backend.forward(*args, **kwargs)
