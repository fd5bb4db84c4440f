"""serving.tokenizer: GPT-2 BPE on `tokenizers` alone, and its stream decoder (`DecodeStream`) that never
splits UTF-8."""

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
    assert tok.backend.decode(ids, skip_special_tokens=False) == TRICKY


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


MULTIBYTE = "naïve café — 日本語のテキスト, 한국어, emoji 🤖🎉👩‍👩‍👧 and <|endoftext|> then ünïcödé"


def _stream(tok, ids):
    dec = tok.stream_decoder()
    deltas = [dec.push([i]) for i in ids]
    return deltas, dec.flush()


def test_stream_emits_text_as_soon_as_its_characters_are_complete(tok):
    """Valid text split over tokens (CJK, emoji, ZWJ sequences): never U+FFFD; after a token that
    completes its characters the text so far is all of it; after one that ends inside a character
    that token's text is held back (a whole token: a space in it waits for the character too)."""
    ids = tok.encode(MULTIBYTE)
    assert len(ids) > len(MULTIBYTE.split())  # multibyte characters span several tokens
    deltas, rest = _stream(tok, ids)
    held = 0
    for k in range(1, len(ids) + 1):
        so_far, decoded = "".join(deltas[:k]), tok.decode(ids[:k])
        assert "\ufffd" not in so_far
        if decoded.endswith("\ufffd"):  # the tail is an incomplete character
            held += 1
            assert decoded.rstrip("\ufffd").startswith(so_far), k
        else:
            assert so_far == decoded, k
    assert held >= 3 and rest == "" and "".join(deltas) == MULTIBYTE


def test_special_tokens_stream_as_their_text(tok):
    ids = tok.encode("a<|endoftext|>b")
    assert 50256 in ids
    deltas, rest = _stream(tok, ids)
    assert "<|endoftext|>" in deltas and "".join(deltas) + rest == "a<|endoftext|>b"


def test_stream_of_arbitrary_ids_concatenates_to_decode(tok):
    """Random ids, mostly tokens of non-ASCII bytes (lead bytes, continuation bytes, invalid
    sequences): the deltas plus the flush always equal one decode of all ids."""
    import random

    rng = random.Random(0)
    vocab = tok.backend.get_vocab()
    high = [i for t, i in vocab.items() if all(ord(c) >= 0x80 for c in t)]
    for _ in range(300):
        ids = [rng.choice(high) if rng.random() < 0.8 else rng.randrange(len(tok)) for _ in range(12)]
        deltas, rest = _stream(tok, ids)
        assert "".join(deltas) + rest == tok.decode(ids), ids


def test_push_rejects_bad_ids_and_keeps_going(tok):
    dec = tok.stream_decoder()
    assert dec.push(tok.encode("Hi")) == "Hi"
    with pytest.raises(InvalidInput, match=r"\[0, 50257\)"):
        dec.push([50257])
    assert dec.push(tok.encode(" there")) == " there" and dec.flush() == ""
