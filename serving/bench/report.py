"""The benchmark's report: machine description, the stdout table, and the PNG plots (matplotlib)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from serving.bench.core import BASELINE, BenchResult

# ISA features that decide which kernels the runtimes pick (int8 dot products above all)
ISA_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)


def _cpuinfo() -> tuple[str | None, set[str]]:
    model: str | None = None
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model is None:
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return model or platform.processor() or None, flags


def machine_info(threads: int) -> dict[str, Any]:
    """CPU model, ISA flags, cores, threads used, memory, load, OS and library versions."""
    from serving.bench.systems import info_versions

    model, flags = _cpuinfo()
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "cpu": model,
        "isa": [f for f in ISA_FLAGS if f in flags],
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "memory_gib": round(mem, 1) if mem else None,
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": info_versions(),
    }


def _f(v: float | None, fmt: str) -> str:
    return "–" if v is None or v != v else format(v, fmt)


def table(result: BenchResult) -> str:
    """Markdown table: one row per (system, batch), with its speed-up over transformers' generate
    and its parity (max|Δlogits| / top-1 vs transformers, greedy tokens matched)."""
    o = result.options
    lines = [
        f"| system | B | prefill ms ({o['prompt_len']} tok) | decode ms/step | best | ms/token | tokens/s | "
        f"vs generate | max\\|Δlogits\\| / top-1 | greedy match | model MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result.rows:
        parity = (
            "reference"
            if r.system == BASELINE
            else (
                "–"
                if r.max_abs_logits is None
                else f"{r.max_abs_logits:.2g} / {r.top1_agreement:.1%}"
                + ("" if r.parity_passed else f" (FAIL {r.tolerance})")
            )
        )
        lines.append(
            f"| {r.system} | {r.batch} | {_f(r.prefill_ms, '.1f')} | {_f(r.step_ms, '.2f')} | "
            f"{_f(r.step_ms_best, '.2f')} | {_f(r.ms_per_token, '.2f')} | {_f(r.tokens_per_s, '.1f')} | "
            f"{_f(r.speedup_vs_generate, '.2f')}× | {parity} | "
            f"{'–' if r.greedy_match is None else f'{r.greedy_match:.0%}'} | {_f(r.model_mb, '.0f')} |"
        )
    out = ["\n".join(lines)]
    if result.streams:
        s_lines = [
            "| served | streams | tokens/s (all streams) | time between tokens p50 / p99 ms | "
            "time to first token p50 / p99 ms | failed |",
            "|---|---|---|---|---|---|",
        ]
        for s in result.streams:
            s_lines.append(
                f"| {s.system} | {s.streams} | {s.tokens_per_s:.1f} | "
                f"{s.tbt_p50_ms:.1f} / {s.tbt_p99_ms:.1f} | "
                f"{s.ttft_p50_ms:.0f} / {s.ttft_p99_ms:.0f} | {s.errors} |"
            )
        out.append("\n".join(s_lines))
    skips = [s.line() for s in (*result.skipped, *result.stream_skipped)]
    if skips:
        out.append("\n".join(skips))
    goal = result.int4_goal()
    if goal is not None:

        def peer(v: dict | None) -> str:
            if v is None:
                return "not measured"
            return f"{v['ms']:.2f} ms ({'behind' if v['int4_ahead'] else 'ahead of'} int4)"

        peers = ", ".join(f"{k} {peer(v)}" for k, v in goal["peers"].items())
        out.append(
            f"int4 goal (B=1 decode): int4 {goal['int4_ms']:.2f} ms = {goal['int4_over_int8']:.2f}x int8 "
            f"{goal['int8_ms']:.2f} ms (target <= 0.65x; best runs {goal['int4_over_int8_best']:.2f}x); "
            f"{peers}: {'MET' if goal['met'] else 'NOT MET'}"
        )
    return "\n\n".join(out)


def _load(machine: dict[str, Any]) -> str:
    start, end = machine.get("loadavg_start"), machine.get("loadavg_end")
    return f"{start[0]:.1f} -> {end[0]:.1f}" if start and end else "unknown"


def plots(result: BenchResult, out: Path) -> list[str]:
    """Write the plots; returns their paths. Needs matplotlib (the ``bench`` and ``dev`` extras)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    name = result.options["model_name"]
    written = []
    batches = sorted({r.batch for r in result.rows})
    systems = list(dict.fromkeys(r.system for r in result.rows))
    colors = {"baseline": "#7f7f7f", "project": "#1f77b4", "peer": "#ff7f0e"}
    fig, axes = plt.subplots(
        1, len(batches), figsize=(6.2 * len(batches), 0.45 * len(systems) + 1.8), squeeze=False
    )
    for ax, b in zip(axes[0], batches):
        found = [(s, result.row(s, b)) for s in systems]
        labels = [s for s, r in found if r is not None]
        rows = [r for _, r in found if r is not None]
        y = range(len(rows))
        ax.barh(y, [r.step_ms for r in rows], color=[colors.get(r.kind, "#2ca02c") for r in rows])
        ax.scatter(
            [r.step_ms_best for r in rows], y, marker="|", color="black", s=120, zorder=3, label="best run"
        )
        for i, r in enumerate(rows):
            acc = (
                "" if r.top1_agreement is None or r.system == BASELINE else f"  top-1 {r.top1_agreement:.0%}"
            )
            ax.text(r.step_ms, i, f" {r.step_ms:.1f}{acc}", va="center", fontsize=8)
        ax.set_yticks(list(y), labels)
        ax.invert_yaxis()
        ax.set_xlabel("decode: ms between tokens (median over rounds)")
        ax.set_title(f"B={b}")
        ax.set_xlim(0, max(r.step_ms for r in rows) * 1.45)
        handles = [Patch(color=c, label=k) for k, c in colors.items() if any(r.kind == k for r in rows)]
        handles.append(ax.collections[-1])
        ax.legend(handles=handles, loc="lower right", fontsize=8)
    m = result.machine
    fig.suptitle(
        f"{name}: {result.options['prompt_len']}-token prompt, {result.options['new_tokens']} greedy tokens, "
        f"{m.get('threads')} threads, {m.get('cpu') or 'CPU'}; load {_load(m)}",
        fontsize=9,
    )
    fig.tight_layout()
    path = out / f"bench-latency-{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(str(path))

    if result.streams:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for i, system in enumerate(dict.fromkeys(s.system for s in result.streams)):
            srows = [s for s in result.streams if s.system == system]
            n = [s.streams for s in srows]
            c = f"C{i}"
            ax1.plot(n, [s.tokens_per_s for s in srows], marker="o", color=c, label=system)
            ax2.plot(n, [s.tbt_p50_ms for s in srows], marker="o", color=c, label=f"{system} p50")
            ax2.plot(
                n, [s.tbt_p99_ms for s in srows], marker="x", color=c, linestyle="--", label=f"{system} p99"
            )
        for ax in (ax1, ax2):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent gRPC streams")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        ax1.set_ylabel("tokens/s (all streams)")
        ax2.set_ylabel("ms between tokens (per stream)")
        fig.suptitle(
            f"{name}: gpt2-deploy server, {result.options['stream_tokens']} tokens per stream; "
            f"load {_load(m)}",
            fontsize=9,
        )
        fig.tight_layout()
        path = out / f"bench-streams-{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written
