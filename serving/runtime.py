"""What a server serves: one bundle on one backend, its scheduler, tokenizer and parity checks.

The gRPC servicers (``serving.servicer`` for our API, ``serving.kserve`` for KServe v2) are thin
async translations of protobuf messages to calls on a ``ModelRuntime``; everything they share
lives here: readiness, the backend's ``Scheduler`` (every request that needs the model is a row
there: generations, Score, the KServe forward, CheckParity, the canary and shadow checks),
metrics of finished generations, the lazily loaded torch reference, the canary and shadow parity.

Concurrency: the scheduler thread owns the backend; the servicers run on the server's event loop
and await their rows' events (no OS thread waits on a stream). Work that needs no backend runs
off the scheduler thread: detokenising and stop strings in the awaiting coroutine, log-softmax of
Score and the torch reference of CheckParity in worker threads.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from typing import Any

import numpy as np

from export.compare import Tolerance
from export.manifest import Bundle
from serving.backends.base import Backend
from serving.errors import OutOfRange, Unavailable
from serving.generation import (
    Completion,
    FinalEvent,
    GenerationRequest,
    Generator,
    ScoreResult,
    TokenEvent,
    score_logits,
)
from serving.metrics import ServerMetrics
from serving.scheduler import CANCELLED, ERROR, Done, Scheduler, SchedulerOptions, Ticket, Token, Work
from serving.tokenizer import Tokenizer

log = logging.getLogger("serving.runtime")

PARITY_MODES = ("off", "warn", "strict")
# What the startup canary compares with: the bundle's golden record (PyTorch's answers stored at
# export; no torch needed), the live torch reference, or auto (golden when the bundle has one).
CANARY_REFERENCES = ("auto", "golden", "torch")

# Repeated backend failures within a window turn health NOT_SERVING (the replica needs a restart).
FAULT_LIMIT, FAULT_WINDOW_S = 5, 60.0

# Lifecycle states (``ModelRuntime.state``).
LOADING, SERVING, NOT_SERVING, STOPPING, STOPPED = (
    "loading",
    "serving",
    "not_serving",
    "stopping",
    "stopped",
)


class ModelRuntime:
    """One bundle served by one backend through one scheduler.

    Args:
        bundle: The opened bundle.
        backend: A backend for it (constructed; ``load()`` loads it).
        metrics: Where generations, scheduler steps and parity results are recorded.
        scheduler: The scheduler's knobs.
        tolerance: What "matches the reference" means for this backend (canary, CheckParity,
            shadow). None (default) takes it from the loaded backend (``serving.parity.served_tolerance``:
            a TensorRT engine's own precision, else the bundle's precision and the device).
        max_new_tokens_limit: Largest max_new_tokens a request may ask for.
        reference_device: Device of the torch reference used by the parity checks.
        max_response_bytes: Largest response the server may send (full-vocabulary logits are
            checked against it before they are computed).
        parity_mode: off, warn or strict (reported by ModelInfo; the server acts on it).
        max_prompt_bytes: Prompt text longer than this is refused before it is tokenised. None
            (default): the most the context can hold, context x the longest token's bytes.
        canary_reference: auto, golden or torch (``CANARY_REFERENCES``).
        close_timeout_s: How long ``close`` waits for a running forward before leaving the
            backend open (rather than closing it under the step).
    """

    def __init__(
        self,
        bundle: Bundle,
        backend: Backend,
        *,
        metrics: ServerMetrics,
        scheduler: SchedulerOptions | None = None,
        tolerance: Tolerance | None = None,
        max_new_tokens_limit: int = 4096,
        reference_device: str = "cpu",
        max_response_bytes: int = 256 << 20,
        parity_mode: str = "warn",
        canary_reference: str = "auto",
        max_prompt_bytes: int | None = None,
        close_timeout_s: float = 30.0,
    ):
        self.bundle = bundle
        self.backend = backend
        self.metrics = metrics
        self.scheduler_options = scheduler or SchedulerOptions()
        self.tolerance = tolerance
        self.max_new_tokens_limit = max_new_tokens_limit
        self.reference_device = reference_device
        self.max_response_bytes = max_response_bytes
        self.parity_mode = parity_mode
        self.canary_reference = canary_reference
        self.max_prompt_bytes = max_prompt_bytes
        self.close_timeout_s = close_timeout_s
        self.tokenizer: Tokenizer | None = None
        self.generator: Generator | None = None
        self.scheduler: Scheduler | None = None
        self.state = LOADING
        self.canary: str = "not run"
        self.canary_report: Any = None
        self.shadow: Any = None  # serving.parity.ShadowParity when --shadow-rate > 0
        self._closing = False
        self.not_serving_reason: str | None = None  # why state is NOT_SERVING (canary or faults)
        self.on_not_serving: Callable[[str, bool], None] | None = None  # set by the server
        self._faults: deque[float] = deque()
        self._ref_lock = threading.Lock()
        self._reference: Backend | None = None
        self._reference_scheduler: Scheduler | None = None

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
        """Load the backend and the tokenizer, start the scheduler (the slow part of startup).

        Raises:
            BundleError: the bundle's tokenizer cannot be read.
            (and what the backend's ``load`` raises)
        """
        from export.manifest import BundleError

        self.backend.load()
        if self.tolerance is None:
            from serving.parity import served_tolerance

            self.tolerance = served_tolerance(self.backend)
        try:
            self.tokenizer = Tokenizer.from_dir(self.bundle.tokenizer_dir)
        except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exceptions on bad files
            raise BundleError(self.bundle.tokenizer_dir, [f"cannot read the tokenizer: {e}"]) from None
        self.scheduler = Scheduler(self.backend, self.scheduler_options, metrics=self.metrics)
        self.scheduler.on_failure(self._on_backend_failure)
        self.scheduler.start()
        self.generator = Generator(
            self.backend,
            self.tokenizer,
            max_new_tokens_limit=self.max_new_tokens_limit,
            scheduler=self.scheduler,
        )
        log.info("loaded %s on %s (max batch %d)", self.name, self.backend.info(), self.scheduler.max_batch)

    def reference(self) -> Scheduler:
        """The torch reference backend's scheduler, loaded on first use (imports torch).

        Raises:
            MissingDependencyError: torch/transformers are not installed.
        """
        with self._ref_lock:
            if self._reference_scheduler is None:
                from serving.parity import reference_backend

                self._reference = reference_backend(self.bundle, device=self.reference_device)
                self._reference_scheduler = Scheduler(self._reference, name="reference").start()
            return self._reference_scheduler

    def start_shadow(self, rate: float, queue_size: int = 64) -> None:
        """Start re-running a fraction ``rate`` of finished generations on the reference.

        The worker teacher-forces each sampled request through the reference and, as background
        rows, through the served scheduler (so checks share batches with live traffic).
        """
        from serving.parity import ShadowParity

        def on_result(report: Any) -> None:
            self.metrics.parity_result("shadow", bool(report), getattr(report, "max_abs", None))

        scheduler, _, tolerance = self._parts()
        shadow = ShadowParity(
            self.reference(), tolerance, rate, queue_size=queue_size, on_result=on_result, served=scheduler
        )
        self.shadow = shadow
        self.metrics.track_shadow_dropped(lambda: int(shadow.dropped))
        shadow.start()

    def _on_backend_failure(self, exc: BaseException) -> None:
        """A forward failed (on the scheduler thread): count it; too many in the window and the
        runtime stops serving, says why (ModelInfo, the log, UNAVAILABLE) and asks for a restart."""
        now = time.monotonic()
        self._faults.append(now)
        while self._faults and now - self._faults[0] > FAULT_WINDOW_S:
            self._faults.popleft()
        self.metrics.backend_failures.inc()
        if len(self._faults) < FAULT_LIMIT or self.state != SERVING:
            return
        reason = (
            f"{len(self._faults)} backend failures in the last {FAULT_WINDOW_S:.0f} s (the last: "
            f"{type(exc).__name__}: {str(exc)[:200]}); restart the server"
        )
        self.state, self.not_serving_reason = NOT_SERVING, reason
        log.error("the %s backend keeps failing: health NOT_SERVING: %s", self.backend.name, reason)
        if self.on_not_serving is not None:
            self.on_not_serving(reason, True)

    def close(self, timeout: float | None = None) -> None:
        """Stop shadow parity and the schedulers, close the backends (after the server stopped).

        Requests still queued get UNAVAILABLE. A forward still running after ``timeout``
        (default ``close_timeout_s``) keeps its backend: it is left open (freed at exit), not
        closed under the step.
        """
        timeout = self.close_timeout_s if timeout is None else timeout
        self._closing = True
        self.state = STOPPED
        shadow_done = self.shadow.stop(timeout) if self.shadow is not None else True
        if self.scheduler is not None and not self.scheduler.stop(timeout):
            log.error(
                "a %s forward is still running after %.0f s; leaving the backend open rather than "
                "closing it under the step",
                self.backend.name,
                self.close_timeout_s,
            )
        else:
            self.backend.close()
        with self._ref_lock:
            if self._reference_scheduler is not None and shadow_done:
                if self._reference_scheduler.stop(timeout) and self._reference is not None:
                    self._reference.close()
                self._reference_scheduler = self._reference = None

    def _parts(self) -> tuple[Scheduler, Tokenizer, Tolerance]:
        """The scheduler, tokenizer and tolerance ``load()`` set up (Unavailable before)."""
        if self.scheduler is None or self.tokenizer is None or self.tolerance is None:
            raise Unavailable(f"model {self.name!r} is {self.state}; retry when health is SERVING")
        return self.scheduler, self.tokenizer, self.tolerance

    def _require_loaded(self) -> Generator:
        if self.generator is None or self._closing or self.state in (LOADING, STOPPED):
            state = STOPPED if self._closing else self.state
            raise Unavailable(f"model {self.name!r} is {state}; retry when health is SERVING")
        return self.generator

    def _require_serving(self) -> Generator:
        """Loaded, and not held back by a failed canary: what inference requests need."""
        generator = self._require_loaded()
        if self.state == NOT_SERVING and self.not_serving_reason is not None:
            raise Unavailable(f"model {self.name!r} is NOT_SERVING: {self.not_serving_reason}")
        if self.state == NOT_SERVING:
            why = summary(self.canary_report) if self.canary_report is not None else self.canary
            raise Unavailable(
                f"model {self.name!r} is NOT_SERVING: the startup parity canary failed ({why}); "
                "inference is refused until the backend matches the reference (ModelInfo and "
                "CheckParity still answer); restart the server with --parity off to serve anyway"
            )
        return generator

    # --- parity (blocking: servicers run these in worker threads) ------------------------------
    def canary_source(self) -> str:
        """golden or torch: what the startup canary compares with (``canary_reference`` resolved)."""
        if self.canary_reference == "auto":
            return "golden" if self.bundle.has_golden else "torch"
        return self.canary_reference

    def run_canary(self, cancelled: Callable[[], bool] | None = None) -> Any:
        """Teacher-force the canary prompts through the served scheduler and compare them with the
        bundle's golden record or the live torch reference (``canary_source``).

        Raises:
            Cancelled: ``cancelled()`` returned True (the server is being stopped).
            BundleError: golden was asked for and the bundle has no (valid) record.
            MissingDependencyError: torch was asked for (or auto without a record) and is absent.
        """
        from serving.parity import golden_canary, run_canary

        scheduler, tokenizer, tolerance = self._parts()
        if self.canary_source() == "golden":
            report = golden_canary(scheduler, self._golden_record(), tolerance, cancelled)
        else:
            report = run_canary(scheduler, self.reference(), tokenizer, tolerance, cancelled=cancelled)
        self.canary_report = report
        self.canary = "passed" if report else "failed"
        self.metrics.parity_result("canary", bool(report), getattr(report, "max_abs", None))
        return report

    def _golden_record(self) -> Any:
        from serving.parity import golden_record

        return golden_record(self.bundle)

    def check_parity(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        cancelled: Callable[[], bool] = lambda: False,
        *,
        batched: bool = False,
    ) -> Any:
        """Whole-generation teacher-forced parity for one prompt (the CheckParity RPC).

        Allowed while NOT_SERVING (it is how a failed canary is investigated). The served rows
        run at background priority: alone (default) or, with ``batched``, alone and then in a
        batch with companion rows, compared with each other and with the reference.

        Raises:
            Cancelled: ``cancelled()`` turned True.
        """
        from serving.parity import batched_parity, check_generation_parity

        generator = self._require_loaded()
        generator.validate(GenerationRequest(prompt_ids=prompt_ids, max_new_tokens=max_new_tokens))
        scheduler, tokenizer, tolerance = self._parts()
        reference = self.reference()
        check = batched_parity if batched else check_generation_parity
        report: Any = check(
            scheduler, reference, tokenizer, prompt_ids, max_new_tokens, tolerance, cancelled, background=True
        )
        self.metrics.parity_result("rpc", bool(report), getattr(report, "max_abs", None))
        return report

    # --- requests (awaited on the server's event loop) -----------------------------------------
    def _context(self) -> int:
        return min(self.bundle.dims.n_positions, self.backend.limits.max_context)

    def _prompt_limit(self) -> tuple[int, Tokenizer]:
        _, tokenizer, _ = self._parts()
        limit = self.max_prompt_bytes
        return (self._context() * tokenizer.max_token_bytes if limit is None else limit), tokenizer

    def check_prompt_size(self, nbytes: int) -> None:
        """Refuse prompt text that cannot fit the context before anything tokenises it."""
        limit, tokenizer = self._prompt_limit()
        if nbytes > limit:
            raise OutOfRange(
                f"the prompt has {nbytes} bytes; at most {limit} are accepted (what the context of "
                f"{self._context()} tokens can hold at {tokenizer.max_token_bytes} bytes per token at most; "
                "gpt2-deploy serve --max-prompt-bytes sets the limit)"
            )

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, refusing text too long for the context before tokenising it."""
        self._require_loaded()
        limit, tokenizer = self._prompt_limit()
        if len(text) > limit // 4:  # a character is 1-4 UTF-8 bytes
            self.check_prompt_size(len(text) if len(text) > limit else len(text.encode()))
        return tokenizer.encode(text)

    def check_token_count(self, n: int, what: str = "the prompt") -> None:
        """Refuse a token id list longer than the context before it is copied."""
        if n > self._context():
            raise OutOfRange(f"{what} has {n} token ids; the context holds {self._context()}")

    def _submit(self, works: list[Work]) -> tuple[list[Ticket], list[asyncio.Queue]]:
        """Submit rows whose events land in asyncio queues of the running loop."""
        loop = asyncio.get_running_loop()
        queues: list[asyncio.Queue] = [asyncio.Queue() for _ in works]

        def sink_for(q: asyncio.Queue) -> Callable[[Any], None]:
            def sink(event: Any) -> None:
                loop.call_soon_threadsafe(q.put_nowait, event)

            return sink

        scheduler, _, _ = self._parts()
        tickets = scheduler.submit_group([(w, sink_for(q)) for w, q in zip(works, queues, strict=True)])
        return tickets, queues

    def generate(self, req: GenerationRequest) -> AsyncIterator[TokenEvent | FinalEvent]:
        """Validate ``req`` (raising at once, before anything is streamed), then stream its events.

        The row leaves the batch when the generation ends, is cancelled, or this iterator is
        closed (a client that goes away cancels the awaiting task, which closes it).

        Raises:
            Unavailable: not loaded, closing, or NOT_SERVING after a failed canary.
            ResourceExhausted: the scheduler's queue is full.
        """
        started = time.perf_counter()  # time to first token includes the queueing
        generator = self._require_serving()
        generator.validate(req)
        (ticket,), (q,) = self._submit([generator.work(req)])
        return self._stream(req, ticket, q, started)

    async def _stream(
        self, req: GenerationRequest, ticket: Ticket, q: asyncio.Queue, started: float
    ) -> AsyncIterator[TokenEvent | FinalEvent]:
        completion = Completion(req, self._parts()[1], ticket, started)
        outcome = CANCELLED  # unless it finishes or fails: the consumer went away
        self.metrics.inflight.inc()
        try:
            while completion.final is None:
                event = await q.get()
                try:
                    produced = completion.feed(event)
                except Exception:
                    outcome = ERROR
                    raise
                for out in produced:
                    yield out
        finally:
            self.metrics.inflight.dec()
            ticket.cancel()  # a no-op when the row already ended
            final = completion.final
            if final is None:
                self.metrics.generation(outcome, len(req.prompt_ids), len(completion.tokens), None, [])
            else:
                self.metrics.generation(
                    final.finish_reason,
                    final.prompt_tokens,
                    final.completion_tokens,
                    final.time_to_first_token_s,
                    final.per_token_s,
                )
                if self.shadow is not None and final.finish_reason != CANCELLED and final.token_ids:
                    self.shadow.maybe_submit(
                        list(req.prompt_ids),
                        list(final.token_ids),
                        greedy=req.sampling.greedy,
                        batch_sizes=final.batch_sizes,
                    )

    async def _logits(self, rows: list[list[int]]) -> list[np.ndarray]:
        """Logits (S_i, V) of every position of each sequence, as scheduler rows."""
        works = [Work(prompt_ids=[int(i) for i in r], forced_ids=[], return_logits=True) for r in rows]
        tickets, queues = self._submit(works)
        out = []
        try:
            for q in queues:
                logits = None
                while True:
                    event = await q.get()
                    if isinstance(event, Token):
                        logits = event.logits
                        continue
                    if event.reason == ERROR:
                        raise event.error or RuntimeError("the forward failed")
                    if logits is None:
                        raise Unavailable(f"the forward ended without logits ({event.reason})")
                    break
                out.append(logits)
        finally:
            for t in tickets:
                t.cancel()
        return out

    async def score(self, ids: list[int], top_k: int = 0) -> ScoreResult:
        """Logits or top-k log-probabilities at every position; log-softmax in a worker thread."""
        generator = self._require_serving()
        generator.check_score(ids, top_k)
        if top_k == 0:
            self._check_response_size(
                len(ids) * self.bundle.dims.vocab_size * 4,
                "Score logits",
                "ask for top_k > 0 instead of the full logits",
            )
        (logits,) = await self._logits([ids])
        return await asyncio.to_thread(score_logits, logits, ids, top_k)

    async def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray | None) -> np.ndarray:
        """Logits (B, S, V) float32 of one forward without a past (KServe's single forward).

        Each row runs as a scheduler row over its real tokens (``attention_mask`` 1), which is
        exact for a causal decoder with position ids counting real tokens; padding positions
        get zero logits.
        """
        generator = self._require_serving()
        b, s = input_ids.shape
        self._check_response_size(
            b * s * self.bundle.dims.vocab_size * 4, "logits", "send fewer tokens per request"
        )
        mask = np.ones_like(input_ids, dtype=np.int64) if attention_mask is None else attention_mask
        rows = [input_ids[i][mask[i] == 1].tolist() for i in range(b)]
        for r in rows:
            generator.check_score(r, 0)
        per_row = await self._logits(rows)
        out = np.zeros((b, s, self.bundle.dims.vocab_size), dtype=np.float32)
        for i, logits in enumerate(per_row):
            out[i, mask[i] == 1] = logits
        return out

    def _check_response_size(self, nbytes: int, what: str, hint: str) -> None:
        if nbytes > self.max_response_bytes:
            raise OutOfRange(
                f"{what} would take {nbytes / 2**20:.1f} MiB, above the server's message limit of "
                f"{self.max_response_bytes / 2**20:.0f} MiB; {hint} (or start the server with a "
                "larger --max-message-mb)"
            )

    # --- info ----------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        m = self.bundle.manifest
        backend_info: dict[str, Any] = (
            self.backend.info() if self.backend.is_loaded else {"backend": self.backend.name}
        )
        if self.backend.is_loaded:
            backend_info["limits"] = self.backend.limits.to_json()
        if self.scheduler is not None:
            backend_info["scheduler"] = {
                "max_batch": self.scheduler.max_batch,
                **asdict(self.scheduler_options),
            }
        return {
            "name": m.name,
            "source": m.source,
            "precision": m.precision,
            "backend": self.backend.name,
            "device": self.backend.options.device,
            "dims": m.dims,
            "state": self.state,
            "not_serving_reason": self.not_serving_reason,
            "canary": self.canary,
            "backend_info": backend_info,
        }


def summary(report: Any) -> str:
    """One line for logs: verdict, max|Δlogits|, top-1 agreement, first diverging step."""
    return report.summary() if hasattr(report, "summary") else str(report).splitlines()[0]


__all__ = ["LOADING", "NOT_SERVING", "PARITY_MODES", "SERVING", "STOPPED", "STOPPING", "Done", "ModelRuntime"]
