"""The GPT-2 tokenizer for serving, on the ``tokenizers`` library alone (never transformers).

The ONNX Runtime serving path must not import torch, and transformers' tokenizers do. Encoding and
decoding are the Rust byte-level BPE of ``tokenizers``; streamed text goes through its
``DecodeStream``, which holds back a character whose UTF-8 bytes are split over tokens instead
of emitting U+FFFD and a second garbled fragment.

    tok = Tokenizer.from_dir(bundle.tokenizer_dir)
    tok.encode("Hello world")            # [15496, 995]
    dec = tok.stream_decoder()
    dec.push([15496]) + dec.push([995]) + dec.flush() == "Hello world"
"""

from __future__ import annotations

import functools
import json
import operator
import os
from pathlib import Path
from typing import Any

from serving.errors import InvalidInput

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_JSON = "tokenizer.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"


def _is_id(i: Any, n: int) -> bool:
    try:
        return 0 <= operator.index(i) < n
    except TypeError:
        return False


class StreamDecoder:
    """Turns token ids pushed one step at a time into text deltas (``tokenizers``' ``DecodeStream``).

    A delta never ends inside a UTF-8 sequence: incomplete bytes are held back until the tokens
    completing them arrive (or until ``flush``, which renders leftovers as U+FFFD). The
    concatenation of all deltas equals ``Tokenizer.decode`` of all ids; special tokens decode to
    their text.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._stream = self._fresh()
        self._pending: list[int] = []  # ids pushed since the last text was emitted

    @staticmethod
    def _fresh() -> Any:
        from tokenizers.decoders import DecodeStream

        return DecodeStream(skip_special_tokens=False)

    def push(self, ids: list[int]) -> str:
        """The text that ``ids`` complete (possibly ""), after the text already returned.

        Raises:
            InvalidInput: for an id outside the vocabulary (nothing of ``ids`` is consumed).
        """
        self._tok.check_ids(ids)
        out = []
        for i in ids:
            self._pending.append(int(i))
            text = self._stream.step(self._tok.backend, int(i))
            if text is not None:
                out.append(text)
                self._pending.clear()
        return "".join(out)

    def flush(self) -> str:
        """The held-back rest (incomplete UTF-8 becomes U+FFFD); the decoder starts afresh."""
        # emitted text always ends on a character boundary, so the pending ids decode on their own
        text = self._tok.decode(self._pending) if self._pending else ""
        self._pending.clear()
        self._stream = self._fresh()
        return text


class Tokenizer:
    """GPT-2 byte-level BPE. Use ``Tokenizer.from_dir(path)``.

    Args:
        backend: A ``tokenizers.Tokenizer`` for the GPT-2 vocabulary.
    """

    def __init__(self, backend: Any):
        self.backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.eos_token_id: int | None = backend.token_to_id(EOS_TOKEN)

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
            tk = TkTokenizer.from_file(str(root / TOKENIZER_JSON))
            if tk.decoder is None:  # GPT-2 is byte-level BPE whatever the file leaves out
                tk.decoder = decoders.ByteLevel()
            return cls(tk)
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
        return self.backend.encode(text, add_special_tokens=False).ids

    def check_ids(self, ids: list[int]) -> None:
        """Raise InvalidInput unless every id is an integer in [0, vocab_size)."""
        bad = [i for i in ids if not _is_id(i, self.vocab_size)]
        if bad:
            raise InvalidInput(f"token ids must be integers in [0, {self.vocab_size}); got {bad[:5]}")

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; special tokens decode to their text; bad UTF-8 becomes U+FFFD.

        Raises:
            InvalidInput: for an id outside the vocabulary.
        """
        self.check_ids(ids)
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """Bytes of text one token covers at most (byte-level BPE: one vocabulary character per
        byte; special tokens their UTF-8 length): a text of B bytes needs >= B / this tokens."""
        return max(
            len(t.encode("utf-8")) if t in self._special else len(t)
            for t in self.backend.get_vocab(with_added_tokens=True)
        )

    @functools.cached_property
    def _special(self) -> set[str]:
        return {t.content for t in self.backend.get_added_tokens_decoder().values()}

    def __len__(self) -> int:
        return self.vocab_size
