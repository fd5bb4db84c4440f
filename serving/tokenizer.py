"""The GPT-2 tokenizer for serving, on the ``tokenizers`` library alone (never transformers).

The ONNX Runtime serving path must not import torch, and transformers' tokenizers do. Encoding is
the Rust BPE from ``tokenizers``; decoding goes through a table id -> bytes (GPT-2 is byte-level
BPE), so a streamed generation can hold back a character whose UTF-8 bytes are split over tokens
instead of emitting U+FFFD and a second garbled fragment.

    tok = Tokenizer.from_dir(bundle.tokenizer_dir)
    tok.encode("Hello world")            # [15496, 995]
    dec = tok.stream_decoder()
    dec.push([15496]) + dec.push([995]) + dec.flush() == "Hello world"
"""

from __future__ import annotations

import codecs
import json
import operator
import os
from pathlib import Path

from serving.errors import InvalidInput

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_JSON = "tokenizer.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable character standing for each byte."""
    # Printable latin-1 bytes stand for themselves; the other 68 are shifted above 255 so that
    # every byte has a visible, non-whitespace character in the vocabulary.
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _is_id(i: object, n: int) -> bool:
    try:
        return 0 <= operator.index(i) < n
    except TypeError:
        return False


class StreamDecoder:
    """Turns token ids pushed one step at a time into text deltas.

    A delta never ends inside a UTF-8 sequence: incomplete bytes are held back until the tokens
    completing them arrive (or until ``flush``, which renders leftovers as U+FFFD). The
    concatenation of all deltas equals ``Tokenizer.decode`` of all ids.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: list[int]) -> str:
        return self._utf8.decode(self._tok.decode_bytes(ids), final=False)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    """GPT-2 byte-level BPE. Use ``Tokenizer.from_dir(path)``.

    Args:
        backend: A ``tokenizers.Tokenizer`` for the GPT-2 vocabulary.
    """

    def __init__(self, backend):
        self._tk = backend
        vocab = backend.get_vocab(with_added_tokens=True)  # token string -> id
        self.vocab_size = max(vocab.values()) + 1
        special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
        bd = _byte_decoder()
        table: list[bytes] = [b""] * self.vocab_size
        for token, i in vocab.items():
            if token in special or any(ch not in bd for ch in token):
                table[i] = token.encode("utf-8")  # added/special tokens decode to their content
            else:
                table[i] = bytes(bd[ch] for ch in token)
        self._bytes = table
        self.eos_token_id: int | None = vocab.get(EOS_TOKEN)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Read ``tokenizer.json``, or else ``vocab.json`` + ``merges.txt``, from ``path``.

        Raises:
            FileNotFoundError: when neither is there (the message lists what is).
        """
        from tokenizers import Tokenizer as TkTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        root = Path(path)
        if (root / TOKENIZER_JSON).is_file():
            return cls(TkTokenizer.from_file(str(root / TOKENIZER_JSON)))
        vocab, merges = root / VOCAB_FILE, root / MERGES_FILE
        if vocab.is_file() and merges.is_file():
            tk = TkTokenizer(models.BPE.from_file(str(vocab), str(merges)))
            tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tk.decoder = decoders.ByteLevel()
            if EOS_TOKEN in json.loads(vocab.read_text(encoding="utf-8")):
                tk.add_special_tokens([EOS_TOKEN])
            return cls(tk)
        present = sorted(p.name for p in root.iterdir())[:12] if root.is_dir() else "no such directory"
        raise FileNotFoundError(
            f"{root}: no tokenizer found; expected {TOKENIZER_JSON} or "
            f"{VOCAB_FILE} + {MERGES_FILE}, found: {present}"
        )

    def encode(self, text: str) -> list[int]:
        # No post-processing template: GPT-2 adds no BOS/EOS, whatever tokenizer.json says.
        return self._tk.encode(text, add_special_tokens=False).ids

    def decode_bytes(self, ids: list[int]) -> bytes:
        """The raw bytes of ``ids`` (may end inside a UTF-8 sequence).

        Raises:
            InvalidInput: for an id outside the vocabulary.
        """
        table = self._bytes
        try:
            return b"".join(table[i] if i >= 0 else table[len(table)] for i in ids)
        except (IndexError, TypeError):
            bad = [i for i in ids if not _is_id(i, len(table))]
            raise InvalidInput(f"token ids must be integers in [0, {len(table)}); got {bad[:5]}") from None

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; special tokens decode to their text; bad UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def __len__(self) -> int:
        return self.vocab_size
