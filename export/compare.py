"""Logit comparison, shared by export validation, the serving parity checks and the TensorRT tests.

A comparison result is truthy when it passes and prints itself (Polygraphy's comparator habit):

    report = compare_logits(ref, got, valid, tolerance_for("fp32"), case="B=2,S=8,P=0")
    if not report: print(report)

Only numpy is imported here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


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


# Per-precision presets. fp32 is the hard contract; the reduced precisions are measured
# bounds with headroom (docs/export.md "Precision presets"), reported next to the measured values.
# Measured at export on CPU (ONNX Runtime 1.32) over the four validation cases, max|Δlogits|:
#   fp16: tiny 3.8e-4, gpt2-124m 2.3e-3 (real GPT-2 124M: 2-3.5e-3), top-1 100% on both
#   int8: tiny 7.2e-3, gpt2-124m 8.5e-2 (per-tensor, lm_head fp32), top-1 96.8% / 100%
#   gpt2-1.5b: fp16 4.0e-3; int8 0.165 with 3 argmax flips in 31 positions (one in a 2-position
#   case): random-weight logits have near-ties, which an error of 0.165 can flip
# Top-1 is checked per case and a case has 1-15 unpadded positions, so a single flip costs 7-50%:
# flips between near-ties (reference margin <= tie_margin, a few times the measured error) count
# as agreeing; a flip of a clear winner still fails. fp32 counts every flip.
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
    # GPU fp32 where TF32 math is on (ORT's CUDA EP, TensorRT's default): measured ~2e-3 on 124M.
    "tf32": Tolerance("tf32", atol=2e-2, min_top1=0.99, note="fp32 I/O with TF32 matmuls"),
    "bf16": Tolerance("bf16", atol=2.5e-1, min_top1=0.95, note="bf16 matmuls, fp32 norms"),
}


def tolerance_for(precision: str) -> Tolerance:
    try:
        return PRECISION_TOLERANCES[precision]
    except KeyError:
        raise ValueError(
            f"no tolerance preset for precision {precision!r}; presets are: {', '.join(PRECISION_TOLERANCES)}"
        ) from None


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
