"""Next-token selection: greedy, or sampling with temperature, top-k and top-p, seeded per request.

The warpers run in transformers' order (temperature, then top-k, then top-p) so a request means
the same thing here as in ``generate``. Randomness comes from one ``numpy.random.Generator`` per
request, seeded from the request: the same seed gives the same tokens, and concurrent requests
never share a random stream.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from serving.errors import InvalidInput

MAX_TEMPERATURE = 100.0
MAX_SEED = 2**64 - 1  # KServe random_seed and our API seed are uint64


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
    x = np.asarray(logits, dtype=np.float64) / params.temperature
    v = x.shape[-1]
    if 0 < params.top_k < v:
        kth = np.partition(x, v - params.top_k)[v - params.top_k]  # k-th largest
        x = np.where(x < kth, -np.inf, x)
    x = x - x.max()
    probs = np.exp(x)
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        # Keep tokens until the mass *before* them reaches top_p (always keeps the top one).
        keep = order[(cum - probs[order]) < params.top_p]
        mask = np.zeros(v, dtype=bool)
        mask[keep] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return probs


def select_next(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator | None) -> int:
    """The next token for one row of logits (V,): argmax when greedy, else a draw from ``rng``."""
    if params.greedy:
        return int(np.argmax(logits))
    probs = warp(logits, params)
    u = rng.random() if rng is not None else np.random.random()
    # Inverse-CDF draw: one uniform per token keeps the stream position independent of V.
    idx = int(np.searchsorted(np.cumsum(probs), u * probs.sum(), side="right"))
    return min(idx, probs.shape[0] - 1)
