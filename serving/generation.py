"""The generation loop, written once above the backends.

    gen = Generator(backend, tokenizer)
    for event in gen.stream(GenerationRequest(prompt_ids=tokenizer.encode("Hello"), max_new_tokens=8)):
        ...  # TokenEvent per generated token, then one FinalEvent

Each request owns its KV cache (the backend's opaque ``KVCache``): the prompt is prefilled in one
forward, then one token per step is fed back with the cache the previous step returned. Batches
are left-padded: the attention mask hides the padding and the position ids count real tokens
only (``cumsum(mask) - 1``), which is what transformers' ``generate`` does, so greedy decoding
matches it token for token.

Stop handling: a stop token (or EOS) ends the generation and is not part of the output; a stop
string ends it and the text is cut just before it. While stop strings are active, text that could
be the beginning of one is held back from the stream until it is known not to be.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import numpy as np

from export.contract import left_padded_positions
from serving.backends.base import Backend
from serving.errors import InvalidInput, OutOfRange
from serving.sampling import SamplingParams, select_next
from serving.tokenizer import Tokenizer

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256


@dataclass
class GenerationRequest:
    """One generation.

    Args:
        prompt_ids: The prompt's token ids (at least one).
        max_new_tokens: Tokens to generate at most, >= 1.
        sampling: Greedy by default.
        stop_token_ids: Token ids that end the generation (not included in the output).
        stop_strings: Strings that end the generation; the text is cut before the first one.
        stop_at_eos: End at the tokenizer's EOS token (not included in the output).
    """

    prompt_ids: list[int]
    max_new_tokens: int = 16
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    stop_at_eos: bool = True


@dataclass
class TokenEvent:
    """One generated token and the text it adds.

    ``text`` may be empty (bytes of a split UTF-8 character, or text held back because it could
    start a stop string). Just before the FinalEvent a flush event with ``token_ids == []`` may
    carry text held back until then. The concatenation of all ``text`` equals FinalEvent.text.
    """

    token_ids: list[int]
    text: str


@dataclass
class FinalEvent:
    """The end of a generation.

    Args:
        finish_reason: "length", "stop" (stop token or stop string), "eos" or "cancelled".
        prompt_tokens: Tokens in the prompt.
        completion_tokens: Tokens generated (``len(token_ids)``; a final stop/EOS token is not counted).
        token_ids: The generated token ids.
        text: The generated text (cut before a stop string).
        time_to_first_token_s: From the request's arrival at the runtime (``started_at``; queueing
            for the backend included) to the first token chosen, prefill included.
        per_token_s: Time between consecutive tokens (one entry per token after the first).
    """

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]
    text: str
    time_to_first_token_s: float
    per_token_s: list[float]


@dataclass
class ScoreResult:
    """Scores of a sequence ``ids`` (S tokens).

    Args:
        logits: (S, V) float32 logits, when asked for (``top_k == 0``), else None.
        top_ids: (S, k) the k most likely next tokens at each position (``top_k > 0``), else None.
        top_logprobs: (S, k) their log-probabilities, else None.
        token_logprobs: (S - 1,) log p(ids[i + 1] | ids[: i + 1]).
    """

    logits: np.ndarray | None
    top_ids: np.ndarray | None
    top_logprobs: np.ndarray | None
    token_logprobs: np.ndarray


@dataclass
class BatchResult:
    """``run_batch``'s result: the generated ids per row and how long the steps took."""

    tokens: list[list[int]]
    prefill_s: float
    step_s: list[float]  # one entry per decode step after the prefill


def remaining_text(final_text: str, streamed: str) -> str:
    """What of a generation's final text was not streamed yet ("" if the stream diverged from it)."""
    return final_text[len(streamed) :] if final_text.startswith(streamed) else ""


def score_logits(logits: np.ndarray, ids: list[int], top_k: int) -> ScoreResult:
    """Log-probabilities of ``ids`` (and the top-k) from their logits (S, V), in float32.

    Uses ``log p = logit - logsumexp(row)``; the top-k are picked on the logits directly (the
    same order as the log-probabilities) with a partial sort.
    """
    s = logits.shape[0]
    m = logits.max(-1, keepdims=True)  # (S, 1)
    lse = m + np.log(np.exp(logits - m, dtype=np.float32).sum(-1, keepdims=True))  # (S, 1)
    nxt = np.asarray(ids[1:], dtype=np.int64)
    token_lp = (logits[np.arange(s - 1), nxt] - lse[:-1, 0]).astype(np.float32)
    if top_k == 0:
        return ScoreResult(logits=logits, top_ids=None, top_logprobs=None, token_logprobs=token_lp)
    part = np.argpartition(-logits, top_k - 1, axis=-1)[:, :top_k]  # (S, k), unordered
    order = np.argsort(-np.take_along_axis(logits, part, -1), axis=-1, kind="stable")
    top_ids = np.take_along_axis(part, order, -1)
    top_lp = (np.take_along_axis(logits, top_ids, -1) - lse).astype(np.float32)
    return ScoreResult(
        logits=None, top_ids=top_ids.astype(np.int64), top_logprobs=top_lp, token_logprobs=token_lp
    )


def _holdback(text: str, start: int, stops: list[str]) -> int:
    """Length of the longest suffix of ``text[start:]`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text) - start), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def _find_stop(text: str, start: int, stops: list[str]) -> int:
    """Index of the earliest stop string occurrence at or after ``start``, or -1."""
    hits = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else -1


class Generator:
    """Generation, scoring and batches over one loaded backend.

    Args:
        backend: A loaded backend.
        tokenizer: The bundle's tokenizer (decodes the stream, knows EOS).
        max_new_tokens_limit: The largest ``max_new_tokens`` accepted.
    """

    def __init__(self, backend: Backend, tokenizer: Tokenizer, *, max_new_tokens_limit: int = 4096):
        self.backend = backend
        self.tokenizer = tokenizer
        self.max_new_tokens_limit = max_new_tokens_limit
        self.vocab_size = backend.dims.vocab_size
        self.n_positions = backend.dims.n_positions
        self.eos_token_id = (
            tokenizer.eos_token_id if tokenizer.eos_token_id is not None else backend.dims.eos_token_id
        )

    # --- validation ----------------------------------------------------------------------------
    def _id_problems(self, what: str, ids) -> list[str]:
        v = self.vocab_size
        try:
            bad = [i for i in ids if isinstance(i, bool) or not 0 <= int(i) < v or int(i) != i]
        except (TypeError, ValueError):
            return [f"{what} must be integers in [0, {v})"]
        return [f"{what} must be in [0, {v}) (the vocabulary); got {bad[:5]}"] if bad else []

    def validate(self, req: GenerationRequest) -> None:
        """Check a request; every problem goes into one error.

        Raises:
            InvalidInput: empty prompt, ids outside the vocabulary, max_new_tokens < 1 or above the
                limit, bad sampling values or stop settings.
            OutOfRange: prompt + max_new_tokens beyond the model's context (n_positions).
        """
        problems: list[str] = []
        n_prompt = len(req.prompt_ids)
        if n_prompt == 0:
            problems.append("the prompt is empty; give at least one token (or non-empty text)")
        problems += self._id_problems("prompt token ids", req.prompt_ids)
        m = req.max_new_tokens
        if (
            isinstance(m, bool)
            or not isinstance(m, (int, np.integer))
            or not 1 <= m <= self.max_new_tokens_limit
        ):
            problems.append(
                f"max_new_tokens must be an integer in [1, {self.max_new_tokens_limit}], got {m!r}"
            )
        try:
            req.sampling.validate(self.vocab_size)
        except InvalidInput as e:
            problems.append(str(e))
        problems += self._id_problems("stop_token_ids", req.stop_token_ids)
        if len(req.stop_strings) > MAX_STOP_STRINGS:
            problems.append(
                f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(req.stop_strings)}"
            )
        for s in req.stop_strings:
            if not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_STRING_CHARS:
                problems.append(
                    f"stop strings must be non-empty strings of at most "
                    f"{MAX_STOP_STRING_CHARS} characters, got {s!r:.40}"
                )
                break
        if problems:
            raise InvalidInput("; ".join(problems))
        if n_prompt + m > self.n_positions:
            raise OutOfRange(
                f"prompt ({n_prompt} tokens) + max_new_tokens ({m}) = {n_prompt + m} exceeds "
                f"the model's context of {self.n_positions} positions; shorten the prompt "
                f"or ask for at most {max(self.n_positions - n_prompt, 0)} new tokens"
            )

    # --- streaming generation ------------------------------------------------------------------
    def stream(
        self,
        req: GenerationRequest,
        cancelled: Callable[[], bool] = lambda: False,
        started_at: float | None = None,
    ) -> Iterator[TokenEvent | FinalEvent]:
        """Validate ``req``, then yield a TokenEvent per generated token and one FinalEvent.

        ``cancelled()`` is checked before every forward; when it returns True the generation ends
        with finish_reason "cancelled" and its KV cache is dropped. Closing the iterator early
        drops the cache too.

        Args:
            req: The request.
            cancelled: Polled before every forward.
            started_at: ``time.perf_counter()`` when the request arrived (a server takes it before
                queueing for the backend, so time to first token includes the wait); None = now.
        """
        self.validate(req)
        t0 = time.perf_counter() if started_at is None else started_at
        sp = req.sampling
        rng = None if sp.greedy else sp.rng()
        decoder = self.tokenizer.stream_decoder()
        stops = list(req.stop_strings)
        stop_ids = set(req.stop_token_ids)
        eos = self.eos_token_id if req.stop_at_eos else None
        tokens: list[int] = []
        text, emitted = "", 0
        ttft, per_token, last_t = 0.0, [], t0
        finish, cut = "length", False
        cache = None
        try:
            if cancelled():
                finish = "cancelled"
            else:
                p = len(req.prompt_ids)
                out = self.backend.forward(
                    np.asarray([req.prompt_ids], dtype=np.int64),
                    np.ones((1, p), dtype=np.int64),
                    np.arange(p, dtype=np.int64)[None, :],
                    None,
                    last_only=True,
                )
                cache = out.present
                while True:
                    tok = select_next(out.logits[0, -1], sp, rng)
                    now = time.perf_counter()
                    if tokens:
                        per_token.append(now - last_t)
                    else:
                        ttft = now - t0
                    last_t = now
                    if tok == eos or tok in stop_ids:
                        finish = "eos" if tok == eos else "stop"
                        break
                    tokens.append(tok)
                    text += decoder.push([tok])
                    if stops and (at := _find_stop(text, emitted, stops)) >= 0:
                        text = text[:at]
                        yield TokenEvent([tok], text[emitted:])
                        emitted, finish, cut = len(text), "stop", True
                        break
                    safe = len(text) - (_holdback(text, emitted, stops) if stops else 0)
                    yield TokenEvent([tok], text[emitted:safe])
                    emitted = safe
                    if len(tokens) >= req.max_new_tokens:
                        break
                    if cancelled():
                        finish = "cancelled"
                        break
                    n = cache.length
                    out = self.backend.forward(
                        np.asarray([[tok]], dtype=np.int64),
                        np.ones((1, n + 1), dtype=np.int64),
                        np.asarray([[n]], dtype=np.int64),
                        cache,
                        last_only=True,
                    )
                    cache = out.present
            cache = out = None  # the request's KV is freed before the final message goes out
            if not cut:  # after a stop string, the bytes that followed it are dropped
                text += decoder.flush()
            if emitted < len(text):
                yield TokenEvent([], text[emitted:])
            yield FinalEvent(
                finish_reason=finish,
                prompt_tokens=len(req.prompt_ids),
                completion_tokens=len(tokens),
                token_ids=tokens,
                text=text,
                time_to_first_token_s=ttft,
                per_token_s=per_token,
            )
        finally:
            cache = None

    def generate(self, req: GenerationRequest, cancelled: Callable[[], bool] = lambda: False) -> FinalEvent:
        """Run ``stream`` to the end and return its FinalEvent."""
        final = None
        for event in self.stream(req, cancelled):
            if isinstance(event, FinalEvent):
                final = event
        assert final is not None
        return final

    # --- batches -------------------------------------------------------------------------------
    def run_batch(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        sampling: SamplingParams | None = None,
        *,
        stop_at_eos: bool = True,
    ) -> BatchResult:
        """Generate for several prompts at once, left-padded into one batch.

        Each row stops at EOS (when ``stop_at_eos``; EOS is not included) or after
        ``max_new_tokens``; finished rows keep being fed until all rows are done. With a seed,
        every row draws from its own stream seeded with it (a row samples like a single request).
        """
        sampling = sampling or SamplingParams()
        if not prompts:
            raise InvalidInput("the batch is empty; give at least one prompt")
        for i, p in enumerate(prompts):
            try:
                self.validate(GenerationRequest(list(p), max_new_tokens, sampling))
            except (InvalidInput, OutOfRange) as e:
                raise type(e)(f"prompt {i}: {e}") from None
        b = len(prompts)
        width = max(len(p) for p in prompts)
        pad = self.eos_token_id if self.eos_token_id is not None else 0
        ids = np.full((b, width), pad, dtype=np.int64)
        mask = np.zeros((b, width), dtype=np.int64)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = p
            mask[i, width - len(p) :] = 1
        pos = left_padded_positions(mask)
        rngs = [None if sampling.greedy else sampling.rng() for _ in range(b)]
        eos = self.eos_token_id if stop_at_eos else None
        tokens: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b

        t0 = time.perf_counter()
        out = self.backend.forward(ids, mask, pos, None, last_only=True)
        prefill_s, step_s = time.perf_counter() - t0, []
        cache = out.present
        next_pos = pos[:, -1] + 1  # (B,)
        for step in range(max_new_tokens):
            feed = np.full((b, 1), pad, dtype=np.int64)
            for i in range(b):
                if done[i]:
                    continue
                tok = select_next(out.logits[i, -1], sampling, rngs[i])
                if tok == eos:
                    done[i] = True
                    continue
                tokens[i].append(tok)
                feed[i, 0] = tok
                done[i] = len(tokens[i]) >= max_new_tokens
            if all(done) or step == max_new_tokens - 1:
                break
            t1 = time.perf_counter()
            mask = np.concatenate([mask, np.ones((b, 1), dtype=np.int64)], axis=1)
            out = self.backend.forward(feed, mask, next_pos[:, None], cache, last_only=True)
            step_s.append(time.perf_counter() - t1)
            cache = out.present
            next_pos = next_pos + 1
        return BatchResult(tokens=tokens, prefill_s=prefill_s, step_s=step_s)

    def generate_batch(
        self, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingParams | None = None
    ) -> list[list[int]]:
        """The generated ids of each prompt, run as one left-padded batch (see ``run_batch``)."""
        return self.run_batch(prompts, max_new_tokens, sampling).tokens

    # --- scoring -------------------------------------------------------------------------------
    def score(
        self, ids: list[int], top_k: int = 0, *, turn: Callable[[], AbstractContextManager] = nullcontext
    ) -> ScoreResult:
        """Logits (``top_k == 0``) or the top-k log-probabilities at every position of ``ids``.

        Only the forward runs inside ``turn()`` (a server's backend lock); scoring runs outside.

        Raises:
            InvalidInput: empty sequence, ids outside the vocabulary, top_k out of [0, vocab_size].
            OutOfRange: more ids than the model's context.
        """
        self.check_score(ids, top_k)
        s = len(ids)
        with turn():
            out = self.backend.forward(
                np.asarray([ids], dtype=np.int64),
                np.ones((1, s), dtype=np.int64),
                np.arange(s, dtype=np.int64)[None, :],
            )
        return score_logits(out.logits[0], ids, top_k)

    def check_score(self, ids: list[int], top_k: int) -> None:
        """Validate a ``score`` request (raises what ``score`` documents)."""
        problems = [] if ids else ["the sequence to score is empty"]
        problems += self._id_problems("token ids", ids)
        if (
            isinstance(top_k, bool)
            or not isinstance(top_k, (int, np.integer))
            or not 0 <= top_k <= self.vocab_size
        ):
            problems.append(
                f"top_k must be an integer in [0, {self.vocab_size}] (0 = full logits), got {top_k!r}"
            )
        if problems:
            raise InvalidInput("; ".join(problems))
        s = len(ids)
        if s > self.n_positions:
            raise OutOfRange(f"the sequence has {s} tokens; the model's context is {self.n_positions}")
