"""Parity of a served backend with the PyTorch reference: canary, per-request checks, shadow runs.

Every check is teacher-forced: both backends are fed the same tokens (the reference's greedy
continuation, or a served request's tokens), so one early divergence does not cascade into
every later step, and the report can name the first step that diverged. Both sides run as rows
of a ``serving.scheduler.Scheduler`` (a server passes the served backend's own), so parity is
checked in the batches requests really run in; ``batched_parity`` compares a row in a batch
with its solo run, which is where batching bugs show.

    report = check_generation_parity(served, reference, tokenizer, prompt_ids, 16, tolerance)
    if not report:
        print(report)  # per-step max|Δlogits|, top-1 agreement, first diverging step

Reports are ``export.compare`` reports (truthy when passing, print themselves, ``to_json()``).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from export.compare import (
    CaseResult,
    ParityReport,
    Tolerance,
    compare_logits,
    step_case_name,
    tolerance_for,
    tolerance_for_run,
)
from export.errors import OptionsError
from export.golden import CANARY_PROMPTS as DEFAULT_CANARY_PROMPTS
from export.golden import GoldenRecord
from export.manifest import Bundle
from serving.backends.base import Backend, BackendOptions
from serving.errors import Cancelled
from serving.scheduler import CANCELLED, ERROR, Done, Scheduler, Ticket, Token, Work

log = logging.getLogger(__name__)


def reference_backend(bundle: Bundle, device: str = "cpu") -> Backend:
    """The torch reference backend on ``device``, loaded."""
    from serving.backends import create_backend

    return create_backend("torch", bundle, BackendOptions(device=device)).load()


def tolerance_for_backend(bundle: Bundle, backend_name: str, device: str = "cpu") -> Tolerance:
    """The tolerance a backend running the bundle's ONNX precision must meet against the reference.

    The bundle's precision decides (fp16, int8 ... presets); fp32 on a GPU uses the "tf32" preset
    (ORT's CUDA EP and TensorRT use TF32 matmuls by default, and GPU kernels differ from CPU ones).
    A backend that runs something else (a TensorRT engine of its own precision) says so itself:
    use ``served_tolerance`` on the loaded backend.
    """
    return tolerance_for_run(bundle.manifest.precision, device=device)


def served_tolerance(backend: Backend) -> Tolerance:
    """The tolerance of a loaded backend: the preset it reports in ``info()["tolerance"]`` (the
    TensorRT backend: the engine it actually loaded), else the bundle's precision on its device,
    with TF32 as the backend reports it (``info()["tf32"]``: ONNX Runtime's CUDA ``use_tf32``;
    unreported: the device's default)."""
    info = backend.info()
    if info.get("tolerance"):
        return tolerance_for(info["tolerance"])
    return tolerance_for_run(
        backend.bundle.manifest.precision, device=backend.options.device, tf32=info.get("tf32")
    )


def _check_cancelled(cancelled: Callable[[], bool] | None, what: str) -> None:
    if cancelled is not None and cancelled():
        raise Cancelled(f"{what} was cancelled")


def _scheduler(engine: Backend | Scheduler) -> tuple[Scheduler, bool]:
    """``engine`` if it is a Scheduler, else a new one on the backend (True: the caller stops it)."""
    if isinstance(engine, Scheduler):
        return engine, False
    return Scheduler(engine).start(), True


def _collect(tickets: list[Ticket], sinks: list[queue.SimpleQueue], cancelled, what: str) -> list[list[Any]]:
    """Every Token of every ticket until its Done; cancels them all if ``cancelled()`` turns True."""
    out: list[list[Any]] = [[] for _ in tickets]
    try:
        for i, q in enumerate(sinks):
            while True:
                try:
                    event = q.get(timeout=0.05)
                except queue.Empty:
                    event = None
                _check_cancelled(cancelled, what)  # after every event too: a fast engine never idles
                if event is None:
                    continue
                if isinstance(event, Done):
                    if event.reason == ERROR:
                        raise event.error or RuntimeError(f"{what} failed")
                    if event.reason == CANCELLED:
                        raise Cancelled(f"{what} was cancelled")
                    break
                out[i].append(event)
    except BaseException:
        for t in tickets:
            t.cancel()
        raise
    return out


def _run_rows(
    engine: Backend | Scheduler, works: list[Work], cancelled, what: str
) -> tuple[list[list[Any]], list[Ticket]]:
    """``works`` submitted together on ``engine`` (its scheduler, or one started for the call):
    every row's Tokens (``_collect``) and the tickets."""
    sched, owned = _scheduler(engine)
    try:
        sinks: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in works]
        tickets = sched.submit_group(list(zip(works, [q.put for q in sinks], strict=True)))
        return _collect(tickets, sinks, cancelled, what), tickets
    finally:
        if owned:
            sched.stop()


def _forced_work(seq: list[int], p: int, *, background: bool, label: str, isolated: bool = False) -> Work:
    """A teacher-forced row: ``seq[:p]`` prefilled, then ``seq[p:]`` fed, every step's logits returned."""
    return Work(
        prompt_ids=list(seq[:p]),
        forced_ids=list(seq[p:]),
        return_logits=True,
        background=background,
        isolated=isolated,
        label=label,
    )


def _step_logits(events: list[Any]) -> list[np.ndarray]:
    """A forced row's logits per step, 2-D: (P, V) for the prefill, then (1, V)."""
    return [e.logits if e.logits.ndim == 2 else e.logits[None, :] for e in events]


def teacher_forced_logits(
    engine: Backend | Scheduler,
    sequences: list[list[int]],
    prompt_lens: list[int],
    *,
    cancelled: Callable[[], bool] | None = None,
    background: bool = False,
    isolated: bool = False,
    label: str = "parity",
) -> tuple[list[list[np.ndarray]], list[list[int]]]:
    """Each sequence teacher-forced as one scheduler row: its logits per step and batch sizes.

    Step 0 is the prefill of ``sequence[:prompt_len]`` (logits (P, V): every prompt position);
    step t >= 1 feeds ``sequence[prompt_len + t - 1]`` (logits (1, V)). The rows are submitted
    together, so they share batches (``isolated`` runs each alone instead).
    """
    works = [
        _forced_work(seq, p, background=background, isolated=isolated, label=f"{label} {i}")
        for i, (seq, p) in enumerate(zip(sequences, prompt_lens, strict=True))
    ]
    events, tickets = _run_rows(engine, works, cancelled, label)
    return [_step_logits(row) for row in events], [t.batch_sizes for t in tickets]


def greedy_continuations(
    engine: Backend | Scheduler,
    prompts: list[list[int]],
    new_tokens: int,
    *,
    cancelled: Callable[[], bool] | None = None,
    background: bool = False,
) -> list[list[int]]:
    """Prompt + the engine's greedy continuation (not stopping at EOS) for each prompt."""
    works = [
        Work(prompt_ids=list(p), max_new_tokens=new_tokens, background=background, label="reference")
        for p in prompts
    ]
    events, _ = _run_rows(engine, works, cancelled, "the reference generation for parity")
    return [list(p) + [int(e.token_id) for e in row] for p, row in zip(prompts, events, strict=True)]


def compare_steps(
    judge: Callable[[int, int, str, np.ndarray], CaseResult],
    actual: list[list[np.ndarray]],
    sequences: list[list[int]],
    prompt_lens: list[int],
    tolerance: Tolerance,
    *,
    title: str,
    served: str,
    reference: str,
) -> ParityReport:
    """One case per (sequence, step) of a teacher-forced run; the report names the first divergence.

    ``judge(seq, step, case, logits)`` compares one step's logits with what was expected of it
    (``live_judge``: another run's logits; a golden record's ``compare_step``).
    """
    report = ParityReport(title=title, tolerance=tolerance, served=served, reference=reference)
    for si, (seq, p) in enumerate(zip(sequences, prompt_lens, strict=True)):
        for step, logits in enumerate(actual[si]):
            token = None if step == 0 else seq[p + step - 1]
            try:
                case = judge(si, step, step_case_name(si, step, token, len(sequences)), logits)
            except ValueError as err:
                report.errors.append(str(err))
                break
            report.add_case(step, case)
        report.steps = max(report.steps, len(seq) - p + 1)
    return report


def live_judge(expected: list[list[np.ndarray]], tolerance: Tolerance) -> Callable:
    """Judge each step against the same step of another run (the reference's, or a solo run's)."""

    def judge(si: int, step: int, case: str, logits: np.ndarray) -> CaseResult:
        return compare_logits(expected[si][step], logits, None, tolerance, case)

    return judge


def golden_judge(record: GoldenRecord, tolerance: Tolerance) -> Callable:
    """Judge each step against a bundle's golden record (no reference model needed)."""

    def judge(si: int, step: int, case: str, logits: np.ndarray) -> CaseResult:
        return record.compare_step(si, step, logits, tolerance, case)

    return judge


def teacher_forced_parity(
    served: Backend | Scheduler,
    reference: Backend | Scheduler,
    sequences: list[list[int]],
    tolerance: Tolerance,
    prompt_len: int | list[int],
    title: str | None = None,
    cancelled: Callable[[], bool] | None = None,
    *,
    background: bool = False,
    isolated: bool = False,
) -> ParityReport:
    """Feed the same tokens to both engines step by step and compare the logits of every step.

    Step 0 prefills ``sequence[:prompt_len]`` (all prompt positions compared); step t >= 1 feeds
    ``sequence[prompt_len + t - 1]`` to both. Each side runs as scheduler rows (a served
    backend's scheduler puts them in batches with whatever else runs; ``isolated`` runs them
    alone).

    Args:
        served: The backend under test, or its scheduler.
        reference: The reference backend, or its scheduler.
        sequences: Prompt + continuation ids (the continuation is what both are fed).
        tolerance: What passing means.
        prompt_len: The prompt length, one for all sequences or one per sequence.
        cancelled: Polled while waiting; when it returns True the check stops.
        background: Run the served rows at background priority (shadow parity, CheckParity).
        isolated: Run each served row alone in its own batch.

    Raises:
        Cancelled: ``cancelled()`` returned True.
    """
    lens = [prompt_len] * len(sequences) if isinstance(prompt_len, int) else list(prompt_len)
    if len(lens) != len(sequences):
        raise OptionsError(f"{len(lens)} prompt lengths for {len(sequences)} sequences")
    for si, (seq, p) in enumerate(zip(sequences, lens, strict=True)):
        if not 1 <= p <= len(seq):
            raise OptionsError(f"sequence {si}: prompt_len {p} outside [1, {len(seq)}]")
    served_name, reference_name = _name(served), _name(reference)
    title = title or f"parity {served_name} vs {reference_name}"
    ref, _ = teacher_forced_logits(reference, sequences, lens, cancelled=cancelled, label="reference")
    got, sizes = teacher_forced_logits(
        served, sequences, lens, cancelled=cancelled, background=background, isolated=isolated, label=title
    )
    report = compare_steps(
        live_judge(ref, tolerance),
        got,
        sequences,
        lens,
        tolerance,
        title=title,
        served=served_name,
        reference=reference_name,
    )
    report.batch_sizes = sizes[0] if sizes else []
    return report


def _name(engine: Backend | Scheduler) -> str:
    return engine.backend.name if isinstance(engine, Scheduler) else engine.name


def reference_continuations(
    reference: Backend | Scheduler,
    tokenizer: Any,
    prompts: list[list[int]],
    new_tokens: int,
    cancelled: Callable[[], bool] | None = None,
) -> list[list[int]]:
    """Prompt + the reference's greedy continuation (without stopping at EOS) for each prompt.

    Raises:
        Cancelled: ``cancelled()`` returned True.
    """
    return greedy_continuations(reference, prompts, new_tokens, cancelled=cancelled)


def check_generation_parity(
    served: Backend | Scheduler,
    reference: Backend | Scheduler,
    tokenizer: Any,
    prompt_ids: list[int],
    max_new_tokens: int,
    tolerance: Tolerance,
    cancelled: Callable[[], bool] | None = None,
    *,
    background: bool = False,
) -> ParityReport:
    """Whole-generation parity of one prompt, per step (the CheckParity RPC and the CLI).

    The reference generates greedily; both are then teacher-forced along that sequence. The
    served row runs alone (isolated), so the verdict does not depend on other traffic; see
    ``batched_parity`` for the check in a batch.

    Raises:
        Cancelled: ``cancelled()`` returned True.
    """
    seq = reference_continuations(reference, tokenizer, [prompt_ids], max_new_tokens, cancelled)[0]
    return teacher_forced_parity(
        served,
        reference,
        [seq],
        tolerance,
        len(prompt_ids),
        title=f"generation parity {_name(served)} vs {_name(reference)}",
        cancelled=cancelled,
        background=background,
        isolated=True,
    )


# Companion rows of a batched check: (prompt length, tokens, join after the target's step k).
# Different lengths on both sides of the target's, one already running when it arrives and one
# joining mid-way, so the target sees left padding, joins, a neighbour's removal and a trim.
BATCH_COMPANIONS = ((23, 40, None), (3, 6, None), (11, 30, 2), (41, 8, 4))


@dataclass
class BatchedParityReport(ParityReport):
    """A prompt run in a batch: against its solo run (``vs_solo``) and against the reference."""

    vs_solo: ParityReport | None = None
    solo: ParityReport | None = None

    def __bool__(self) -> bool:
        return ParityReport.__bool__(self) and bool(self.vs_solo) and bool(self.solo)

    def summary(self) -> str:
        parts = [ParityReport.summary(self)]
        if self.vs_solo is not None:
            parts.append(self.vs_solo.summary())
        return "; ".join(parts)

    def __str__(self) -> str:
        lines = [ParityReport.__str__(self)]
        for sub in (self.vs_solo, self.solo):
            if sub is not None:
                lines += ["", str(sub)]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        d = ParityReport.to_json(self)
        d["passed"] = bool(self)
        d["vs_solo"] = self.vs_solo.to_json() if self.vs_solo is not None else None
        d["solo"] = self.solo.to_json() if self.solo is not None else None
        return d


def batched_parity(
    served: Backend | Scheduler,
    reference: Backend | Scheduler,
    tokenizer: Any,
    prompt_ids: list[int],
    max_new_tokens: int,
    tolerance: Tolerance,
    cancelled: Callable[[], bool] | None = None,
    *,
    background: bool = False,
    seed: int = 0,
) -> BatchedParityReport:
    """One prompt teacher-forced alone, then alongside companion rows that join and leave.

    The batched run is compared with the solo run (fp32: within 1e-4, the ``fp32`` preset; TF32 or a
    reduced precision keeps its own preset) and with the reference (``tolerance``). The report
    names the batch composition: the companions' lengths and join points, and the rows of every
    forward the target ran in.

    Raises:
        Cancelled: ``cancelled()`` returned True.
    """
    sched, owned = _scheduler(served)
    try:
        seq = reference_continuations(reference, tokenizer, [prompt_ids], max_new_tokens, cancelled)[0]
        p = len(prompt_ids)
        ref, _ = teacher_forced_logits(reference, [seq], [p], cancelled=cancelled, label="reference")
        solo, _ = teacher_forced_logits(
            sched, [seq], [p], cancelled=cancelled, background=background, isolated=True, label="solo"
        )
        batched, sizes, notes = _run_in_batch(sched, seq, p, cancelled, background, seed)
    finally:
        if owned:
            sched.stop()
    name, ref_name = _name(served), _name(reference)
    # fp32 math on a CPU: batch composition moves logits by ~1e-7, so batched vs solo is held to the
    # fp32 preset; with TF32 (a GPU) or reduced precision, GEMM kernels differ by batch shape too.
    same = tolerance_for("fp32") if tolerance.name in ("fp32", "ort-fused") else tolerance
    report = compare_steps(
        live_judge(ref, tolerance),
        batched,
        [seq],
        [p],
        tolerance,
        title=f"batched parity {name} vs {ref_name}",
        served=f"{name} (batched)",
        reference=ref_name,
    )
    report = BatchedParityReport(**{f.name: getattr(report, f.name) for f in dataclasses.fields(report)})
    report.batch_sizes, report.notes = sizes, notes
    report.vs_solo = compare_steps(
        live_judge(solo, same),
        batched,
        [seq],
        [p],
        same,
        title=f"batched vs solo {name}",
        served=f"{name} (batched)",
        reference=f"{name} (solo)",
    )
    report.solo = compare_steps(
        live_judge(ref, tolerance),
        solo,
        [seq],
        [p],
        tolerance,
        title=f"solo parity {name} vs {ref_name}",
        served=f"{name} (solo)",
        reference=ref_name,
    )
    return report


def _run_in_batch(sched: Scheduler, seq: list[int], p: int, cancelled, background: bool, seed: int):
    """The target row among BATCH_COMPANIONS; (its step logits, its batch sizes, composition notes)."""
    rng = np.random.default_rng(seed)
    vocab = sched.backend.dims.vocab_size
    context = sched.backend.limits.max_context
    target_q: queue.SimpleQueue = queue.SimpleQueue()
    companion_qs: list[queue.SimpleQueue] = []
    tickets: list[Ticket] = []
    pending: dict[int, list[Work]] = {}
    notes = []
    first: list[Work] = []
    for i, (length, n, after) in enumerate(BATCH_COMPANIONS):
        n = max(1, min(n, context - length))
        w = Work(
            prompt_ids=rng.integers(0, vocab, length).tolist(),
            max_new_tokens=n,
            background=background,
            label=f"companion {i}",
        )
        (first if after is None else pending.setdefault(after, [])).append(w)
        when = "running before the target" if after is None else f"joining after the target's step {after}"
        notes.append(f"companion {i}: {length}-token prompt, {n} tokens, {when}")

    def submit(works: list[Work]) -> None:
        for w in works:
            q: queue.SimpleQueue = queue.SimpleQueue()
            companion_qs.append(q)
            tickets.append(sched.submit(w, q.put))

    def on_target(event: Any) -> None:  # on the scheduler thread: companions join mid-way
        target_q.put(event)
        if isinstance(event, Token) and event.step in pending:
            submit(pending.pop(event.step))

    submit(first)
    target = sched.submit(_forced_work(seq, p, background=background, label="target"), on_target)
    try:
        events = _collect([target], [target_q], cancelled, "batched parity")[0]
    finally:
        for t in tickets:
            t.cancel()
    sizes = list(target.batch_sizes)
    notes.append(f"target: {p}-token prompt, {len(seq) - p} forced tokens; rows per forward {sizes}")
    return [_step_logits(events)], sizes, notes


def run_canary(
    served: Backend | Scheduler,
    reference: Backend | Scheduler,
    tokenizer: Any,
    tolerance: Tolerance,
    prompts: tuple[str, ...] | list[str] = DEFAULT_CANARY_PROMPTS,
    new_tokens: int = 8,
    cancelled: Callable[[], bool] | None = None,
) -> ParityReport:
    """The startup canary: fixed prompts teacher-forced through both, as one left-padded batch.

    Raises:
        Cancelled: ``cancelled()`` returned True.
    """
    ids = [tokenizer.encode(p) for p in prompts]
    seqs = reference_continuations(reference, tokenizer, ids, new_tokens, cancelled)
    report = teacher_forced_parity(
        served,
        reference,
        seqs,
        tolerance,
        [len(i) for i in ids],
        title=f"startup canary {_name(served)} vs {_name(reference)}",
        cancelled=cancelled,
    )
    report.notes.append(f"{len(ids)} prompts run together (rows per forward {report.batch_sizes})")
    (log.info if report else log.error)("%s", report.summary())
    return report


def golden_parity(
    served: Backend | Scheduler,
    record: GoldenRecord,
    tolerance: Tolerance,
    *,
    title: str | None = None,
    cancelled: Callable[[], bool] | None = None,
    background: bool = False,
) -> ParityReport:
    """The record's sequences teacher-forced through ``served`` (as one batch), each step judged
    against what PyTorch computed at export: parity without torch in the serving process.

    Same tolerances and verdict rule as the live check (``export.golden``); the record holds the
    reference's top-k logits and row statistics, so a pass here is implied by a live pass.

    Raises:
        Cancelled: ``cancelled()`` returned True.
    """
    seqs, lens = record.token_sequences, record.prompt_lens
    name = _name(served)
    title = title or f"golden parity {name} vs the bundle's record"
    got, sizes = teacher_forced_logits(
        served, seqs, lens, cancelled=cancelled, background=background, label=title
    )
    report = compare_steps(
        golden_judge(record, tolerance),
        got,
        seqs,
        lens,
        tolerance,
        title=title,
        served=name,
        reference="golden",
    )
    report.batch_sizes = sizes[0] if sizes else []
    made = record.producer
    report.notes.append(
        f"reference: the bundle's golden record ({len(seqs)} sequences, top-{record.top_k} logits + row "
        f"statistics per position, made with torch {made.get('torch')}, transformers "
        f"{made.get('transformers')})"
    )
    return report


def golden_canary(
    served: Backend | Scheduler,
    record: GoldenRecord,
    tolerance: Tolerance,
    cancelled: Callable[[], bool] | None = None,
) -> ParityReport:
    """The startup canary against the bundle's golden record (no torch needed)."""
    report = golden_parity(
        served,
        record,
        tolerance,
        title=f"startup canary {_name(served)} vs golden record",
        cancelled=cancelled,
    )
    (log.info if report else log.error)("%s", report.summary())
    return report


class ShadowParity:
    """Re-checks a sampled fraction of live requests against the reference, off the hot path.

    ``maybe_submit`` is cheap and never blocks: it samples with probability ``rate`` and enqueues
    into a bounded queue, counting a drop when the queue is full. A worker thread teacher-forces
    each request's tokens (sampled or greedy) through both backends, compares the logits of every
    step, and records the report (``last_report``, the counters, ``on_result``).

    Args:
        reference: The loaded reference backend.
        tolerance: What passing means.
        rate: Fraction of requests to check, in [0, 1].
        queue_size: Bound of the work queue.
        on_result: Called with each report on the worker thread.
        seed: Seed of the sampling decision.
        served: The served backend, or (in a server) its scheduler: checks run there as
            background rows, in batches with live traffic.
    """

    def __init__(
        self,
        reference: Backend | Scheduler,
        tolerance: Tolerance,
        rate: float,
        queue_size: int = 64,
        on_result: Callable[[ParityReport], None] | None = None,
        seed: int = 0,
        *,
        served: Backend | Scheduler,
    ):
        if not 0.0 <= rate <= 1.0:
            raise OptionsError(f"shadow rate must be in [0, 1], got {rate}")
        if queue_size < 1:
            raise OptionsError(f"queue_size must be >= 1, got {queue_size}")
        self.reference = reference
        self.served = served
        self.tolerance = tolerance
        self.rate = rate
        self.on_result = on_result
        self._rng = np.random.default_rng(seed)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._lock = threading.Lock()
        self.submitted = self.dropped = self.checked = self.failed = self.skipped = self.errors = 0
        self.last_report: ParityReport | None = None

    def start(self) -> ShadowParity:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="shadow-parity", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the worker: the check it is in is cancelled (its rows leave their schedulers at
        the next step boundary) and queued items are discarded.

        Returns:
            True when the worker has ended; False when it is still busy after ``timeout`` (``stop``
            may be called again). The schedulers may still be finishing a forward of a cancelled
            row: stop them before closing their backends.
        """
        if self._thread is None:
            return True
        if not self._stopping:
            self._stopping = True
            while True:  # discard what is queued, then post the sentinel (never blocks)
                try:
                    self._queue.get_nowait()
                    self._queue.task_done()  # a discarded item counts as done for join()
                    continue
                except queue.Empty:
                    pass
                try:
                    self._queue.put_nowait(None)
                    break
                except queue.Full:  # a late submit slipped in: drain again
                    continue
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("shadow parity worker still busy after %.1f s; leaving it to finish", timeout)
            return False
        self._thread = None
        return True

    def maybe_submit(
        self,
        prompt_ids: list[int],
        generated_ids: list[int],
        *,
        greedy: bool = True,
        batch_sizes: list[int] | None = None,
    ) -> bool:
        """Sample this request for a shadow check; True if it was queued.

        ``batch_sizes``: rows of each forward the live request ran in (recorded in the report).
        """
        if not generated_ids or self.rate <= 0 or self._stopping:
            return False
        with self._lock:
            if self._rng.random() >= self.rate:
                return False
        try:
            self._queue.put_nowait((list(prompt_ids), list(generated_ids), greedy, list(batch_sizes or [])))
        except queue.Full:
            with self._lock:
                self.dropped += 1
            return False
        with self._lock:
            self.submitted += 1
        return True

    def join(self, timeout: float = 10.0) -> bool:
        """Wait until the queue is drained (for tests and shutdown); True if it was."""
        done = threading.Event()

        def waiter():
            self._queue.join()
            done.set()

        threading.Thread(target=waiter, daemon=True).start()
        return done.wait(timeout)

    def check(
        self,
        prompt_ids: list[int],
        generated_ids: list[int],
        greedy: bool = True,
        batch_sizes: list[int] | None = None,
    ) -> ParityReport | None:
        """One shadow check, synchronously (what the worker runs).

        ``greedy`` does not matter for a teacher-forced check (sampled tokens are fed the same way).
        """
        seq = list(prompt_ids) + list(generated_ids)
        report = teacher_forced_parity(
            self.served,
            self.reference,
            [seq],
            self.tolerance,
            len(prompt_ids),
            title=f"shadow parity {_name(self.served)} vs {_name(self.reference)}",
            cancelled=lambda: self._stopping,
            background=True,
        )
        if batch_sizes:
            report.notes.append(
                f"the live request ran in batches of {min(batch_sizes)}..{max(batch_sizes)} "
                f"rows (per forward: {batch_sizes})"
            )
        return report

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                try:
                    report = self.check(*item)
                except Cancelled:  # stop() while a check ran: not a failure of the check
                    continue
                except Exception:  # a shadow check must never take the server down
                    log.exception("shadow parity check failed to run")
                    with self._lock:
                        self.errors += 1
                    continue
                with self._lock:
                    if report is None:
                        self.skipped += 1
                        continue
                    self.checked += 1
                    self.failed += 0 if report else 1
                    self.last_report = report
                if not report:
                    log.warning("%s", report.summary())
                if self.on_result is not None:
                    self.on_result(report)
            finally:
                self._queue.task_done()

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {
                "submitted": self.submitted,
                "dropped": self.dropped,
                "checked": self.checked,
                "failed": self.failed,
                "skipped": self.skipped,
                "errors": self.errors,
            }


@dataclass
class ParityOptions:
    """What ``gpt2-deploy parity`` does.

    Args:
        bundle: The bundle directory.
        backend: The served backend to check (onnxruntime, torch, tensorrt).
        device: The served backend's device; None means cuda for tensorrt, cpu otherwise.
        engine: TensorRT engine to check (bundle-relative or absolute); None picks the newest.
        trt_runtime: auto, tensorrt or tensorrt_lean (the tensorrt backend only).
        trust_engine_host_code: tensorrt only: load an engine that carries executable host code.
        prompt: Prompt text; None runs the canary prompts.
        max_new_tokens: Tokens the reference generates (the steps compared after the prefill).
        reference_device: Where the torch reference runs. Defaults to "cpu".
        tolerance: A preset name from export.compare; None picks it from bundle, backend, device.
        batched: Also run the prompt in a batch with companion rows joining and leaving, and
            compare it with its solo run (``batched_parity``).
        golden: Compare with the bundle's golden record instead of a live torch reference (no
            torch needed; the record's own prompts and length).
    """

    bundle: str
    backend: str = "onnxruntime"
    device: str | None = None
    engine: str | None = None
    trt_runtime: str = "auto"
    trust_engine_host_code: bool = False
    prompt: str | None = None
    max_new_tokens: int = 16
    reference_device: str = "cpu"
    tolerance: str | None = None
    batched: bool = False
    golden: bool = False

    def check(self) -> None:
        """Raise OptionsError for combinations that cannot work."""
        if self.golden and (self.prompt is not None or self.batched):
            raise OptionsError(
                "--golden checks the golden record's own prompts and length: drop --prompt/--batched, "
                "or use the live torch reference (without --golden)"
            )


def run_parity(opts: ParityOptions) -> ParityReport:
    """Open the bundle, load both backends, and report whole-generation parity per step.

    Raises:
        export.manifest.BundleError, serving.errors.ServingError, ValueError: unusable inputs.
    """
    from serving.backends import backend_options, create_backend
    from serving.generation import GenerationRequest, Generator
    from serving.tokenizer import Tokenizer

    opts.check()
    bundle = Bundle.open(opts.bundle)
    options = backend_options(
        opts.backend,
        opts.device,
        engine=opts.engine,
        trt_runtime=opts.trt_runtime,
        trust_engine_host_code=opts.trust_engine_host_code,
    )
    fixed = tolerance_for(opts.tolerance) if opts.tolerance else None  # a bad name fails before loading
    record = golden_record(bundle) if opts.golden else None  # a missing record fails before loading
    tokenizer = Tokenizer.from_dir(bundle.tokenizer_dir)
    ids = tokenizer.encode(opts.prompt) if opts.prompt is not None else None
    with create_backend(opts.backend, bundle, options) as served:
        tolerance = fixed or served_tolerance(served)  # the engine actually loaded decides
        if record is not None:
            with Scheduler(served) as served_s:
                return golden_parity(served_s, record, tolerance)
        # Prompt and --max-new-tokens are checked like a server request (same messages).
        check = Generator(served, tokenizer, max_new_tokens_limit=bundle.dims.n_positions)
        prompts = [ids] if ids is not None else [tokenizer.encode(t) for t in DEFAULT_CANARY_PROMPTS]
        for p in prompts:
            check.validate(GenerationRequest(p, opts.max_new_tokens))
        with reference_backend(bundle, opts.reference_device) as reference:
            with Scheduler(served) as served_s, Scheduler(reference) as reference_s:
                if opts.batched:
                    return batched_parity(
                        served_s, reference_s, tokenizer, prompts[0], opts.max_new_tokens, tolerance
                    )
                if ids is None:
                    return run_canary(
                        served_s, reference_s, tokenizer, tolerance, new_tokens=opts.max_new_tokens
                    )
                return check_generation_parity(
                    served_s, reference_s, tokenizer, ids, opts.max_new_tokens, tolerance
                )


def golden_record(bundle: Bundle) -> GoldenRecord:
    """The bundle's golden record, or a BundleError saying why there is none."""
    from export.golden import GoldenError
    from export.manifest import BundleError

    path = bundle.golden_path
    if not bundle.has_golden or path is None:
        raise BundleError(
            bundle.root,
            [
                "no golden record (golden.json) to check against: re-export the bundle (records are "
                "written by default), or use the live torch reference (drop --golden, or serve with "
                "--canary-reference torch)",
            ],
        )
    try:
        return GoldenRecord.from_file(path)
    except GoldenError as e:
        raise BundleError(bundle.root, e.problems) from None
