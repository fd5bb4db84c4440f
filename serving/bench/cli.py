"""``python -m serving.bench``: the command line of the benchmark (``make bench``, ``make bench-quick``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from serving.bench.core import DEFAULT_STREAM_SYSTEMS, DEFAULT_SYSTEMS, BenchOptions

# --quick: the tiny preset, fewer tokens and rounds, a short streams pass (< 2 minutes here)
QUICK = {
    "model": "tiny",
    "rounds": 2,
    "new_tokens": 16,
    "streams": [1, 4],
    "stream_tokens": 16,
    "stream_systems": ["onnxruntime"],
    "parity_sequences": 1,
}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip() and int(x) > 0]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse(argv: list[str] | None = None) -> BenchOptions:
    ap = argparse.ArgumentParser(
        prog="python -m serving.bench",
        description="CPU decode benchmark: transformers' generate, the project's backends and peers on the "
        "same weights, plus concurrent gRPC streams. Prints a table, writes JSON and PNG plots to --out.",
    )
    ap.add_argument(
        "--out", type=Path, default=Path("bench-results"), help="results, cached bundles and peers"
    )
    ap.add_argument("--quick", action="store_true", help=f"smoke run in < 2 minutes: {QUICK}")
    ap.add_argument("--model", default=None, help="preset to export with random weights (default gpt2-124m)")
    ap.add_argument("--bundle", type=Path, default=None, help="an fp32 bundle (with reference/) instead")
    ap.add_argument("--systems", default=None, help=f"comma-separated (default: {','.join(DEFAULT_SYSTEMS)})")
    ap.add_argument("--batches", default=None, help="decode batch sizes (default 1,8)")
    ap.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 32)")
    ap.add_argument("--new-tokens", type=int, default=None, help="generated tokens per row (default 64)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved measured rounds (default 5)")
    ap.add_argument(
        "--threads", type=int, default=None, help="intra-op threads of every system (default: all cores)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--streams", default=None, help="concurrent gRPC client counts (default 1,2,4,8,16; 0 = not run)"
    )
    ap.add_argument("--stream-tokens", type=int, default=None, help="tokens per stream (default 64)")
    ap.add_argument(
        "--serve",
        default=None,
        help=f"backends served in the streams scenario (default {','.join(DEFAULT_STREAM_SYSTEMS)})",
    )
    ap.add_argument(
        "--stream-rounds", type=int, default=None, help="passes per client count, best kept (default 1)"
    )
    ap.add_argument(
        "--parity-sequences", type=int, default=None, help="sequences of the parity check (default 2)"
    )
    ap.add_argument("--no-plots", action="store_true", help="no PNG plots")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    ap.add_argument("--list-systems", action="store_true", help="print the system names and exit")
    a = ap.parse_args(argv)
    if a.list_systems:
        from serving.bench import systems

        print(systems.__doc__)
        raise SystemExit(0)
    given = {
        "model": a.model,
        "systems": _names(a.systems) if a.systems else None,
        "batches": _ints(a.batches) if a.batches else None,
        "prompt_len": a.prompt_len,
        "new_tokens": a.new_tokens,
        "rounds": a.rounds,
        "streams": _ints(a.streams) if a.streams is not None else None,
        "stream_tokens": a.stream_tokens,
        "stream_systems": _names(a.serve) if a.serve else None,
        "stream_rounds": a.stream_rounds,
        "parity_sequences": a.parity_sequences,
    }
    values = {**(QUICK if a.quick else {}), **{k: v for k, v in given.items() if v is not None}}
    return BenchOptions(
        out=a.out,
        bundle=a.bundle,
        threads=a.threads,
        seed=a.seed,
        plots=not a.no_plots,
        quick=a.quick,
        progress=not a.quiet,
        **values,
    )


def main(argv: list[str] | None = None) -> int:
    from serving.bench.report import plots, table
    from serving.bench.run import run_bench

    opts = parse(argv)
    t0 = time.perf_counter()
    result = run_bench(opts)
    opts.out.mkdir(parents=True, exist_ok=True)
    name = result.options["model_name"]
    if opts.plots:
        try:
            result.plots = plots(result, opts.out)
        except ImportError as e:
            print(f"no plots: {e} (pip install matplotlib, or 'gpt2-deploy[bench]')", file=sys.stderr)
    m = result.machine
    print(
        f"benchmark: {name} ({result.options['bundle']}), prompt {opts.prompt_len} tokens, {opts.new_tokens} "
        f"new tokens, {m['threads']} threads, {opts.rounds} interleaved rounds (median; best: fastest); "
        f"CPU {m['cpu']} [{' '.join(m['isa'])}], load {m['loadavg_start'][0]:.2f} at start, "
        f"{m['loadavg_end'][0]:.2f} at the end"
    )
    print(table(result))
    path = opts.out / f"bench-{name}.json"
    path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    print(f"wrote {path}" + "".join(f", {p}" for p in result.plots) + f" ({time.perf_counter() - t0:.0f} s)")
    return 0
