"""CPU decode benchmark: the torch and onnxruntime backends side by side, through the generation loop.

    python -m serving.bench --out bench-results            # `make bench`

Exports (once, cached under OUT/bundles/) a random-weight bundle of the requested preset (default
``gpt2-124m``, the real GPT-2 small shape), then for each batch size runs prefill + greedy decode
with ``Generator.run_batch`` on every backend, interleaving backends repeat by repeat so that both
see the same machine state. Prints a table with the ratios and writes OUT/bench-decode-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export.manifest import MANIFEST_FILE, Bundle, BundleError


@dataclass
class BenchOptions:
    """What to measure.

    Args:
        out: Results directory (JSON written here; bundles cached in OUT/bundles).
        model: Preset to export (random weights, fixed seed).
        bundle: Use this bundle instead of exporting one.
        backends: Backends to compare; ``name:precision`` runs a backend on another precision
            variant of the same preset (e.g. ``onnxruntime:int8``, exported and cached too).
        batches: Batch sizes.
        prompt_len: Prompt tokens per row.
        new_tokens: Tokens generated per row (decode steps = new_tokens - 1 after the prefill's token).
        repeats: Measured runs per (backend, batch); medians are reported.
        threads: Intra-op threads for both backends; None uses os.cpu_count().
        seed: Seed of the bundle's weights and of the prompts.
    """

    out: Path = Path("bench-results")
    model: str = "gpt2-124m"
    bundle: Path | None = None
    backends: list[str] | None = None  # None: torch, onnxruntime (+ onnxruntime:int8 for a preset)
    batches: list[int] = field(default_factory=lambda: [1, 8])
    prompt_len: int = 32
    new_tokens: int = 64
    repeats: int = 3
    threads: int | None = None
    seed: int = 0


@dataclass
class BenchRow:
    backend: str
    batch: int
    prefill_ms: float
    decode_ms_per_step: float
    decode_ms_per_token: float
    decode_tokens_per_s: float
    runs: int
    prefill_ms_best: float = float("nan")  # the fastest run: robust to other load on a shared machine
    decode_ms_per_step_best: float = float("nan")


@dataclass
class BenchResult:
    options: dict[str, Any]
    environment: dict[str, Any]
    rows: list[BenchRow]

    def row(self, backend: str, batch: int) -> BenchRow | None:
        return next((r for r in self.rows if r.backend == backend and r.batch == batch), None)

    def ratios(
        self, slow: str | None = None, fast: str = "onnxruntime", best: bool = False
    ) -> dict[int, dict[str, float]]:
        """Per batch: how many times ``fast`` beats ``slow`` (default: the first backend, the
        baseline) in prefill and decode; medians or best runs."""
        slow = slow or self.backends()[0]
        out = {}
        for b in sorted({r.batch for r in self.rows}):
            s, f = self.row(slow, b), self.row(fast, b)
            if s and f:
                if best:
                    out[b] = {
                        "prefill": s.prefill_ms_best / f.prefill_ms_best,
                        "decode": s.decode_ms_per_step_best / f.decode_ms_per_step_best,
                    }
                else:
                    out[b] = {
                        "prefill": s.prefill_ms / f.prefill_ms,
                        "decode": s.decode_ms_per_step / f.decode_ms_per_step,
                    }
        return out

    def table(self) -> str:
        lines = [
            f"| backend | B | prefill ms ({self.options['prompt_len']} tok) | decode ms/step | "
            "decode ms/token | tokens/s | best prefill ms | best decode ms/step |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.backend} | {r.batch} | {r.prefill_ms:.1f} | {r.decode_ms_per_step:.2f} | "
                f"{r.decode_ms_per_token:.2f} | {r.decode_tokens_per_s:.1f} | "
                f"{r.prefill_ms_best:.1f} | {r.decode_ms_per_step_best:.2f} |"
            )
        for fast in self.backends()[1:]:
            best = self.ratios(fast=fast, best=True)
            for b, rt in self.ratios(fast=fast).items():
                lines.append(
                    f"B={b}: {fast} vs {self.backends()[0]} (same run, interleaved): "
                    f"prefill {rt['prefill']:.2f}x, "
                    f"decode {rt['decode']:.2f}x faster (medians); best runs: prefill "
                    f"{best[b]['prefill']:.2f}x, decode {best[b]['decode']:.2f}x"
                )
        return "\n".join(lines)

    def backends(self) -> list[str]:
        return list(dict.fromkeys(r.backend for r in self.rows))

    def to_json(self) -> dict[str, Any]:
        return {
            "options": self.options,
            "environment": self.environment,
            "rows": [asdict(r) for r in self.rows],
            "baseline": self.backends()[0],
            "ratios_over_baseline": {
                f: {str(b): v for b, v in self.ratios(fast=f).items()} for f in self.backends()[1:]
            },
            "ratios_over_baseline_best_runs": {
                f: {str(b): v for b, v in self.ratios(fast=f, best=True).items()} for f in self.backends()[1:]
            },
        }


def cached_bundle(opts: BenchOptions, precision: str = "fp32") -> Bundle:
    """``opts.bundle``, or the preset exported once into OUT/bundles/<model>-seed<seed>[-precision]."""
    if opts.bundle is not None and precision == "fp32":
        return Bundle.open(opts.bundle)
    if opts.bundle is not None:
        raise ValueError(f"--bundle gives one precision; {precision!r} variants need --model")
    suffix = "" if precision == "fp32" else f"-{precision}"
    root = Path(opts.out) / "bundles" / f"{opts.model}-seed{opts.seed}{suffix}"
    if (root / MANIFEST_FILE).is_file():
        try:
            return Bundle.open(root)
        except BundleError as e:
            print(f"re-exporting: {e}", file=sys.stderr)
    from export.api import ExportOptions, export_bundle

    print(
        f"exporting {opts.model} {precision} (seed {opts.seed}) to {root} (cached for later runs) ...",
        file=sys.stderr,
    )
    return export_bundle(
        ExportOptions(
            model=opts.model,
            out=root,
            seed=opts.seed,
            precision=precision,
            reference=precision == "fp32",
            quiet=True,
        )
    )


def _environment(threads: int) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "processor": platform.processor(),
    }
    for mod in ("numpy", "onnxruntime", "torch", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return env


def run_bench(opts: BenchOptions, bundle: Bundle | None = None) -> BenchResult:
    """Measure every (backend, batch) ``opts.repeats`` times, backends interleaved; medians."""
    from serving.backends import BackendOptions, create_backend
    from serving.generation import Generator
    from serving.tokenizer import Tokenizer

    bundle = bundle or cached_bundle(opts)
    if opts.prompt_len + opts.new_tokens > bundle.dims.n_positions:
        raise ValueError(
            f"prompt_len + new_tokens = {opts.prompt_len + opts.new_tokens} exceeds the "
            f"model's {bundle.dims.n_positions} positions"
        )
    threads = opts.threads or os.cpu_count() or 1
    tokenizer = Tokenizer.from_dir(bundle.tokenizer_dir)
    labels = opts.backends or (
        ["torch", "onnxruntime"] if opts.bundle is not None else ["torch", "onnxruntime", "onnxruntime:int8"]
    )
    backends = {}
    for label in labels:
        name, _, precision = label.partition(":")
        b = (
            bundle
            if not precision or precision == bundle.manifest.precision
            else cached_bundle(opts, precision)
        )
        backends[label] = create_backend(name, b, BackendOptions(threads=threads)).load()
    try:
        gens = {n: Generator(b, tokenizer) for n, b in backends.items()}
        rng = np.random.default_rng(opts.seed)
        prompts = {
            b: rng.integers(0, bundle.dims.vocab_size - 1, (b, opts.prompt_len)).tolist()
            for b in opts.batches
        }
        for g in gens.values():  # warm-up: session/kernel initialization is not what we measure
            g.run_batch(prompts[opts.batches[0]], min(4, opts.new_tokens), stop_at_eos=False)
        samples: dict[tuple[str, int], list[tuple[float, float]]] = {}
        for _ in range(opts.repeats):
            for b in opts.batches:
                for name, g in gens.items():
                    r = g.run_batch(prompts[b], opts.new_tokens, stop_at_eos=False)
                    step = statistics.median(r.step_s) if r.step_s else float("nan")
                    samples.setdefault((name, b), []).append((r.prefill_s, step))
        rows = []
        for (name, b), runs in samples.items():
            prefill = statistics.median(p for p, _ in runs) * 1e3
            step = statistics.median(s for _, s in runs) * 1e3
            rows.append(
                BenchRow(
                    name,
                    b,
                    prefill,
                    step,
                    step / b,
                    1e3 * b / step,
                    len(runs),
                    min(p for p, _ in runs) * 1e3,
                    min(s for _, s in runs) * 1e3,
                )
            )
        rows.sort(key=lambda r: (r.batch, labels.index(r.backend)))
    finally:
        for be in backends.values():
            be.close()
    o = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}
    o["bundle"] = str(bundle.root)
    o["model_name"] = bundle.name
    return BenchResult(options=o, environment=_environment(threads), rows=rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serving.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--model", default="gpt2-124m", help="preset to export (random weights)")
    ap.add_argument("--bundle", type=Path, default=None, help="benchmark this bundle instead")
    ap.add_argument(
        "--backends",
        default=None,
        help="comma-separated; name:precision runs a precision variant of the preset; the "
        "first is the baseline (default: torch,onnxruntime,onnxruntime:int8; without "
        "the int8 variant with --bundle)",
    )
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    opts = BenchOptions(
        out=a.out,
        model=a.model,
        bundle=a.bundle,
        backends=a.backends.split(",") if a.backends else None,
        batches=[int(b) for b in a.batches.split(",")],
        prompt_len=a.prompt_len,
        new_tokens=a.new_tokens,
        repeats=a.repeats,
        threads=a.threads,
    )
    t0 = time.perf_counter()
    result = run_bench(opts)
    print(
        f"decode benchmark: {result.options['model_name']} ({result.options['bundle']}), prompt "
        f"{opts.prompt_len} tokens, {opts.new_tokens} new tokens, {result.environment['threads']} threads, "
        f"median of {opts.repeats}"
    )
    print(result.table())
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"bench-decode-{result.options['model_name']}.json"
    path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    print(f"wrote {path} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
