"""serving.tokenizer: GPT-2 BPE on `tokenizers` alone, and a stream decoder that never splits UTF-8."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.errors import InvalidInput
from serving.tokenizer import Tokenizer

EMBEDDED = Path(__file__).resolve().parents[2] / "export" / "tokenizer_data"
TRICKY = "Hello world  naïve 日本語 🤖<|endoftext|> x\n\n  y"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(EMBEDDED)


def test_embedded_vocab_and_merges_encode_hello_world(tok):
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eos_token_id == 50256
    assert tok.vocab_size == 50257
    assert tok.decode([15496, 995]) == "Hello world"


def test_bundle_tokenizer_json_matches_embedded_files(tok, tiny_bundle):
    from_json = Tokenizer.from_dir(tiny_bundle.tokenizer_dir)
    assert (tiny_bundle.tokenizer_dir / "tokenizer.json").is_file()
    assert from_json.encode(TRICKY) == tok.encode(TRICKY)
    assert from_json.encode("Hello world") == [15496, 995]
    assert from_json.eos_token_id == 50256


def test_decode_round_trips_and_agrees_with_tokenizers(tok):
    ids = tok.encode(TRICKY)
    assert 50256 in ids  # the special token is one token, not "<", "|", ...
    assert tok.decode(ids) == TRICKY
    assert tok._tk.decode(ids, skip_special_tokens=False) == TRICKY


def test_stream_decoder_holds_back_split_utf8(tok):
    ids = tok.encode("🤖!")
    assert len(ids) > 2  # the emoji's 4 bytes span several byte-level tokens
    dec = tok.stream_decoder()
    deltas = [dec.push([i]) for i in ids]
    assert "\ufffd" not in "".join(deltas)
    assert deltas[0] == ""  # an incomplete character is held back, not emitted as U+FFFD
    assert "".join(deltas) + dec.flush() == "🤖!"


def test_stream_decoder_flush_renders_leftover_bytes(tok):
    ids = tok.encode("🤖")
    dec = tok.stream_decoder()
    assert dec.push(ids[:1]) == ""
    assert dec.flush() == "\ufffd"


def test_stream_deltas_concatenate_to_decode(tok):
    ids = tok.encode(TRICKY)
    dec = tok.stream_decoder()
    assert "".join(dec.push([i]) for i in ids) + dec.flush() == tok.decode(ids)


def test_decode_rejects_ids_outside_vocab(tok):
    with pytest.raises(InvalidInput, match=r"\[0, 50257\).*50257"):
        tok.decode([1, 50257])
    with pytest.raises(InvalidInput, match="-1"):
        tok.decode([-1])


def test_from_dir_without_tokenizer_names_what_it_wants(tmp_path):
    (tmp_path / "other.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"tokenizer.json or vocab.json \+ merges.txt.*other.txt"):
        Tokenizer.from_dir(tmp_path)
