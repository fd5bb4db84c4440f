"""CPU benchmarks a user can trust: transformers' generate, the project's backends, peers, gRPC streams.

    python -m serving.bench --out bench-results            # make bench: the full run (docs/benchmarks.md)
    python -m serving.bench --quick --out bench-results    # make bench-quick: tiny preset, < 2 minutes

Every system runs on the same weights (the bundle's reference checkpoint), is timed the same way
(prefill, then the time between tokens) in interleaved rounds, and carries its parity against
transformers (max|Δlogits| and top-1 along the reference's greedy continuation, greedy tokens
matched). ``core``: options and results; ``systems``: what is compared (``peers``: CTranslate2,
Optimum, llama.cpp); ``streams``: concurrent
gRPC clients; ``report``: table, machine info, plots; ``run``: the loop.
"""

from serving.bench.cli import main
from serving.bench.core import BenchOptions, BenchResult
from serving.bench.run import run_bench

__all__ = ["BenchOptions", "BenchResult", "main", "run_bench"]
