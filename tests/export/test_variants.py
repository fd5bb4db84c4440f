"""fp16, int8, int4 and ORT-fused variants of the tiny graph, each validated against its preset."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from export.compare import tolerance_for
from export.errors import OptionsError
from export.validate import validate_export
from export.variants import Int4Options, make_variant, residual_adds

N_LAYER = 2


@pytest.fixture(scope="module")
def tiny_model(tiny_bundle):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(tiny_bundle.root / "reference", attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def variant(tiny_bundle, tmp_path_factory):
    made = {}

    def make(precision: str):
        if precision not in made:
            out = tmp_path_factory.mktemp(precision) / "model.onnx"
            made[precision] = (out, make_variant(tiny_bundle.onnx_path, out, precision))
        return made[precision]

    return make


@pytest.mark.parametrize("precision", ["fp16", "int8", "int4", "ort-fused"])
def test_variant_validates_against_its_preset(variant, tiny_model, tiny_bundle, precision):
    path, info = variant(precision)
    report = validate_export(path, tiny_model, tolerance_for(precision), raise_on_failure=False)
    assert report, str(report)
    onnx.checker.check_model(str(path))
    # the I/O contract is unchanged: fp32 in, fp32 out, same names
    m = onnx.load(str(path))
    assert [i.name for i in m.graph.input] == tiny_bundle.contract.input_names
    assert [o.name for o in m.graph.output] == tiny_bundle.contract.output_names
    assert all(
        v.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64)
        for v in (*m.graph.input, *m.graph.output)
    )
    assert info.nodes_before > 0 and info.nodes_after > 0
    # the tied embedding / lm_head table is stored once in every variant
    assert sum(1 for i in m.graph.initializer if sorted(i.dims) == [64, 50257]) == 1


def test_fp16_keeps_sensitive_ops_in_fp32(variant, tiny_bundle):
    path, info = variant("fp16")
    m = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {
        v.name: v.type.tensor_type.elem_type for v in (*m.graph.value_info, *m.graph.input, *m.graph.output)
    }
    types.update({i.name: i.data_type for i in m.graph.initializer})
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    by_op = {}
    for n in m.graph.node:
        by_op.setdefault(n.op_type, []).append(n)
    for n in by_op["LayerNormalization"] + by_op["Softmax"]:
        assert types[n.input[0]] == f32, n.name
    assert info.details["fp32_residual_adds"] == 2 * N_LAYER + 1  # embedding sum + 2 per block
    for n in by_op["Add"]:
        if n.name in residual_adds(onnx.load(str(tiny_bundle.onnx_path)).graph):
            assert all(types[i] == f32 for i in n.input), n.name
    # logits come straight from the fp32 lm_head matmul, no fp16 round trip before the output
    head = next(n for n in m.graph.node if "logits" in n.output)
    assert head.op_type == "MatMul" and types[head.input[0]] == f32
    # the weights are fp16, and the tied embedding/lm_head table is stored once
    tables = [i for i in m.graph.initializer if sorted(i.dims) == [64, 50257]]
    assert len(tables) == 1 and tables[0].data_type == f16
    assert sum(i.data_type == f16 for i in m.graph.initializer if len(i.dims) == 2) >= 4 * N_LAYER


def test_fp16_left_padding_is_finite(variant, tiny_bundle):
    """Fully masked (left-padding) rows must not produce -inf/NaN that leak into valid positions."""
    import onnxruntime as ort

    path, _ = variant("fp16")
    c = tiny_bundle.contract
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    b, s = 3, 12
    mask = np.ones((b, s), np.int64)
    mask[0, :9] = 0  # mostly padding
    mask[1, :11] = 0  # a single real token
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None).astype(np.int64)
    feeds = {
        "input_ids": np.random.default_rng(0).integers(0, c.vocab_size, (b, s), dtype=np.int64),
        "attention_mask": mask,
        "position_ids": pos,
        **{n: np.zeros((b, c.n_head, 0, c.head_dim), np.float32) for n in c.past_names},
    }
    out = sess.run(None, feeds)
    valid = mask.astype(bool)
    assert np.isfinite(out[0][valid]).all()
    for present in out[1:]:
        assert not np.isnan(present.transpose(0, 2, 1, 3)[valid]).any()
    # the fp16 graph holds no mask constant beyond fp16's range
    from onnx import numpy_helper

    m = onnx.load(str(path))
    for init in m.graph.initializer:
        if init.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT) and np.prod(init.dims) <= 16:
            assert np.isfinite(numpy_helper.to_array(init).astype(np.float16)).all(), init.name


def test_int8_quantizes_the_weight_matmuls_only(variant):
    path, info = variant("int8")
    ops = info.ops_after
    assert ops.get("MatMulInteger") == 4 * N_LAYER == info.details["matmuls_quantized"]
    assert ops.get("Gemm", 0) == 0
    m = onnx.load(str(path))
    assert sum(1 for i in m.graph.initializer if i.data_type == onnx.TensorProto.INT8) >= 4 * N_LAYER


def _attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def test_int4_quantizes_the_weight_matmuls_and_the_lm_head(variant, tiny_bundle):
    path, info = variant("int4")
    ops = info.ops_after
    # 4 weight matmuls per block + the lm_head, all MatMulNBits; no Gemm left
    assert ops.get("MatMulNBits") == 4 * N_LAYER + 1 == info.details["matmuls_quantized"]
    assert ops.get("Gemm", 0) == 0
    d = info.details
    assert (d["bits"], d["block_size"], d["symmetric"], d["accuracy_level"]) == (4, 32, False, 4)
    assert d["lm_head_quantized"] is True
    m = onnx.load(str(path))
    prod = {o: n for n in m.graph.node for o in n.output}
    node = prod["logits"]
    while node.op_type != "MatMulNBits":  # logits <- reshapes <- the lm_head
        assert node.op_type in ("Reshape", "Identity", "Cast"), node.op_type
        node = prod[node.input[0]]
    a = _attrs(node)
    assert (a["bits"], a["block_size"], a["K"], a["N"], a["accuracy_level"]) == (4, 32, 64, 50257, 4)
    for n in m.graph.node:
        if n.op_type == "MatMulNBits":
            assert _attrs(n)["bits"] == 4 and n.domain == "com.microsoft", n.name
    # the embedding lookup keeps the fp32 table; the Transpose that fed the lm_head is gone
    inits = {i.name: i for i in m.graph.initializer}
    tables = [i for i in inits.values() if sorted(i.dims) == [64, 50257]]
    assert len(tables) == 1 and tables[0].data_type == onnx.TensorProto.FLOAT
    assert not any(n.op_type == "Transpose" and n.input[0] == tables[0].name for n in m.graph.node)
    assert info.ops_after["Transpose"] == info.ops_before["Transpose"] - 1
    # the lm_head's 4-bit copy (+ scales, zero points) is ~6x smaller than the fp32 table
    head_bytes = sum(len(inits[i].raw_data) for i in node.input[1:4] if i)
    assert head_bytes < len(tables[0].raw_data) / 5


def test_int4_options_lm_head_fp32_and_symmetric(tiny_bundle, tiny_model, tmp_path):
    out = tmp_path / "model.onnx"
    info = make_variant(
        tiny_bundle.onnx_path, out, "int4", int4=Int4Options(block_size=16, symmetric=True, lm_head=False)
    )
    assert info.ops_after["MatMulNBits"] == 4 * N_LAYER and not info.details["lm_head_quantized"]
    m = onnx.load(str(out))
    nbits = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    assert all(_attrs(n)["block_size"] == 16 for n in nbits)
    # symmetric: no zero-point input
    assert all(len(n.input) < 4 or not n.input[3] for n in nbits)
    head = {o: n for n in m.graph.node for o in n.output}["logits"]
    while head.op_type not in ("MatMul", "MatMulNBits"):
        head = {o: n for n in m.graph.node for o in n.output}[head.input[0]]
    assert head.op_type == "MatMul"
    report = validate_export(out, tiny_model, tolerance_for("int4"), raise_on_failure=False)
    assert report, str(report)


@pytest.mark.parametrize(
    "opts, message",
    [
        (Int4Options(block_size=24), "block_size must be a power of two >= 16, got 24"),
        (Int4Options(block_size=8), "block_size must be a power of two >= 16, got 8"),
        (Int4Options(accuracy_level=7), "accuracy_level must be 0..4, got 7"),
    ],
)
def test_int4_bad_options(tiny_bundle, tmp_path, opts, message):
    with pytest.raises(OptionsError, match=message):
        make_variant(tiny_bundle.onnx_path, tmp_path / "m.onnx", "int4", int4=opts)


def test_int4_bundle_records_its_error_and_tolerance(tmp_path):
    """`gpt2-deploy export --precision int4`: validated, measured error and top-1 in the manifest."""
    from export.api import ExportOptions, export_bundle
    from export.cli import Precision

    assert Precision("int4").value == "int4"  # the CLI's choice comes from EXPORT_PRECISIONS
    b = export_bundle(
        ExportOptions(model="tiny", out=tmp_path / "int4", precision="int4", reference=False, quiet=True)
    )
    v = b.manifest.validation
    assert b.manifest.precision == "int4" and v["passed"] and v["tolerance"]["name"] == "int4"
    assert 0 < v["max_abs"] <= tolerance_for("int4").atol and 0.5 <= v["top1_agreement"] <= 1.0
    variant = b.manifest.export["variant"]
    assert variant["block_size"] == 32 and variant["lm_head_quantized"] is True
    assert variant["ops_changed_before_after"]["MatMulNBits"] == [0, 4 * N_LAYER + 1]


def test_ort_fused_records_its_fusions(variant):
    _, info = variant("ort-fused")
    j = info.to_json()
    assert info.ops_after.get("MultiHeadAttention") == N_LAYER
    assert info.ops_after.get("SkipLayerNormalization", 0) >= 2 * N_LAYER
    assert j["nodes_after"] < j["nodes_before"] and j["fusions"]
    assert j["ops_changed_before_after"]["MultiHeadAttention"] == [0, N_LAYER]


def test_unknown_precision(tiny_bundle, tmp_path):
    with pytest.raises(OptionsError, match=r"precision 'fp8' is not supported; choose one of fp32, fp16"):
        make_variant(tiny_bundle.onnx_path, tmp_path / "m.onnx", "fp8")


def test_fp16_bundle_with_external_data(tmp_path):
    """The API path: an fp16 variant of a graph written with external data stays external."""
    from export.api import ExportOptions, export_bundle

    b = export_bundle(
        ExportOptions(
            model="tiny",
            out=tmp_path / "fp16",
            precision="fp16",
            external_data=True,
            reference=False,
            quiet=True,
        )
    )
    files = b.manifest.files
    assert set(files) >= {"model.onnx", "model.onnx.data"} and not (b.root / ".staging").exists()
    assert b.manifest.precision == "fp16" and b.manifest.validation["passed"]
    assert b.manifest.validation["tolerance"]["name"] == "fp16"
    assert b.manifest.export["variant"]["external_data"] is True
    m = onnx.load(str(b.onnx_path), load_external_data=False)
    assert sum(1 for i in m.graph.initializer if sorted(i.dims) == [64, 50257]) == 1
