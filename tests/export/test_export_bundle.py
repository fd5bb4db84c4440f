"""Integration: the exported `tiny` bundle in ONNX Runtime against the PyTorch reference."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from export.contract import IOContract
from export.manifest import Bundle

TOL = 1e-4


@pytest.fixture(scope="module")
def session(tiny_bundle):
    import onnxruntime as ort

    return ort.InferenceSession(str(tiny_bundle.onnx_path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def reference(tiny_bundle):
    """The PyTorch model from the bundle's own reference checkpoint, behind the flat-KV wrapper."""
    from transformers import GPT2LMHeadModel

    from export.onnx_export import flat_kv_decoder

    model = GPT2LMHeadModel.from_pretrained(tiny_bundle.root / "reference", attn_implementation="sdpa")
    return flat_kv_decoder(model.eval())


def _run_torch(decoder, feeds, contract: IOContract):
    import torch

    with torch.no_grad():
        outs = decoder(*[torch.from_numpy(feeds[n]) for n in contract.input_names])
    return [o.numpy() for o in outs]


def _feeds(contract, mask, seq, rng):
    b, total = mask.shape
    past = total - seq
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, past:].astype(np.int64)
    feeds = {
        "input_ids": rng.integers(0, contract.vocab_size, (b, seq), dtype=np.int64),
        "attention_mask": mask.astype(np.int64),
        "position_ids": pos,
    }
    for n in contract.past_names:
        feeds[n] = rng.standard_normal(
            contract.concrete_shape(n, batch=b, seq=seq, past=past), dtype=np.float32
        )
    return feeds


@pytest.mark.parametrize("past", [0, 6])
def test_parity_with_left_padding(tiny_bundle, session, reference, past):
    c = tiny_bundle.contract
    seq = 5
    mask = np.ones((3, past + seq), np.int64)
    mask[0, :4] = 0  # row 0 left-padded by 4
    mask[1, :1] = 0  # row 1 by 1
    feeds = _feeds(c, mask, seq, np.random.default_rng(past))
    got = session.run(None, feeds)
    ref = _run_torch(reference, feeds, c)
    valid = mask[:, past:].astype(bool)  # (B, S)
    assert got[0].shape == (3, seq, c.vocab_size)
    assert np.abs(got[0] - ref[0])[valid].max() <= TOL
    assert (got[0].argmax(-1) == ref[0].argmax(-1))[valid].all()
    kv_valid = mask.astype(bool)
    for g, r in zip(got[1:], ref[1:]):
        assert g.shape == (3, c.n_head, past + seq, c.head_dim)
        assert np.abs(g - r).transpose(0, 2, 1, 3)[kv_valid].max() <= TOL


def test_incremental_decode_matches_full_prefill(tiny_bundle, session):
    """Prefill 6 tokens then decode 1 with the returned cache == prefill all 7 at once."""
    c = tiny_bundle.contract
    rng = np.random.default_rng(1)
    ids = rng.integers(0, c.vocab_size, (2, 7), dtype=np.int64)
    mask = np.ones((2, 7), np.int64)
    mask[0, :2] = 0
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None).astype(np.int64)
    empty = {n: np.zeros((2, c.n_head, 0, c.head_dim), np.float32) for n in c.past_names}
    full = session.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **empty})
    first = session.run(
        None, {"input_ids": ids[:, :6], "attention_mask": mask[:, :6], "position_ids": pos[:, :6], **empty}
    )
    past = dict(zip(c.past_names, first[1:]))
    step = session.run(
        None, {"input_ids": ids[:, 6:], "attention_mask": mask, "position_ids": pos[:, 6:], **past}
    )
    assert np.abs(step[0][:, 0] - full[0][:, 6]).max() <= TOL


def test_manifest_records_what_the_issue_asks(tiny_bundle):
    m = Bundle.open(tiny_bundle.root).manifest
    assert m.name == "tiny" and m.source == "tiny" and m.precision == "fp32"
    assert m.dims.n_positions == 256  # read from the config, not assumed 1024
    assert (m.dims.n_layer, m.dims.n_head, m.dims.n_embd, m.dims.vocab_size) == (2, 4, 64, 50257)
    assert m.contract == IOContract(2, 4, 16, 50257)
    roles = {f.role for f in m.files.values()}
    assert {"onnx", "config", "tokenizer", "reference"} <= roles
    assert {"model.onnx", "config.json", "tokenizer.json", "reference/model.safetensors"} <= set(m.files)
    assert all(len(f.sha256) == 64 for f in m.files.values())
    e = m.export
    assert e["opset"] >= 17 and e["precision"] == "fp32" and e["seed"] == 0
    assert set(e["versions"]) >= {"torch", "transformers", "onnx", "onnxruntime"}
    assert e["variant"]["nodes_after"] > 0 and e["external_data"] is True  # shared with the serving graph
    assert m.files["model.onnx.data"].role == "onnx-data"
    assert m.files["model_serving.onnx"].bytes < m.files["model.onnx.data"].bytes / 10  # weights once
    v = m.validation
    assert v["passed"] and v["max_abs"] <= 1e-4 and v["top1_agreement"] == 1.0 and len(v["cases"]) == 4


def _tied_count(path, vocab, n_embd) -> int:
    m = onnx.load(str(path), load_external_data=False)
    return sum(1 for i in m.graph.initializer if sorted(i.dims) == sorted([vocab, n_embd]))


def test_graph_structure(tiny_bundle):
    m = onnx.load(str(tiny_bundle.onnx_path))
    ops = [n.op_type for n in m.graph.node]
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert ops.count("LayerNormalization") == 2 * 2 + 1  # one node per LayerNorm (TensorRT's layer)
    assert _tied_count(tiny_bundle.onnx_path, 50257, 64) == 1  # tied lm_head/wte stored once
    # present's length axis is named ``total`` like the mask's
    present = next(o for o in m.graph.output if o.name == "present.0.key")
    assert present.type.tensor_type.shape.dim[2].dim_param == "total"
    # the attention-mask fill value is finite in fp16 (no finfo(float32).min left in the graph)
    from onnx import numpy_helper

    smallest = min(
        float(numpy_helper.to_array(i).min())
        for i in m.graph.initializer
        if i.data_type == onnx.TensorProto.FLOAT and 0 < np.prod(i.dims or [1]) <= 16
    )
    assert smallest > -65504


def test_no_external_data_writes_self_contained_graphs(tmp_path_factory):
    """--no-external-data on a small model: model.onnx and the serving graph each hold the weights."""
    import onnxruntime as ort

    from export.api import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("inline") / "tiny-inline"
    b = export_bundle(ExportOptions(model="tiny", out=out, external_data=False, reference=False, quiet=True))
    files = b.manifest.files
    assert "model.onnx.data" not in files and b.manifest.export["external_data"] is False
    assert files["model_serving.onnx"].bytes > files["model.onnx"].bytes / 2  # its own copy
    assert b.manifest.validation["passed"] and b.manifest.validation["max_abs"] <= 1e-4
    onnx.checker.check_model(str(b.onnx_path))
    ort.InferenceSession(str(b.onnx_path), providers=["CPUExecutionProvider"])
    assert _tied_count(b.onnx_path, 50257, 64) == 1
    assert "reference/model.safetensors" not in files  # --no-reference


def test_no_external_data_over_2_gib_is_refused_before_tracing(tmp_path):
    """gpt2-1.5b's shape on the meta device: no memory, no tracing; the size check alone."""
    import torch
    import transformers

    from export.errors import OptionsError
    from export.onnx_export import export_onnx
    from export.sources import preset_config

    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(preset_config("gpt2-1.5b"))
    with pytest.raises(OptionsError, match=r"weights are 5.8 GiB .* drop --no-external-data"):
        export_onnx(model, tmp_path / "model.onnx", external_data=False)
    assert not (tmp_path / "model.onnx").exists()
