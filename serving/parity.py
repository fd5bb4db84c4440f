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
from dataclasses import dataclass
from typing import Any

import numpy as np

from export.compare import CaseResult, ComparisonReport, Tolerance, compare_logits, tolerance_for
from export.manifest import Bundle
from serving.backends.base import Backend, BackendOptions

log = logging.getLogger(__name__)

DEFAULT_CANARY_PROMPTS: list[str] = [
    "Hello, my name is",
    "The capital of France is",
    "def fibonacci(n):\n    ",
]

# Manifest precision names that differ from their tolerance preset's name.
_PRECISION_ALIASES = {"fp32-ort-fused": "ort-fused"}


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
        return (f"{self.title}: {'PASS' if self else 'FAIL'} max|Δlogits| {self.max_abs:.3g} "
                f"(atol {self.tolerance.atol:g}, {self.tolerance.name}), top-1 {self.top1_agreement:.2%}"
                f"{div}")

    def __str__(self) -> str:
        lines = [ComparisonReport.__str__(self)]
        if self.first_diverging is not None:
            lines.append(f"  first diverging step: {self.first_diverging}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        d = ComparisonReport.to_json(self)
        d.update(served=self.served, reference=self.reference, steps=self.steps,
                 first_diverging_step=self.first_diverging_step, first_diverging=self.first_diverging)
        return d


def reference_backend(bundle: Bundle, device: str = "cpu") -> Backend:
    """The torch reference backend on ``device``, loaded."""
    from serving.backends import create_backend

    return create_backend("torch", bundle, BackendOptions(device=device)).load()


def tolerance_for_backend(bundle: Bundle, backend_name: str, device: str = "cpu") -> Tolerance:
    """The tolerance a backend must meet against the CPU fp32 reference.

    The bundle's precision decides (fp16, int8 ... presets); a TensorRT engine's own precision
    wins for the tensorrt backend; fp32 on a GPU uses the "tf32" preset (ORT's CUDA EP and
    TensorRT use TF32 matmuls by default, and GPU kernels differ from CPU ones).
    """
    precision = bundle.manifest.precision
    if backend_name == "tensorrt" and bundle.manifest.engines:
        precision = bundle.manifest.engines[-1].get("precision", precision)
    precision = _PRECISION_ALIASES.get(precision, precision)
    if precision == "fp32" and device.startswith("cuda"):
        precision = "tf32"
    return tolerance_for(precision)


def _case_name(seq: int, step: int, token: int | None, n_seqs: int) -> str:
    head = f"seq {seq} " if n_seqs > 1 else ""
    return f"{head}step {step} ({'prefill' if token is None else f'token {token}'})"


def teacher_forced_parity(served: Backend, reference: Backend, sequences: list[list[int]],
                          tolerance: Tolerance, prompt_len: int | list[int],
                          title: str | None = None) -> ParityReport:
    """Run each sequence through both backends step by step and compare the logits of every step.

    Step 0 prefills ``sequence[:prompt_len]`` (all prompt positions compared); step t >= 1 feeds
    ``sequence[prompt_len + t - 1]`` to both, each with its own KV cache.

    Args:
        served: The backend under test (loaded).
        reference: The reference backend (loaded).
        sequences: Prompt + continuation ids (the continuation is what both are fed).
        tolerance: What passing means.
        prompt_len: The prompt length, one for all sequences or one per sequence.
    """
    lens = [prompt_len] * len(sequences) if isinstance(prompt_len, int) else list(prompt_len)
    if len(lens) != len(sequences):
        raise ValueError(f"{len(lens)} prompt lengths for {len(sequences)} sequences")
    report = ParityReport(title=title or f"parity {served.name} vs {reference.name}", tolerance=tolerance,
                          served=served.name, reference=reference.name)
    first: tuple[int, int, CaseResult] | None = None
    for si, (seq, p) in enumerate(zip(sequences, lens)):
        if not 1 <= p <= len(seq):
            raise ValueError(f"sequence {si}: prompt_len {p} outside [1, {len(seq)}]")
        caches: list[Any] = [None, None]  # reference's, served's
        for step in range(len(seq) - p + 1):
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
                case = compare_logits(logits[0], logits[1], None, tolerance,
                                      _case_name(si, step, token, len(sequences)))
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
        report.first_diverging = (f"{case.case}: max|Δlogits| {case.max_abs:.3g}, "
                                  f"top-1 {case.top1_agreement:.2%}")
    return report


def reference_continuations(reference: Backend, tokenizer: Any, prompts: list[list[int]],
                            new_tokens: int) -> list[list[int]]:
    """Prompt + the reference's greedy continuation (without stopping at EOS) for each prompt."""
    from serving.generation import GenerationRequest, Generator

    gen = Generator(reference, tokenizer)
    return [list(p) + gen.generate(GenerationRequest(list(p), new_tokens, stop_at_eos=False)).token_ids
            for p in prompts]


def check_generation_parity(served: Backend, reference: Backend, tokenizer: Any, prompt_ids: list[int],
                            max_new_tokens: int, tolerance: Tolerance) -> ParityReport:
    """Whole-generation parity of one prompt, per step (the CheckParity RPC and the CLI).

    The reference generates greedily; both backends are then teacher-forced along that sequence.
    """
    seq = reference_continuations(reference, tokenizer, [prompt_ids], max_new_tokens)[0]
    return teacher_forced_parity(served, reference, [seq], tolerance, len(prompt_ids),
                                 title=f"generation parity {served.name} vs {reference.name}")


def run_canary(served: Backend, reference: Backend, tokenizer: Any, tolerance: Tolerance,
               prompts: list[str] = DEFAULT_CANARY_PROMPTS, new_tokens: int = 8) -> ParityReport:
    """The startup canary: a few fixed prompts teacher-forced through both backends."""
    ids = [tokenizer.encode(p) for p in prompts]
    seqs = reference_continuations(reference, tokenizer, ids, new_tokens)
    report = teacher_forced_parity(served, reference, seqs, tolerance, [len(i) for i in ids],
                                   title=f"startup canary {served.name} vs {reference.name}")
    (log.info if report else log.error)("%s", report.summary())
    return report


class ShadowParity:
    """Re-checks a sampled fraction of live requests against the reference, off the hot path.

    ``maybe_submit`` is cheap and never blocks: it samples with probability ``rate`` and enqueues
    into a bounded queue, counting a drop when the queue is full. A worker thread checks each
    item and records the report (``last_report``, the counters, ``on_result``).

    With ``served`` given, the worker teacher-forces the request's tokens through both backends
    and compares logits (a full ParityReport). Without it, only the request's tokens are known:
    for greedy requests each generated token must be the reference's argmax at its step (a
    ParityReport whose cases measure top-1 agreement only, max|Δ| reported as 0); requests
    submitted with ``greedy=False`` are then skipped.

    Args:
        reference: The loaded reference backend.
        tolerance: What passing means.
        rate: Fraction of requests to check, in [0, 1].
        queue_size: Bound of the work queue.
        on_result: Called with each report on the worker thread.
        seed: Seed of the sampling decision.
        served: The served backend, for logit-level checks.
    """

    def __init__(self, reference: Backend, tolerance: Tolerance, rate: float, queue_size: int = 64,
                 on_result: Callable[[ParityReport], None] | None = None, seed: int = 0, *,
                 served: Backend | None = None):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"shadow rate must be in [0, 1], got {rate}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.reference = reference
        self.served = served
        self.tolerance = tolerance
        self.rate = rate
        self.on_result = on_result
        self._rng = np.random.default_rng(seed)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.submitted = self.dropped = self.checked = self.failed = self.skipped = self.errors = 0
        self.last_report: ParityReport | None = None

    def start(self) -> ShadowParity:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="shadow-parity", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the worker after the item it is on; queued items are discarded."""
        if self._thread is None:
            return
        while True:  # make room for the sentinel without blocking
            try:
                self._queue.put_nowait(None)
                break
            except queue.Full:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
        self._thread.join(timeout)
        self._thread = None

    def maybe_submit(self, prompt_ids: list[int], generated_ids: list[int], *, greedy: bool = True) -> bool:
        """Sample this request for a shadow check; True if it was queued."""
        if not generated_ids or self.rate <= 0:
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

    def check(self, prompt_ids: list[int], generated_ids: list[int],
              greedy: bool = True) -> ParityReport | None:
        """One shadow check, synchronously (what the worker runs). None when skipped."""
        seq = list(prompt_ids) + list(generated_ids)
        if self.served is not None:
            return teacher_forced_parity(self.served, self.reference, [seq], self.tolerance, len(prompt_ids),
                                         title=f"shadow parity {self.served.name} vs {self.reference.name}")
        if not greedy:
            return None
        return greedy_token_parity(self.reference, prompt_ids, generated_ids, self.tolerance)

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
            return {"submitted": self.submitted, "dropped": self.dropped, "checked": self.checked,
                    "failed": self.failed, "skipped": self.skipped, "errors": self.errors}


def greedy_token_parity(reference: Backend, prompt_ids: list[int], generated_ids: list[int],
                        tolerance: Tolerance) -> ParityReport:
    """Whether each greedily generated token is the reference's argmax at its step (one forward)."""
    seq = list(prompt_ids) + list(generated_ids)
    s, p = len(seq), len(prompt_ids)
    out = reference.forward(np.asarray([seq], dtype=np.int64), np.ones((1, s), dtype=np.int64),
                            np.arange(s, dtype=np.int64)[None, :])
    ref_next = out.logits[0, p - 1: s - 1].argmax(-1)  # (G,) the reference's choice at each step
    report = ParityReport(title=f"shadow token parity vs {reference.name}", tolerance=tolerance,
                          served="(tokens)", reference=reference.name, steps=len(generated_ids))
    for t, (got, want) in enumerate(zip(generated_ids, ref_next.tolist())):
        agree = got == want
        report.cases.append(CaseResult(f"step {t + 1} (token {got}, reference {want})", 0.0, 0.0,
                                       1.0 if agree else 0.0, 1, None if agree else 0,
                                       agree or tolerance.min_top1 < 1.0))
        if not agree and report.first_diverging_step is None:
            report.first_diverging_step = t + 1
            report.first_diverging = f"step {t + 1}: served token {got}, reference argmax {want}"
    # Below-1 top-1 tolerances judge the agreement over the whole request, not per token.
    if tolerance.min_top1 < 1.0 and report.top1_agreement < tolerance.min_top1:
        report.errors.append(f"top-1 agreement {report.top1_agreement:.2%} < {tolerance.min_top1:.0%}")
    return report


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
    from serving.tokenizer import Tokenizer

    if opts.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {opts.max_new_tokens}")
    bundle = Bundle.open(opts.bundle)
    options = backend_options(opts.backend, opts.device, engine=opts.engine, trt_runtime=opts.trt_runtime)
    tolerance = tolerance_for(opts.tolerance) if opts.tolerance else \
        tolerance_for_backend(bundle, opts.backend, options.device)
    tokenizer = Tokenizer.from_dir(bundle.tokenizer_dir)
    with create_backend(opts.backend, bundle, options) as served, \
            reference_backend(bundle, opts.reference_device) as reference:
        if opts.prompt is None:
            return run_canary(served, reference, tokenizer, tolerance, new_tokens=opts.max_new_tokens)
        ids = tokenizer.encode(opts.prompt)
        if not ids:
            raise ValueError("--prompt is empty; give some text")
        limit = bundle.dims.n_positions
        if len(ids) + opts.max_new_tokens > limit:
            raise ValueError(f"prompt ({len(ids)} tokens) + --max-new-tokens ({opts.max_new_tokens}) "
                             f"exceeds the model's context of {limit} positions")
        return check_generation_parity(served, reference, tokenizer, ids, opts.max_new_tokens, tolerance)
