"""The benchmark's options, measurements and result, and the loop that runs the systems in rounds.

Every system is timed the same way: the time from the call to the first logits (prefill) and the
time between successive logits (one decode step), taken as close to the model as each API allows.
Systems run interleaved, one generation each per (round, batch), in a rotated order, so that all
of them see the same machine state; medians and the best run are reported.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# transformers' own generate() first: the baseline every ratio is quoted against
BASELINE = "hf-generate"
DEFAULT_SYSTEMS = (
    BASELINE,
    "torch",
    "onnxruntime",
    "onnxruntime:int8",
    "onnxruntime:int4",
    "ctranslate2:float32",
    "ctranslate2:int8",
    "optimum",
    "llama.cpp:q8_0",
)
DEFAULT_STREAM_SYSTEMS = ("onnxruntime", "onnxruntime:int4")
SCHEMA = "gpt2-deploy-bench/2"


@dataclass
class BenchOptions:
    """What to measure.

    Args:
        out: Results directory: JSON and plots, exported bundles (OUT/bundles), converted peer
            models and the Optimum environment (OUT/peers).
        model: Preset to export (random weights, fixed seed).
        bundle: Use this fp32 bundle (with its reference checkpoint) instead of exporting one.
        systems: Systems to compare (``DEFAULT_SYSTEMS``; ``python -m serving.bench --list-systems``).
        batches: Batch sizes of the decode scenarios.
        prompt_len: Prompt tokens per row (the prefill scenario).
        new_tokens: Tokens generated per row.
        rounds: Measured rounds; each runs every (system, batch) once.
        threads: Intra-op threads of every system; None uses os.cpu_count().
        seed: Seed of the bundle's weights and of the prompts.
        streams: Concurrent gRPC client counts of the streams scenario (empty: not run).
        stream_tokens: Tokens each client asks for.
        stream_systems: Served backends (``backend[:precision]``) of the streams scenario.
        stream_rounds: Passes over ``streams`` (per count, the pass with the best aggregate is kept).
        parity_sequences: Sequences of the teacher-forced parity check (prompt + the reference's
            greedy continuation).
        plots: Write PNG plots (needs matplotlib).
        quick: Set by ``--quick``; recorded in the result.
        progress: Progress lines on stderr.
    """

    out: Path = Path("bench-results")
    model: str = "gpt2-124m"
    bundle: Path | None = None
    systems: list[str] = field(default_factory=lambda: list(DEFAULT_SYSTEMS))
    batches: list[int] = field(default_factory=lambda: [1, 8])
    prompt_len: int = 32
    new_tokens: int = 64
    rounds: int = 5
    threads: int | None = None
    seed: int = 0
    streams: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    stream_tokens: int = 64
    stream_systems: list[str] = field(default_factory=lambda: list(DEFAULT_STREAM_SYSTEMS))
    stream_rounds: int = 1
    parity_sequences: int = 2
    plots: bool = True
    quick: bool = False
    progress: bool = True

    def check(self) -> None:
        problems = []
        if not self.batches or any(b < 1 for b in self.batches):
            problems.append(f"batches must be >= 1, got {self.batches}")
        if self.prompt_len < 1 or self.new_tokens < 2:
            problems.append("prompt_len must be >= 1 and new_tokens >= 2 (one decode step at least)")
        if self.rounds < 1 or self.stream_rounds < 1:
            problems.append("rounds and stream_rounds must be >= 1")
        if any(n < 1 for n in self.streams) or (self.streams and self.stream_tokens < 2):
            problems.append("streams must be >= 1 and stream_tokens >= 2")
        if self.parity_sequences < 1:
            problems.append("parity_sequences must be >= 1")
        if not self.systems:
            problems.append("no systems to run")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def threads_used(self) -> int:
        return self.threads or os.cpu_count() or 1


@dataclass
class Run:
    """One timed generation: the tokens per row, the prefill, each decode step, the whole call."""

    tokens: list[list[int]]
    prefill_s: float
    step_s: list[float]
    total_s: float

    @classmethod
    def from_stamps(cls, tokens: list[list[int]], t0: float, stamps: list[float], t_end: float) -> Run:
        """``stamps``: when each forward's logits were ready (the first is the prefill's)."""
        if not stamps:
            raise ValueError("no forward was timed")
        steps = [b - a for a, b in zip(stamps, stamps[1:])]
        return cls([list(map(int, t)) for t in tokens], stamps[0] - t0, steps, t_end - t0)

    @property
    def step_median_s(self) -> float:
        return statistics.median(self.step_s) if self.step_s else float("nan")


@dataclass
class Parity:
    """A system's logits against transformers' along the reference sequences, and its greedy tokens."""

    tolerance: str
    max_abs_logits: float
    top1_agreement: float
    passed: bool
    positions: int
    note: str = ""

    def cell(self) -> str:
        return f"{self.max_abs_logits:.2g} / {self.top1_agreement:.1%}{'' if self.passed else ' FAIL'}"


@dataclass
class Row:
    """One (system, batch): medians over rounds and the best round, with its parity."""

    system: str
    kind: str  # baseline | project | peer
    batch: int
    runs: int
    prefill_ms: float
    prefill_ms_best: float
    step_ms: float  # decode: time between two tokens of one row (median over the run, then rounds)
    step_ms_best: float
    ms_per_token: float  # step_ms / batch
    tokens_per_s: float  # decode throughput, batch / step
    e2e_ms: float  # the whole call (prefill + decode + the API's own overhead), median
    speedup_vs_generate: float | None = None  # transformers' step_ms / this step_ms
    speedup_vs_generate_best: float | None = None
    greedy_match: float | None = None  # mean common prefix with transformers' greedy tokens
    greedy_exact: bool | None = None
    max_abs_logits: float | None = None
    top1_agreement: float | None = None
    parity_passed: bool | None = None
    tolerance: str | None = None
    model_mb: float | None = None

    @classmethod
    def from_runs(cls, system: str, kind: str, batch: int, runs: list[Run]) -> Row:
        prefill = [r.prefill_s * 1e3 for r in runs]
        steps = [r.step_median_s * 1e3 for r in runs]
        step = statistics.median(steps)
        return cls(
            system=system,
            kind=kind,
            batch=batch,
            runs=len(runs),
            prefill_ms=statistics.median(prefill),
            prefill_ms_best=min(prefill),
            step_ms=step,
            step_ms_best=min(steps),
            ms_per_token=step / batch,
            tokens_per_s=1e3 * batch / step,
            e2e_ms=statistics.median(r.total_s * 1e3 for r in runs),
        )


@dataclass
class Skip:
    """A system that did not run, why, and how to make it run."""

    system: str
    reason: str
    install: str = ""

    def line(self) -> str:
        how = f" -- install: {self.install}" if self.install else ""
        return f"SKIP {self.system}: {self.reason}{how}"


@dataclass
class StreamRow:
    """N concurrent gRPC streams against one server: throughput and what each stream saw."""

    system: str
    streams: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    tbt_p50_ms: float
    tbt_p99_ms: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    errors: int = 0


@dataclass
class BenchResult:
    options: dict[str, Any]
    machine: dict[str, Any]
    systems: dict[str, dict[str, Any]]
    rows: list[Row]
    skipped: list[Skip]
    streams: list[StreamRow] = field(default_factory=list)
    stream_skipped: list[Skip] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    def row(self, system: str, batch: int) -> Row | None:
        return next((r for r in self.rows if r.system == system and r.batch == batch), None)

    def int4_goal(self) -> dict[str, Any] | None:
        """The issue's int4 goal at B=1: <= 0.65x the project's int8 step, ahead of CTranslate2
        int8 and llama.cpp q8_0 measured in the same run. None when int4 or int8 did not run."""
        int4, int8 = self.row("onnxruntime:int4", 1), self.row("onnxruntime:int8", 1)
        if int4 is None or int8 is None:
            return None
        ratio = int4.step_ms / int8.step_ms
        goal: dict[str, Any] = {
            "int4_ms": int4.step_ms,
            "int8_ms": int8.step_ms,
            "int4_over_int8": ratio,
            "int4_over_int8_best": int4.step_ms_best / int8.step_ms_best,
            "target_ratio": 0.65,
            "ratio_met": ratio <= 0.65,
            "peers": {},
        }
        for peer in ("ctranslate2:int8", "llama.cpp:q8_0"):
            p = self.row(peer, 1)
            goal["peers"][peer] = (
                None if p is None else {"ms": p.step_ms, "int4_ahead": int4.step_ms < p.step_ms}
            )
        goal["met"] = goal["ratio_met"] and all(
            v is not None and v["int4_ahead"] for v in goal["peers"].values()
        )
        return goal

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BenchResult:
        """Read back ``to_json()`` (to re-draw the plots or compare runs)."""
        return cls(
            options=d["options"],
            machine=d["machine"],
            systems=d["systems"],
            rows=[Row(**r) for r in d["rows"]],
            skipped=[Skip(**s) for s in d["skipped"]],
            streams=[StreamRow(**s) for s in d["streams"]],
            stream_skipped=[Skip(**s) for s in d.get("streams_skipped", [])],
            plots=d.get("plots", []),
            duration_s=d.get("duration_s", 0.0),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "options": self.options,
            "machine": self.machine,
            "baseline": BASELINE,
            "systems": self.systems,
            "rows": [asdict(r) for r in self.rows],
            "skipped": [asdict(s) for s in self.skipped],
            "streams": [asdict(s) for s in self.streams],
            "streams_skipped": [asdict(s) for s in self.stream_skipped],
            "int4_goal": self.int4_goal(),
            "plots": self.plots,
            "duration_s": round(self.duration_s, 1),
        }


class Progress:
    """Progress lines on stderr (which system, which round), with the time since the start."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.t0 = time.perf_counter()

    def __call__(self, line: str) -> None:
        if self.enabled:
            print(f"[{time.perf_counter() - self.t0:6.1f} s] {line}", file=sys.stderr, flush=True)


def prompts_for(opts: BenchOptions, vocab_size: int) -> list[list[int]]:
    """max(batches) random prompts of ``prompt_len`` ids (fixed by the seed); B=b uses the first b."""
    rng = np.random.default_rng(opts.seed)
    return rng.integers(0, vocab_size - 1, (max(opts.batches), opts.prompt_len)).tolist()


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prefix_match(got: list[list[int]], ref: list[list[int]]) -> float:
    """Mean over rows of the common prefix length over the reference length (1.0: identical)."""
    fractions = [common_prefix(g, r) / len(r) if r else 1.0 for g, r in zip(got, ref)]
    return float(np.mean(fractions)) if fractions else 1.0
