"""Validation collects every failure (names, shapes, values) and raises one ValidationError."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from export.compare import Tolerance, compare_logits, tolerance_for
from export.validate import ValidationError, check_graph, validate_export


@pytest.fixture(scope="module")
def tiny_model(tiny_bundle):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(tiny_bundle.root / "reference").eval()


def test_wrong_name_and_wrong_shape_are_both_reported(tiny_bundle, tiny_model, tmp_path):
    m = onnx.load(str(tiny_bundle.onnx_path))
    out = {o.name: o for o in m.graph.output}
    out["present.1.value"].name = "present.1.val"  # a wrong output name ...
    for node in m.graph.node:
        node.output[:] = ["present.1.val" if o == "present.1.value" else o for o in node.output]
    dims = out["present.0.key"].type.tensor_type.shape.dim
    dims[3].dim_value = 17  # ... and a wrong shape (head_dim is 16)
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))

    problems = check_graph(bad, tiny_bundle.contract)
    assert any("missing ['present.1.value'], unexpected ['present.1.val']" in p for p in problems), problems
    shape = "present.0.key: shape ['batch', 4, 'total', 17], contract says"
    assert any(shape in p for p in problems), problems

    with pytest.raises(ValidationError) as e:
        validate_export(bad, tiny_model, tolerance_for("fp32"))
    text = str(e.value)
    assert "present.1.val" in text and "present.0.key: shape" in text
    assert len(e.value.report.errors) >= 2 and not e.value.report


def test_value_failures_are_collected_per_case(tiny_bundle, tiny_model):
    strict = Tolerance("impossible", atol=0.0, min_top1=1.0)
    report = validate_export(tiny_bundle.onnx_path, tiny_model, strict, raise_on_failure=False)
    assert not report
    assert len(report.cases) == 4 and sum(not c for c in report.cases) >= 3  # all compared, none skipped
    assert "FAIL" in str(report) and report.to_json()["passed"] is False
    with pytest.raises(ValidationError):
        validate_export(tiny_bundle.onnx_path, tiny_model, strict)


def test_compare_logits_ignores_padded_positions_and_flags_nan():
    ref = np.zeros((1, 3, 5), np.float32)
    ref[..., 2] = 1.0
    got = ref.copy()
    got[0, 0] = np.nan  # padding position: excluded
    valid = np.array([[False, True, True]])
    r = compare_logits(ref, got, valid, tolerance_for("fp32"), "padded")
    assert r and r.positions == 2 and r.max_abs == 0.0
    got[0, 1, 0] = np.inf
    r = compare_logits(ref, got, valid, tolerance_for("fp32"), "nan")
    assert not r and not r.finite and "NON-FINITE" in str(r)


def test_near_tie_flips_are_forgiven_only_within_the_margin():
    ref = np.zeros((1, 2, 4), np.float32)
    ref[0, :, 0] = 1.0
    ref[0, 0, 1] = 0.95  # position 0: a near-tie (margin 0.05)
    got = ref.copy()
    got[0, 0, 1] = 1.05  # flips the near-tie
    valid = np.ones((1, 2), bool)
    loose = Tolerance("t", atol=0.2, min_top1=1.0, tie_margin=0.1)
    r = compare_logits(ref, got, valid, loose, "near tie")
    assert r and r.top1_agreement == 0.5 and r.near_tie_flips == 1 and "1 near-tie" in str(r)
    strict = Tolerance("t", atol=0.2, min_top1=1.0)  # fp32-style: every flip counts
    assert not compare_logits(ref, got, valid, strict, "strict")
    got[0, 1, 3] = 1.2  # position 1: a clear winner (margin 1.0) flipped
    r = compare_logits(ref, got, valid, Tolerance("t", atol=2.0, min_top1=0.9, tie_margin=0.1), "clear")
    assert not r and r.near_tie_flips == 1


def test_a_graph_onnx_runtime_cannot_load_is_reported(tiny_bundle, tmp_path):
    """Names and shapes are right and the onnx checker passes, but an op ONNX Runtime lacks makes
    the session fail: that is one collected error, not a traceback."""
    from export.validate import References

    m = onnx.load(str(tiny_bundle.onnx_path))
    softmax = next(n for n in m.graph.node if n.op_type == "Softmax")
    softmax.domain = "com.example.unknown"
    m.opset_import.append(onnx.helper.make_opsetid("com.example.unknown", 1))
    path = tmp_path / "model.onnx"
    onnx.save(m, str(path))
    refs = References(tiny_bundle.contract, (), [], [])  # never reached: the session fails first
    report = validate_export(path, refs, tolerance_for("fp32"), raise_on_failure=False)
    assert not report and len(report.errors) == 1
    assert report.errors[0].startswith("ONNX Runtime cannot load the graph: ")
    assert "com.example.unknown" in report.errors[0]
    with pytest.raises(ValidationError, match="ONNX Runtime cannot load the graph"):
        validate_export(path, refs, tolerance_for("fp32"))


def test_tolerance_for_run_is_the_one_place_that_picks():
    from export.compare import tolerance_for_run
    from export.errors import OptionsError

    def name(*args, **kw):
        return tolerance_for_run(*args, **kw).name

    assert name("fp32") == "fp32" and name("fp32", device="cuda:1") == "tf32"  # GPU: TF32 by default
    assert name("fp32", device="cuda", tf32=False) == "fp32" and name("fp32", tf32=True) == "tf32"
    assert name("ort-fused", device="cuda") == "tf32" and name("ort-fused") == "ort-fused"
    assert name("fp16", device="cuda") == "fp16" and name("int8") == "int8"
    # a TensorRT engine computes in its own precision, whatever the graph's
    assert name("fp32", device="cuda", engine_precision="fp16") == "fp16"
    assert name("fp32", device="cuda", tf32=False, engine_precision="fp32") == "fp32"
    assert name("fp16", device="cuda", engine_precision="bf16") == "bf16"
    with pytest.raises(OptionsError, match="no tolerance preset for precision 'fp8'"):
        tolerance_for_run("fp8")
