"""Parity of a served backend with the PyTorch reference: canary, per-request checks, shadow runs.

Every check is teacher-forced: both backends are fed the same tokens (the reference's greedy
continuation, or a served request's tokens), so one early divergence does not cascade into
every later step, and the report can name the first step that diverged.

    report = check_generation_parity(served, reference, tokenizer, prompt_ids, 16, tolerance)
    if not report:
        print(report)  # per-step max|Δlogits|, top-1 agreement, first diverging step

Reports are ``export.compare`` reports (truthy when passing, print themselves, ``to_json()``).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

from export.compare import CaseResult, ComparisonReport, Tolerance, compare_logits, tolerance_for
from export.manifest import Bundle
from serving.backends.base import Backend, BackendOptions
from serving.errors import Cancelled

log = logging.getLogger(__name__)

DEFAULT_CANARY_PROMPTS: list[str] = [
    "Hello, my name is",
    "The capital of France is",
    "def fibonacci(n):\n    ",
]


@dataclass
class ParityReport(ComparisonReport):
    """A teacher-forced comparison, one case per (sequence, step); step 0 is the prompt prefill.

    ``first_diverging_step`` is the earliest failing step over all sequences (None when all pass);
    ``first_diverging`` says which sequence and step, with the numbers.
    """

    served: str = ""
    reference: str = ""
    steps: int = 0
    first_diverging_step: int | None = None
    first_diverging: str | None = None

    def summary(self) -> str:
        """One line: verdict, max|Δlogits|, top-1 agreement, first diverging step."""
        div = "" if self.first_diverging is None else f", first divergence: {self.first_diverging}"
        return (
            f"{self.title}: {'PASS' if self else 'FAIL'} max|Δlogits| {self.max_abs:.3g} "
            f"(atol {self.tolerance.atol:g}, {self.tolerance.name}), top-1 {self.top1_agreement:.2%}"
            f"{div}"
        )

    def __str__(self) -> str:
        lines = [ComparisonReport.__str__(self)]
        if self.first_diverging is not None:
            lines.append(f"  first diverging step: {self.first_diverging}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        d = ComparisonReport.to_json(self)
        d.update(
            served=self.served,
            reference=self.reference,
            steps=self.steps,
            first_diverging_step=self.first_diverging_step,
            first_diverging=self.first_diverging,
        )
        return d


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
    precision = bundle.manifest.precision
    if precision == "fp32" and device.startswith("cuda"):
        precision = "tf32"
    return tolerance_for(precision)


def served_tolerance(backend: Backend) -> Tolerance:
    """The tolerance of a loaded backend: the preset it reports in ``info()["tolerance"]`` (the
    TensorRT backend: the engine it actually loaded), else ``tolerance_for_backend``."""
    name = backend.info().get("tolerance")
    if name:
        return tolerance_for(name)
    return tolerance_for_backend(backend.bundle, backend.name, backend.options.device)


def _check_cancelled(cancelled: Callable[[], bool] | None, what: str) -> None:
    if cancelled is not None and cancelled():
        raise Cancelled(f"{what} was cancelled")


def _case_name(seq: int, step: int, token: int | None, n_seqs: int) -> str:
    head = f"seq {seq} " if n_seqs > 1 else ""
    return f"{head}step {step} ({'prefill' if token is None else f'token {token}'})"


def teacher_forced_parity(
    served: Backend,
    reference: Backend,
    sequences: list[list[int]],
    tolerance: Tolerance,
    prompt_len: int | list[int],
    title: str | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> ParityReport:
    """Run each sequence through both backends step by step and compare the logits of every step.

    Step 0 prefills ``sequence[:prompt_len]`` (all prompt positions compared); step t >= 1 feeds
    ``sequence[prompt_len + t - 1]`` to both, each with its own KV cache.

    Args:
        served: The backend under test (loaded).
        reference: The reference backend (loaded).
        sequences: Prompt + continuation ids (the continuation is what both are fed).
        tolerance: What passing means.
        prompt_len: The prompt length, one for all sequences or one per sequence.
        cancelled: Polled before every step; when it returns True the check stops.

    Raises:
        Cancelled: ``cancelled()`` returned True.
    """
    lens = [prompt_len] * len(sequences) if isinstance(prompt_len, int) else list(prompt_len)
    if len(lens) != len(sequences):
        raise ValueError(f"{len(lens)} prompt lengths for {len(sequences)} sequences")
    report = ParityReport(
        title=title or f"parity {served.name} vs {reference.name}",
        tolerance=tolerance,
        served=served.name,
        reference=reference.name,
    )
    first: tuple[int, int, CaseResult] | None = None
    for si, (seq, p) in enumerate(zip(sequences, lens)):
        if not 1 <= p <= len(seq):
            raise ValueError(f"sequence {si}: prompt_len {p} outside [1, {len(seq)}]")
        caches: list[Any] = [None, None]  # reference's, served's
        for step in range(len(seq) - p + 1):
            _check_cancelled(cancelled, report.title)
            if step == 0:
                ids = np.asarray([seq[:p]], dtype=np.int64)
                pos = np.arange(p, dtype=np.int64)[None, :]
                token = None
            else:
                token = seq[p + step - 1]
                ids = np.asarray([[token]], dtype=np.int64)
                pos = np.asarray([[p + step - 1]], dtype=np.int64)
            mask = np.ones((1, p + step), dtype=np.int64)  # past + new tokens, no padding
            logits = []
            for j, be in enumerate((reference, served)):
                out = be.forward(ids, mask, pos, caches[j])
                caches[j] = out.present
                logits.append(out.logits)
            try:
                case = compare_logits(
                    logits[0], logits[1], None, tolerance, _case_name(si, step, token, len(sequences))
                )
            except ValueError as e:
                report.errors.append(str(e))
                break
            report.cases.append(case)
            if not case and (first is None or step < first[1]):
                first = (si, step, case)
        report.steps = max(report.steps, len(seq) - p + 1)
    if first is not None:
        si, step, case = first
        report.first_diverging_step = step
        report.first_diverging = (
            f"{case.case}: max|Δlogits| {case.max_abs:.3g}, top-1 {case.top1_agreement:.2%}"
        )
    return report


def reference_continuations(
    reference: Backend,
    tokenizer: Any,
    prompts: list[list[int]],
    new_tokens: int,
    cancelled: Callable[[], bool] | None = None,
) -> list[list[int]]:
    """Prompt + the reference's greedy continuation (without stopping at EOS) for each prompt.

    Raises:
        Cancelled: ``cancelled()`` returned True (polled before every reference step).
    """
    from serving.generation import GenerationRequest, Generator

    gen = Generator(reference, tokenizer)
    out = []
    for p in prompts:
        final = gen.generate(
            GenerationRequest(list(p), new_tokens, stop_at_eos=False), cancelled or (lambda: False)
        )
        if final.finish_reason == "cancelled":
            raise Cancelled("the reference generation for parity was cancelled")
        out.append(list(p) + final.token_ids)
    return out


def check_generation_parity(
    served: Backend,
    reference: Backend,
    tokenizer: Any,
    prompt_ids: list[int],
    max_new_tokens: int,
    tolerance: Tolerance,
    cancelled: Callable[[], bool] | None = None,
) -> ParityReport:
    """Whole-generation parity of one prompt, per step (the CheckParity RPC and the CLI).

    The reference generates greedily; both backends are then teacher-forced along that sequence.

    Raises:
        Cancelled: ``cancelled()`` returned True (polled before every step of either part).
    """
    seq = reference_continuations(reference, tokenizer, [prompt_ids], max_new_tokens, cancelled)[0]
    return teacher_forced_parity(
        served,
        reference,
        [seq],
        tolerance,
        len(prompt_ids),
        title=f"generation parity {served.name} vs {reference.name}",
        cancelled=cancelled,
    )


def run_canary(
    served: Backend,
    reference: Backend,
    tokenizer: Any,
    tolerance: Tolerance,
    prompts: list[str] = DEFAULT_CANARY_PROMPTS,
    new_tokens: int = 8,
    cancelled: Callable[[], bool] | None = None,
) -> ParityReport:
    """The startup canary: a few fixed prompts teacher-forced through both backends.

    Raises:
        Cancelled: ``cancelled()`` returned True (polled before every step).
    """
    ids = [tokenizer.encode(p) for p in prompts]
    seqs = reference_continuations(reference, tokenizer, ids, new_tokens, cancelled)
    report = teacher_forced_parity(
        served,
        reference,
        seqs,
        tolerance,
        [len(i) for i in ids],
        title=f"startup canary {served.name} vs {reference.name}",
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
        served: The served backend (a server passes it wrapped so each forward takes its lock).
        guard: Entered around each check (a server's admission limit); None = nothing.
    """

    def __init__(
        self,
        reference: Backend,
        tolerance: Tolerance,
        rate: float,
        queue_size: int = 64,
        on_result: Callable[[ParityReport], None] | None = None,
        seed: int = 0,
        *,
        served: Backend,
        guard: Callable[[], AbstractContextManager] | None = None,
    ):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"shadow rate must be in [0, 1], got {rate}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.reference = reference
        self.served = served
        self.guard = guard or nullcontext
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
        """Stop the worker after the item it is on; queued items are discarded.

        Returns:
            True when the worker has ended (its backends may be closed); False when it is still
            inside a check after ``timeout`` (``stop`` may be called again).
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

    def maybe_submit(self, prompt_ids: list[int], generated_ids: list[int], *, greedy: bool = True) -> bool:
        """Sample this request for a shadow check; True if it was queued."""
        if not generated_ids or self.rate <= 0 or self._stopping:
            return False
        with self._lock:
            if self._rng.random() >= self.rate:
                return False
        try:
            self._queue.put_nowait((list(prompt_ids), list(generated_ids), greedy))
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
        self, prompt_ids: list[int], generated_ids: list[int], greedy: bool = True
    ) -> ParityReport | None:
        """One shadow check, synchronously (what the worker runs).

        ``greedy`` does not matter for a teacher-forced check (sampled tokens are fed the same way).
        """
        seq = list(prompt_ids) + list(generated_ids)
        with self.guard():
            return teacher_forced_parity(
                self.served,
                self.reference,
                [seq],
                self.tolerance,
                len(prompt_ids),
                title=f"shadow parity {self.served.name} vs {self.reference.name}",
            )

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                try:
                    report = self.check(*item)
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
        prompt: Prompt text; None runs the canary prompts.
        max_new_tokens: Tokens the reference generates (the steps compared after the prefill).
        reference_device: Where the torch reference runs. Defaults to "cpu".
        tolerance: A preset name from export.compare; None picks it from bundle, backend, device.
    """

    bundle: str
    backend: str = "onnxruntime"
    device: str | None = None
    engine: str | None = None
    trt_runtime: str = "auto"
    prompt: str | None = None
    max_new_tokens: int = 16
    reference_device: str = "cpu"
    tolerance: str | None = None


def run_parity(opts: ParityOptions) -> ParityReport:
    """Open the bundle, load both backends, and report whole-generation parity per step.

    Raises:
        export.manifest.BundleError, serving.errors.ServingError, ValueError: unusable inputs.
    """
    from serving.backends import backend_options, create_backend
    from serving.generation import GenerationRequest, Generator
    from serving.tokenizer import Tokenizer

    bundle = Bundle.open(opts.bundle)
    options = backend_options(opts.backend, opts.device, engine=opts.engine, trt_runtime=opts.trt_runtime)
    fixed = tolerance_for(opts.tolerance) if opts.tolerance else None  # a bad name fails before loading
    tokenizer = Tokenizer.from_dir(bundle.tokenizer_dir)
    ids = tokenizer.encode(opts.prompt) if opts.prompt is not None else None
    with create_backend(opts.backend, bundle, options) as served:
        # Prompt and --max-new-tokens are checked like a server request (same messages).
        check = Generator(served, tokenizer, max_new_tokens_limit=bundle.dims.n_positions)
        for p in [ids] if ids is not None else [tokenizer.encode(t) for t in DEFAULT_CANARY_PROMPTS]:
            check.validate(GenerationRequest(p, opts.max_new_tokens))
        tolerance = fixed or served_tolerance(served)  # the engine actually loaded decides
        with reference_backend(bundle, opts.reference_device) as reference:
            if ids is None:
                return run_canary(served, reference, tokenizer, tolerance, new_tokens=opts.max_new_tokens)
            return check_generation_parity(served, reference, tokenizer, ids, opts.max_new_tokens, tolerance)
