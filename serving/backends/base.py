"""The backend interface every engine implements (torch reference, onnxruntime, tensorrt).

A backend runs one decoder step of the I/O contract in ``export.contract``: given new token ids,
the attention mask over past + new tokens, position ids and the past KV cache, it returns the
logits and the present KV cache. The generation loop, parity checks and servers are written once
above this interface.

Shaped after Polygraphy's runners: the constructor is cheap (no sessions, no CUDA); heavy work
starts in ``load()``; ``forward`` validates and ``_forward`` works; ``close()`` frees resources;
a backend is a context manager.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from export.manifest import Bundle
from serving.errors import BackendUnavailable, InvalidInput, OutOfRange

log = logging.getLogger("serving.backends")


def parse_device(device: str) -> tuple[str, int]:
    """``"cpu"`` -> ("cpu", 0); ``"cuda"``/``"cuda:N"`` -> ("cuda", N).

    Raises:
        BackendUnavailable: for any other device string.
    """
    kind, _, index = device.partition(":")
    if kind == "cpu" and not index:
        return "cpu", 0
    if kind == "cuda" and (not index or index.isdigit()):
        return "cuda", int(index or 0)
    raise BackendUnavailable(f"device {device!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'")


@dataclass
class BackendOptions:
    """Options common to backends; each backend reads what applies to it.

    Args:
        device: "cpu" or "cuda" (or "cuda:N"). Defaults to "cpu".
        providers: onnxruntime execution providers, in priority order. None picks from ``device``.
        threads: Intra-op threads for CPU backends; None lets the runtime decide.
        engine: TensorRT engine path (bundle-relative or absolute); None picks the bundle's newest.
        extra: Backend-specific settings.
    """

    device: str = "cpu"
    providers: list[str] | None = None
    threads: int | None = None
    engine: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class KVCache:
    """A backend's KV cache for a batch: opaque to callers except for its batch size and length.

    Backends subclass this and keep the tensors where they live (host arrays, torch tensors,
    OrtValues, device buffers), so present of step t becomes past of step t+1 without a copy.
    """

    def __init__(self, batch: int, length: int):
        self.batch = batch
        self.length = length


@dataclass
class StepOutput:
    """The result of one forward: host float32 logits (B, S, V) (or (B, 1, V) with last_only)."""

    logits: np.ndarray
    present: KVCache


class Backend(ABC):
    """One decoder engine behind the I/O contract. Subclasses implement the ``_impl`` methods."""

    name: ClassVar[str] = "base"

    def __init__(self, bundle: Bundle, options: BackendOptions | None = None):
        self.bundle = bundle
        self.options = options or BackendOptions()
        self.contract = bundle.contract
        self.dims = bundle.dims
        self._loaded = False

    # --- lifecycle -----------------------------------------------------------------------------
    def load(self) -> Backend:
        """Create sessions/engines/devices. Idempotent; returns self.

        A load that fails part way frees what it had created (``_close_impl`` must tolerate a
        half-initialised backend) before the error propagates.
        """
        if not self._loaded:
            try:
                self._load_impl()
            except BaseException:
                try:
                    self._close_impl()
                except Exception:  # noqa: BLE001 - the load error is the one to report
                    log.warning("cleanup after a failed %s load failed too", self.name, exc_info=True)
                raise
            self._loaded = True
        return self

    def close(self) -> None:
        if self._loaded:
            self._close_impl()
            self._loaded = False

    @property
    def is_loaded(self) -> bool:
        return self._loaded

    @property
    def max_concurrent_caches(self) -> int | None:
        """How many KV caches may be live at once (one per running generation); None = no limit.

        Servers admit at most this many generations (and parity checks) at a time, so a request
        waits for a free cache before it takes the backend, never while holding it.
        """
        return None

    def __enter__(self) -> Backend:
        return self.load()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- the step ------------------------------------------------------------------------------
    def empty_cache(self, batch: int) -> KVCache:
        """A KV cache with past length 0 for ``batch`` rows (the first step)."""
        self._require_loaded()
        if batch < 1:
            raise InvalidInput(f"batch must be >= 1, got {batch}")
        return self._empty_cache_impl(batch)

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: KVCache | None = None,
        *,
        last_only: bool = False,
    ) -> StepOutput:
        """Run one step. ``past=None`` means an empty cache. Validates, then calls ``_forward``.

        Args:
            input_ids: int (B, S) token ids in [0, vocab_size).
            attention_mask: int (B, P + S), 1 for real tokens, 0 for (left) padding.
            position_ids: int (B, S) positions in [0, n_positions).
            past: The cache returned by the previous step, or None.
            last_only: Return only the last position's logits, (B, 1, V).
        """
        self._require_loaded()
        input_ids = np.asarray(input_ids)
        attention_mask = np.asarray(attention_mask)
        position_ids = np.asarray(position_ids)
        if past is None:
            past = self.empty_cache(input_ids.shape[0] if input_ids.ndim == 2 else 1)
        self._validate(input_ids, attention_mask, position_ids, past)
        return self._forward(
            input_ids.astype(np.int64, copy=False),
            attention_mask.astype(np.int64, copy=False),
            position_ids.astype(np.int64, copy=False),
            past,
            last_only,
        )

    def info(self) -> dict[str, Any]:
        """What this backend runs on (device, providers, precision...), for ModelInfo and logs."""
        return {"backend": self.name, "device": self.options.device, **self._info_impl()}

    # --- validation ----------------------------------------------------------------------------
    def _require_loaded(self) -> None:
        if not self._loaded:
            raise RuntimeError(f"{type(self).__name__} is not loaded; call load() first")

    def _validate(self, input_ids, attention_mask, position_ids, past: KVCache) -> None:
        problems: list[str] = []
        for nm, a in (
            ("input_ids", input_ids),
            ("attention_mask", attention_mask),
            ("position_ids", position_ids),
        ):
            if a.ndim != 2:
                problems.append(f"{nm} must be 2-D, got shape {list(a.shape)}")
            elif not np.issubdtype(a.dtype, np.integer):
                problems.append(f"{nm} must be an integer array, got {a.dtype}")
        if problems:
            raise InvalidInput("; ".join(problems))
        b, s = input_ids.shape
        if s < 1:
            problems.append("input_ids has no tokens (seq must be >= 1)")
        if position_ids.shape != (b, s):
            problems.append(f"position_ids shape {list(position_ids.shape)} != input_ids shape {[b, s]}")
        if past.batch != b:
            problems.append(f"past cache batch {past.batch} != input batch {b}")
        if attention_mask.shape != (b, past.length + s):
            problems.append(
                f"attention_mask shape {list(attention_mask.shape)} != "
                f"[batch, past + seq] = {[b, past.length + s]}"
            )
        if problems:
            raise InvalidInput("; ".join(problems))
        v = self.dims.vocab_size
        if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= v):
            bad = input_ids[(input_ids < 0) | (input_ids >= v)]
            raise InvalidInput(f"token ids must be in [0, {v}); got {bad[:5].tolist()}")
        if past.length + s > self.dims.n_positions:
            raise OutOfRange(
                f"past ({past.length}) + new tokens ({s}) = {past.length + s} exceeds "
                f"the model's context of {self.dims.n_positions} positions"
            )
        n = self.dims.n_positions
        if position_ids.size and (position_ids.min() < 0 or position_ids.max() >= n):
            raise OutOfRange(
                f"position ids must be in [0, {n}); got min {position_ids.min()} max {position_ids.max()}"
            )

    # --- to implement --------------------------------------------------------------------------
    @abstractmethod
    def _load_impl(self) -> None: ...

    @abstractmethod
    def _close_impl(self) -> None: ...

    @abstractmethod
    def _empty_cache_impl(self, batch: int) -> KVCache: ...

    @abstractmethod
    def _forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: KVCache,
        last_only: bool,
    ) -> StepOutput: ...

    def _info_impl(self) -> dict[str, Any]:
        return {}
