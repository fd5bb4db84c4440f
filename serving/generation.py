"""Generation requests and their results, written once above the scheduler and the backends.

    gen = Generator(backend, tokenizer)            # owns a Scheduler unless given one
    for event in gen.stream(GenerationRequest(prompt_ids=tokenizer.encode("Hello"), max_new_tokens=8)):
        ...  # TokenEvent per generated token, then one FinalEvent
    gen.close()

Every request runs as a row of the backend's ``serving.scheduler.Scheduler``, batched with the
others (left-padded: the attention mask hides the padding and position ids count real tokens
only, ``cumsum(mask) - 1``, which is what transformers' ``generate`` does, so greedy decoding
matches it token for token). The scheduler chooses tokens; ``Completion`` turns them into text on
the consumer's side: detokenising, stop strings and the final event never run inside a step.

Stop handling: a stop token (or EOS) ends the generation and is not part of the output; a stop
string ends it and the text is cut just before it. While stop strings are active, text that could
be the beginning of one is held back from the stream until it is known not to be.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from serving.backends.base import Backend
from serving.errors import InvalidInput, OutOfRange
from serving.sampling import SamplingParams
from serving.scheduler import CANCELLED, ERROR, STOP, Done, Scheduler, SchedulerOptions, Ticket, Token, Work
from serving.tokenizer import Tokenizer

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
_POLL_S = 0.05  # how often a blocking consumer checks its ``cancelled()`` callback


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
        batch_sizes: Rows in each forward the request ran in (the prefill first).
    """

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]
    text: str
    time_to_first_token_s: float
    per_token_s: list[float]
    batch_sizes: list[int] = field(default_factory=list)


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


class Completion:
    """One request's consumer side: scheduler events in, TokenEvents and one FinalEvent out.

    Args:
        req: The request.
        tokenizer: Decodes the stream.
        ticket: The scheduler ticket (``finish("stop")`` is called when a stop string ends it).
        started_at: ``time.perf_counter()`` when the request arrived (time to first token counts
            from here, queueing included).
    """

    def __init__(self, req: GenerationRequest, tokenizer: Tokenizer, ticket: Ticket, started_at: float):
        self.req = req
        self.ticket = ticket
        self.t0 = started_at
        self.decoder = tokenizer.stream_decoder()
        self.tokens: list[int] = []
        self.text = ""
        self.emitted = 0
        self.ttft = 0.0
        self.per_token: list[float] = []
        self.last_t = started_at
        self.cut = False  # a stop string cut the text: later tokens are ignored
        self.final: FinalEvent | None = None

    def feed(self, event: Token | Done) -> list[TokenEvent | FinalEvent]:
        """The events a scheduler event produces (raises the row's error for Done(error))."""
        if self.final is not None:
            return []
        if isinstance(event, Done):
            return self._done(event)
        assert event.token_id is not None, "a generated row's tokens are chosen, not forced"
        tok = int(event.token_id)
        if self.tokens:
            self.per_token.append(event.time - self.last_t)
        else:
            self.ttft = event.time - self.t0
        self.last_t = event.time
        self.tokens.append(tok)
        self.text += self.decoder.push([tok])
        stops = self.req.stop_strings
        if stops and (at := _find_stop(self.text, self.emitted, stops)) >= 0:
            self.text = self.text[:at]
            self.cut = True
            self.ticket.finish(STOP)  # the scheduler drops the row at its next step boundary
            out: list[TokenEvent | FinalEvent] = [TokenEvent([tok], self.text[self.emitted :])]
            self.emitted = len(self.text)
            return out + self._finish(STOP)
        safe = len(self.text) - (_holdback(self.text, self.emitted, stops) if stops else 0)
        out = [TokenEvent([tok], self.text[self.emitted : safe])]
        self.emitted = safe
        return out

    def cancel(self) -> list[TokenEvent | FinalEvent]:
        """The consumer went away: end now with finish_reason "cancelled" (later tokens are dropped)."""
        if self.final is not None:
            return []
        self.ticket.cancel()
        return self._finish(CANCELLED)

    def _done(self, done: Done) -> list[TokenEvent | FinalEvent]:
        if done.reason == ERROR:
            raise done.error if done.error is not None else RuntimeError("the generation failed")
        return self._finish(done.reason)

    def _finish(self, reason: str) -> list[TokenEvent | FinalEvent]:
        if not self.cut:  # after a stop string, the bytes that followed it are dropped
            self.text += self.decoder.flush()
        out: list[TokenEvent | FinalEvent] = []
        if self.emitted < len(self.text):
            out.append(TokenEvent([], self.text[self.emitted :]))
            self.emitted = len(self.text)
        self.final = FinalEvent(
            finish_reason=reason,
            prompt_tokens=len(self.req.prompt_ids),
            completion_tokens=len(self.tokens),
            token_ids=list(self.tokens),
            text=self.text,
            time_to_first_token_s=self.ttft,
            per_token_s=self.per_token,
            batch_sizes=list(self.ticket.batch_sizes),
        )
        return [*out, self.final]


class Generator:
    """Validation, generation, scoring and batches over one loaded backend, through its scheduler.

    Args:
        backend: A loaded backend.
        tokenizer: The bundle's tokenizer (decodes the stream, knows EOS).
        max_new_tokens_limit: The largest ``max_new_tokens`` accepted.
        scheduler: The backend's scheduler (a server shares one); None starts one on first use
            with ``scheduler_options`` and stops it in ``close()``.
    """

    def __init__(
        self,
        backend: Backend,
        tokenizer: Tokenizer,
        *,
        max_new_tokens_limit: int = 4096,
        scheduler: Scheduler | None = None,
        scheduler_options: SchedulerOptions | None = None,
    ):
        self.backend = backend
        self.tokenizer = tokenizer
        self.max_new_tokens_limit = max_new_tokens_limit
        self.vocab_size = backend.dims.vocab_size
        self.n_positions = backend.dims.n_positions
        self.eos_token_id = (
            tokenizer.eos_token_id if tokenizer.eos_token_id is not None else backend.dims.eos_token_id
        )
        self._scheduler = scheduler
        self._owns_scheduler = scheduler is None
        self._scheduler_options = scheduler_options

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            self._scheduler = Scheduler(self.backend, self._scheduler_options).start()
        return self._scheduler

    def close(self) -> None:
        """Stop the scheduler this generator started (not one it was given)."""
        if self._owns_scheduler and self._scheduler is not None:
            self._scheduler.stop()
            self._scheduler = None

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- validation ----------------------------------------------------------------------------
    @property
    def context(self) -> int:
        """Positions a row may use: the model's, or less where the backend (an engine) says so."""
        return min(self.n_positions, self.backend.limits.max_context)

    def _context_owner(self) -> str:
        if self.backend.limits.max_context < self.n_positions:
            return f"the {self.backend.name} backend's context of {self.context} positions"
        return f"the model's context of {self.n_positions} positions"

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
            OutOfRange: prompt + max_new_tokens beyond the context (the model's n_positions, or a
                TensorRT engine's own smaller limit), checked before anything is streamed.
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
        if len(req.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            problems.append(
                f"at most {MAX_STOP_TOKEN_IDS} stop token ids are allowed, got {len(req.stop_token_ids)}"
            )
        else:
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
        if n_prompt + m > self.context:
            raise OutOfRange(
                f"prompt ({n_prompt} tokens) + max_new_tokens ({m}) = {n_prompt + m} exceeds "
                f"{self._context_owner()}; shorten the prompt "
                f"or ask for at most {max(self.context - n_prompt, 0)} new tokens"
            )

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
        if len(ids) > self.context:
            raise OutOfRange(f"the sequence has {len(ids)} tokens, which exceeds {self._context_owner()}")

    def work(self, req: GenerationRequest, *, background: bool = False, label: str = "") -> Work:
        """The scheduler's view of a (validated) request."""
        return Work(
            prompt_ids=[int(i) for i in req.prompt_ids],
            max_new_tokens=int(req.max_new_tokens),
            sampling=req.sampling,
            stop_token_ids=frozenset(int(i) for i in req.stop_token_ids),
            eos_token_id=self.eos_token_id if req.stop_at_eos else None,
            background=background,
            label=label,
        )

    # --- streaming generation ------------------------------------------------------------------
    def stream(
        self,
        req: GenerationRequest,
        cancelled: Callable[[], bool] = lambda: False,
        started_at: float | None = None,
    ) -> Iterator[TokenEvent | FinalEvent]:
        """Validate ``req``, then yield a TokenEvent per generated token and one FinalEvent.

        Blocking (for threads and scripts; a server awaits the same events instead).
        ``cancelled()`` is polled while waiting; when it returns True the row is dropped at the
        next step boundary and the generation ends with finish_reason "cancelled". Closing the
        iterator early drops the row too.
        """
        self.validate(req)
        events: queue.SimpleQueue = queue.SimpleQueue()
        if cancelled():  # gone before it started: nothing reaches the scheduler
            ticket = Ticket(self.work(req), events.put)
            yield from Completion(req, self.tokenizer, ticket, started_at or ticket.submitted_at).cancel()
            return
        ticket = self.scheduler.submit(self.work(req), events.put)
        completion = Completion(req, self.tokenizer, ticket, started_at or ticket.submitted_at)
        try:
            while completion.final is None:
                try:
                    event = events.get(timeout=_POLL_S)
                except queue.Empty:
                    event = None
                if event is not None:
                    yield from completion.feed(event)
                if completion.final is None and cancelled():
                    yield from completion.cancel()
        finally:
            if completion.final is None or completion.final.finish_reason == CANCELLED:
                ticket.cancel()

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
        """Generate for several prompts submitted together (so prefilled and stepped as one batch).

        Each row stops at EOS (when ``stop_at_eos``; EOS is not included) or after
        ``max_new_tokens``, and leaves the batch then. With a seed, every row draws from its own
        stream seeded with it (a row samples like a single request).
        """
        sampling = sampling or SamplingParams()
        if not prompts:
            raise InvalidInput("the batch is empty; give at least one prompt")
        reqs = [
            GenerationRequest(list(p), max_new_tokens, sampling, stop_at_eos=stop_at_eos) for p in prompts
        ]
        for i, r in enumerate(reqs):
            try:
                self.validate(r)
            except (InvalidInput, OutOfRange) as e:
                raise type(e)(f"prompt {i}: {e}") from None
        sinks: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in reqs]
        tickets = self.scheduler.submit_group(
            [(self.work(r), q.put) for r, q in zip(reqs, sinks, strict=True)]
        )
        tokens: list[list[int]] = [[] for _ in reqs]
        times: list[list[float]] = [[] for _ in reqs]
        for i, q in enumerate(sinks):
            while True:
                event = q.get()
                if isinstance(event, Done):
                    if event.reason == ERROR:
                        raise event.error or RuntimeError("the batch failed")
                    break
                tokens[i].append(int(event.token_id))
                times[i].append(event.time)
        longest = max(times, key=len)
        t0 = min(t.submitted_at for t in tickets)
        prefill = (min(t[0] for t in times if t) - t0) if any(times) else 0.0
        return BatchResult(tokens=tokens, prefill_s=prefill, step_s=list(np.diff(longest).tolist()))

    def generate_batch(
        self, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingParams | None = None
    ) -> list[list[int]]:
        """The generated ids of each prompt, run as one batch (see ``run_batch``)."""
        return self.run_batch(prompts, max_new_tokens, sampling).tokens

    # --- scoring and single forwards -----------------------------------------------------------
    def logits(self, rows: list[list[int]], *, background: bool = False) -> list[np.ndarray]:
        """Logits (S_i, V) at every position of each token sequence, as scheduler rows."""
        sinks: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in rows]
        works = [
            Work(prompt_ids=[int(i) for i in r], forced_ids=[], return_logits=True, background=background)
            for r in rows
        ]
        self.scheduler.submit_group(list(zip(works, [q.put for q in sinks], strict=True)))
        return [_prefill_logits(q.get) for q in sinks]

    def score(self, ids: list[int], top_k: int = 0) -> ScoreResult:
        """Logits (``top_k == 0``) or the top-k log-probabilities at every position of ``ids``.

        Raises:
            InvalidInput: empty sequence, ids outside the vocabulary, top_k out of [0, vocab_size].
            OutOfRange: more ids than the context.
        """
        self.check_score(ids, top_k)
        return score_logits(self.logits([ids])[0], ids, top_k)


def _prefill_logits(get: Callable[[], Token | Done]) -> np.ndarray:
    """The (P, V) logits a ``forced_ids=[]`` row delivers, waiting for its Done."""
    logits = None
    while True:
        event = get()
        if isinstance(event, Token):
            logits = event.logits
        elif event.reason == ERROR:
            raise event.error or RuntimeError("the forward failed")
        elif event.reason == CANCELLED or logits is None:
            raise RuntimeError(f"the forward ended without logits ({event.reason})")
        else:
            return logits
