"""The ONNX I/O contract: names, axes, concrete shapes, JSON round trip."""

from __future__ import annotations

import pytest

from export.contract import TOTAL, IOContract


@pytest.fixture
def contract() -> IOContract:
    return IOContract(n_layer=2, n_head=4, head_dim=16, vocab_size=50257)


def test_names_follow_the_layer_key_value_order(contract):
    assert contract.input_names == [
        "input_ids",
        "attention_mask",
        "position_ids",
        "past_key_values.0.key",
        "past_key_values.0.value",
        "past_key_values.1.key",
        "past_key_values.1.value",
    ]
    assert contract.output_names == [
        "logits",
        "present.0.key",
        "present.0.value",
        "present.1.key",
        "present.1.value",
    ]


def test_axes_and_concrete_shapes(contract):
    assert contract.spec("attention_mask").shape == ("batch", TOTAL)
    assert contract.spec("present.1.value").shape == ("batch", 4, TOTAL, 16)
    assert contract.concrete_shape("past_key_values.0.key", batch=3, seq=5, past=7) == (3, 4, 7, 16)
    assert contract.concrete_shape("present.0.key", batch=3, seq=5, past=7) == (3, 4, 12, 16)
    assert contract.concrete_shape("logits", batch=2, seq=1, past=0) == (2, 1, 50257)
    assert contract.concrete_shape("attention_mask", batch=2, seq=1, past=0) == (2, 1)


def test_unknown_name_lists_what_exists(contract):
    pattern = r"'present\.2\.key' is not part of the I/O contract.*present\.\{0\.\.1\}"
    with pytest.raises(KeyError, match=pattern):
        contract.spec("present.2.key")


def test_json_round_trip_and_mismatch(contract):
    d = contract.to_json()
    assert IOContract.from_json(d) == contract
    d["n_layer"] = 3  # the recorded specs still describe 2 layers
    with pytest.raises(ValueError, match="recorded input specs do not match"):
        IOContract.from_json(d)


def test_for_config_reads_the_config():
    class Cfg:
        n_layer, n_head, n_embd, vocab_size = 12, 12, 768, 50257

    c = IOContract.for_config(Cfg)
    assert (c.n_layer, c.n_head, c.head_dim, c.vocab_size) == (12, 12, 64, 50257)
    assert c.float_dtype == "float32" and c.ids_dtype == "int64"
