"""``run_bench``: prepare every system, time them in interleaved rounds, check parity, run the streams."""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path

from export.manifest import Bundle
from serving.bench.core import (
    BASELINE,
    BenchOptions,
    BenchResult,
    Progress,
    Row,
    Run,
    Skip,
    StreamRow,
    prefix_match,
)
from serving.bench.report import machine_info
from serving.bench.systems import Context, Skipped, System, make_system


def _prepare(systems: list[System], progress: Progress) -> tuple[list[System], list[Skip]]:
    ready, skipped = [], []
    for s in systems:
        progress(f"preparing {s.label} ...")
        try:
            s.prepare()
            s.load()
            ready.append(s)
        except Skipped as e:
            s.close()
            skipped.append(Skip(s.label, e.reason, e.install))
            progress(skipped[-1].line())
    return ready, skipped


def run_bench(opts: BenchOptions, bundle: Bundle | None = None) -> BenchResult:
    """Measure every (system, batch) once per round, systems interleaved (rotated each round).

    Args:
        opts: What to measure.
        bundle: The fp32 bundle to use (else ``opts.bundle`` or the exported preset).
    """
    opts.check()
    t_start = time.perf_counter()
    progress = Progress(opts.progress)
    machine = machine_info(opts.threads_used)
    ctx = Context(opts, progress, bundle)
    dims = ctx.bundle.dims
    if opts.prompt_len + opts.new_tokens > dims.n_positions:
        raise ValueError(
            f"prompt_len + new_tokens = {opts.prompt_len + opts.new_tokens} exceeds the "
            f"model's {dims.n_positions} positions"
        )
    from serving.bench.core import prompts_for

    ctx.prompts = prompts_for(opts, dims.vocab_size)
    systems = [make_system(label, ctx) for label in dict.fromkeys(opts.systems)]
    ready, skipped = _prepare(systems, progress)
    runs: dict[tuple[str, int], list[Run]] = {}
    rows: list[Row] = []
    try:
        for s in ready:  # warm-up: sessions, kernels, caches are not what is measured
            progress(f"warm-up {s.label} ...")
            for b in opts.batches:
                if s.supports(b) is None:
                    s.generate(ctx.prompts[:b], min(4, opts.new_tokens))
        for r in range(opts.rounds):
            order = ready[r % len(ready) :] + ready[: r % len(ready)] if ready else []
            for b in opts.batches:
                for s in order:
                    if s.supports(b) is not None:
                        continue
                    run = s.generate(ctx.prompts[:b], opts.new_tokens)
                    runs.setdefault((s.label, b), []).append(run)
                    progress(
                        f"round {r + 1}/{opts.rounds} B={b} {s.label}: prefill {run.prefill_s * 1e3:.1f} ms, "
                        f"decode {run.step_median_s * 1e3:.2f} ms/step"
                    )
        for s in ready:
            for b in opts.batches:
                why = s.supports(b)
                if why is not None:
                    skipped.append(Skip(f"{s.label} B={b}", why))
        progress("parity: transformers' greedy tokens and logits along them ...")
        parity = {}
        for s in ready:
            progress(f"parity {s.label} ...")
            parity[s.label] = s.parity()
        for s in ready:
            for b in opts.batches:
                if (s.label, b) not in runs:
                    continue
                row = Row.from_runs(s.label, s.kind, b, runs[(s.label, b)])
                p = parity[s.label]
                row.max_abs_logits, row.top1_agreement = p.max_abs_logits, p.top1_agreement
                row.parity_passed, row.tolerance = p.passed, p.tolerance
                ref = ctx.reference_tokens(b)
                got = runs[(s.label, b)][0].tokens
                row.greedy_match = prefix_match(got, ref)
                row.greedy_exact = got == ref
                info = s.info()
                row.model_mb = info.get("model_mb")
                rows.append(row)
        infos = {s.label: s.info() for s in ready}
        for label, p in parity.items():
            infos[label]["parity"] = asdict(p)
    finally:
        for s in ready:
            s.close()
    base = {r.batch: r for r in rows if r.system == BASELINE}
    for row in rows:
        baseline = base.get(row.batch)
        if baseline is not None:
            row.speedup_vs_generate = baseline.step_ms / row.step_ms
            row.speedup_vs_generate_best = baseline.step_ms_best / row.step_ms_best
    rank = {label: i for i, label in enumerate(opts.systems)}
    rows.sort(key=lambda r: (r.batch, rank.get(r.system, 99)))

    stream_rows: list[StreamRow] = []
    stream_skipped: list[Skip] = []
    if opts.streams:
        from serving.bench.streams import run_streams

        for label in opts.stream_systems:
            precision = label.partition(":")[2] or "fp32"
            try:
                served = ctx.bundle if precision == "fp32" else ctx.variant_bundle(precision)
                stream_rows += run_streams(
                    label,
                    served,
                    opts.streams,
                    opts.stream_tokens,
                    ctx.prompts,
                    opts.threads_used,
                    opts.stream_rounds,
                    progress,
                )
            except Skipped as e:
                stream_skipped.append(Skip(f"streams {label}", e.reason, e.install))
    ctx.close()

    o = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}
    o["bundle"] = str(ctx.bundle.root)
    o["model_name"] = ctx.bundle.name
    machine["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return BenchResult(
        options=o,
        machine=machine,
        systems=infos,
        rows=rows,
        skipped=skipped,
        streams=stream_rows,
        stream_skipped=stream_skipped,
        duration_s=time.perf_counter() - t_start,
    )
