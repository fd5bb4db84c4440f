"""The golden parity record: the reference's answers on the canary prompts, carried in the bundle.

At export, ``make_golden`` runs transformers' ``GPT2LMHeadModel`` over ``CANARY_PROMPTS`` (the
prompt prefill, then its greedy continuation fed one token at a time) and keeps, for every
position, the top-k token ids with their logits and a few statistics of the full row. A served
backend is later checked against the record without torch or a tokenizer, with the same
``export.compare`` tolerance presets and verdict rule as the live-reference check:

    record = GoldenRecord.from_file(bundle.golden_path)
    report = check_backend(backend, record, tolerance_for("fp32"))
    if not report: print(report)

numpy and the standard library only at module level (torch is imported inside ``make_golden``).
Format, and why these numbers suffice: docs/export.md "Golden parity record".
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export.compare import CaseResult, ParityReport, Tolerance, step_case_name

SCHEMA = "gpt2-deploy.golden"
SCHEMA_VERSION = 1
# The canonical canary prompts (the serving startup canary uses the same list).
CANARY_PROMPTS: tuple[str, ...] = (
    "Hello, my name is",
    "The capital of France is",
    "def fibonacci(n):\n    ",
)
DEFAULT_NEW_TOKENS = 8
DEFAULT_TOP_K = 32
# Statistics of the full logits row, in stored order. Each is 1-Lipschitz in max|Δ|, so
# |Δstat| is a lower bound of the max|Δlogits| the live check measures.
STATS: tuple[str, ...] = ("max", "logsumexp", "mean", "std")


class GoldenError(ValueError):
    """A golden record is malformed, foreign or of an unsupported schema; ``problems`` lists all."""

    def __init__(self, path: str | os.PathLike, problems: list[str]):
        self.path = str(path)
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{self.path} is not a usable golden parity record:\n{lines}")


def row_stats(logits: np.ndarray) -> np.ndarray:
    """(N, V) logits -> (N, len(STATS)) float64: max, logsumexp, mean, std of each row."""
    x = np.asarray(logits, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        mx = x.max(-1)
        lse = mx + np.log(np.exp(x - mx[:, None]).sum(-1))
        return np.stack([mx, lse, x.mean(-1), x.std(-1)], axis=-1)


def summarize_logits(logits: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, V) float32 logits -> what a golden record keeps of them.

    Returns:
        top_ids (N, k) int32 and top_logits (N, k) float32, sorted by logit descending and, among
        equal logits, by id ascending (so column 0 is ``np.argmax``); stats (N, len(STATS)).
    """
    x = np.asarray(logits, dtype=np.float32)
    if x.ndim != 2 or not 1 <= top_k <= x.shape[-1]:
        raise ValueError(f"need (N, V) logits and 1 <= top_k <= V, got shape {x.shape}, top_k {top_k}")
    part = np.argpartition(-x, top_k - 1, axis=-1)[:, :top_k]
    vals = np.take_along_axis(x, part, -1)
    order = np.lexsort((part, -vals), axis=-1)
    ids = np.take_along_axis(part, order, -1).astype(np.int32)
    return ids, np.take_along_axis(vals, order, -1), row_stats(x)


@dataclass(frozen=True, eq=False)
class GoldenSequence:
    """One canary prompt: its tokens and the reference's summary of every position's logits.

    Row ``i`` of the arrays is position ``i`` of ``token_ids`` (the logits predicting token i+1).
    Step 0 (the prefill) covers rows ``[0, prompt_len)``; step t >= 1 feeds
    ``continuation_ids[t-1]`` and covers row ``prompt_len + t - 1``.
    """

    prompt: str
    prompt_ids: tuple[int, ...]
    continuation_ids: tuple[int, ...]
    top_ids: np.ndarray  # (positions, k) int32
    top_logits: np.ndarray  # (positions, k) float32
    stats: np.ndarray  # (positions, len(STATS)) float64

    @property
    def token_ids(self) -> list[int]:
        """Prompt + continuation: what a teacher-forced check feeds."""
        return [*self.prompt_ids, *self.continuation_ids]

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def steps(self) -> int:
        """Compared steps: the prefill and one per continuation token."""
        return len(self.continuation_ids) + 1

    def rows(self, step: int) -> slice:
        """The rows (positions) compared at ``step``."""
        if not 0 <= step < self.steps:
            raise ValueError(f"step {step} outside [0, {self.steps})")
        p = self.prompt_len
        return slice(0, p) if step == 0 else slice(p + step - 1, p + step)

    def step_inputs(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """input_ids, attention_mask (past + new, no padding), position_ids for ``step`` (batch 1)."""
        r = self.rows(step)
        ids = self.token_ids[r] if step == 0 else [self.continuation_ids[step - 1]]
        return (
            np.asarray([ids], dtype=np.int64),
            np.ones((1, r.stop), dtype=np.int64),
            np.arange(r.start, r.stop, dtype=np.int64)[None, :],
        )


@dataclass(frozen=True, eq=False)
class GoldenRecord:
    """The reference's answers on the canary prompts (``golden.json`` in a bundle).

    Args:
        sequences: One per canary prompt.
        vocab_size: The logits row length the record was made from.
        top_k: Stored entries per position.
        new_tokens: Greedy continuation length (steps compared = new_tokens + 1).
        producer: What computed it: model class, torch/transformers/numpy versions, attention
            implementation, dtype, device.
    """

    sequences: tuple[GoldenSequence, ...]
    vocab_size: int
    top_k: int
    new_tokens: int
    producer: dict[str, Any] = field(default_factory=dict)
    schema: str = SCHEMA
    schema_version: int = SCHEMA_VERSION

    @property
    def token_sequences(self) -> list[list[int]]:
        return [s.token_ids for s in self.sequences]

    @property
    def prompt_lens(self) -> list[int]:
        return [s.prompt_len for s in self.sequences]

    @property
    def positions(self) -> int:
        return sum(s.top_ids.shape[0] for s in self.sequences)

    def summary(self) -> dict[str, Any]:
        """A few numbers for the manifest and ``inspect``."""
        return {
            "prompts": len(self.sequences),
            "steps": sum(s.steps for s in self.sequences),
            "new_tokens": self.new_tokens,
            "top_k": self.top_k,
            "positions": self.positions,
        }

    def compare_step(
        self, seq: int, step: int, logits: np.ndarray, tolerance: Tolerance, case: str | None = None
    ) -> GoldenCaseResult:
        """Judge the logits a backend produced for one golden step: (positions, V) or (1, positions, V).

        Args:
            seq: Index into ``sequences``.
            step: 0 = the prompt prefill, t = the t-th continuation token fed.
            logits: The backend's logits for the tokens ``sequences[seq].step_inputs(step)`` feeds.
            tolerance: What passing means (an ``export.compare`` preset).
            case: The case label; defaults to the serving parity reports' form.

        Raises:
            ValueError: a sequence or step outside the record, or logits of the wrong shape.
        """
        if not 0 <= seq < len(self.sequences):
            raise ValueError(f"sequence {seq} outside [0, {len(self.sequences)})")
        s = self.sequences[seq]
        r = s.rows(step)
        token = None if step == 0 else s.continuation_ids[step - 1]
        case = case or step_case_name(seq, step, token, len(self.sequences))
        got = np.asarray(logits)
        if got.ndim == 3 and got.shape[0] == 1:
            got = got[0]
        if got.ndim != 2 or got.shape != (r.stop - r.start, self.vocab_size):
            raise ValueError(
                f"{case}: logits shape {list(np.shape(logits))}, expected "
                f"[{r.stop - r.start}, {self.vocab_size}] (positions, the record's vocabulary)"
            )
        return compare_rows(s.top_ids[r], s.top_logits[r], s.stats[r], got, tolerance, case)

    # --- file format ---------------------------------------------------------------------------
    def dumps(self) -> str:
        """The JSON text: indented, one position per line, float32 logits in their shortest form."""
        rows: list[str] = []

        def put(text: str) -> str:  # a placeholder json.dumps writes as a string, replaced below
            rows.append(text)
            return f"\0{len(rows) - 1}"

        def f32(a: np.ndarray) -> str:
            return ",".join(np.format_float_positional(v, unique=True, trim="-") for v in a)

        doc = {
            "schema": self.schema,
            "schema_version": self.schema_version,
            "producer": self.producer,
            "vocab_size": self.vocab_size,
            "top_k": self.top_k,
            "new_tokens": self.new_tokens,
            "stats": list(STATS),
            "sequences": [
                {
                    "prompt": put(json.dumps(s.prompt, ensure_ascii=False)),  # no placeholder look-alike
                    "prompt_ids": put(json.dumps(list(s.prompt_ids))),
                    "continuation_ids": put(json.dumps(list(s.continuation_ids))),
                    "top_ids": [put("[" + ",".join(map(str, r.tolist())) + "]") for r in s.top_ids],
                    "top_logits": [put(f"[{f32(r)}]") for r in s.top_logits],
                    "stats": [put("[" + ",".join(repr(float(v)) for v in r) + "]") for r in s.stats],
                }
                for s in self.sequences
            ],
        }
        text = json.dumps(doc, indent=1, ensure_ascii=False)
        return re.sub(r'"\\u0000(\d+)"', lambda m: rows[int(m.group(1))], text) + "\n"

    def to_file(self, path: str | os.PathLike) -> Path:
        """Write the record atomically (a reader never sees half a file); returns the path."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.dumps(), encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> GoldenRecord:
        """Read and check a record.

        Raises:
            GoldenError: unreadable, foreign, unsupported version, or malformed (every problem).
        """
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise GoldenError(path, [f"cannot read it as JSON: {type(e).__name__}: {e}"]) from None
        return cls.from_json(raw, path)

    @classmethod
    def from_json(cls, raw: Any, path: str | os.PathLike = "<golden record>") -> GoldenRecord:
        """Check ``raw`` (the parsed JSON) names -> shapes -> values and build the record.

        Raises:
            GoldenError: listing every problem found.
        """
        if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
            seen = raw.get("schema") if isinstance(raw, dict) else type(raw).__name__
            raise GoldenError(path, [f"schema is {seen!r}, expected {SCHEMA!r}"])
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise GoldenError(
                path,
                [
                    f"schema_version {raw.get('schema_version')!r} is not supported; "
                    f"this gpt2-deploy reads version {SCHEMA_VERSION}"
                ],
            )
        keys = ("producer", "vocab_size", "top_k", "new_tokens", "stats", "sequences")
        problems = [f"missing key {k!r}" for k in keys if k not in raw]
        if problems:
            raise GoldenError(path, problems)
        v, k, n = raw["vocab_size"], raw["top_k"], raw["new_tokens"]
        for name, val, lo in (("vocab_size", v, 1), ("top_k", k, 1), ("new_tokens", n, 0)):
            if not isinstance(val, int) or val < lo:
                problems.append(f"{name} must be an integer >= {lo}, got {val!r}")
        if not problems and k > v:
            problems.append(f"top_k {k} exceeds vocab_size {v}")
        if raw["stats"] != list(STATS):
            problems.append(f"stats are {raw['stats']!r}, this gpt2-deploy reads {list(STATS)}")
        if not isinstance(raw["sequences"], list) or not raw["sequences"]:
            problems.append("sequences must be a non-empty list")
        if problems:
            raise GoldenError(path, problems)
        seqs = []
        for i, s in enumerate(raw["sequences"]):
            seq = _sequence_from_json(s, f"sequence {i}", v, k, n, problems)
            if seq is not None:
                seqs.append(seq)
        if problems:
            raise GoldenError(path, problems)
        return cls(tuple(seqs), v, k, n, dict(raw["producer"]))


def _sequence_from_json(
    s: Any, where: str, vocab: int, k: int, n: int, problems: list[str]
) -> GoldenSequence | None:
    """One sequence, checked names -> shapes -> values; problems are appended, None on failure."""
    keys = ("prompt", "prompt_ids", "continuation_ids", "top_ids", "top_logits", "stats")
    missing = [key for key in keys if not isinstance(s, dict) or key not in s]
    if missing:
        problems.append(f"{where}: missing {missing}")
        return None
    before = len(problems)
    try:
        prompt_ids = np.asarray(s["prompt_ids"], dtype=np.int64)
        cont = np.asarray(s["continuation_ids"], dtype=np.int64)
        top_ids = np.asarray(s["top_ids"], dtype=np.int64)
        top_logits = np.asarray(s["top_logits"], dtype=np.float32)
        stats = np.asarray(s["stats"], dtype=np.float64)
    except (TypeError, ValueError) as e:
        problems.append(f"{where}: arrays are not numeric or ragged: {e}")
        return None
    rows = prompt_ids.size + n
    if prompt_ids.ndim != 1 or prompt_ids.size == 0:
        problems.append(f"{where}: prompt_ids must be a non-empty list, got shape {list(prompt_ids.shape)}")
    if cont.shape != (n,):
        problems.append(f"{where}: continuation_ids has shape {list(cont.shape)}, new_tokens is {n}")
    widths = (("top_ids", top_ids, k), ("top_logits", top_logits, k), ("stats", stats, len(STATS)))
    for name, a, width in widths:
        if a.shape != (rows, width):
            problems.append(f"{where}: {name} has shape {list(a.shape)}, expected {[rows, width]}")
    if len(problems) > before:
        return None
    for name, a in (("prompt_ids", prompt_ids), ("continuation_ids", cont), ("top_ids", top_ids)):
        if a.size and (a.min() < 0 or a.max() >= vocab):
            problems.append(f"{where}: {name} outside [0, {vocab})")
    if not (np.isfinite(top_logits).all() and np.isfinite(stats).all()):
        problems.append(f"{where}: non-finite logits or stats")
    elif k > 1 and (np.diff(top_logits, axis=-1) > 0).any():
        problems.append(f"{where}: top_logits are not sorted in descending order")
    if any(len(set(r)) != k for r in top_ids.tolist()):
        problems.append(f"{where}: a top_ids row repeats an id")
    p = prompt_ids.size
    if n and not np.array_equal(top_ids[p - 1 : p - 1 + n, 0], cont):
        problems.append(f"{where}: continuation_ids are not the reference's top-1 at their positions")
    if len(problems) > before:
        return None
    return GoldenSequence(
        str(s["prompt"]),
        tuple(prompt_ids.tolist()),
        tuple(cont.tolist()),
        top_ids.astype(np.int32),
        top_logits,
        stats,
    )


# --- making a record (export time, needs torch) ---------------------------------------------------
def make_golden(
    model: Any,
    tokenizer: Any,
    *,
    prompts: Sequence[str] = CANARY_PROMPTS,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    top_k: int = DEFAULT_TOP_K,
) -> GoldenRecord:
    """Run the reference over ``prompts`` and record its answers.

    Each prompt is prefilled, then the reference's greedy continuation (argmax, EOS not special)
    is fed one token at a time with the KV cache, as the serving parity checks teacher-force it.

    Args:
        model: A transformers ``GPT2LMHeadModel`` in eval mode (the weights the graph is exported from).
        tokenizer: Anything with ``encode(text) -> list[int]`` (the bundle's tokenizer).
        prompts: The canary prompts.
        new_tokens: Continuation length; new_tokens + 1 steps are recorded.
        top_k: Stored entries per position.
    """
    from export.cache_adapter import forward_with_cache
    from export.deps import require

    torch = require("torch")
    transformers = require("transformers")
    cfg = model.config
    ids_list = [list(tokenizer.encode(p)) for p in prompts]
    problems = []
    if model.training:
        problems.append("the model is in training mode (dropout); call model.eval()")
    if not prompts:
        problems.append("no prompts")
    if new_tokens < 0 or not 1 <= top_k <= cfg.vocab_size:
        problems.append(f"need new_tokens >= 0 and 1 <= top_k <= {cfg.vocab_size}, got {new_tokens}, {top_k}")
    for p, ids in zip(prompts, ids_list):
        if not ids or len(ids) + new_tokens > cfg.n_positions:
            problems.append(
                f"prompt {p!r}: {len(ids)} tokens + {new_tokens} new must be in [1, {cfg.n_positions}]"
            )
    if problems:
        raise ValueError("cannot make a golden record: " + "; ".join(problems))
    param = next(model.parameters())
    dev = param.device
    seqs = []
    with torch.inference_mode():
        for prompt, ids in zip(prompts, ids_list):
            layers: list = []
            fed, start, cont, parts = ids, 0, [], []
            for step in range(new_tokens + 1):
                end = start + len(fed)
                logits, layers = forward_with_cache(
                    model,
                    layers,
                    input_ids=torch.tensor([fed], dtype=torch.long, device=dev),
                    attention_mask=torch.ones((1, end), dtype=torch.long, device=dev),
                    position_ids=torch.arange(start, end, dtype=torch.long, device=dev)[None, :],
                )
                rows = logits[0].float().cpu().numpy()
                parts.append(summarize_logits(rows, top_k))
                if step < new_tokens:
                    fed, start = [int(np.argmax(rows[-1]))], end
                    cont.append(fed[0])
            top_ids, top_logits, stats = (np.concatenate(a) for a in zip(*parts))
            seqs.append(GoldenSequence(prompt, tuple(ids), tuple(cont), top_ids, top_logits, stats))
    producer = {
        "model_class": type(model).__name__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "dtype": str(param.dtype).removeprefix("torch."),
        "device": str(dev),
    }
    return GoldenRecord(tuple(seqs), int(cfg.vocab_size), top_k, new_tokens, producer)


# --- checking against a record (no torch) ---------------------------------------------------------
@dataclass
class GoldenCaseResult(CaseResult):
    """A ``CaseResult`` judged from a golden record instead of the full reference row.

    ``max_abs`` is the largest of ``bounds``, each a lower bound of the full-row max|Δlogits| the
    live check computes: "top_k" (the stored entries, the same values the live check sees there),
    "tail" (how far an unstored entry rises above the reference's k-th logit) and one per entry of
    ``STATS`` (|Δstat|; each statistic is 1-Lipschitz in max|Δ|). ``mean_abs`` is over the stored
    entries. Top-1 follows ``compare_logits`` exactly, including ``Tolerance.tie_margin``; a flip
    to an unstored token whose margin the record cannot bound above the tie margin is counted
    (``undetermined_flips``), never forgiven.
    """

    bounds: dict[str, float] = field(default_factory=dict)
    undetermined_flips: int = 0

    def __str__(self) -> str:
        s = CaseResult.__str__(self)
        if self.bounds and self.finite:
            key = max(self.bounds, key=self.bounds.__getitem__)
            if key != "top_k":
                s += f" (max|Δ| bound from {key})"
        if self.undetermined_flips:
            s += f" ({self.undetermined_flips} flip(s) to unstored tokens counted)"
        return s


def compare_rows(
    top_ids: np.ndarray,
    top_logits: np.ndarray,
    stats: np.ndarray,
    actual: np.ndarray,
    tolerance: Tolerance,
    case: str,
) -> GoldenCaseResult:
    """Judge served logits (N, V) against the stored summary of N reference rows.

    Same verdict rule as ``compare_logits``: finite, max_abs <= atol, counted top-1 >= min_top1.

    Raises:
        ValueError: the shapes do not fit together.
    """
    got = np.asarray(actual, dtype=np.float32)
    n, k = top_ids.shape
    if got.ndim != 2 or got.shape[0] != n or got.shape[1] < k:
        raise ValueError(f"{case}: logits shape {list(got.shape)} does not fit the record's {n} positions")
    if n == 0:
        return GoldenCaseResult(case, 0.0, 0.0, 1.0, 0, None, True)
    finite = bool(np.isfinite(got).all())
    rows = np.arange(n)[:, None]
    diff = np.abs(top_logits - got[rows, top_ids])
    tail = got.copy()
    tail[rows, top_ids] = -np.inf
    with np.errstate(invalid="ignore"):
        tail_gap = np.maximum(tail.max(-1) - top_logits[:, -1], 0.0) if got.shape[1] > k else np.zeros(n)
        # minus a rounding allowance, so a bound never exceeds the max|Δ| the live check computes
        # in float32 (its element differences round by up to half an ulp; float64 sums drift ~1e-12)
        stat_d = np.maximum(np.abs(row_stats(got) - stats) * (1 - 2**-22) - 1e-9 * (1 + np.abs(stats)), 0.0)
    bounds = {"top_k": float(diff.max()), "tail": float(tail_gap.max())}
    bounds.update({name: float(stat_d[:, i].max()) for i, name in enumerate(STATS)})
    max_abs = max(bounds.values()) if finite else float("inf")
    mean_abs = float(diff.mean()) if finite else float("inf")
    chosen = got.argmax(-1)
    agree = chosen == top_ids[:, 0]
    hit = top_ids == chosen[:, None]
    known = hit.any(-1)
    # how much the reference prefers its own top-1 over the token the actual output picked
    margin = top_logits[:, 0] - top_logits[np.arange(n), hit.argmax(-1)]
    if tolerance.tie_margin > 0:
        near_tie = ~agree & known & (margin <= tolerance.tie_margin)
        # unstored: margin >= top1 - k-th, which may still be within the tie margin
        undetermined = ~agree & ~known & (top_logits[:, 0] - top_logits[:, -1] <= tolerance.tie_margin)
    else:
        near_tie = undetermined = np.zeros(n, dtype=bool)
    mism = np.flatnonzero(~agree)
    counted_top1 = float((agree | near_tie).mean())
    passed = finite and max_abs <= tolerance.atol and counted_top1 >= tolerance.min_top1
    return GoldenCaseResult(
        case,
        max_abs,
        mean_abs,
        float(agree.mean()),
        n,
        int(mism[0]) if mism.size else None,
        passed,
        finite,
        int(near_tie.sum()),
        bounds=bounds,
        undetermined_flips=int(undetermined.sum()),
    )


def check_backend(
    backend: Any,
    record: GoldenRecord,
    tolerance: Tolerance,
    *,
    title: str | None = None,
    before_step: Callable[[], None] | None = None,
) -> ParityReport:
    """Teacher-force every record sequence through ``backend`` and judge each step's logits.

    ``backend`` is anything with ``forward(input_ids, attention_mask, position_ids, past) ->
    (.logits (1, S, V), .present)`` (the serving backends' interface) and optionally ``name``.

    Args:
        backend: The loaded backend under test.
        record: The golden record.
        tolerance: What passing means (an ``export.compare`` preset).
        title: The report's title.
        before_step: Called before every forward; raise from it to stop the check (cancellation).
    """
    name = str(getattr(backend, "name", type(backend).__name__))
    report = ParityReport(
        title=title or f"golden parity {name} vs the reference record",
        tolerance=tolerance,
        served=name,
        reference="golden",
    )
    for si, seq in enumerate(record.sequences):
        past = None
        for step in range(seq.steps):
            if before_step is not None:
                before_step()
            ids, mask, pos = seq.step_inputs(step)
            out = backend.forward(ids, mask, pos, past)
            past = out.present
            try:
                case = record.compare_step(si, step, out.logits, tolerance)
            except ValueError as e:
                report.errors.append(str(e))
                break
            report.add_case(step, case)
        report.steps = max(report.steps, seq.steps)
    return report
