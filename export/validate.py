"""Export-time validation: onnx checker, then an ONNX Runtime session against the PyTorch model.

Checks go names -> shapes -> values over a fixed set of cases; every failure is collected and one
``ValidationError`` carrying the whole report is raised at the end (optimum's habit), so a user
sees everything that is wrong at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.compare import ComparisonReport, Tolerance, compare_logits, tolerance_for
from export.contract import LOGITS, LOGITS_TO_KEEP, IOContract, left_padded_positions
from export.deps import require


class ValidationError(Exception):
    """The exported graph does not match the reference; ``report`` holds every failure."""

    def __init__(self, report: ComparisonReport):
        self.report = report
        super().__init__(str(report))


@dataclass(frozen=True)
class Case:
    """One validation input: batch, new tokens, past length, and how many rows are left-padded."""

    batch: int
    seq: int
    past: int
    padded_rows: int = 0

    @property
    def name(self) -> str:
        pad = f", {self.padded_rows} row left-padded" if self.padded_rows else ""
        return f"B={self.batch},S={self.seq},P={self.past}{pad}"


# The minimum set: first step, a padded prefill, decode over a past, random past.
DEFAULT_CASES = (Case(1, 1, 0), Case(2, 8, 0, padded_rows=1), Case(2, 1, 16), Case(3, 5, 7))


def make_case_inputs(case: Case, contract: IOContract, seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds for one case. Padding is on the left of row 0 (3 pad tokens at the start)."""
    rng = np.random.default_rng(seed)
    b, s, p = case.batch, case.seq, case.past
    ids = rng.integers(0, contract.vocab_size, (b, s), dtype=np.int64)
    mask = np.ones((b, p + s), dtype=np.int64)
    for r in range(case.padded_rows):
        mask[r, : min(3, p + s - 1)] = 0
    # positions count real tokens only, so a left-padded row starts at 0 like an unpadded one
    pos = left_padded_positions(mask)[:, p:]
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos.astype(np.int64)}
    for name in contract.past_names:
        shape = contract.concrete_shape(name, batch=b, seq=s, past=p)
        feeds[name] = rng.standard_normal(shape, dtype=np.float32)
    return feeds


def reference_outputs(model: Any, feeds: dict[str, np.ndarray], contract: IOContract) -> list[np.ndarray]:
    """Run the PyTorch model on ``feeds``; outputs in contract order."""
    torch = require("torch")
    from export.onnx_export import flat_kv_decoder

    decoder = flat_kv_decoder(model)
    args = [torch.from_numpy(feeds[n]) for n in contract.input_names]
    with torch.no_grad():
        outs = decoder(*args)
    return [o.float().numpy() for o in outs]


@dataclass
class References:
    """The PyTorch model's outputs on the validation cases, computed once.

    Computing them before the ONNX work lets the exporter free the PyTorch model first: making
    and checking a variant of gpt2-xl then does not hold 6 GB of torch weights on top.
    """

    contract: IOContract
    cases: tuple[Case, ...]
    feeds: list[dict[str, np.ndarray]]
    outputs: list[list[np.ndarray]]

    @classmethod
    def compute(cls, model: Any, cases: tuple[Case, ...] = DEFAULT_CASES) -> References:
        contract = IOContract.for_config(model.config)
        feeds = [make_case_inputs(case, contract, seed=i) for i, case in enumerate(cases)]
        return cls(contract, tuple(cases), feeds, [reference_outputs(model, f, contract) for f in feeds])


def check_graph(onnx_path: Path, contract: IOContract) -> list[str]:
    """onnx checker + the contract's names and symbolic shapes. Returns the problems found."""
    onnx = require("onnx")
    problems: list[str] = []
    try:  # the path form handles external data and models over 2 GB
        onnx.checker.check_model(str(onnx_path), full_check=False)
    except Exception as e:  # noqa: BLE001 - the checker raises several types; report them all
        problems.append(f"onnx checker: {type(e).__name__}: {e}")
    m = onnx.load(str(onnx_path), load_external_data=False)
    for kind, got, want in (
        ("inputs", [i.name for i in m.graph.input], contract.input_names),
        ("outputs", [o.name for o in m.graph.output], contract.output_names),
    ):
        if got != want:
            missing = [n for n in want if n not in got]
            extra = [n for n in got if n not in want]
            problems.append(
                f"graph {kind} differ from the contract: missing {missing}, unexpected {extra}"
                if (missing or extra)
                else f"graph {kind} are in a different order than the contract"
            )
    for vi in (*m.graph.input, *m.graph.output):
        try:
            spec = contract.spec(vi.name)
        except KeyError:
            continue
        dims = tuple(d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim)
        if len(dims) != len(spec.shape):
            problems.append(
                f"{vi.name}: rank {len(dims)}, contract says {len(spec.shape)} {list(spec.shape)}"
            )
        elif any(isinstance(w, int) and g != w for g, w in zip(dims, spec.shape)):
            problems.append(f"{vi.name}: shape {list(dims)}, contract says {list(spec.shape)}")
    return problems


def _session(ort: Any, path: Path, providers: list[str] | None, errors: list[str], what: str) -> Any:
    """An ONNX Runtime session on ``path`` (its warnings silenced), or None with the load failure
    appended to ``errors``."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        errors.append(f"ONNX Runtime cannot load {what}: {type(e).__name__}: {e}")
        return None


def _finish(report: ComparisonReport, raise_on_failure: bool) -> ComparisonReport:
    if raise_on_failure and not report:
        raise ValidationError(report)
    return report


def validate_export(
    onnx_path: str | Path,
    model: Any,
    tolerance: Tolerance,
    *,
    cases: tuple[Case, ...] = DEFAULT_CASES,
    providers: list[str] | None = None,
    raise_on_failure: bool = True,
) -> ComparisonReport:
    """Validate the graph at ``onnx_path`` against ``model`` (names -> shapes -> values).

    Args:
        onnx_path: The graph (external data beside it is found by ONNX Runtime).
        model: The PyTorch GPT2LMHeadModel, or its ``References`` computed earlier (then
            ``cases`` is taken from them).
        tolerance: The precision preset deciding pass/fail.
        cases: Input shapes to compare on.
        providers: ONNX Runtime execution providers (default CPU).
        raise_on_failure: Raise instead of returning a failing report.

    Raises:
        ValidationError: when anything fails and ``raise_on_failure``; it lists every failure.
    """
    ort = require("onnxruntime")
    onnx_path = Path(onnx_path)
    refs = model if isinstance(model, References) else None
    contract = refs.contract if refs else IOContract.for_config(model.config)
    report = ComparisonReport(f"validation of {onnx_path.name}", tolerance)
    report.errors.extend(check_graph(onnx_path, contract))
    if report.errors:  # names/shapes wrong: values would only add noise
        return _finish(report, raise_on_failure)
    sess = _session(ort, onnx_path, providers, report.errors, "the graph")
    if sess is None:
        return _finish(report, raise_on_failure)
    for i, case in enumerate(refs.cases if refs else cases):
        feeds = refs.feeds[i] if refs else make_case_inputs(case, contract, seed=i)
        try:
            got = sess.run(None, feeds)
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            report.errors.append(f"{case.name}: ONNX Runtime failed: {type(e).__name__}: {e}")
            continue
        ref = refs.outputs[i] if refs else reference_outputs(model, feeds, contract)
        shape_errors = [
            f"{case.name}: {name} shape {list(g.shape)}, expected {list(r.shape)}"
            for name, g, r in zip(contract.output_names, got, ref)
            if g.shape != r.shape
        ]
        if shape_errors:
            report.errors.extend(shape_errors)
            continue
        valid = feeds["attention_mask"][:, case.past :].astype(bool)  # (B, S): unpadded positions
        report.cases.append(compare_logits(ref[0], got[0], valid, tolerance, f"{case.name} {LOGITS}"))
        # present must equal past followed by the new keys/values (the cache the next step reads),
        # at unpadded positions: keys/values of padding are never attended to and may differ
        kv_valid = feeds["attention_mask"].astype(bool)  # (B, P + S)
        kv_err = max(
            float(np.abs(g - r).transpose(0, 2, 1, 3)[kv_valid].max()) for g, r in zip(got[1:], ref[1:])
        )
        if not np.isfinite(kv_err) or kv_err > max(tolerance.atol, 1e-3) * 10:
            report.errors.append(f"{case.name}: present KV differs from the reference by {kv_err:.3g}")
    return _finish(report, raise_on_failure)


# The serving graph computes what the graph it was derived from computes (same variant, the same
# kernels but for the lm_head's row count), so it is held to the fp32 preset whatever the precision.
SERVING_TOLERANCE = "fp32"


def validate_serving_graph(
    serving_path: str | Path,
    full_path: str | Path,
    contract: IOContract,
    *,
    cases: tuple[Case, ...] = DEFAULT_CASES,
    providers: list[str] | None = None,
    raise_on_failure: bool = True,
) -> ComparisonReport:
    """Validate a serving graph against the main graph it was derived from (names -> shapes -> values).

    The serving graph (``contract.logits_positions`` "kept" or "last") must return, on the same
    inputs, the main graph's logits at the positions it keeps (the last one with
    ``logits_to_keep=1``; every one with ``logits_to_keep=0``) and the same present KV.

    Args:
        serving_path: The serving graph.
        full_path: The graph it was derived from (``logits_positions="all"``, validated itself).
        contract: The serving graph's contract.
        cases: Input shapes to compare on (left padding included by default).
        providers: ONNX Runtime execution providers (default CPU).
        raise_on_failure: Raise instead of returning a failing report.

    Raises:
        ValidationError: when anything fails and ``raise_on_failure``; it lists every failure.
    """
    ort = require("onnxruntime")
    serving_path, full_path = Path(serving_path), Path(full_path)
    tolerance = tolerance_for(SERVING_TOLERANCE)
    report = ComparisonReport(f"validation of {serving_path.name} against {full_path.name}", tolerance)
    if contract.logits_positions == "all":
        report.errors.append("the serving graph's contract must keep some positions ('kept' or 'last')")
        return _finish(report, raise_on_failure)
    report.errors.extend(check_graph(serving_path, contract))
    if report.errors:
        return _finish(report, raise_on_failure)
    sessions = {
        name: _session(ort, path, providers, report.errors, path.name)
        for name, path in (("full", full_path), ("serving", serving_path))
    }
    if report.errors:
        return _finish(report, raise_on_failure)
    main = contract.with_logits_positions("all")
    kept = contract.logits_positions == "kept"
    for i, case in enumerate(cases):
        feeds = make_case_inputs(case, main, seed=i)
        full = sessions["full"].run(None, feeds)
        for keep in (1, 0) if kept else (1,):
            label = f"{case.name} logits_to_keep={keep}" if kept else case.name
            extra = {LOGITS_TO_KEEP: np.array(keep, dtype=np.int64)} if kept else {}
            try:
                got = sessions["serving"].run(None, {**feeds, **extra})
            except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
                report.errors.append(f"{label}: ONNX Runtime failed: {type(e).__name__}: {e}")
                continue
            want = full[0][:, -keep:] if keep else full[0]  # with left padding the last is seq - 1
            expected = [want.shape, *(f.shape for f in full[1:])]
            shape_errors = [
                f"{label}: {name} shape {list(g.shape)}, expected {list(e)}"
                for name, g, e in zip(contract.output_names, got, expected)
                if g.shape != e
            ]
            if shape_errors:
                report.errors.extend(shape_errors)
                continue
            valid = feeds["attention_mask"][:, case.past :].astype(bool)[:, -want.shape[1] :]
            report.cases.append(compare_logits(want, got[0], valid, tolerance, f"{label} {LOGITS}"))
            kv_err = max(
                (float(np.abs(g - f).max()) for g, f in zip(got[1:], full[1:]) if g.size), default=0.0
            )
            if not np.isfinite(kv_err) or kv_err > tolerance.atol:
                report.errors.append(f"{label}: present KV differs from {full_path.name}'s by {kv_err:.3g}")
    return _finish(report, raise_on_failure)
