"""What a server serves: one bundle on one backend, with its tokenizer, generator and parity.

The gRPC servicers (``serving.servicer`` for our API, ``serving.kserve`` for KServe v2) are thin
translations of protobuf messages to calls on a ``ModelRuntime``; everything they share lives
here: readiness, the per-step backend lock, metrics of finished generations, the lazily loaded
torch reference for ``CheckParity``, the startup canary and shadow parity.

Concurrency: requests run on the server's worker threads.

- Admission: a generation (or a Score, KServe forward, CheckParity, canary or shadow check) first
  takes one of the backend's ``max_concurrent_caches`` KV-cache places (unlimited for the CPU
  backends; the TensorRT backend's KV slots) for its whole lifetime, waiting at most
  ``admission_timeout_s`` and otherwise failing with UNAVAILABLE. This wait happens before, never
  while, holding the backend lock, so the generations owning the places keep stepping and free them.
- The backend lock (``_lock``) is held for one forward step at a time (the prefill, or one decoded
  token), so concurrent streams interleave token by token instead of waiting for each other.
  Work that needs no backend (sampling, log-softmax, the torch reference of a parity check) runs
  outside it. After taking the lock a step re-checks that the runtime is not closing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from export.compare import Tolerance
from export.contract import left_padded_positions
from export.manifest import Bundle
from serving.backends.base import Backend
from serving.errors import OutOfRange, Unavailable
from serving.generation import (
    FinalEvent,
    GenerationRequest,
    Generator,
    ScoreResult,
    TokenEvent,
)
from serving.metrics import ServerMetrics
from serving.tokenizer import Tokenizer

log = logging.getLogger("serving.runtime")

PARITY_MODES = ("off", "warn", "strict")

# Lifecycle states (``ModelRuntime.state``).
LOADING, SERVING, NOT_SERVING, STOPPING, STOPPED = (
    "loading",
    "serving",
    "not_serving",
    "stopping",
    "stopped",
)


class ModelRuntime:
    """One bundle served by one backend.

    Args:
        bundle: The opened bundle.
        backend: A backend for it (constructed; ``load()`` loads it).
        metrics: Where generations and parity results are recorded.
        tolerance: What "matches the reference" means for this backend (canary, CheckParity,
            shadow). None (default) takes it from the loaded backend (``serving.parity.served_tolerance``:
            a TensorRT engine's own precision, else the bundle's precision and the device).
        max_new_tokens_limit: Largest max_new_tokens a request may ask for.
        reference_device: Device of the torch reference used by the parity checks.
        max_response_bytes: Largest response the server may send (full-vocabulary logits are
            checked against it before they are computed).
        parity_mode: off, warn or strict (reported by ModelInfo; the server acts on it).
        admission_timeout_s: How long a request waits for one of the backend's
            ``max_concurrent_caches`` places before it fails with UNAVAILABLE.
        close_timeout_s: How long ``close`` waits for a running forward step before giving up
            on closing the backend (it is then left open rather than closed under the step).
    """

    def __init__(
        self,
        bundle: Bundle,
        backend: Backend,
        *,
        metrics: ServerMetrics,
        tolerance: Tolerance | None = None,
        max_new_tokens_limit: int = 4096,
        reference_device: str = "cpu",
        max_response_bytes: int = 256 << 20,
        parity_mode: str = "warn",
        admission_timeout_s: float = 30.0,
        close_timeout_s: float = 30.0,
    ):
        self.bundle = bundle
        self.backend = backend
        self.metrics = metrics
        self.tolerance = tolerance
        self.max_new_tokens_limit = max_new_tokens_limit
        self.reference_device = reference_device
        self.max_response_bytes = max_response_bytes
        self.parity_mode = parity_mode
        self.admission_timeout_s = admission_timeout_s
        self.close_timeout_s = close_timeout_s
        self.tokenizer: Tokenizer | None = None
        self.generator: Generator | None = None
        self.state = LOADING
        self.canary: str = "not run"
        self.canary_report: Any = None
        self.shadow: Any = None  # serving.parity.ShadowParity when --shadow-rate > 0
        self._lock = threading.Lock()  # one forward at a time on the served backend
        self._closing = False  # set by close(); checked under _lock by every step
        self._admission: threading.BoundedSemaphore | None = None  # set by load()
        self.admission_limit: int | None = None
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
        """Load the backend and the tokenizer (the slow part of startup).

        Raises:
            BundleError: the bundle's tokenizer cannot be read.
            (and what the backend's ``load`` raises)
        """
        from export.manifest import BundleError

        self.backend.load()
        if self.tolerance is None:
            from serving.parity import served_tolerance

            self.tolerance = served_tolerance(self.backend)
        self.admission_limit = self.backend.max_concurrent_caches
        if self.admission_limit is not None:
            self._admission = threading.BoundedSemaphore(self.admission_limit)
        try:
            self.tokenizer = Tokenizer.from_dir(self.bundle.tokenizer_dir)
        except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exceptions on bad files
            raise BundleError(f"cannot read the tokenizer in {self.bundle.tokenizer_dir}: {e}") from None
        self.generator = Generator(
            self.backend, self.tokenizer, max_new_tokens_limit=self.max_new_tokens_limit
        )
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
        backend (logit-level comparison). Like a live stream, it is admitted for each check and
        takes the served backend's lock one step at a time, so it never runs a forward
        concurrently with one.
        """
        from serving.parity import ShadowParity

        def on_result(report: Any) -> None:
            self.metrics.parity_result("shadow", bool(report), getattr(report, "max_abs", None))

        self.shadow = ShadowParity(
            self.reference(),
            self.tolerance,
            rate,
            queue_size=queue_size,
            on_result=on_result,
            served=self._locked_backend(),
            guard=self._admitted,
        )
        self.metrics.track_shadow_dropped(lambda: int(self.shadow.dropped))
        self.shadow.start()

    def close(self) -> None:
        """Stop shadow parity and close the backends (after the server stopped).

        Requests still queued for the backend get UNAVAILABLE. A step still running after
        ``close_timeout_s`` keeps its backend: it is left open (freed at exit), not closed under
        a running forward.
        """
        self._closing = True
        self.state = STOPPED
        shadow_done = self.shadow.stop() if self.shadow is not None else True
        # A stream cut at the end of the grace period may still be inside a step: let it finish
        # (its next step sees the closing flag) before the backend goes away.
        if self._lock.acquire(timeout=self.close_timeout_s):
            try:
                self.backend.close()
            finally:
                self._lock.release()
        else:
            log.error(
                "a %s forward step is still running after %.0f s; leaving the backend open "
                "rather than closing it under the step",
                self.backend.name,
                self.close_timeout_s,
            )
        with self._ref_lock:
            if self._reference is not None and shadow_done:
                self._reference.close()
                self._reference = None

    def _require_loaded(self) -> Generator:
        if self.generator is None or self._closing or self.state in (LOADING, STOPPED):
            state = STOPPED if self._closing else self.state
            raise Unavailable(f"model {self.name!r} is {state}; retry when health is SERVING")
        return self.generator

    def _require_serving(self) -> Generator:
        """Loaded, and not held back by a failed canary: what inference requests need."""
        generator = self._require_loaded()
        if self.state == NOT_SERVING:
            why = summary(self.canary_report) if self.canary_report is not None else self.canary
            raise Unavailable(
                f"model {self.name!r} is NOT_SERVING: the startup parity canary failed ({why}); "
                "inference is refused until the backend matches the reference (ModelInfo and "
                "CheckParity still answer); restart the server with --parity off to serve anyway"
            )
        return generator

    @contextmanager
    def _admitted(self) -> Iterator[None]:
        """Hold one of the backend's KV-cache places (see the module docstring) for the block."""
        sem = self._admission
        if sem is None:
            yield
            return
        if not sem.acquire(timeout=self.admission_timeout_s):
            raise Unavailable(
                f"the {self.backend.name} backend holds at most {self.admission_limit} KV cache(s) at "
                f"once and all are in use by running requests (waited {self.admission_timeout_s:g} s); "
                "retry later, or raise the limit (gpt2-deploy serve --kv-slots N)"
            )
        try:
            yield
        finally:
            sem.release()

    @contextmanager
    def _backend_turn(self) -> Iterator[None]:
        """The backend lock for one step; refuses once the runtime is closing."""
        with self._lock:
            if self._closing:
                raise Unavailable(f"model {self.name!r} is shutting down; retry on another server")
            yield

    def _locked_backend(self) -> _Locked:
        return _Locked(self.backend, self._backend_turn)

    # --- parity --------------------------------------------------------------------------------
    def run_canary(self, cancelled: Callable[[], bool] | None = None) -> Any:
        """Teacher-force the canary prompts through the served backend and the reference.

        Raises:
            Cancelled: ``cancelled()`` returned True (the server is being stopped).
        """
        from serving.parity import run_canary

        reference = self.reference()
        with self._admitted():
            report = run_canary(
                self._locked_backend(), reference, self.tokenizer, self.tolerance, cancelled=cancelled
            )
        self.canary_report = report
        self.canary = "passed" if report else "failed"
        self.metrics.parity_result("canary", bool(report), getattr(report, "max_abs", None))
        return report

    def check_parity(
        self, prompt_ids: list[int], max_new_tokens: int, cancelled: Callable[[], bool] = lambda: False
    ) -> Any:
        """Whole-generation teacher-forced parity for one prompt (the CheckParity RPC).

        Allowed while NOT_SERVING (it is how a failed canary is investigated). The reference runs
        outside the backend lock; the served backend is taken one step at a time.

        Raises:
            Cancelled: ``cancelled()`` turned True (checked before every step).
        """
        from serving.parity import check_generation_parity

        generator = self._require_loaded()
        generator.validate(GenerationRequest(prompt_ids=prompt_ids, max_new_tokens=max_new_tokens))
        reference = self.reference()
        with self._admitted():
            report = check_generation_parity(
                self._locked_backend(),
                reference,
                self.tokenizer,
                prompt_ids,
                max_new_tokens,
                self.tolerance,
                cancelled=cancelled,
            )
        self.metrics.parity_result("rpc", bool(report), getattr(report, "max_abs", None))
        return report

    # --- requests ------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        self._require_loaded()
        return self.tokenizer.encode(text)

    def generate(
        self, req: GenerationRequest, cancelled: Callable[[], bool] = lambda: False
    ) -> Iterator[TokenEvent | FinalEvent]:
        """Validate ``req`` (raising before anything is streamed), then stream its events.

        The generation is admitted (one KV-cache place) before its first step and keeps the place
        until it ends, is cancelled, or this iterator is closed (a client that goes away closes
        it); its KV cache is freed then too.

        Raises:
            Unavailable: not loaded, closing, or NOT_SERVING after a failed canary (at once); no
                KV-cache place freed up in time (at the first step).
        """
        started = time.perf_counter()  # time to first token includes the queueing below
        generator = self._require_serving()
        generator.validate(req)
        return self._generate(generator, req, cancelled, started)

    def _generate(
        self, generator: Generator, req: GenerationRequest, cancelled: Callable[[], bool], started: float
    ) -> Iterator[TokenEvent | FinalEvent]:
        final: FinalEvent | None = None
        n_tokens = 0
        outcome = "cancelled"  # unless it finishes or fails: the consumer went away between steps
        self.metrics.inflight.inc()
        try:
            with self._admitted():
                events = generator.stream(req, cancelled, started_at=started)
                try:
                    while True:
                        with self._backend_turn():  # one step: the prefill, or one decoded token
                            event = next(events, None)
                        if event is None:
                            break
                        if isinstance(event, FinalEvent):
                            final = event
                        else:
                            n_tokens += len(event.token_ids)
                        yield event
                finally:
                    events.close()  # drops the request's KV cache now, before its place is freed
        except Exception:
            outcome = "error"
            raise
        finally:
            self.metrics.inflight.dec()
            if final is None:
                self.metrics.generation(outcome, len(req.prompt_ids), n_tokens, None, [])
            else:
                self.metrics.generation(
                    final.finish_reason,
                    final.prompt_tokens,
                    final.completion_tokens,
                    final.time_to_first_token_s,
                    final.per_token_s,
                )
                if self.shadow is not None and final.finish_reason != "cancelled" and final.token_ids:
                    self.shadow.maybe_submit(
                        list(req.prompt_ids), list(final.token_ids), greedy=req.sampling.greedy
                    )

    def score(self, ids: list[int], top_k: int = 0) -> ScoreResult:
        """``Generator.score`` with only the forward under the backend lock."""
        generator = self._require_serving()
        generator.check_score(ids, top_k)
        if top_k == 0:
            self._check_response_size(
                len(ids) * self.bundle.dims.vocab_size * 4,
                "Score logits",
                "ask for top_k > 0 instead of the full logits",
            )
        with self._admitted():
            return generator.score(ids, top_k, turn=self._backend_turn)

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray | None) -> np.ndarray:
        """Logits (B, S, V) float32 of one forward without a past (KServe's single forward).

        Left padding is expressed by ``attention_mask``; position ids count real tokens only.
        """
        self._require_serving()
        b, s = input_ids.shape
        self._check_response_size(
            b * s * self.bundle.dims.vocab_size * 4, "logits", "send fewer tokens per request"
        )
        if attention_mask is None:
            attention_mask = np.ones_like(input_ids, dtype=np.int64)
        position_ids = left_padded_positions(attention_mask)
        with self._admitted():
            with self._backend_turn():
                return self.backend.forward(input_ids, attention_mask, position_ids, None).logits

    def _check_response_size(self, nbytes: int, what: str, hint: str) -> None:
        if nbytes > self.max_response_bytes:
            raise OutOfRange(
                f"{what} would take {nbytes / 2**20:.1f} MiB, above the server's "
                f"message limit of {self.max_response_bytes / 2**20:.0f} MiB; {hint} "
                "(or start the server with a larger --max-message-mb)"
            )

    # --- info ----------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        m = self.bundle.manifest
        backend_info = self.backend.info() if self.backend.is_loaded else {"backend": self.backend.name}
        return {
            "name": m.name,
            "source": m.source,
            "precision": m.precision,
            "backend": self.backend.name,
            "device": self.backend.options.device,
            "dims": m.dims,
            "state": self.state,
            "canary": self.canary,
            "backend_info": backend_info,
        }


def summary(report: Any) -> str:
    """One line for logs: verdict, max|Δlogits|, top-1 agreement, first diverging step."""
    return report.summary() if hasattr(report, "summary") else str(report).splitlines()[0]


class _Locked:
    """The served backend as parity checks see it: each forward in its own turn on the backend
    lock (``turn`` is ``ModelRuntime._backend_turn``), so checks interleave with live streams."""

    def __init__(self, backend: Backend, turn: Callable[[], Any]):
        self._backend = backend
        self._turn = turn
        self.name = backend.name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._turn():
            return self._backend.forward(*args, **kwargs)
