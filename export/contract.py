"""The ONNX I/O contract of the exported GPT-2 decoder: names, axes and dtypes, declared once.

Every stage imports this module: the exporter names the graph's inputs and outputs from it, the
validator checks a graph against it, the TensorRT builder derives optimization profiles from its
axes, and the serving backends feed tensors by these names. Naming follows Optimum's convention.

    inputs                                   outputs
    input_ids              (batch, seq)      logits              (batch, seq, vocab)
    attention_mask         (batch, total)    present.{i}.key     (batch, heads, total, head_dim)
    position_ids           (batch, seq)      present.{i}.value   (batch, heads, total, head_dim)
    past_key_values.{i}.key   (batch, heads, past, head_dim)
    past_key_values.{i}.value (batch, heads, past, head_dim)

where ``total = past + seq``. ``past`` may be 0 (the first step); batch, seq and past are dynamic.
The attention mask covers past and new tokens, so left padding is expressed by the mask alone and
the position ids come in from the caller.

``IOContract.logits_positions`` says which positions' logits a graph returns (the same contract
otherwise; generation needs the last position only, and the lm_head is ~30% of a 124M prefill):

    "all"   logits (batch, seq, vocab)                      model.onnx, Optimum's contract
    "kept"  + input logits_to_keep (int64 scalar);          the serving graph (ONNX Runtime):
            logits (batch, kept, vocab)                     0 -> every position, k -> the last k
    "last"  logits (batch, 1, vocab)                        TensorRT engines (built from it)

With left padding the last position is ``seq - 1`` in every row, so "last" needs no per-row index.

This module must stay free of heavy imports (numpy only): ``gpt2-deploy --help`` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
# The serving graph's extra input (transformers' ``logits_to_keep``): 0 -> logits for every
# position, k > 0 -> for the last k positions only.
LOGITS_TO_KEEP = "logits_to_keep"
LOGITS_POSITIONS = ("all", "kept", "last")

# Symbolic axis names, shared by the exporter's dynamic shapes and the TensorRT profiles.
BATCH = "batch"
SEQ = "seq"
PAST = "past"
TOTAL = "total"  # past + seq; its own symbol because exporters cannot express Dim + Dim
KEPT = "kept"  # positions with logits in a "kept" graph: seq if logits_to_keep == 0, else min(it, seq)


def past_key(i: int) -> str:
    return f"past_key_values.{i}.key"


def past_value(i: int) -> str:
    return f"past_key_values.{i}.value"


def present_key(i: int) -> str:
    return f"present.{i}.key"


def present_value(i: int) -> str:
    return f"present.{i}.value"


def left_padded_positions(attention_mask: Any) -> Any:
    """Position ids (B, T) for an attention mask (B, T) of a left-padded batch.

    Real tokens count 0, 1, ... in each row; padding slots get 0 (they are masked anyway). This is
    what transformers' ``generate`` does, so a padded row gets the positions it would get alone.
    """
    import numpy as np  # lazily: this module is read by ``gpt2-deploy --help``

    return np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None)


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor: its dtype (numpy name) and its axes (symbol names or fixed sizes)."""

    name: str
    dtype: str
    shape: tuple[str | int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(name=d["name"], dtype=d["dtype"], shape=tuple(d["shape"]))


@dataclass(frozen=True)
class IOContract:
    """The decoder graph's interface for one model shape.

    Args:
        n_layer: Number of transformer blocks (one past/present key and value each).
        n_head: Attention heads per block.
        head_dim: Size of one head (n_embd // n_head).
        vocab_size: Size of the logits' last axis.
        ids_dtype: dtype of input_ids, attention_mask and position_ids. Defaults to int64.
        float_dtype: dtype of the KV cache and the logits. Defaults to float32; reduced-precision
            variants keep float32 I/O and convert inside the graph.
        logits_positions: Which positions' logits the graph returns: "all" (default, the main
            graph), "kept" (the serving graph, with the ``logits_to_keep`` input) or "last".
    """

    n_layer: int
    n_head: int
    head_dim: int
    vocab_size: int
    ids_dtype: str = "int64"
    float_dtype: str = "float32"
    logits_positions: str = "all"

    def __post_init__(self) -> None:
        if self.logits_positions not in LOGITS_POSITIONS:
            raise ValueError(
                f"logits_positions {self.logits_positions!r} is not one of {', '.join(LOGITS_POSITIONS)}"
            )

    def with_logits_positions(self, positions: str) -> IOContract:
        """The same contract for a graph returning ``positions``' logits ("all", "kept", "last")."""
        return replace(self, logits_positions=positions)

    # --- names -------------------------------------------------------------------------------
    @property
    def past_names(self) -> list[str]:
        return [n for i in range(self.n_layer) for n in (past_key(i), past_value(i))]

    @property
    def present_names(self) -> list[str]:
        return [n for i in range(self.n_layer) for n in (present_key(i), present_value(i))]

    @property
    def input_names(self) -> list[str]:
        keep = [LOGITS_TO_KEEP] if self.logits_positions == "kept" else []
        return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *self.past_names, *keep]

    @property
    def output_names(self) -> list[str]:
        return [LOGITS, *self.present_names]

    # --- specs -------------------------------------------------------------------------------
    def _kv(self, name: str, length_axis: str) -> TensorSpec:
        return TensorSpec(name, self.float_dtype, (BATCH, self.n_head, length_axis, self.head_dim))

    @property
    def inputs(self) -> list[TensorSpec]:
        return [
            TensorSpec(INPUT_IDS, self.ids_dtype, (BATCH, SEQ)),
            TensorSpec(ATTENTION_MASK, self.ids_dtype, (BATCH, TOTAL)),
            TensorSpec(POSITION_IDS, self.ids_dtype, (BATCH, SEQ)),
            *(self._kv(n, PAST) for n in self.past_names),
            *([TensorSpec(LOGITS_TO_KEEP, self.ids_dtype, ())] if self.logits_positions == "kept" else []),
        ]

    @property
    def outputs(self) -> list[TensorSpec]:
        axis: dict[str, str | int] = {"all": SEQ, "kept": KEPT, "last": 1}
        positions = axis[self.logits_positions]
        return [
            TensorSpec(LOGITS, self.float_dtype, (BATCH, positions, self.vocab_size)),
            *(self._kv(n, TOTAL) for n in self.present_names),
        ]

    def spec(self, name: str) -> TensorSpec:
        for s in (*self.inputs, *self.outputs):
            if s.name == name:
                return s
        raise KeyError(
            f"{name!r} is not part of the I/O contract; inputs are {self.input_names[:3]} + "
            f"past_key_values.{{0..{self.n_layer - 1}}}.key|value"
            + (f" + ['{LOGITS_TO_KEEP}']" if self.logits_positions == "kept" else "")
            + f", outputs are ['logits'] + present.{{0..{self.n_layer - 1}}}.key|value"
        )

    def concrete_shape(
        self, name: str, *, batch: int, seq: int, past: int, logits_to_keep: int = 0
    ) -> tuple[int, ...]:
        """The shape ``name`` takes for a given batch, new-token count and past length (and, for a
        "kept" graph's logits, ``logits_to_keep``)."""
        kept = min(logits_to_keep, seq) if logits_to_keep > 0 else seq
        sizes = {BATCH: batch, SEQ: seq, PAST: past, TOTAL: past + seq, KEPT: kept}
        return tuple(sizes[a] if isinstance(a, str) else a for a in self.spec(name).shape)

    # --- (de)serialization -------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "ids_dtype": self.ids_dtype,
            "float_dtype": self.float_dtype,
            # written only when not "all", so the main contract's JSON is what it always was
            **({"logits_positions": self.logits_positions} if self.logits_positions != "all" else {}),
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> IOContract:
        c = cls(
            n_layer=int(d["n_layer"]),
            n_head=int(d["n_head"]),
            head_dim=int(d["head_dim"]),
            vocab_size=int(d["vocab_size"]),
            ids_dtype=d.get("ids_dtype", "int64"),
            float_dtype=d.get("float_dtype", "float32"),
            logits_positions=d.get("logits_positions", "all"),
        )
        if "inputs" in d and [TensorSpec.from_json(s) for s in d["inputs"]] != c.inputs:
            raise ValueError("the recorded input specs do not match the contract they claim")
        if "outputs" in d and [TensorSpec.from_json(s) for s in d["outputs"]] != c.outputs:
            raise ValueError("the recorded output specs do not match the contract they claim")
        return c

    @classmethod
    def for_config(cls, config: Any) -> IOContract:
        """Contract for a transformers ``GPT2Config`` (or anything with its attribute names)."""
        return cls(
            n_layer=config.n_layer,
            n_head=config.n_head,
            head_dim=config.n_embd // config.n_head,
            vocab_size=config.vocab_size,
        )
