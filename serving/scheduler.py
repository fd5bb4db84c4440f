"""The batching scheduler: one thread owns a backend and steps every active request together.

    sched = Scheduler(backend, SchedulerOptions(max_batch_size=8)).start()
    ticket = sched.submit(Work(prompt_ids=ids, max_new_tokens=16, eos_token_id=50256), events.put)
    ...   # the sink receives a Token per chosen token, then one Done
    sched.stop()

A request waits in a queue until a step boundary, is prefilled (alone, or grouped with other
waiting requests within a token budget), and its KV cache is joined to the running batch (left
padding to the common past width). Every step then feeds one token per row in one forward. Rows
that finish (length, EOS, stop id), are cancelled or fail are removed at the next boundary by
one ``Backend.select`` that also trims the past to the longest remaining row, so padding never
grows without bound. Sampling runs on this thread between forwards; detokenising and stop
strings run in the request's consumer (``serving.generation.Completion``), which ends a row with
``Ticket.finish``.

Rows marked ``isolated`` run in a batch of their own (parity's solo runs), and ``background``
rows (shadow parity, CheckParity) take a bounded share of the batch: they never starve live
traffic, and live traffic delays them by at most ``background_max_wait_s``.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np

from export.contract import left_padded_positions
from export.errors import OptionsError
from serving.backends.base import Backend, KVCache, StepOutput
from serving.errors import ResourceExhausted, Unavailable
from serving.sampling import SamplingParams, greedy_from_top, reduced_top_k, select_from_top, select_next

log = logging.getLogger("serving.scheduler")

# Why a row ended (``Done.reason``).
LENGTH, EOS, STOP, CANCELLED, ERROR = "length", "eos", "stop", "cancelled", "error"
# Solo runs stepped beside the main batch at once (each is one more forward per step).
MAX_ISOLATED_BATCHES = 2


@dataclass(frozen=True)
class SchedulerOptions:
    """The scheduler's knobs (``gpt2-deploy serve`` flags of the same names).

    Args:
        max_batch_size: Rows stepped together (capped by the backend's own max batch).
        max_batch_tokens: Padded tokens a decode step may hold, rows x (past width + 1): bounds the
            attention cost when long and short requests share a batch.
        max_prefill_tokens: Padded tokens of one prefill forward (rows x longest prompt). A prompt
            longer than this is still prefilled, alone.
        max_wait_ms: While a batch is running, how long waiting requests may wait to be grouped
            into one prefill + join (each join stalls the running rows for one prefill). With
            nothing running, a request starts at once.
        max_queue: Requests waiting to be admitted; one more is refused with RESOURCE_EXHAUSTED.
        background_share: Fraction of the batch that background rows (shadow parity,
            CheckParity) may hold while live requests wait (at least one row).
        background_max_wait_s: A background request waiting this long is admitted before live ones.
    """

    max_batch_size: int = 16
    max_batch_tokens: int = 16384
    max_prefill_tokens: int = 1024
    max_wait_ms: float = 10.0
    max_queue: int = 1024
    background_share: float = 0.25
    background_max_wait_s: float = 2.0

    def check(self) -> None:
        """Raise OptionsError listing every knob out of range."""
        problems = []
        for name in ("max_batch_size", "max_batch_tokens", "max_prefill_tokens", "max_queue"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                problems.append(f"{name} must be an integer >= 1, got {v!r}")
        if not 0 <= self.max_wait_ms <= 60_000:
            problems.append(f"max_wait_ms must be in [0, 60000], got {self.max_wait_ms}")
        if not 0 <= self.background_share <= 1:
            problems.append(f"background_share must be in [0, 1], got {self.background_share}")
        if self.background_max_wait_s < 0:
            problems.append(f"background_max_wait_s must be >= 0, got {self.background_max_wait_s}")
        if problems:
            raise OptionsError("invalid scheduler options: " + "; ".join(problems))


@dataclass
class Work:
    """What one request asks of the model.

    Args:
        prompt_ids: Prompt token ids (validated by the caller).
        max_new_tokens: Tokens to choose at most.
        sampling: Greedy by default; a seeded request draws from its own stream.
        stop_token_ids: Token ids that end the row (not delivered as a Token).
        eos_token_id: End the row at this token (not delivered); None: never.
        forced_ids: Teacher forcing (parity): feed these tokens instead of choosing; the row
            delivers len(forced_ids) + 1 logits (the prefill, then one per fed token).
        return_logits: Deliver logits with each Token (the prefill's for every prompt position).
        background: Shadow parity / CheckParity: a bounded share of the batch.
        isolated: Run in a batch of its own (a solo run inside a busy server).
        label: Names the row in logs and parity reports.
    """

    prompt_ids: list[int]
    max_new_tokens: int = 1
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: frozenset[int] = frozenset()
    eos_token_id: int | None = None
    forced_ids: list[int] | None = None
    return_logits: bool = False
    background: bool = False
    isolated: bool = False
    label: str = ""


@dataclass
class Token:
    """One step's outcome for a row.

    Args:
        token_id: The chosen (or forced) token; None for a forced row's last logits.
        time: ``time.perf_counter()`` when it was chosen.
        batch_size: Rows in the forward that produced it.
        step: 0 for the prefill, then 1, 2, ... per fed token.
        logits: With ``return_logits``: (P, V) for the prefill (every prompt position), else (V,).
    """

    token_id: int | None
    time: float
    batch_size: int
    step: int
    logits: np.ndarray | None = None


@dataclass
class Done:
    """The end of a row: ``reason`` is length, eos, stop, cancelled or error (then ``error``)."""

    reason: str
    time: float
    error: BaseException | None = None


Sink = Callable[[Any], None]


class Ticket:
    """A submitted request: ``cancel()`` or ``finish(reason)`` end it at the next step boundary."""

    _ids = itertools.count(1)

    def __init__(self, work: Work, sink: Sink):
        self.id = next(self._ids)
        self.work = work
        self.sink = sink
        self.submitted_at = time.perf_counter()
        self.admitted_at: float | None = None
        self.batch_sizes: list[int] = []  # rows in each forward this request ran in
        self._end: str | None = None

    def cancel(self) -> None:
        """The client went away: drop the row (and its KV) at the next boundary."""
        self.finish(CANCELLED)

    def finish(self, reason: str = STOP) -> None:
        """End the row at the next boundary (a stop string found by the consumer)."""
        if self._end is None:
            self._end = reason

    @property
    def ended(self) -> str | None:
        """Why the consumer ended the request (cancelled, stop), or None."""
        return self._end

    def __repr__(self) -> str:
        return f"Ticket({self.id}{', ' + self.work.label if self.work.label else ''})"


class _Row:
    """A ticket admitted into a batch: its KV row, position and the token to feed next."""

    def __init__(self, ticket: Ticket):
        w = ticket.work
        self.ticket = ticket
        self.work = w
        self.rng = None if w.sampling.greedy or w.forced_ids is not None else w.sampling.rng()
        self.real_len = 0  # real (unpadded) tokens of this row in the KV cache
        self.next_token = 0  # to feed at the next step
        self.chosen = 0  # tokens chosen so far (forced rows: logits delivered so far)
        self.done: str | None = None
        self.error: BaseException | None = None
        self.logits: np.ndarray | None = None  # of the last forward, until the token is chosen
        # or, from a forward reduced on the device: its top-k (ids, values) and how to get the row
        self.top: tuple[np.ndarray, np.ndarray] | None = None
        self.fetch: Callable[[], np.ndarray] | None = None
        self.batch_size = 0  # rows in the last forward

    @property
    def greedy(self) -> bool:
        return self.rng is None and self.work.forced_ids is None


class _Batch:
    """Rows stepped together, with their dense left-padded KV cache and attention mask."""

    def __init__(self, isolated: bool = False):
        self.rows: list[_Row] = []
        self.cache: KVCache | None = None
        self.mask = np.zeros((0, 0), dtype=np.int64)  # (B, W): 1 real, 0 padding
        self.isolated = isolated

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    @property
    def kv(self) -> KVCache:
        """The cache of a batch that has rows."""
        assert self.cache is not None, "a batch with rows has a cache"
        return self.cache


class Scheduler:
    """Owns ``backend`` on one thread; every request that needs the model is a ``Ticket`` here.

    Args:
        backend: A loaded backend (the scheduler is its only user once started).
        options: The knobs.
        metrics: Optional ``serving.metrics.ServerMetrics`` (batch sizes, queue, joins...).
        name: Thread name suffix.
    """

    def __init__(
        self,
        backend: Backend,
        options: SchedulerOptions | None = None,
        *,
        metrics: Any = None,
        name: str = "",
    ):
        self.backend = backend
        self.options = options or SchedulerOptions()
        self.options.check()
        self.metrics = metrics
        limits = backend.limits
        self.max_batch = min(self.options.max_batch_size, limits.max_batch or self.options.max_batch_size)
        # Beside the running batch and one prefill, the caches left run solo (isolated) rows; with
        # none left, isolated work waits (a TensorRT engine's preallocated KV memory decides).
        spare = MAX_ISOLATED_BATCHES if limits.max_caches is None else limits.max_caches - 2
        self.max_isolated = max(0, min(MAX_ISOLATED_BATCHES, spare))
        self._cv = threading.Condition()
        self._live: deque[Ticket] = deque()
        self._background: deque[Ticket] = deque()
        self._main = _Batch()
        self._isolated: list[_Batch] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._name = name or backend.name
        self.steps = 0  # forwards run (prefills + decode steps)
        self.reduced_steps = 0  # of them, reduced to the top-k on the backend's device
        self.top_k_fallbacks = 0  # rows of reduced steps whose top-k could not decide (full row fetched)
        self._sampler: ThreadPoolExecutor | None = None
        self._failure_hook: Callable[[BaseException], None] | None = None

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> Scheduler:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"scheduler-{self._name}", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> bool:
        """Refuse new work, end every waiting and running row (Done cancelled), join the thread.

        Returns True when the thread ended (the backend may be closed), False if a forward is
        still running after ``timeout``.
        """
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        if self._sampler is not None:
            self._sampler.shutdown(wait=False)
        return True

    def __enter__(self) -> Scheduler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def on_failure(self, hook: Callable[[BaseException], None]) -> None:
        """Call ``hook(exc)`` (on the scheduler thread) whenever a forward fails."""
        self._failure_hook = hook

    # --- submitting ----------------------------------------------------------------------------
    def submit(self, work: Work, sink: Sink) -> Ticket:
        """Queue ``work``; ``sink`` receives its Token events and one Done, on the scheduler thread.

        ``sink`` must not block (put into a queue). Raises ResourceExhausted when the queue is
        full and Unavailable once the scheduler is stopping.
        """
        return self.submit_group([(work, sink)])[0]

    def submit_group(self, items: list[tuple[Work, Sink]]) -> list[Ticket]:
        """Queue several requests at once (all or none), so they can share one prefill."""
        if not self.max_isolated:  # no spare KV cache for a solo batch: share the running one
            items = [(replace(w, isolated=False) if w.isolated else w, sink) for w, sink in items]
        tickets = [Ticket(w, sink) for w, sink in items]
        with self._cv:
            if self._stopping:
                raise Unavailable("the model is shutting down; retry on another server")
            waiting = len(self._live) + len(self._background)
            if waiting + len(tickets) > self.options.max_queue:
                raise ResourceExhausted(
                    f"the server's queue is full: {waiting} requests are waiting for the model "
                    f"(limit {self.options.max_queue}, set with gpt2-deploy serve --max-queue); "
                    "retry later or on another replica"
                )
            for t in tickets:
                (self._background if t.work.background else self._live).append(t)
            self._cv.notify_all()
        self._gauge_queue()
        return tickets

    def queue_depth(self) -> int:
        with self._cv:
            return len(self._live) + len(self._background)

    def active_rows(self) -> int:
        return len(self._main.rows) + sum(len(b.rows) for b in self._isolated)

    # --- the loop ------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._stopping and not self._has_work():
                        self._cv.wait()
                    if self._stopping:
                        break
                    admitted, isolated = self._admissions()
                self._gauge_queue()
                self._boundary(admitted, isolated)
                self._step_all()
        except BaseException as e:  # a scheduler bug: fail everything rather than hang clients
            log.exception("the scheduler thread failed; failing every request")
            self._fail_everything(e)
            return
        self._fail_everything(None)

    def _has_work(self) -> bool:
        return bool(self._live or self._background or self._main.rows or self._isolated)

    def _admissions(self) -> tuple[list[Ticket], list[Ticket]]:
        """Under the lock: pop what joins now (main batch) and what starts isolated batches."""
        now = time.perf_counter()
        opts = self.options
        for q in (self._live, self._background):  # drop what was cancelled while waiting
            for t in [t for t in q if t.ended]:
                q.remove(t)
                self._deliver(t, Done(t.ended or CANCELLED, now))
        isolated: list[Ticket] = []
        room = self.max_isolated - len(self._isolated)
        for q in (self._live, self._background):
            for t in [t for t in q if t.work.isolated][: max(room - len(isolated), 0)]:
                q.remove(t)
                isolated.append(t)
        free = self.max_batch - len(self._main.rows)
        if free <= 0 or not (self._live or self._background):
            return [], isolated
        if self._main.rows and self._live and len(self._live) < free:
            oldest = now - self._live[0].submitted_at
            if oldest * 1e3 < opts.max_wait_ms and not self._background:
                return [], isolated  # let more arrive and share one prefill + join
        width = self._main.width
        rows = len(self._main.rows)
        taken: list[Ticket] = []
        prefill_rows, prefill_width = 0, 0
        bg_rows = sum(r.work.background for r in self._main.rows)
        bg_cap = max(1, int(self.max_batch * opts.background_share))

        def fits(t: Ticket) -> bool:
            p = len(t.work.prompt_ids)
            pw = max(prefill_width, p)
            if taken and (prefill_rows + 1) * pw > opts.max_prefill_tokens:
                return False
            w = max(width, pw)
            return not (rows + len(taken) > 0 and (rows + len(taken) + 1) * (w + 1) > opts.max_batch_tokens)

        def take(q: deque[Ticket]) -> bool:
            nonlocal prefill_rows, prefill_width, bg_rows
            t = q[0]
            if not fits(t):
                return False
            q.popleft()
            taken.append(t)
            prefill_rows += 1
            prefill_width = max(prefill_width, len(t.work.prompt_ids))
            bg_rows += t.work.background
            return True

        overdue = self._background and now - self._background[0].submitted_at >= opts.background_max_wait_s
        if overdue:
            take(self._background)
        while self._live and len(taken) < free and take(self._live):
            pass
        while (
            self._background
            and len(taken) < free
            and (not self._live or bg_rows < bg_cap)
            and take(self._background)
        ):
            pass
        return taken, isolated

    def _boundary(self, admitted: list[Ticket], isolated: list[Ticket]) -> None:
        """Remove ended rows, prefill what was admitted and join it, start isolated batches."""
        for batch in [self._main, *self._isolated]:
            self._remove_ended(batch)
        self._isolated = [b for b in self._isolated if b.rows]
        if admitted:
            self._admit(self._main, admitted)
        for t in isolated:
            batch = _Batch(isolated=True)
            self._admit(batch, [t])
            if batch.rows:
                self._isolated.append(batch)

    def _step_all(self) -> None:
        for batch in [self._main, *self._isolated]:
            if batch.rows:
                self._decode(batch)

    # --- admission: prefill + join -------------------------------------------------------------
    def _admit(self, batch: _Batch, tickets: list[Ticket]) -> None:
        now = time.perf_counter()
        rows = []
        for t in tickets:
            t.admitted_at = now
            if self.metrics is not None:
                self.metrics.queue_wait(now - t.submitted_at)
            rows.append(_Row(t))
        out = self._prefill(rows)
        if out is None:
            return
        cache, mask = out
        self._choose(rows)
        alive = [i for i, r in enumerate(rows) if r.done is None]
        for r in rows:
            if r.done is not None:
                self._end_row(r)
        if not alive:
            self.backend.release(cache)
            return
        if len(alive) < len(rows):
            width = max(rows[i].real_len for i in alive)
            cache = self.backend.select(cache, alive, width)
            mask = mask[alive][:, mask.shape[1] - width :]
        new_rows = [rows[i] for i in alive]
        if not batch.rows:
            batch.rows, batch.cache, batch.mask = new_rows, cache, mask
        else:
            try:
                batch.cache = self.backend.join([batch.kv, cache])
            except Exception as e:  # noqa: BLE001 - a failed join fails the newcomers only if it can
                self._failed_forward(e)
                for r in new_rows:
                    self._end_row(r, ERROR, e)
                return
            batch.mask = _stack_masks([batch.mask, mask])
            batch.rows += new_rows
        if self.metrics is not None:
            self.metrics.rows_joined(len(new_rows))

    def _prefill(self, rows: list[_Row]) -> tuple[KVCache, np.ndarray] | None:
        """One left-padded forward over the rows' prompts; sets their logits for ``_choose``."""
        n = len(rows)
        width = max(len(r.work.prompt_ids) for r in rows)
        ids = np.zeros((n, width), dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        for i, r in enumerate(rows):
            p = r.work.prompt_ids
            ids[i, width - len(p) :] = p
            mask[i, width - len(p) :] = 1
        want_all = any(r.work.return_logits for r in rows)
        try:
            out = self._forward(
                ids,
                mask,
                left_padded_positions(mask),
                None,
                last_only=not want_all,
                top_k=None if want_all else self._top_k(rows),
                kind="prefill",
            )
        except Exception as e:  # noqa: BLE001 - isolate: retry each row alone
            if n == 1:
                self._failed_forward(e)
                self._end_row(rows[0], ERROR, e)
                return None
            return self._prefill_each(rows, e)
        for i, r in enumerate(rows):
            n_prompt = len(r.work.prompt_ids)
            r.real_len = n_prompt
            r.ticket.batch_sizes.append(n)
            if r.work.return_logits:
                r.logits = out.logits[i, width - n_prompt :]  # (P, V): every prompt position
            else:
                _take(r, out, i)
            r.batch_size = n
        return out.present, mask

    def _prefill_each(self, rows: list[_Row], first: BaseException) -> tuple[KVCache, np.ndarray] | None:
        """After a failed group prefill: prefill rows one by one, failing only those that fail."""
        log.warning("a prefill of %d rows failed (%s); retrying each row alone", len(rows), first)
        caches, masks, ok = [], [], []
        for r in rows:
            got = self._prefill([r])
            if got is not None:
                caches.append(got[0])
                masks.append(got[1])
                ok.append(r)
        rows[:] = ok
        if not ok:
            return None
        return self.backend.join(caches), _stack_masks(masks)

    # --- decoding ------------------------------------------------------------------------------
    def _decode(self, batch: _Batch) -> None:
        rows = batch.rows
        b = len(rows)
        ids = np.asarray([[r.next_token] for r in rows], dtype=np.int64)
        pos = np.asarray([[r.real_len] for r in rows], dtype=np.int64)
        mask = np.concatenate([batch.mask, np.ones((b, 1), dtype=np.int64)], axis=1)
        top_k = self._top_k(rows)
        try:
            out = self._forward(ids, mask, pos, batch.cache, last_only=True, top_k=top_k, kind="decode")
        except Exception as e:  # noqa: BLE001 - isolate the failing rows if the backend allows it
            self._decode_each(batch, e, top_k)
            return
        batch.cache, batch.mask = out.present, mask
        for i, r in enumerate(rows):
            _decoded(r, out, i, b)
        self._choose(rows)

    def _decode_each(self, batch: _Batch, first: BaseException, top_k: int | None = None) -> None:
        """A batched step failed: step each row alone from the intact past; fail only failing rows.

        Backends keep the past intact when a forward fails (present is written elsewhere), but
        a backend whose ``select`` consumes the past (TensorRT's ping-pong slots) cannot be
        split: then every row of the step fails.
        """
        rows, b = batch.rows, len(batch.rows)
        self._failed_forward(first)
        if b == 1:
            self._end_row(rows[0], ERROR, first)
            self._drop_batch(batch)
            return
        log.warning("a decode step of %d rows failed (%s); stepping each row alone", b, first)
        caches, masks, survivors = [], [], []
        for i, r in enumerate(rows):
            try:
                cache = self.backend.select(batch.kv, [i], r.real_len)
            except Exception:  # noqa: BLE001 - this backend cannot split a batch: fail all
                for rr in rows[i:]:
                    self._end_row(rr, ERROR, first)
                break
            mask = np.concatenate(
                [batch.mask[i : i + 1, batch.width - r.real_len :], np.ones((1, 1), np.int64)], 1
            )
            ids = np.asarray([[r.next_token]], dtype=np.int64)
            pos = np.asarray([[r.real_len]], dtype=np.int64)
            try:
                out = self._forward(ids, mask, pos, cache, last_only=True, top_k=top_k, kind="decode")
            except Exception as e:  # noqa: BLE001 - this row fails alone
                self._failed_forward(e)
                self._end_row(r, ERROR, e)
                continue
            _decoded(r, out, 0, 1)
            caches.append(out.present)
            masks.append(mask)
            survivors.append(r)
        self._drop_batch(batch, release=False)
        if not survivors:
            return
        batch.rows = survivors
        batch.cache = self.backend.join(caches)
        batch.mask = _stack_masks(masks)
        self._choose(survivors)

    def _top_k(self, rows: list[_Row]) -> int | None:
        """The K a step asks the backend for when every row can be chosen from its top-K
        (``serving.sampling.reduced_top_k``); None when a row needs full logits."""
        if not self.backend.reduces_top_k or any(r.work.return_logits for r in rows):
            return None
        return reduced_top_k([r.work.sampling for r in rows if r.work.forced_ids is None])

    def _forward(self, ids, mask, pos, cache, *, last_only: bool, kind: str, top_k: int | None = None):
        t0 = time.perf_counter()
        try:
            out = self.backend.forward(ids, mask, pos, cache, last_only=last_only, top_k=top_k)
        except Exception as e:
            if _out_of_memory(e):
                raise ResourceExhausted(
                    f"the {self.backend.name} backend ran out of memory in a {kind} of {ids.shape[0]} "
                    f"row(s) x {mask.shape[1]} positions; retry with a shorter request, or serve with a "
                    "lower --max-batch-size / --max-batch-tokens"
                ) from e
            raise
        self.steps += 1
        if out.logits is None:
            self.reduced_steps += 1
        if self.metrics is not None:
            self.metrics.step(kind, ids.shape[0], time.perf_counter() - t0)
        return out

    def _failed_forward(self, exc: BaseException) -> None:
        if self._failure_hook is not None:
            try:
                self._failure_hook(exc)
            except Exception:
                log.exception("the scheduler's failure hook failed")

    # --- choosing tokens -----------------------------------------------------------------------
    def _choose(self, rows: list[_Row]) -> None:
        """Pick each row's next token from ``row.logits`` (or its top-k), deliver it, mark rows that end.

        A row reduced to its top-k gets exactly the token its full logits would give
        (``serving.sampling.select_from_top``); where the top-k cannot decide, its full row is
        fetched from the backend (``StepOutput.last_logits``).
        """
        now = time.perf_counter()
        vocab = self.backend.dims.vocab_size
        greedy = [r for r in rows if r.greedy and r.done is None]
        reduced: dict[int, list[tuple[_Row, tuple[np.ndarray, np.ndarray]]]] = {}  # by K (one per forward)
        for r in greedy:
            if r.logits is None:
                assert r.top is not None, "a row without logits was reduced"
                reduced.setdefault(len(r.top[0]), []).append((r, r.top))
        for group in reduced.values():  # one vectorised pick per K
            picks, ok = greedy_from_top(
                np.stack([top[0] for _, top in group]), np.stack([top[1] for _, top in group]), vocab
            )
            for (r, _), tok, decided in zip(group, picks, ok, strict=True):
                if decided:
                    r.next_token = int(tok)
                else:
                    self.top_k_fallbacks += 1
                    r.logits = _fetch(r)
        full = [r for r in greedy if r.logits is not None]
        if full:  # one vectorised argmax for every greedy row that has its logits
            picks = np.argmax(np.stack([_last(r.logits) for r in full]), -1)
            for r, tok in zip(full, picks, strict=True):
                r.next_token = int(tok)
        sampled = [r for r in rows if r.rng is not None and r.done is None]
        draw = partial(_draw, vocab=vocab)
        if len(sampled) > 1:  # numpy releases the GIL in the heavy parts: draw rows in parallel
            for r, tok in zip(sampled, self._pool().map(draw, sampled), strict=True):
                r.next_token = tok
        elif sampled:
            sampled[0].next_token = draw(sampled[0])
        self.top_k_fallbacks += sum(1 for r in sampled if r.fetch is None and r.top is not None)
        for r in rows:
            if r.done is not None:
                continue
            try:
                self._advance(r, now)
            except Exception as e:
                log.exception("choosing the next token failed for %r", r.ticket)
                r.done, r.error = ERROR, e
            r.logits, r.top, r.fetch = None, None, None

    def _pool(self) -> ThreadPoolExecutor:
        if self._sampler is None:
            self._sampler = ThreadPoolExecutor(
                max_workers=min(4, os.cpu_count() or 1), thread_name_prefix=f"sampler-{self._name}"
            )
        return self._sampler

    def _advance(self, r: _Row, now: float) -> None:
        w, t = r.work, r.ticket
        logits = r.logits if w.return_logits else None
        step = r.chosen
        if w.forced_ids is not None:  # teacher forcing: the fed token is given, logits delivered
            tok = w.forced_ids[step] if step < len(w.forced_ids) else None
            self._deliver(t, Token(tok, now, r.batch_size, step, logits))
            r.chosen += 1
            if tok is None:
                r.done = LENGTH
            else:
                r.next_token = tok
            return
        tok = r.next_token
        if w.eos_token_id is not None and tok == w.eos_token_id:
            r.done = EOS
            return
        if tok in w.stop_token_ids:
            r.done = STOP
            return
        self._deliver(t, Token(tok, now, r.batch_size, step, logits))
        r.chosen += 1
        if r.chosen >= w.max_new_tokens:
            r.done = LENGTH

    # --- removal -------------------------------------------------------------------------------
    def _remove_ended(self, batch: _Batch) -> None:
        """One select that drops ended rows and trims the past to the longest remaining row."""
        for r in batch.rows:
            if r.done is None and r.ticket.ended:
                r.done = r.ticket.ended
            if r.done is None and self._stopping:
                r.done = CANCELLED
        ended = [r for r in batch.rows if r.done is not None]
        if not ended:
            return
        keep = [i for i, r in enumerate(batch.rows) if r.done is None]
        for r in ended:
            self._end_row(r)
        if self.metrics is not None:
            self.metrics.rows_removed(len(ended))
        if not keep:
            self._drop_batch(batch)
            return
        width = max(batch.rows[i].real_len for i in keep)
        try:
            batch.cache = self.backend.select(batch.kv, keep, width)
        except Exception as e:  # noqa: BLE001 - cannot shrink the cache: fail the rest too
            self._failed_forward(e)
            for i in keep:
                self._end_row(batch.rows[i], ERROR, e)
            self._drop_batch(batch)
            return
        batch.mask = batch.mask[keep][:, batch.width - width :]
        batch.rows = [batch.rows[i] for i in keep]

    def _drop_batch(self, batch: _Batch, release: bool = True) -> None:
        if release:
            self.backend.release(batch.cache)
        batch.rows, batch.cache = [], None
        batch.mask = np.zeros((0, 0), dtype=np.int64)

    def _end_row(self, r: _Row, reason: str | None = None, error: BaseException | None = None) -> None:
        if reason is not None:
            r.done, r.error = reason, error
        self._deliver(r.ticket, Done(r.done or CANCELLED, time.perf_counter(), r.error))

    def _deliver(self, ticket: Ticket, event: Any) -> None:
        try:
            ticket.sink(event)
        except Exception:
            log.exception("delivering to %r failed; cancelling it", ticket)
            ticket.cancel()

    def _fail_everything(self, exc: BaseException | None) -> None:
        """Stop or crash: every waiting and running request gets its Done."""
        error = exc or Unavailable("the model is shutting down; retry on another server")
        with self._cv:
            waiting = list(self._live) + list(self._background)
            self._live.clear()
            self._background.clear()
            self._stopping = True
        now = time.perf_counter()
        for t in waiting:
            self._deliver(t, Done(ERROR if exc else CANCELLED, now, error))
        for batch in [self._main, *self._isolated]:
            for r in batch.rows:
                if r.done is None:
                    r.done, r.error = (ERROR, exc) if exc else (CANCELLED, None)
                self._end_row(r)
            try:
                self._drop_batch(batch)
            except Exception:
                log.exception("releasing a batch failed")
        self._isolated = []

    def _gauge_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._live) + len(self._background))


_OOM_MARKERS = ("out of memory", "failed to allocate", "bad_alloc", "cudaErrorMemoryAllocation", "OOM")


def _out_of_memory(e: BaseException) -> bool:
    """MemoryError, or a runtime's own out-of-memory error (ONNX Runtime, CUDA, TensorRT)."""
    return isinstance(e, MemoryError) or any(m.lower() in str(e).lower() for m in _OOM_MARKERS)


def _last(logits: np.ndarray | None) -> np.ndarray:
    """The last position's row of a prefill's (P, V) logits, or a decode step's (V,)."""
    assert logits is not None, "a row is chosen for after its forward"
    return logits if logits.ndim == 1 else logits[-1]


def _take(r: _Row, out: StepOutput, i: int) -> None:
    """Row ``i`` of a last-only forward: its logits (V,), or its top-k and a way to its logits."""
    if out.logits is not None:
        r.logits = out.logits[i, -1]
    else:
        assert out.top_ids is not None and out.top_values is not None, "a reduced step has its top-k"
        r.top = (out.top_ids[i], out.top_values[i])
        r.fetch = partial(_row_logits, out, i)


def _decoded(r: _Row, out: StepOutput, i: int, batch_size: int) -> None:
    """Row ``i`` of a decode step of ``batch_size`` rows: one more real token, and its outcome."""
    r.real_len += 1
    _take(r, out, i)
    r.batch_size = batch_size
    r.ticket.batch_sizes.append(batch_size)


def _row_logits(out: StepOutput, i: int) -> np.ndarray:
    return out.last_logits()[i]


def _fetch(r: _Row) -> np.ndarray:
    """The full logits of a reduced row, fetched from the backend (marks the row as fetched)."""
    assert r.fetch is not None, "a reduced row keeps a way to its logits"
    logits, r.fetch = r.fetch(), None
    return logits


def _draw(r: _Row, vocab: int) -> int:
    """A sampled row's next token (its own random stream, so the batch does not matter)."""
    if r.logits is None:
        assert r.top is not None, "a row without logits was reduced"
        tok = select_from_top(r.top[0], r.top[1], r.work.sampling, r.rng, vocab)
        if tok is not None:
            return tok
        r.logits = _fetch(r)  # the top-k cannot decide: the same draw on the full row
    return select_next(_last(r.logits), r.work.sampling, r.rng)


def _stack_masks(masks: list[np.ndarray]) -> np.ndarray:
    """Rows of ``masks`` stacked, each (B_i, w_i) left-padded with zero columns to the widest."""
    width = max(m.shape[1] for m in masks)
    return np.concatenate([_pad_left(m, width) for m in masks], axis=0)


def _pad_left(mask: np.ndarray, width: int) -> np.ndarray:
    """(B, w) -> (B, width) with zero (padding) columns on the left."""
    extra = width - mask.shape[1]
    return mask if extra == 0 else np.concatenate([np.zeros((mask.shape[0], extra), mask.dtype), mask], 1)
