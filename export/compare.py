"""Logit comparison, shared by export validation, the serving parity checks and the TensorRT tests.

A comparison result is truthy when it passes and prints itself (Polygraphy's comparator habit):

    report = compare_logits(ref, got, valid, tolerance_for("fp32"), case="B=2,S=8,P=0")
    if not report: print(report)

Only numpy (and ``export.errors``) is imported here. ``tolerance_for_run`` picks the tolerance for
a run (graph precision, device/TF32, engine precision); everything else calls it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from export.errors import OptionsError


@dataclass(frozen=True)
class Tolerance:
    """What "matches the reference" means for one precision.

    Args:
        name: The preset's name (the precision it is for).
        atol: Maximum allowed max|Δlogits| over unpadded positions.
        min_top1: Minimum fraction of unpadded positions whose argmax must agree.
        note: Where the numbers come from.
        tie_margin: An argmax flip where the reference prefers its own top-1 over the chosen token
            by at most this much counts as agreeing (a near-tie that the precision's error can
            legitimately flip). 0 (fp32): every flip counts.
    """

    name: str
    atol: float
    min_top1: float
    note: str = ""
    tie_margin: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# Per-precision presets: fp32 is exact up to kernel differences; the reduced precisions are measured
# bounds with headroom. The measurements behind each bound, and why near-tie argmax flips are
# forgiven: docs/export.md "Validation and precision presets".
PRECISION_TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance("fp32", atol=1e-4, min_top1=1.0, note="same math, different kernels"),
    "ort-fused": Tolerance("ort-fused", atol=1e-4, min_top1=1.0, note="fused kernels, fp32"),
    "fp16": Tolerance(
        "fp16",
        atol=5e-2,
        min_top1=0.9,
        tie_margin=2e-2,
        note="fp16 weights/matmuls, fp32 LayerNorm/Softmax/residual/lm_head; "
        "measured 2.3e-3 (gpt2-124m) .. 4.0e-3 (gpt2-1.5b)",
    ),
    "int8": Tolerance(
        "int8",
        atol=1.0,
        min_top1=0.75,
        tie_margin=0.5,
        note="dynamic int8 weight matmuls, fp32 lm_head; measured 8.5e-2 (gpt2-124m) .. 0.165 (gpt2-1.5b)",
    ),
    "int4": Tolerance(
        "int4",
        atol=4.0,
        min_top1=0.5,
        tie_margin=1.5,
        note="4-bit weight-only matmuls + lm_head (MatMulNBits, blocks of 32, asymmetric); "
        "measured 8.6e-2 (tiny) .. 0.59 (gpt2-124m)",
    ),
    # GPU fp32 where TF32 math is on (ORT's CUDA EP, TensorRT's default): measured ~2e-3 on 124M.
    "tf32": Tolerance("tf32", atol=2e-2, min_top1=0.99, note="fp32 I/O with TF32 matmuls"),
    "bf16": Tolerance("bf16", atol=2.5e-1, min_top1=0.95, note="bf16 matmuls, fp32 norms"),
}


# Precisions whose math is fp32: on a GPU their matmuls may run in TF32.
FP32_MATH = ("fp32", "ort-fused")


def tolerance_for(precision: str) -> Tolerance:
    """The preset called ``precision`` (a key of ``PRECISION_TOLERANCES``, e.g. from ``--tolerance``).

    Raises:
        OptionsError: no such preset.
    """
    try:
        return PRECISION_TOLERANCES[precision]
    except KeyError:
        raise OptionsError(
            f"no tolerance preset for precision {precision!r}; presets are: {', '.join(PRECISION_TOLERANCES)}"
        ) from None


def tolerance_for_run(
    precision: str, *, device: str = "cpu", tf32: bool | None = None, engine_precision: str | None = None
) -> Tolerance:
    """The tolerance a run must meet against the PyTorch reference: the one place that decides.

    Args:
        precision: The bundle's graph precision (``export.variants.EXPORT_PRECISIONS``).
        device: Where it runs: cpu, cuda or cuda:N.
        tf32: Whether fp32 matmuls may use TF32; None means the device's default (on for CUDA,
            where ONNX Runtime's CUDA EP and TensorRT use it unless told not to; off on CPU).
        engine_precision: A TensorRT engine's precision (``deploy.presets.ENGINE_PRECISIONS``); the
            engine computes in it, whatever the graph's.
    """
    computed = engine_precision or precision
    if tf32 is None:
        tf32 = device.startswith("cuda")
    if computed in FP32_MATH and tf32:
        return tolerance_for("tf32")
    return tolerance_for(computed)


@dataclass
class CaseResult:
    """The comparison of one case (one input shape, or one generation step)."""

    case: str
    max_abs: float
    mean_abs: float
    top1_agreement: float
    positions: int
    first_mismatch: int | None  # index (flattened over valid positions) of the first argmax mismatch
    passed: bool
    finite: bool = True
    near_tie_flips: int = 0  # argmax flips forgiven as near-ties (Tolerance.tie_margin)

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        mark = "PASS" if self.passed else "FAIL"
        fm = "" if self.first_mismatch is None else f", first argmax mismatch at {self.first_mismatch}"
        nan = "" if self.finite else ", NON-FINITE values"
        ties = f" ({self.near_tie_flips} near-tie)" if self.near_tie_flips else ""
        return (
            f"[{mark}] {self.case}: max|Δ| {self.max_abs:.3g}, mean|Δ| {self.mean_abs:.3g}, "
            f"top-1 {self.top1_agreement:.2%} of {self.positions}{fm}{ties}{nan}"
        )


def compare_logits(
    reference: np.ndarray, actual: np.ndarray, valid: np.ndarray | None, tolerance: Tolerance, case: str
) -> CaseResult:
    """Compare logits (..., V) at the positions where ``valid`` (shape ``...``) is true.

    Padded positions are excluded: with left padding the logits there are meaningless and differ
    legitimately between implementations.
    """
    ref = np.asarray(reference, dtype=np.float32)
    got = np.asarray(actual, dtype=np.float32)
    if ref.shape != got.shape:
        raise ValueError(f"{case}: logits shapes differ: reference {ref.shape}, actual {got.shape}")
    if valid is None:
        valid = np.ones(ref.shape[:-1], dtype=bool)
    valid = np.asarray(valid, dtype=bool)
    r = ref[valid]  # (N, V)
    g = got[valid]
    if r.shape[0] == 0:
        return CaseResult(case, 0.0, 0.0, 1.0, 0, None, True)
    finite = bool(np.isfinite(g).all())
    diff = np.abs(r - g)
    max_abs = float(np.nanmax(diff)) if finite else float("inf")
    mean_abs = float(np.nanmean(diff)) if finite else float("inf")
    chosen = g.argmax(-1)
    agree = r.argmax(-1) == chosen
    top1 = float(agree.mean())
    mism = np.flatnonzero(~agree)
    # how much the reference prefers its own top-1 over the token the actual output picked
    margin = r.max(-1) - r[np.arange(r.shape[0]), chosen]
    near_tie = ~agree & (margin <= tolerance.tie_margin) if tolerance.tie_margin > 0 else np.zeros_like(agree)
    counted_top1 = float((agree | near_tie).mean())
    passed = finite and max_abs <= tolerance.atol and counted_top1 >= tolerance.min_top1
    return CaseResult(
        case,
        max_abs,
        mean_abs,
        top1,
        int(r.shape[0]),
        int(mism[0]) if mism.size else None,
        passed,
        finite,
        int(near_tie.sum()),
    )


@dataclass
class ComparisonReport:
    """Several cases against one tolerance: truthy when all pass; prints a table."""

    title: str
    tolerance: Tolerance
    cases: list[CaseResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # failures that are not numeric (names, shapes)

    def __bool__(self) -> bool:
        return not self.errors and all(self.cases)

    @property
    def max_abs(self) -> float:
        return max((c.max_abs for c in self.cases), default=0.0)

    @property
    def top1_agreement(self) -> float:
        n = sum(c.positions for c in self.cases)
        return sum(c.top1_agreement * c.positions for c in self.cases) / n if n else 1.0

    def __str__(self) -> str:
        t = self.tolerance
        ties = f", flips of near-ties <= {t.tie_margin:g} allowed" if t.tie_margin else ""
        head = (
            f"{self.title}: {'PASS' if self else 'FAIL'} (tolerance {t.name}: "
            f"max|Δ| <= {t.atol:g}, top-1 >= {t.min_top1:.0%}{ties})"
        )
        lines = [head, *(f"  {c}" for c in self.cases), *(f"  [ERROR] {e}" for e in self.errors)]
        if self.cases:
            lines.append(f"  overall: max|Δ| {self.max_abs:.3g}, top-1 {self.top1_agreement:.2%}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "passed": bool(self),
            "tolerance": self.tolerance.to_json(),
            "max_abs": self.max_abs,
            "top1_agreement": self.top1_agreement,
            "cases": [asdict(c) for c in self.cases],
            "errors": list(self.errors),
        }


def step_case_name(seq: int, step: int, token: int | None, n_seqs: int) -> str:
    """A teacher-forced step's label: ``seq 1 step 0 (prefill)``, ``step 3 (token 612)``."""
    head = f"seq {seq} " if n_seqs > 1 else ""
    return f"{head}step {step} ({'prefill' if token is None else f'token {token}'})"


@dataclass
class ParityReport(ComparisonReport):
    """A teacher-forced comparison, one case per (sequence, step); step 0 is the prompt prefill.

    ``first_diverging_step`` is the earliest failing step over all sequences (None when all pass);
    ``first_diverging`` says which sequence and step, with the numbers. ``batch_sizes`` are the
    rows of each forward the (first) checked row ran in; ``notes`` say how it ran.
    """

    served: str = ""
    reference: str = ""
    steps: int = 0
    first_diverging_step: int | None = None
    first_diverging: str | None = None
    batch_sizes: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add_case(self, step: int, case: CaseResult) -> None:
        """Record one step's result, keeping track of the first divergence."""
        self.cases.append(case)
        if not case and (self.first_diverging_step is None or step < self.first_diverging_step):
            self.first_diverging_step = step
            self.first_diverging = (
                f"{case.case}: max|Δlogits| {case.max_abs:.3g}, top-1 {case.top1_agreement:.2%}"
            )

    def summary(self) -> str:
        """One line: verdict, max|Δlogits|, top-1 agreement, first diverging step."""
        div = "" if self.first_diverging is None else f", first divergence: {self.first_diverging}"
        return (
            f"{self.title}: {'PASS' if self else 'FAIL'} max|Δlogits| {self.max_abs:.3g} "
            f"(atol {self.tolerance.atol:g}, {self.tolerance.name}), top-1 {self.top1_agreement:.2%}{div}"
        )

    def __str__(self) -> str:
        lines = [ComparisonReport.__str__(self)]
        if self.first_diverging is not None:
            lines.append(f"  first diverging step: {self.first_diverging}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        d = ComparisonReport.to_json(self)
        d.update(
            served=self.served,
            reference=self.reference,
            steps=self.steps,
            first_diverging_step=self.first_diverging_step,
            first_diverging=self.first_diverging,
            batch_sizes=list(self.batch_sizes),
            notes=list(self.notes),
        )
        return d
