"""Next-token selection: greedy, or sampling with temperature, top-k and top-p, seeded per request.

The warpers run in transformers' order (temperature, then top-k, then top-p) so a request means
the same thing here as in ``generate``. Randomness comes from one ``numpy.random.Generator`` per
request, seeded from the request: the same seed gives the same tokens, and concurrent requests
never share a random stream.

``select_next`` chooses from a full row of logits; ``select_from_top`` from the row's K largest
(reduced on the device, ``Backend.forward(..., top_k=K)``), giving the same token bit for bit or
None when the K cannot decide (a tie that may continue past them). ``reduced_top_k`` says which K
a step's rows need.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from serving.errors import InvalidInput

MAX_TEMPERATURE = 100.0
# A smaller positive temperature can overflow logits / temperature in float64 (5e-324 makes every
# probability NaN and the draw silently returns the last token id); it would pick the argmax anyway.
MIN_TEMPERATURE = 1e-30
MAX_SEED = 2**64 - 1  # KServe random_seed and our API seed are uint64
# Largest top_k a sampled row may have and still be chosen from logits reduced on the device.
MAX_REDUCED_TOP_K = 64


@dataclass
class SamplingParams:
    """How to choose each next token. Greedy (argmax) by default.

    Args:
        temperature: Divides the logits before sampling, in (0, 100]. 0 also means greedy.
        top_k: Keep only the k most likely tokens; 0 disables. In [0, vocab_size].
        top_p: Keep the smallest set of most likely tokens whose probability reaches top_p,
            in (0, 1]; 1 disables.
        seed: Seed of the request's random stream, in [0, 2**64); None draws a fresh one.
        do_sample: Sample (True) or take the argmax (False, the default).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    do_sample: bool = False

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise InvalidInput listing every value out of its allowed range."""
        problems = []
        t = self.temperature
        if not isinstance(t, (int, float)) or not np.isfinite(t) or not 0 <= t <= MAX_TEMPERATURE:
            problems.append(f"temperature must be in [0, {MAX_TEMPERATURE:g}] (0 = greedy), got {t!r}")
        elif 0 < t < MIN_TEMPERATURE:
            problems.append(
                f"temperature must be in [0, {MAX_TEMPERATURE:g}] and 0 (greedy) or at least "
                f"{MIN_TEMPERATURE:g}, got {t!r}"
            )
        k = self.top_k
        k_max = vocab_size if vocab_size is not None else "vocab_size"
        if (
            isinstance(k, bool)
            or not isinstance(k, (int, np.integer))
            or k < 0
            or (vocab_size is not None and k > vocab_size)
        ):
            problems.append(f"top_k must be an integer in [0, {k_max}] (0 = off), got {k!r}")
        p = self.top_p
        if not isinstance(p, (int, float)) or not np.isfinite(p) or not 0 < p <= 1:
            problems.append(f"top_p must be in (0, 1] (1 = off), got {p!r}")
        s = self.seed
        if s is not None and (
            isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s <= MAX_SEED
        ):
            problems.append(f"seed must be an integer in [0, 2**64) or unset, got {s!r}")
        if problems:
            raise InvalidInput("invalid sampling parameters: " + "; ".join(problems))

    def rng(self) -> np.random.Generator:
        """A fresh random stream for one request (seeded when ``seed`` is set)."""
        return np.random.default_rng(self.seed)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def warp(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Probabilities (float64, V) after temperature, top-k and top-p, for one row of logits."""
    ids, x = _support(logits, params)
    probs = _probs(x, params)
    if ids is None:
        return probs
    full = np.zeros(np.shape(logits)[-1], dtype=np.float64)
    full[ids] = probs
    return full


def _support(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray | None, np.ndarray]:
    """The tokens top-k keeps, in id order (None: all of them), and their logits / temperature.

    Every draw works on this compact, id-ordered support, so a row reduced to its top-k on a
    device (``select_from_top``) computes with the very same arrays as the full row.
    """
    x = np.asarray(logits, dtype=np.float64) / params.temperature
    v = x.shape[-1]
    if not 0 < params.top_k < v:
        return None, x
    kth = np.partition(x, v - params.top_k)[v - params.top_k]  # k-th largest (ties at it all kept)
    ids = np.flatnonzero(x >= kth)
    return ids, x[ids]


def _probs(x: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Softmax of the support's scaled logits, then top-p (renormalised)."""
    x = x - x.max()
    probs = np.exp(x)
    probs /= probs.sum()
    if params.top_p < 1.0:
        keep = _nucleus(probs, params.top_p)
        mask = np.zeros(probs.shape[0], dtype=bool)
        mask[keep] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return probs


def _draw(
    ids: np.ndarray | None, x: np.ndarray, params: SamplingParams, rng: np.random.Generator | None
) -> int:
    """An inverse-CDF draw over the support, walked in token-id order."""
    probs = _probs(x, params)
    u = rng.random() if rng is not None else np.random.random()
    # One uniform per token keeps the stream position independent of V.
    idx = int(np.searchsorted(np.cumsum(probs), u * probs.sum(), side="right"))
    idx = min(idx, probs.shape[0] - 1)
    return idx if ids is None else int(ids[idx])


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Indices of the smallest most-likely set whose mass reaches ``top_p`` (always the top one).

    Tokens are kept until the mass *before* them reaches top_p, as transformers does. The nucleus
    is usually a few hundred tokens of 50k, so candidates are found with a partial sort, widened
    until they hold the nucleus; only they are sorted (a full sort cost ~6 ms a token).
    """
    v = probs.shape[0]
    k = 256
    while True:
        if k >= v:
            order = np.argsort(-probs, kind="stable")
        else:
            part = np.argpartition(-probs, k - 1)[:k]
            order = part[np.argsort(-probs[part], kind="stable")]
        cum = np.cumsum(probs[order])
        if k >= v or cum[-1] >= top_p:  # the nucleus ends inside the candidates
            return order[(cum - probs[order]) < top_p]
        k *= 4


def select_next(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator | None) -> int:
    """The next token for one row of logits (V,): argmax when greedy, else a draw from ``rng``."""
    if params.greedy:
        return int(np.argmax(logits))
    ids, x = _support(logits, params)
    return _draw(ids, x, params, rng)


def row_top_k(params: SamplingParams) -> int | None:
    """How many of a row's largest logits decide its token (greedy 1, top-k sampling k), or None
    when it needs the full row (no top-k, or a top-k above ``MAX_REDUCED_TOP_K``)."""
    if params.greedy:
        return 1
    if 0 < params.top_k <= MAX_REDUCED_TOP_K:
        return int(params.top_k)
    return None


def reduced_top_k(rows: list[SamplingParams]) -> int | None:
    """The K to reduce a step's logits to so that every row is chosen exactly from its top-K, or
    None when some row needs its full logits. K is the largest row's k plus one: the extra value
    shows whether a tie at a row's boundary could continue past the K (then that row falls back)."""
    ks = [row_top_k(p) for p in rows]
    known = [k for k in ks if k is not None]
    if not ks or len(known) < len(ks):
        return None
    return max(known) + 1


def greedy_from_top(ids: np.ndarray, values: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.argmax`` of each full row from its K largest logits (B, K): (picks, decided) (B,).

    The argmax is the lowest id among the values equal to the row's maximum; the K hold every one
    of them unless the maximum is also their smallest value (then ``decided`` is False, as for a
    non-finite value). K == V always decides.
    """
    values = np.asarray(values)
    top = values.max(axis=1, keepdims=True)
    picks = np.where(values == top, np.asarray(ids), np.iinfo(np.int64).max).min(axis=1)
    ok = np.isfinite(values).all(axis=1)
    if values.shape[1] < vocab_size:
        ok &= values.min(axis=1) < top[:, 0]
    return picks.astype(np.int64), ok


def select_from_top(
    ids: np.ndarray,
    values: np.ndarray,
    params: SamplingParams,
    rng: np.random.Generator | None,
    vocab_size: int,
) -> int | None:
    """The token ``select_next`` would choose from the full row, given only its K largest logits.

    Args:
        ids, values: The row's K largest logits and their token ids (any order; a TopK's).
        params, rng: As for ``select_next`` (``rng`` is drawn from only when a token is returned).
        vocab_size: V (K == V means the K are the whole row).

    Returns:
        The token, or None when the K cannot decide exactly: the row needs more than K - 1 of them,
        or its boundary value ties with the smallest of the K (tokens past the K may tie too), or a
        value is not finite. The caller then uses the full row.
    """
    values = np.asarray(values)
    ids = np.asarray(ids)
    n = values.shape[0]
    whole = n >= vocab_size
    if n == 0 or not np.isfinite(values).all():
        return None
    if params.greedy:
        picks, ok = greedy_from_top(ids[None], values[None], vocab_size)
        return int(picks[0]) if ok[0] else None
    k = params.top_k
    if whole and not 0 < k < vocab_size:  # the whole row, no top-k: the full draw over all V
        order = np.argsort(ids)
        return _draw(ids[order], np.asarray(values[order], np.float64) / params.temperature, params, rng)
    if not 0 < k < n:
        return None
    x = np.asarray(values, dtype=np.float64) / params.temperature
    kth = np.partition(x, n - k)[n - k]  # the row's k-th largest, as _support computes it
    if not whole and kth <= x.min():
        return None
    keep = np.flatnonzero(x >= kth)
    order = keep[np.argsort(ids[keep])]
    return _draw(ids[order], x[order], params, rng)
