"""The serving graph (the lm_head on the kept positions only) and the generation graph TensorRT builds
from: in every precision, validated against the main graph, recorded in the manifest, served by the
ONNX Runtime backend from one session."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest

from deploy.presets import PRESETS, ProfileLimits, memory_budget
from deploy.trt_build import BuildOptions, onnx_fp32_names, plan_build, write_generation_graph
from export.contract import LOGITS, LOGITS_TO_KEEP, IOContract, left_padded_positions
from export.manifest import Bundle, BundleError, Manifest
from export.onnx_export import select_logits_positions, write_logits_graph
from export.validate import ValidationError, check_graph, validate_serving_graph
from export.variants import EXPORT_PRECISIONS, make_variant
from serving.backends import BackendOptions, create_backend

TINY = IOContract(2, 4, 16, 50257)


def _left_padded_batch():
    ids = np.array([[464, 2068, 7586, 21831, 18045], [50256, 50256, 15496, 995, 11]], dtype=np.int64)
    mask = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=np.int64)
    return ids, mask, left_padded_positions(mask)


# --- the contract -------------------------------------------------------------------------------------
def test_contract_forms_and_their_json():
    kept, last = TINY.with_logits_positions("kept"), TINY.with_logits_positions("last")
    assert kept.input_names == [*TINY.input_names, LOGITS_TO_KEEP] and last.input_names == TINY.input_names
    assert kept.output_names == last.output_names == TINY.output_names
    assert kept.spec(LOGITS).shape == ("batch", "kept", 50257) and last.spec(LOGITS).shape == (
        "batch",
        1,
        50257,
    )
    assert kept.spec(LOGITS_TO_KEEP).shape == () and kept.spec(LOGITS_TO_KEEP).dtype == "int64"
    assert kept.concrete_shape(LOGITS, batch=2, seq=5, past=3, logits_to_keep=1) == (2, 1, 50257)
    assert kept.concrete_shape(LOGITS, batch=2, seq=5, past=3) == (2, 5, 50257)  # 0: every position
    for c in (TINY, kept, last):
        assert IOContract.from_json(json.loads(json.dumps(c.to_json()))) == c
    assert "logits_positions" not in TINY.to_json()  # the main contract's JSON is unchanged
    with pytest.raises(ValueError, match="logits_positions 'first' is not one of all, kept, last"):
        TINY.with_logits_positions("first")


# --- the bundle ---------------------------------------------------------------------------------------
def test_the_bundle_records_a_validated_serving_graph(tiny_bundle):
    m = tiny_bundle.manifest
    s = m.serving
    assert s is not None and s.file == "model_serving.onnx" and s.derived_from == m.model_file
    assert s.contract == m.contract.with_logits_positions("kept")
    assert m.files[s.file].role == "onnx" and tiny_bundle.serving_onnx_path == tiny_bundle.root / s.file
    assert s.validation["passed"] and s.validation["max_abs"] <= 1e-4
    # every case at logits_to_keep 1 and 0 (left padding included), against the main graph
    assert len(s.validation["cases"]) == 8 and any("left-padded" in c["case"] for c in s.validation["cases"])
    assert s.details["lm_head_op"] == "MatMul" and s.details["shared_external_data"] == ["model.onnx.data"]
    assert m.validation["passed"]  # the main graph's own validation is where it was
    # the same weights: every initializer of model.onnx is in the serving graph, byte for byte
    full = {i.name: i.raw_data for i in onnx.load(str(tiny_bundle.onnx_path)).graph.initializer}
    serving = {i.name: i.raw_data for i in onnx.load(str(tiny_bundle.serving_onnx_path)).graph.initializer}
    assert all(serving[k] == v for k, v in full.items())
    assert sorted(set(serving) - set(full)) == [
        "logits_positions/axes",
        "logits_positions/ends",
        "logits_positions/shape",
    ]


def test_manifest_round_trip_and_a_missing_serving_file(tiny_bundle, tmp_path):
    m = tiny_bundle.manifest
    again = Manifest.from_json(json.loads(json.dumps(m.to_json())))
    assert again.serving == m.serving
    assert Manifest.from_json({k: v for k, v in m.to_json().items() if k != "serving"}).serving is None
    import shutil

    dst = tmp_path / "b"
    shutil.copytree(tiny_bundle.root, dst)
    b = Bundle.open(dst)
    b.update_manifest(
        dataclasses.replace(
            b.manifest, files={k: v for k, v in b.manifest.files.items() if k != m.serving.file}
        )
    )
    with pytest.raises(BundleError, match="serving graph 'model_serving.onnx' is not listed in files"):
        Bundle.open(dst)


def test_an_external_data_graph_shares_its_weights(tiny_bundle, tmp_path):
    """A graph with external data (the default layout): the serving graph is a small file pointing
    at the same data file, no second copy of the weights on disk."""
    from export.variants import save_model

    full = save_model(onnx.load(str(tiny_bundle.onnx_path)), tmp_path / "model.onnx", external=True)
    details = write_logits_graph(full, tmp_path / "model_serving.onnx", "kept")
    assert details["shared_external_data"] == ["model.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model.onnx",
        "model.onnx.data",
        "model_serving.onnx",
    ]
    data = (tmp_path / "model.onnx.data").stat().st_size
    assert (tmp_path / "model_serving.onnx").stat().st_size < data / 10
    assert validate_serving_graph(tmp_path / "model_serving.onnx", full, TINY.with_logits_positions("kept"))
    with pytest.raises(ValueError, match="must sit in the same directory"):
        write_logits_graph(full, tmp_path / "elsewhere" / "m.onnx", "kept")


# --- every precision ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def variant(tiny_bundle, tmp_path_factory):
    made = {}

    def make(precision: str):
        if precision not in made:
            out = tmp_path_factory.mktemp(f"serving-{precision}") / "model.onnx"
            make_variant(tiny_bundle.onnx_path, out, precision)
            made[precision] = out
        return made[precision]

    return make


@pytest.mark.parametrize("precision", EXPORT_PRECISIONS)
def test_every_precision_gets_a_serving_and_a_generation_graph(variant, tiny_bundle, precision):
    full = variant(precision)
    serving = full.with_name("model_serving.onnx")
    details = write_logits_graph(full, serving, "kept")
    report = validate_serving_graph(serving, full, TINY.with_logits_positions("kept"))
    assert report and len(report.cases) == 8 and report.max_abs <= 1e-4, str(report)
    assert details["lm_head_op"] in ("MatMul", "FusedMatMul", "MatMulNBits")
    last = write_generation_graph(full)
    assert last == full.with_name("model_last.onnx")
    assert validate_serving_graph(last, full, TINY.with_logits_positions("last"))
    # the generation graph's logits are (batch, 1, vocab) for shape inference too (TensorRT sizes by it)
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(last)))
    dims = [d.dim_param or d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 1, 50257]


def _graph_copy(bundle, directory):
    """The bundle's model.onnx and its weight file, copied (a derived graph sits beside its data)."""
    import shutil

    for name in ("model.onnx", "model.onnx.data"):
        shutil.copyfile(bundle.root / name, directory / name)
    return directory / "model.onnx"


def test_reduced_precision_keeps_the_position_selection_in_fp32(tiny_bundle, tmp_path):
    """TensorRT pins the lm_head path by node name; the Gather picking the last position is on it."""
    last = write_generation_graph(_graph_copy(tiny_bundle, tmp_path))
    assert "logits_positions/Gather" in onnx_fp32_names(last)["lm_head"]
    assert "logits_positions/Gather" in onnx_fp32_names(tiny_bundle.onnx_path, last_position=True)["lm_head"]
    fp16 = make_variant(last, tmp_path / "fp16" / "model.onnx", "fp16")
    assert fp16.details["fp32_lm_head"][:3] == ["node_linear", "logits_positions/Gather", "node_view_28"]


# --- validation catches a wrong serving graph -------------------------------------------------------------
def _edited(src, dst, edit):
    m = onnx.load(str(src))
    edit(m.graph)
    onnx.save(m, str(dst))
    return dst


def test_validation_catches_a_wrong_serving_graph(tiny_bundle, tmp_path):
    kept = TINY.with_logits_positions("kept")

    def first_position(g):  # -logits_to_keep -> +logits_to_keep: the slice starts at position k
        next(n for n in g.node if n.name == "logits_positions/Neg").op_type = "Identity"

    wrong = _edited(tiny_bundle.serving_onnx_path, tmp_path / "wrong.onnx", first_position)
    report = validate_serving_graph(wrong, tiny_bundle.onnx_path, kept, raise_on_failure=False)
    assert not report and any(
        "logits shape [1, 0, 50257], expected [1, 1, 50257]" in e for e in report.errors
    )

    # right shapes, wrong values: the generation graph picking position 0 instead of seq - 1
    last = write_generation_graph(_graph_copy(tiny_bundle, tmp_path))

    def index_zero(g):
        t = next(i for i in g.initializer if i.name == "logits_positions/last")
        t.CopyFrom(onnx.numpy_helper.from_array(np.array([0], dtype=np.int64), t.name))

    zero = _edited(last, tmp_path / "zero.onnx", index_zero)
    with pytest.raises(ValidationError) as e:
        validate_serving_graph(zero, tiny_bundle.onnx_path, TINY.with_logits_positions("last"))
    failed = [c for c in e.value.report.cases if not c]
    assert failed and not e.value.report.errors  # shapes right, values wrong
    assert all(c.max_abs > 1e-2 for c in failed if c.positions and "S=1" not in c.case)

    # names: the main graph passed off as a serving graph
    report = validate_serving_graph(
        tiny_bundle.onnx_path, tiny_bundle.onnx_path, kept, raise_on_failure=False
    )
    assert report.errors == [
        "graph inputs differ from the contract: missing ['logits_to_keep'], unexpected []"
    ]


def test_rewriting_refuses_what_it_does_not_know(tiny_bundle):
    m = onnx.load(str(tiny_bundle.serving_onnx_path))
    with pytest.raises(ValueError, match="already selects its logits positions"):
        select_logits_positions(m, "kept")
    m = onnx.load(str(tiny_bundle.onnx_path))
    with pytest.raises(ValueError, match="positions must be 'kept' or 'last'"):
        select_logits_positions(m, "all")
    head = next(n for n in m.graph.node if n.output[0] == LOGITS)
    head.op_type = "Gemm"
    with pytest.raises(ValueError, match="expected one of MatMul, FusedMatMul, MatMulNBits .* found Gemm"):
        select_logits_positions(m, "last")


# --- the ONNX Runtime backend ---------------------------------------------------------------------------
def test_ort_backend_last_only_equals_the_full_graphs_last_position(tiny_bundle):
    ids, mask, pos = _left_padded_batch()
    with (
        create_backend("onnxruntime", tiny_bundle, BackendOptions(threads=1)) as served,
        create_backend(
            "onnxruntime", tiny_bundle, BackendOptions(threads=1, extra={"serving_graph": "off"})
        ) as plain,
    ):
        assert served.info()["onnx"].endswith("model_serving.onnx") and plain.info()["onnx"].endswith(
            "model.onnx"
        )
        full = plain.forward(ids, mask, pos)  # model.onnx: every position
        last = served.forward(ids, mask, pos, last_only=True)
        every = served.forward(ids, mask, pos)  # logits_to_keep = 0 on the serving graph
        assert last.logits.shape == (2, 1, 50257) and every.logits.shape == (2, 5, 50257)
        np.testing.assert_allclose(last.logits, full.logits[:, -1:], rtol=0, atol=1e-5)
        np.testing.assert_allclose(every.logits, full.logits, rtol=0, atol=1e-5)
        # the caches a last-only prefill returns continue exactly like the full graph's
        step_mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
        nxt = np.array([[100], [200]])
        a = served.forward(nxt, step_mask, pos[:, -1:] + 1, last.present, last_only=True)
        b = plain.forward(nxt, step_mask, pos[:, -1:] + 1, full.present)
        np.testing.assert_allclose(a.logits, b.logits, rtol=0, atol=1e-5)


def test_ort_backend_holds_the_weights_once(tiny_bundle, monkeypatch):
    """One decoder session: the serving graph serves both logits forms, so the weights (and ONNX
    Runtime's prepacked copies of them, which two sessions cannot share) are held once."""
    import onnxruntime as ort

    loaded = []
    real = ort.InferenceSession

    class Spy(real):  # a real session; only its model path is noted
        def __init__(self, path_or_bytes, *args, **kwargs):
            if isinstance(path_or_bytes, str):
                loaded.append(path_or_bytes)
            super().__init__(path_or_bytes, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", Spy)
    with create_backend("onnxruntime", tiny_bundle, BackendOptions(threads=1)) as b:
        b.forward(*_left_padded_batch(), last_only=True)
        b.forward(*_left_padded_batch())
    decoders = [p for p in loaded if p.endswith(".onnx") and str(tiny_bundle.root) in p]
    assert decoders == [str(tiny_bundle.serving_onnx_path)]


# --- TensorRT: the generation graph and the memory budget ---------------------------------------------------
def test_build_plan_prints_the_generation_graph_first(tiny_bundle):
    plan = plan_build(tiny_bundle, BuildOptions(preset="orin-nano"))
    assert plan.generation_graph == tiny_bundle.root / "model_last.onnx"
    for major in (10, 11):
        derive, trtexec = plan.trtexec_steps(major)
        assert derive[:2] == ["python", "-c"] and "write_generation_graph(" in derive[2]
        onnx_arg = next(a for a in trtexec if a.startswith("--onnx="))
        assert onnx_arg.endswith("model_last.onnx" if major == 10 else ".fp16.onnx")
    assert "logits_positions/Gather:fp32" in " ".join(plan.trtexec_steps(10)[1])


def test_generation_graph_check_catches_full_logits(tiny_bundle, tmp_path):
    """What ``build`` checks before parsing: a graph still returning every position is refused."""
    last = TINY.with_logits_positions("last")
    assert check_graph(tiny_bundle.onnx_path, last) == [
        "logits: shape ['batch', 'seq', 50257], contract says ['batch', 1, 50257]"
    ]
    assert check_graph(write_generation_graph(_graph_copy(tiny_bundle, tmp_path)), last) == []


def test_memory_budget_logits_before_and_after():
    gpt2 = IOContract(12, 12, 64, 50257)
    server = ProfileLimits.resolve(PRESETS["server"], 1024)
    m = memory_budget(gpt2, 1024, server, precision="fp16", kv_caches=3)
    assert m.logits == 16 * 1 * 50257 * 4  # B_max x 1 x V, fp32
    assert m.logits_all_positions == 16 * 1024 * 50257 * 4 > 3 * 2**30  # the 3 GiB of the issue
    assert m.kv_per_row == 2 * 1024 * 12 * 2 * 768 * 4 and m.kv == 3 * 16 * m.kv_per_row
    assert m.total_all_positions - m.total == m.logits_all_positions - m.logits
    assert 300 * 2**20 < m.weights < 330 * 2**20  # 124M: fp16 matmuls, fp32 tied table
    nano = memory_budget(
        gpt2, 1024, ProfileLimits.resolve(PRESETS["orin-nano"], 1024), precision="fp16", kv_caches=3
    )
    assert nano.logits == 2 * 50257 * 4 and nano.total < 1 * 2**30
