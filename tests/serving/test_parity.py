"""Parity against the reference: canary, per-step generation parity, shadow checks and the CLI."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time

import numpy as np
import pytest

from export.compare import Tolerance, tolerance_for
from export.errors import OptionsError
from export.manifest import Bundle
from serving import parity
from serving.backends import BackendOptions, create_backend
from serving.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_bundle):
    return Tokenizer.from_dir(tiny_bundle.tokenizer_dir)


@pytest.fixture(scope="module")
def reference(tiny_bundle):
    ref = parity.reference_backend(tiny_bundle)
    yield ref
    ref.close()


@pytest.fixture(scope="module")
def served(tiny_bundle):
    with create_backend("onnxruntime", tiny_bundle, BackendOptions(threads=1)) as b:
        yield b


@pytest.fixture(scope="module")
def perturbed_bundle(tiny_bundle, tmp_path_factory) -> Bundle:
    """A copy of the tiny bundle whose ONNX has really perturbed weights (manifest re-hashed)."""
    import onnx
    from onnx import numpy_helper

    root = tmp_path_factory.mktemp("perturbed") / "tiny"
    shutil.copytree(tiny_bundle.root, root)
    m = tiny_bundle.manifest
    # every decoder graph: model.onnx and the serving graph the onnxruntime backend runs
    for rel in [m.model_file] + ([m.serving.file] if m.serving is not None else []):
        model = onnx.load(str(root / rel))
        big = max(model.graph.initializer, key=lambda t: np.prod(t.dims))  # the token embedding
        w = numpy_helper.to_array(big)
        noise = np.random.default_rng(0).normal(0, 0.05, w.shape).astype(w.dtype)
        big.CopyFrom(numpy_helper.from_array(w + noise, big.name))
        onnx.save(model, str(root / rel))
    rehashed = m.with_files(root, {rel: f.role for rel, f in m.files.items()})
    rehashed.write(root)
    return Bundle.open(root)


def test_canary_passes_for_onnxruntime(served, reference, tokenizer):
    tol = tolerance_for("fp32")
    report = parity.run_canary(served, reference, tokenizer, tol, new_tokens=4)
    assert report, str(report)
    assert len(report.cases) == len(parity.DEFAULT_CANARY_PROMPTS) * (4 + 1)
    assert report.first_diverging_step is None
    assert 0 < report.max_abs <= tol.atol and report.top1_agreement == 1.0
    assert "PASS" in str(report) and "step 4" in str(report)
    d = json.loads(json.dumps(report.to_json()))
    assert d["passed"] is True and d["served"] == "onnxruntime" and d["tolerance"]["name"] == "fp32"


def test_canary_fails_on_really_perturbed_weights(perturbed_bundle, reference, tokenizer):
    with create_backend("onnxruntime", perturbed_bundle) as bad:
        report = parity.run_canary(bad, reference, tokenizer, tolerance_for("fp32"), new_tokens=2)
    assert not report
    assert report.first_diverging_step == 0  # wrong from the prefill on
    assert report.max_abs > 1e-2
    assert "first diverging step" in str(report) and "FAIL" in report.summary()


def test_generation_parity_is_teacher_forced_per_step(served, reference, tokenizer):
    ids = tokenizer.encode("one red")
    report = parity.check_generation_parity(served, reference, tokenizer, ids, 6, tolerance_for("fp32"))
    assert report and report.steps == 7
    seq = parity.reference_continuations(reference, tokenizer, [ids], 6)[0]
    assert [c.case for c in report.cases[:2]] == ["step 0 (prefill)", f"step 1 (token {seq[len(ids)]})"]
    assert report.cases[0].positions == len(ids) and all(c.positions == 1 for c in report.cases[1:])


def test_a_late_divergence_is_located(served, reference, tokenizer):
    class DriftingOrt(type(served)):
        """Real ORT logits, with an offset on one token from the 3rd decode step on."""

        def _forward(self, *args):
            out = super()._forward(*args)
            if args[3].length >= 4:  # past length: prompt (2) + 2 generated
                out.logits[..., 7] += 50.0
            return out

    with DriftingOrt(served.bundle) as drifting:
        report = parity.check_generation_parity(
            drifting, reference, tokenizer, tokenizer.encode("one red"), 5, tolerance_for("fp32")
        )
    assert not report
    assert report.first_diverging_step == 3
    assert [bool(c) for c in report.cases] == [True, True, True, False, False, False]


def test_tolerance_for_backend(tiny_bundle):
    assert parity.tolerance_for_backend(tiny_bundle, "onnxruntime", "cpu").name == "fp32"
    assert parity.tolerance_for_backend(tiny_bundle, "onnxruntime", "cuda:0").name == "tf32"
    fp16 = Bundle(tiny_bundle.root, dataclasses.replace(tiny_bundle.manifest, precision="fp16"))
    assert parity.tolerance_for_backend(fp16, "onnxruntime", "cuda").name == "fp16"
    # The manifest's engine list is no guess for the tensorrt backend any more: the loaded
    # backend says which engine (and so which tolerance) it runs (served_tolerance).
    engine = Bundle(
        tiny_bundle.root, dataclasses.replace(tiny_bundle.manifest, engines=[{"precision": "int8"}])
    )
    assert parity.tolerance_for_backend(engine, "tensorrt", "cuda").name == "tf32"


def test_served_tolerance_comes_from_the_loaded_backend(served):
    assert parity.served_tolerance(served).name == "fp32"  # no engine: bundle precision on cpu

    class EngineLikeOrt(type(served)):
        """The real ORT backend reporting the tolerance of what it loaded, as TensorRT does."""

        def _info_impl(self):
            return {**super()._info_impl(), "tolerance": "fp16"}

    with EngineLikeOrt(served.bundle) as b:
        assert parity.served_tolerance(b).name == "fp16"


def test_generation_parity_stops_when_cancelled(served, reference, tokenizer):
    from serving.errors import Cancelled
    from serving.scheduler import Scheduler

    calls = []

    def cancelled():
        calls.append(1)
        return len(calls) > 5  # a few reference tokens, then the client goes away

    ref = Scheduler(reference).start()
    try:
        with pytest.raises(Cancelled):
            parity.check_generation_parity(
                served,
                ref,
                tokenizer,
                tokenizer.encode("one red"),
                200,
                tolerance_for("fp32"),
                cancelled=cancelled,
            )
        assert len(calls) == 6  # polled while the rows ran, stopped at the first True
        time.sleep(0.5)
        assert ref.active_rows() == 0 and ref.queue_depth() == 0  # the cancelled row left its batch
        ids = tokenizer.encode("one red")
        seq = parity.reference_continuations(ref, tokenizer, [ids], 3)
        n = []
        with pytest.raises(Cancelled):  # the teacher-forced part polls too
            parity.teacher_forced_parity(
                served, ref, seq, tolerance_for("fp32"), len(ids), cancelled=lambda: n.append(1) or len(n) > 2
            )
        assert len(n) == 3
    finally:
        ref.stop()


def test_shadow_parity_checks_off_the_hot_path(served, reference, tokenizer):
    prompt = tokenizer.encode("one red")
    generated = parity.reference_continuations(reference, tokenizer, [prompt], 4)[0][len(prompt) :]
    results = []
    shadow = parity.ShadowParity(
        reference, tolerance_for("fp32"), rate=1.0, served=served, on_result=results.append
    ).start()
    try:
        assert shadow.maybe_submit(prompt, generated)
        assert shadow.join(30)
    finally:
        shadow.stop()
    assert shadow.counters() == {
        "submitted": 1,
        "dropped": 0,
        "checked": 1,
        "failed": 0,
        "skipped": 0,
        "errors": 0,
    }
    assert results and results[0] and shadow.last_report is results[0]


def test_shadow_queue_is_bounded_and_sampled(reference):
    tol = Tolerance("t", 1.0, 0.0)
    full = parity.ShadowParity(reference, tol, rate=1.0, queue_size=1, served=reference)  # not started
    assert full.maybe_submit([1], [2]) and not full.maybe_submit([1], [2])
    assert full.counters()["dropped"] == 1 and full.counters()["submitted"] == 1
    never = parity.ShadowParity(reference, tol, rate=0.0, served=reference)
    assert not any(never.maybe_submit([1], [2]) for _ in range(20))
    some = parity.ShadowParity(reference, tol, rate=0.5, queue_size=1000, seed=1, served=reference)
    n = sum(some.maybe_submit([1], [2]) for _ in range(400))
    assert 150 < n < 250
    with pytest.raises(OptionsError, match=r"\[0, 1\]"):
        parity.ShadowParity(reference, tol, rate=1.5, served=reference)


def test_shadow_stop_cancels_a_busy_check_and_discards_the_queue(tiny_bundle, reference):
    import threading

    from serving.backends.ort_backend import OrtBackend
    from serving.scheduler import Scheduler

    release, entered = threading.Event(), threading.Event()

    class BlockingOrt(OrtBackend):  # the real backend, held inside its forward until released
        def _forward(self, *args):
            entered.set()
            release.wait(30)
            return super()._forward(*args)

    backend = BlockingOrt(tiny_bundle, BackendOptions(threads=1)).load()
    sched = Scheduler(backend).start()
    shadow = parity.ShadowParity(
        reference, tolerance_for("fp32"), rate=1.0, queue_size=4, served=sched
    ).start()
    try:
        assert shadow.maybe_submit([1, 2], [3])
        assert entered.wait(30)  # the worker's check is inside the served forward
        assert all(shadow.maybe_submit([1, 2], [3]) for _ in range(4))  # queue full behind it
        t0 = time.perf_counter()
        assert shadow.stop(timeout=10) is True  # cancelled at once, not after the forward
        assert time.perf_counter() - t0 < 5
        assert shadow.join(5)  # discarded items were marked done
        assert shadow.counters()["checked"] == 0 and shadow.counters()["errors"] == 0
    finally:
        release.set()
        assert sched.stop(30)
        backend.close()
    assert sched.active_rows() == 0


def test_parity_cli_reports_and_exits_by_verdict(tiny_bundle, perturbed_bundle, tmp_path):
    from typer.testing import CliRunner

    from serving.cli import app

    runner = CliRunner()
    out = tmp_path / "parity.json"
    ok = runner.invoke(
        app,
        [
            "parity",
            str(tiny_bundle.root),
            "--backend",
            "onnxruntime",
            "--prompt",
            "one red",
            "--max-new-tokens",
            "3",
            "--json",
            str(out),
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert "PASS" in ok.output and "step 3" in ok.output
    assert json.loads(out.read_text())["passed"] is True
    bad = runner.invoke(app, ["parity", str(perturbed_bundle.root), "-n", "2"])
    assert bad.exit_code == 1 and "FAIL" in bad.output
    missing = runner.invoke(app, ["parity", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
