"""The golden parity record: made at export from the reference, checked later without torch.

Real tiny export (the ``tiny_bundle`` fixture), the real ONNX Runtime backend and the real torch
reference. The live-reference check the golden verdicts must agree with is what the serving canary
does: both backends teacher-forced along the same tokens, full rows compared by ``compare_logits``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from export.compare import (
    PRECISION_TOLERANCES,
    ComparisonReport,
    Tolerance,
    compare_logits,
    step_case_name,
    tolerance_for,
)
from export.golden import (
    CANARY_PROMPTS,
    DEFAULT_NEW_TOKENS,
    DEFAULT_TOP_K,
    SCHEMA_VERSION,
    STATS,
    GoldenError,
    GoldenRecord,
    check_backend,
    compare_rows,
    make_golden,
    summarize_logits,
)
from export.manifest import GOLDEN_FILE, Bundle, BundleError, sha256_file

ROOT = Path(__file__).resolve().parents[2]
FP32 = tolerance_for("fp32")


@pytest.fixture(scope="module")
def record(tiny_bundle) -> GoldenRecord:
    return GoldenRecord.from_file(tiny_bundle.golden_path)


@pytest.fixture(scope="module")
def ort(tiny_bundle):
    from serving.backends.ort_backend import OrtBackend

    with OrtBackend(tiny_bundle) as be:
        yield be


@pytest.fixture(scope="module")
def reference(tiny_bundle):
    from serving.backends import create_backend

    with create_backend("torch", tiny_bundle) as be:
        yield be


class Perturbed:
    """A real backend whose logits are changed on the way out (the deliberately broken backend)."""

    name = "perturbed"

    def __init__(self, backend, change):
        self.backend, self.change = backend, change

    def forward(self, *args, **kwargs):
        out = self.backend.forward(*args, **kwargs)
        out.logits = self.change(np.array(out.logits, dtype=np.float32))
        return out


def noise(sigma: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    return lambda x: x + rng.normal(0.0, sigma, x.shape).astype(np.float32)


def live_check(served, reference, record, tolerance) -> ComparisonReport:
    """The live-reference check: both backends teacher-forced along the record's tokens, every
    step's full logits compared with ``compare_logits`` (what the serving canary does)."""
    report = ComparisonReport("live", tolerance)
    for si, seq in enumerate(record.sequences):
        caches = [None, None]
        for step in range(seq.steps):
            logits = []
            for j, be in enumerate((reference, served)):
                out = be.forward(*seq.step_inputs(step), caches[j])
                caches[j] = out.present
                logits.append(out.logits)
            token = None if step == 0 else seq.continuation_ids[step - 1]
            name = step_case_name(si, step, token, len(record.sequences))
            report.cases.append(compare_logits(logits[0], logits[1], None, tolerance, name))
    return report


def first_failing_step(report: ComparisonReport) -> int | None:
    steps = [int(c.case.split("step ")[1].split()[0]) for c in report.cases if not c]
    return min(steps, default=None)


# --- the record in the bundle ---------------------------------------------------------------------
def test_bundle_carries_the_record_hashed_in_the_manifest(tiny_bundle, record):
    assert tiny_bundle.has_golden and tiny_bundle.golden_path == tiny_bundle.root / GOLDEN_FILE
    entry = tiny_bundle.manifest.files[GOLDEN_FILE]
    assert entry.role == "golden" and entry.sha256 == sha256_file(tiny_bundle.golden_path)
    assert tiny_bundle.manifest.export["golden"] == {"file": GOLDEN_FILE, **record.summary()}
    # KB, not MB: 3 prompts x (prefill + 8 steps), top-32 per position (measured: 29.4 KB)
    assert 10_000 < entry.bytes < 48_000, entry.bytes
    assert record.summary() == {
        "prompts": len(CANARY_PROMPTS),
        "steps": len(CANARY_PROMPTS) * (DEFAULT_NEW_TOKENS + 1),
        "new_tokens": DEFAULT_NEW_TOKENS,
        "top_k": DEFAULT_TOP_K,
        "positions": sum(s.prompt_len for s in record.sequences) + len(CANARY_PROMPTS) * DEFAULT_NEW_TOKENS,
    }
    assert [s.prompt for s in record.sequences] == list(CANARY_PROMPTS)
    assert record.vocab_size == tiny_bundle.dims.vocab_size and record.schema_version == SCHEMA_VERSION
    p = record.producer
    assert p["model_class"] == "GPT2LMHeadModel" and p["dtype"] == "float32"
    assert p["attn_implementation"] == tiny_bundle.manifest.export["attn_implementation"]
    assert p["torch"] == tiny_bundle.manifest.export["versions"]["torch"]
    assert p["transformers"] == tiny_bundle.manifest.export["versions"]["transformers"]


def test_serving_canary_prompts_are_the_golden_ones():
    from serving import parity

    assert parity.DEFAULT_CANARY_PROMPTS is CANARY_PROMPTS


def test_prompt_ids_are_what_the_serving_tokenizer_encodes(tiny_bundle, record):
    from serving.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_bundle.tokenizer_dir)
    assert [list(s.prompt_ids) for s in record.sequences] == [tok.encode(p) for p in CANARY_PROMPTS]


def test_record_is_the_reference_teacher_forced_along_its_greedy_continuation(reference, record):
    """The torch backend (reloaded from BUNDLE/reference) reproduces every stored number."""
    for seq in record.sequences:
        past, rows = None, []
        for step in range(seq.steps):
            out = reference.forward(*seq.step_inputs(step), past)
            past = out.present
            rows.append(out.logits[0])
        full = np.concatenate(rows)  # (positions, V)
        p = seq.prompt_len
        # greedy: each continuation token is the reference's argmax at the position before it
        assert list(full[p - 1 : -1].argmax(-1)) == list(seq.continuation_ids)
        ids, logits, stats = summarize_logits(full, record.top_k)
        np.testing.assert_array_equal(ids[:, 0], seq.top_ids[:, 0])
        np.testing.assert_allclose(np.take_along_axis(full, seq.top_ids, -1), seq.top_logits, atol=1e-6)
        np.testing.assert_allclose(stats, seq.stats, atol=1e-6)


def test_round_trip_is_exact_and_the_text_stable(tmp_path, record):
    path = record.to_file(tmp_path / "g.json")
    back = GoldenRecord.from_file(path)
    for a, b in zip(record.sequences, back.sequences):
        assert (a.prompt, a.prompt_ids, a.continuation_ids) == (b.prompt, b.prompt_ids, b.continuation_ids)
        np.testing.assert_array_equal(a.top_ids, b.top_ids)
        np.testing.assert_array_equal(a.top_logits, b.top_logits)  # float32 bit for bit
        np.testing.assert_array_equal(a.stats, b.stats)
    assert back.producer == record.producer and back.summary() == record.summary()
    assert back.dumps() == path.read_text(encoding="utf-8")
    raw = json.loads(path.read_text(encoding="utf-8"))  # plain JSON, one position per line
    assert raw["stats"] == list(STATS) and len(raw["sequences"][0]["top_logits"][0]) == record.top_k
    assert path.read_text(encoding="utf-8").count("\n") > record.positions * 3


def test_make_golden_validates_and_is_reproducible(reference, tiny_bundle, record):
    from serving.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_bundle.tokenizer_dir)
    again = make_golden(reference.model, tok, prompts=CANARY_PROMPTS[:1], new_tokens=3, top_k=8)
    first = record.sequences[0]
    assert again.sequences[0].continuation_ids == first.continuation_ids[:3]
    np.testing.assert_array_equal(again.sequences[0].top_ids, first.top_ids[: first.prompt_len + 3, :8])
    with pytest.raises(ValueError, match=r"prompt '': 0 tokens"):
        make_golden(reference.model, tok, prompts=("",))
    with pytest.raises(ValueError, match=r"1 <= top_k <= 50257"):
        make_golden(reference.model, tok, top_k=0)
    with pytest.raises(ValueError, match=r"\+ 300 new must be in \[1, 256\]"):
        make_golden(reference.model, tok, new_tokens=300)


def test_malformed_records_list_every_problem(tmp_path, record):
    raw = json.loads(record.dumps())

    def load(doc) -> GoldenError:
        p = tmp_path / "g.json"
        p.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
        with pytest.raises(GoldenError) as e:
            GoldenRecord.from_file(p)
        return e.value

    assert "cannot read it as JSON" in str(load("{nope"))
    assert "schema is 'other', expected 'gpt2-deploy.golden'" in str(load({**raw, "schema": "other"}))
    assert "schema_version 2 is not supported" in str(load({**raw, "schema_version": 2}))
    assert "missing key 'stats'" in str(load({k: v for k, v in raw.items() if k != "stats"}))
    bad = json.loads(json.dumps(raw))
    s0, s1 = bad["sequences"][0], bad["sequences"][1]
    s0["top_logits"][0] = s0["top_logits"][0][:-1]  # ragged
    s1["top_logits"][0][0], s1["top_logits"][0][1] = s1["top_logits"][0][1] - 1, s1["top_logits"][0][0]
    s1["continuation_ids"][0] = (s1["continuation_ids"][0] + 1) % record.vocab_size
    s1["top_ids"][2][3] = record.vocab_size
    err = load(bad)
    msg = str(err)
    assert "sequence 0: arrays are not numeric or ragged" in msg
    assert "sequence 1: top_ids outside [0, 50257)" in msg
    assert "sequence 1: top_logits are not sorted in descending order" in msg
    assert "sequence 1: continuation_ids are not the reference's top-1 at their positions" in msg
    assert len(err.problems) == 4, msg


# --- Bundle.open checks it like every file --------------------------------------------------------
def test_tampered_or_missing_record_is_named(bundle_copy):
    path = bundle_copy / GOLDEN_FILE
    text = path.read_text(encoding="utf-8")
    at = text.index('"top_logits"') + 20
    digit = next(i for i in range(at, len(text)) if text[i] in "123456789")
    path.write_text(text[:digit] + str(int(text[digit]) % 9 + 1) + text[digit + 1 :], encoding="utf-8")
    with pytest.raises(BundleError) as e:
        Bundle.open(bundle_copy)
    assert e.value.problems == [e.value.problems[0]] and e.value.problems[0].startswith(
        f"{GOLDEN_FILE}: sha256 is"
    )
    path.unlink()
    with pytest.raises(BundleError, match=rf"{GOLDEN_FILE}: missing \(golden, \d+ bytes expected\)"):
        Bundle.open(bundle_copy)


# --- verdicts: golden vs the live reference -------------------------------------------------------
def test_ort_fp32_passes_like_the_live_check(ort, reference, record):
    golden = check_backend(ort, record, FP32)
    live = live_check(ort, reference, record, FP32)
    assert golden and live, f"{golden}\n{live}"
    assert [c.case for c in golden.cases] == [c.case for c in live.cases]
    assert len(golden.cases) == sum(s.steps for s in record.sequences) and not golden.errors
    assert golden.steps == DEFAULT_NEW_TOKENS + 1 and golden.first_diverging_step is None
    for g, v in zip(golden.cases, live.cases):
        assert g.positions == v.positions and g.top1_agreement == v.top1_agreement == 1.0
        assert g.max_abs <= v.max_abs + 1e-7  # a lower bound of the live max|Δ|
    assert golden.max_abs < 1e-5  # measured 3.6e-7 (live: 3.6e-7)
    # the torch reference itself reproduces the record (same weights, same kernels)
    assert check_backend(reference, record, FP32).max_abs < 1e-6
    d = json.loads(json.dumps(golden.to_json()))
    assert (
        d["passed"]
        and d["reference"] == "golden"
        and set(d["cases"][0]["bounds"]) == {"top_k", "tail", *STATS}
    )
    assert golden.summary().startswith("golden parity onnxruntime vs the reference record: PASS")


@pytest.mark.parametrize("sigma", [1e-3, 3e-2])
def test_noisy_logits_fail_both_checks(ort, reference, record, sigma):
    golden = check_backend(Perturbed(ort, noise(sigma)), record, FP32)
    live = live_check(Perturbed(ort, noise(sigma)), reference, record, FP32)
    assert not golden and not live
    assert golden.first_diverging_step == first_failing_step(live) == 0
    assert golden.max_abs > FP32.atol * 10 and golden.max_abs <= live.max_abs
    assert "FAIL" in golden.summary() and "first divergence: seq 0 step 0 (prefill)" in golden.summary()


def test_an_error_outside_the_top_k_is_caught_by_the_statistics(ort, reference, record):
    """Leave every reference top-32 entry as is and shift the rest of the row."""

    def tail_shift(x):
        keep = np.zeros(x.shape, dtype=bool)
        top = np.argpartition(-x, 64, axis=-1)[..., :64]
        np.put_along_axis(keep, top, True, axis=-1)
        return np.where(keep, x, x - 0.01).astype(np.float32)

    golden = check_backend(Perturbed(ort, tail_shift), record, FP32)
    live = live_check(Perturbed(ort, tail_shift), reference, record, FP32)
    assert not golden and not live
    case = golden.cases[0]
    assert case.bounds["top_k"] < FP32.atol < case.bounds["mean"]  # only the statistics see it
    assert "bound from" in str(case)


def test_a_constant_shift_fails_both(ort, reference, record):
    golden = check_backend(Perturbed(ort, lambda x: x + 1e-3), record, FP32)
    live = live_check(Perturbed(ort, lambda x: x + 1e-3), reference, record, FP32)
    assert not golden and not live
    assert golden.max_abs == pytest.approx(live.max_abs, rel=1e-2)


def test_wrong_vocabulary_and_cancellation(ort, record):
    r = check_backend(Perturbed(ort, lambda x: x[..., :-1]), record, FP32)
    assert not r and len(r.errors) == len(record.sequences) and not r.cases
    assert "logits shape [1, 5, 50256], expected [5, 50257]" in r.errors[0]

    calls = []

    def stop():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("stop")

    with pytest.raises(KeyboardInterrupt):
        check_backend(ort, record, FP32, before_step=stop)
    assert len(calls) == 3


def test_compare_step_for_one_served_step(ort, record):
    seq = record.sequences[2]
    out = ort.forward(*seq.step_inputs(0))
    case = record.compare_step(2, 0, out.logits, FP32)
    assert case and case.positions == seq.prompt_len and case.case == "seq 2 step 0 (prefill)"
    assert record.compare_step(2, 0, out.logits[0], FP32).max_abs == case.max_abs
    with pytest.raises(ValueError, match=r"step 9 outside \[0, 9\)"):
        record.compare_step(2, 9, out.logits, FP32)
    with pytest.raises(ValueError, match=r"expected \[1, 50257\]"):
        record.compare_step(2, 1, out.logits, FP32)


# --- the comparison rule itself, on synthetic rows ------------------------------------------------
def test_near_ties_follow_the_tolerance_like_compare_logits():
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 1, (1, 200)).astype(np.float32)
    ref[0, 5], ref[0, 7] = 5.0, 4.99  # a near-tie at the top
    got = ref.copy()
    got[0, 7] = 5.001  # the served argmax flips to the runner-up: margin 0.01
    fp16 = tolerance_for("fp16")  # tie_margin 0.02
    for tol, forgiven in ((fp16, True), (FP32, False)):
        live = compare_logits(ref, got, None, tol, "c")
        gold = compare_rows(*summarize_logits(ref, 8), got, tol, "c")
        assert gold.top1_agreement == live.top1_agreement == 0.0
        assert gold.near_tie_flips == live.near_tie_flips == int(forgiven)
        assert bool(gold) == bool(live) == (forgiven and tol is fp16)
        assert gold.first_mismatch == live.first_mismatch == 0
    # a clear winner flipped (margin 0.3 > 0.02) counts under fp16 too
    got2 = ref.copy()
    got2[0, 7], ref2 = 5.001, ref.copy()
    ref2[0, 7] = 4.7
    live = compare_logits(ref2, got2, None, fp16, "c")
    gold = compare_rows(*summarize_logits(ref2, 8), got2, fp16, "c")
    assert not live and not gold and gold.near_tie_flips == live.near_tie_flips == 0


def test_a_flip_to_an_unstored_token():
    rng = np.random.default_rng(1)
    ref = np.sort(rng.normal(0, 1, (1, 300)).astype(np.float32))[:, ::-1].copy()  # id 0 is top-1
    got = ref.copy()
    got[0, 100] = ref[0, 0] + 0.01  # a token far outside the stored top-8 wins
    fp16 = tolerance_for("fp16")
    live = compare_logits(ref, got, None, fp16, "c")
    gold = compare_rows(*summarize_logits(ref, 8), got, fp16, "c")
    # the stored span (top-1 - 8th) exceeds the tie margin: the flip is decided, as in the live check
    assert not live and not gold and gold.undetermined_flips == 0
    assert gold.bounds["tail"] >= ref[0, 0] - ref[0, 7] and gold.max_abs <= live.max_abs
    # a tie margin wider than the stored span: the record cannot tell, so the flip counts
    wide = Tolerance("wide", atol=10.0, min_top1=1.0, tie_margin=50.0)
    live = compare_logits(ref, got, None, wide, "c")
    gold = compare_rows(*summarize_logits(ref, 8), got, wide, "c")
    assert live and not gold and gold.undetermined_flips == 1 and "to unstored tokens counted" in str(gold)


@pytest.mark.parametrize("preset", sorted(PRECISION_TOLERANCES))
def test_live_pass_implies_golden_pass_and_golden_never_overstates(preset):
    """Over many random perturbations: golden max|Δ| <= live max|Δ|, identical top-1 numbers, and
    whenever the live check passes the golden one does (no flip the record cannot decide)."""
    tol = tolerance_for(preset)
    rng = np.random.default_rng(7)
    agree = 0
    for trial in range(60):
        n, v, k = int(rng.integers(1, 6)), 512, 16
        ref = rng.normal(0, rng.choice([0.2, 1.0, 3.0]), (n, v)).astype(np.float32)
        kind = trial % 4
        scale = tol.atol * float(rng.choice([0.1, 0.5, 1.0, 2.0, 10.0]))
        if kind == 0:
            got = ref + rng.normal(0, scale, ref.shape)
        elif kind == 1:
            got = ref + scale
        elif kind == 2:
            got = ref * (1 + scale)
        else:
            got = ref.copy()
            got[:, rng.integers(0, v, 5)] += scale * 3
        got = got.astype(np.float32)
        live = compare_logits(ref, got, None, tol, "c")
        gold = compare_rows(*summarize_logits(ref, k), got, tol, "c")
        assert gold.max_abs <= live.max_abs * (1 + 1e-6) + 1e-9, (trial, gold, live)
        assert gold.top1_agreement == live.top1_agreement and gold.first_mismatch == live.first_mismatch
        if gold.undetermined_flips == 0:
            assert gold.near_tie_flips == live.near_tie_flips
            if live:
                assert gold, (trial, gold, live)
        agree += bool(gold) == bool(live)
    assert agree >= 40  # they disagree only for errors hidden in the untouched tail


def test_non_finite_served_logits_fail():
    ref = np.random.default_rng(2).normal(0, 1, (2, 64)).astype(np.float32)
    got = ref.copy()
    got[1, 3] = np.nan
    gold = compare_rows(*summarize_logits(ref, 8), got, FP32, "c")
    assert not gold and not gold.finite and gold.max_abs == float("inf")
    assert "NON-FINITE" in str(gold)


# --- CLI and the lean (torch-free) path -----------------------------------------------------------
def test_inspect_shows_the_record(tiny_bundle):
    from serving.cli import app

    r = CliRunner().invoke(app, ["inspect", str(tiny_bundle.root), "--files"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.split("\n}\n")[0] + "}")
    size = tiny_bundle.manifest.files[GOLDEN_FILE].bytes
    positions = tiny_bundle.manifest.export["golden"]["positions"]
    assert summary["golden"] == (
        f"3 prompts, 27 steps (prefill + 8 tokens each), {positions} positions, top-32, {size:,d} bytes"
    )
    assert f"golden       {GOLDEN_FILE}" in r.stdout


def test_export_no_golden(tmp_path):
    from serving.cli import app

    out = tmp_path / "b"
    args = ["export", "-m", "tiny", "-o", str(out), "--no-golden", "--no-validate", "--no-reference", "-q"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["golden"] is None
    b = Bundle.open(out)
    assert not b.has_golden and b.golden_path is None and not (out / GOLDEN_FILE).exists()
    assert b.manifest.export["golden"] is None


def test_golden_check_runs_without_torch(tiny_bundle):
    """The lean image: ONNX Runtime + the record, torch and transformers unimportable."""
    code = textwrap.dedent(
        f"""
        import importlib.abc, json, sys
        class _Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers"):
                    raise ImportError(name + " is blocked for this test")
        sys.meta_path.insert(0, _Block())
        from export.compare import tolerance_for
        from export.golden import GoldenRecord, check_backend
        from export.manifest import Bundle
        from serving.backends.ort_backend import OrtBackend
        b = Bundle.open({str(tiny_bundle.root)!r})
        with OrtBackend(b) as be:
            r = check_backend(be, GoldenRecord.from_file(b.golden_path), tolerance_for("fp32"))
        assert "torch" not in sys.modules and "transformers" not in sys.modules
        print(json.dumps({{"passed": bool(r), "cases": len(r.cases)}}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"passed": True, "cases": 27}
