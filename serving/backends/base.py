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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
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
    Rows are left-padded: row r's real tokens are its last positions; which positions are padding
    is known to the caller's attention mask, not to the cache.
    """

    def __init__(self, batch: int, length: int):
        self.batch = batch
        self.length = length


@dataclass
class StepOutput:
    """The result of one forward: host float32 logits (B, S, V) (or (B, 1, V) with last_only).

    A forward asked for ``top_k`` by a backend that reduces on its device leaves ``logits`` None
    and gives the last position's ``top_values`` (B, K) float32, largest first, and their
    ``top_ids`` (B, K) int64; the full last-position row is still there on demand
    (``last_logits()``, one device-to-host copy). Any other backend returns full logits.
    """

    logits: np.ndarray | None
    present: KVCache
    top_ids: np.ndarray | None = None
    top_values: np.ndarray | None = None
    fetch_logits: Callable[[], np.ndarray] | None = field(default=None, repr=False)
    _last: np.ndarray | None = field(default=None, init=False, repr=False)

    def last_logits(self) -> np.ndarray:
        """The last position's logits (B, V) on the host (fetched once when they were left behind)."""
        if self.logits is not None:
            return self.logits[:, -1]
        if self._last is None:
            assert self.fetch_logits is not None, "a reduced step keeps a way to its full logits"
            self._last = self.fetch_logits()
        return self._last


@dataclass(frozen=True)
class BackendLimits:
    """What one forward of a loaded backend accepts; requests are checked against it up front.

    Args:
        max_batch: Rows in one forward (so in one running batch); None = no limit of its own.
        max_context: Past + new tokens of a row (the model's n_positions, or an engine's profile).
        max_prompt: Tokens one prefill forward takes at once; None = max_context. Longer prompts
            still run (the backend decomposes them), so this is informative, not a refusal.
        max_caches: KV caches that can be live at once (preallocated device memory); None = as
            many as memory holds. A scheduler needs two (the running batch and a prefill).
    """

    max_batch: int | None
    max_context: int
    max_prompt: int | None = None
    max_caches: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


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
                except Exception:
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
    def limits(self) -> BackendLimits:
        """What one forward accepts (valid once loaded: an engine's profiles decide for TensorRT)."""
        return BackendLimits(max_batch=None, max_context=self.dims.n_positions)

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
        top_k: int | None = None,
    ) -> StepOutput:
        """Run one step. ``past=None`` means an empty cache. Validates, then calls ``_forward``.

        Args:
            input_ids: int (B, S) token ids in [0, vocab_size).
            attention_mask: int (B, P + S), 1 for real tokens, 0 for (left) padding.
            position_ids: int (B, S) positions in [0, n_positions).
            past: The cache returned by the previous step, or None.
            last_only: Return only the last position's logits, (B, 1, V).
            top_k: With ``last_only``: the caller needs only the last position's ``top_k`` largest
                logits. A backend that ``reduces_top_k`` returns them (``StepOutput.top_ids`` /
                ``top_values``, ``logits`` None); any other returns its full logits as usual.
        """
        self._require_loaded()
        input_ids = np.asarray(input_ids)
        attention_mask = np.asarray(attention_mask)
        position_ids = np.asarray(position_ids)
        if top_k is not None and (
            isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1 or not last_only
        ):
            raise InvalidInput(f"top_k must be an integer >= 1 and needs last_only=True, got {top_k!r}")
        if past is None:
            past = self.empty_cache(input_ids.shape[0] if input_ids.ndim == 2 else 1)
        self._validate(input_ids, attention_mask, position_ids, past)
        args = (
            input_ids.astype(np.int64, copy=False),
            attention_mask.astype(np.int64, copy=False),
            position_ids.astype(np.int64, copy=False),
            past,
        )
        if top_k is not None and self.reduces_top_k:
            return self._forward_top_k(*args, min(int(top_k), self.dims.vocab_size))
        return self._forward(*args, last_only)

    @property
    def reduces_top_k(self) -> bool:
        """Whether ``forward(..., top_k=K)`` reduces the logits on the backend's device."""
        return False

    # --- KV-cache operations (what a batching scheduler needs) -----------------------------------
    def join(self, caches: Sequence[KVCache]) -> KVCache:
        """The rows of ``caches`` stacked in order, each left-padded with zeros to the longest.

        Padding goes on the left because rows are right-aligned (their newest token last), so a
        row keeps its positions and the caller's attention mask hides the new padding columns.
        Consumes its inputs: use only the returned cache afterwards.
        """
        self._require_loaded()
        caches = list(caches)
        if not caches:
            raise InvalidInput("join needs at least one KV cache")
        rows = sum(c.batch for c in caches)
        limit = self.limits.max_batch
        if limit is not None and rows > limit:
            raise OutOfRange(f"joining {rows} rows exceeds the {self.name} backend's max batch of {limit}")
        if len(caches) == 1:
            return caches[0]
        return self._join_impl(caches, max(c.length for c in caches))

    def select(self, cache: KVCache, rows: Sequence[int], length: int | None = None) -> KVCache:
        """Rows ``rows`` of ``cache`` (in that order), keeping only its last ``length`` positions.

        Dropping rows and trimming the left columns that became padding for every kept row are one
        copy. ``length`` defaults to ``cache.length`` (no trim). Consumes its input.
        """
        self._require_loaded()
        rows = [int(r) for r in rows]
        length = cache.length if length is None else int(length)
        problems = []
        if not rows:
            problems.append("select needs at least one row")
        if any(not 0 <= r < cache.batch for r in rows) or len(set(rows)) != len(rows):
            problems.append(f"rows must be distinct indices in [0, {cache.batch}), got {rows[:8]}")
        if not 0 <= length <= cache.length:
            problems.append(f"length must be in [0, {cache.length}] (the cache's length), got {length}")
        if problems:
            raise InvalidInput("; ".join(problems))
        if rows == list(range(cache.batch)) and length == cache.length:
            return cache
        return self._select_impl(cache, rows, length)

    def trim(self, cache: KVCache, length: int) -> KVCache:
        """``cache`` keeping only its last ``length`` positions (all rows). Consumes its input."""
        return self.select(cache, range(cache.batch), length)

    def release(self, cache: KVCache | None) -> None:
        """Free what ``cache`` holds now instead of when it is garbage-collected (a TensorRT slot)."""
        if cache is not None and self._loaded:
            self._release_impl(cache)

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
        lim = self.limits
        if lim.max_batch is not None and b > lim.max_batch:
            raise OutOfRange(f"batch {b} exceeds the {self.name} backend's max batch of {lim.max_batch}")
        if past.length + s > lim.max_context:
            raise OutOfRange(
                f"past ({past.length}) + new tokens ({s}) = {past.length + s} exceeds "
                f"the {self.name} backend's context of {lim.max_context} positions"
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

    def _forward_top_k(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: KVCache,
        k: int,
    ) -> StepOutput:
        """A last-only step returning the top ``k`` (only called where ``reduces_top_k``)."""
        raise NotImplementedError(f"the {self.name} backend does not reduce logits on its device")

    @abstractmethod
    def _join_impl(self, caches: list[KVCache], length: int) -> KVCache: ...

    @abstractmethod
    def _select_impl(self, cache: KVCache, rows: list[int], length: int) -> KVCache: ...

    def _release_impl(self, cache: KVCache) -> None:  # noqa: B027 - optional hook, no-op by default
        """Caches that live in host/framework memory are freed by dropping them."""

    def _info_impl(self) -> dict[str, Any]:
        return {}
