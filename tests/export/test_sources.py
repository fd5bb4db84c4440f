"""Model sources: presets, a local save_pretrained directory, and hub names with no hub."""

from __future__ import annotations

import time

import pytest

from export.sources import PRESETS, SourceError, load_source


def test_unknown_name_lists_what_is_accepted():
    with pytest.raises(SourceError) as e:
        load_source("gpt3")
    msg = str(e.value)
    assert "'gpt3' is not a preset, a hub name or an existing directory" in msg
    assert all(p in msg for p in PRESETS) and "local Hugging Face directory" in msg


def test_directory_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(SourceError, match="has no config.json, so it is not a Hugging Face checkpoint"):
        load_source(str(tmp_path))


@pytest.mark.parametrize(
    "env",
    [
        {"HF_HUB_OFFLINE": "1"},
        # unroutable (TEST-NET-1): a connect would hang without a timeout
        {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "https://192.0.2.1"},
    ],
)
def test_hub_name_without_hub_fails_fast(monkeypatch, tmp_path, env):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing downloaded before
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if "HF_ENDPOINT" not in env:
        monkeypatch.delenv("HF_ENDPOINT", raising=False)
    t0 = time.monotonic()
    with pytest.raises(SourceError) as e:
        load_source("gpt2-deploy-tests/never-downloaded")  # a hub id no cache can hold
    assert time.monotonic() - t0 < 20
    msg = str(e.value)
    assert "hub cannot be reached" in msg and "local directory" in msg and "gpt2-124m" in msg


def test_presets_are_seeded_and_read_their_context_length():
    a, b = load_source("tiny", seed=3), load_source("tiny", seed=3)
    c = load_source("tiny", seed=4)
    wa, wb, wc = (m.model.transformer.h[0].attn.c_attn.bias for m in (a, b, c))
    assert (wa == wb).all() and not (wa == wc).all()
    assert wa.abs().max() > 0  # biases and LayerNorm parameters are random, not 0/1
    assert a.config.n_positions == 256 and a.config.vocab_size == 50257
    assert a.tokenizer("hello world")["input_ids"] == [31373, 995]  # the real GPT-2 BPE


def test_export_from_local_directory(tmp_path):
    """A directory written by save_pretrained (model + tokenizer): the bundle is named after it."""
    from export.api import ExportOptions, export_bundle

    src = load_source("tiny", seed=1)
    d = tmp_path / "my-little-gpt2"
    src.model.save_pretrained(d)
    src.tokenizer.save_pretrained(d)
    b = export_bundle(ExportOptions(model=str(d), out=tmp_path / "bundle", reference=False, quiet=True))
    m = b.manifest
    assert m.name == "my-little-gpt2" and m.export["source_kind"] == "local" and m.export["seed"] is None
    assert m.validation["passed"] and m.validation["max_abs"] <= 1e-4
    assert (b.root / "tokenizer.json").is_file() and not (b.root / "TOKENIZER-LICENSE").exists()
    named = export_bundle(
        ExportOptions(
            model=str(d), out=tmp_path / "bundle", name="custom", validate=False, reference=False, quiet=True
        )
    )
    assert named.name == "custom" and named.manifest.validation == {"skipped": True}


@pytest.mark.parametrize("model", ["./no/such/dir", "~/no-such-gpt2-dir", "no/such/dir"])
def test_a_missing_directory_is_not_taken_for_a_hub_name(model):
    with pytest.raises(SourceError, match=r"^directory \S*no[/-]such\S* does not exist") as e:
        load_source(model)
    assert "hub" in str(e.value) and "tiny" in str(e.value)  # the accepted sources are listed


def test_directory_with_config_but_no_weights(tmp_path):
    load_source("tiny").config.save_pretrained(tmp_path)
    with pytest.raises(SourceError) as e:
        load_source(str(tmp_path))
    msg = str(e.value)
    assert msg.startswith(f"cannot load {tmp_path}: OSError:") and "tiny" in msg


def test_directory_with_a_corrupt_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SourceError, match=rf"cannot load {tmp_path}: .*Error.*--model accepts"):
        load_source(str(tmp_path))


def test_directory_holding_another_model_type(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(SourceError, match="holds a 'bert' model; only 'gpt2' is supported"):
        load_source(str(tmp_path))
