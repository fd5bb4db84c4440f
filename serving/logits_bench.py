"""Prefill with the serving graph (the lm_head on the last position only) against ``model.onnx``
(the lm_head on every position, then the last one taken on the host), and what each way of loading
the graphs holds in memory.

    python -m serving.logits_bench BUNDLE [--batch 1 --batch 8] [--prompt 32] [--repeats 9] [--out DIR]

Prefill: both ONNX Runtime backends in one process (worker threads not spinning), timed in
interleaved rounds (medians of wall and CPU time). Memory: each configuration loaded in a fresh
process (RSS after one prefill and a few decode steps). Exits 1 when the serving backend's RSS
exceeds ``--rss-bound`` times that of the ``model.onnx`` backend (the weights must not be held
twice). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from export.manifest import Bundle
from serving.backends import BackendOptions, create_backend

# How each configuration loads: the backends' serving_graph switch, and how many of them.
MEMORY_CONFIGS = {
    "model.onnx (1 session)": ["off"],
    "serving graph (1 session)": ["on"],
    "both graphs (2 sessions)": ["off", "on"],
}


def _status() -> dict[str, float]:
    """VmRSS, RssAnon, RssFile and VmHWM of this process, in MiB (Linux)."""
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def _prompt(batch: int, seq: int, vocab: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    ids = np.random.default_rng(seed).integers(0, vocab, (batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    return ids, mask, np.tile(np.arange(seq, dtype=np.int64), (batch, 1))


def _backend(bundle: Bundle, serving_graph: str, threads: int | None):
    # no busy-waiting worker threads: CPU time then counts work, which a shared machine leaves
    # comparable between rounds when wall time is not
    opts = BackendOptions(threads=threads, extra={"serving_graph": serving_graph, "allow_spinning": "0"})
    return create_backend("onnxruntime", bundle, opts).load()


def measure_memory(bundle: Bundle, config: str, threads: int | None, prompt: int) -> dict[str, Any]:
    """In this process: load ``config``'s backends, prefill B=8 and decode 4 steps on each, report RSS."""
    before = _status()
    backends = [_backend(bundle, sg, threads) for sg in MEMORY_CONFIGS[config]]
    loaded = _status()
    ids, mask, pos = _prompt(8, prompt, bundle.dims.vocab_size)
    for b in backends:
        out = b.forward(ids, mask, pos, last_only=True)
        for t in range(4):
            m = np.ones((8, prompt + t + 1), dtype=np.int64)
            out = b.forward(ids[:, :1], m, np.full((8, 1), prompt + t), out.present, last_only=True)
    ran = _status()
    return {"config": config, "sessions": len(backends), "start": before, "loaded": loaded, "ran": ran}


def _memory_in_subprocess(bundle: Path, config: str, threads: int | None, prompt: int) -> dict[str, Any]:
    argv = [sys.executable, "-m", "serving.logits_bench", str(bundle), "--memory-config", config]
    argv += ["--prompt", str(prompt)] + (["--threads", str(threads)] if threads else [])
    proc = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=900)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_prefill(
    bundle: Bundle, batches: list[int], prompt: int, repeats: int, threads: int | None
) -> list[dict[str, Any]]:
    """Interleaved rounds over (batch, graph, logits) cases; medians of wall and CPU time."""
    backends = {
        "model.onnx": _backend(bundle, "off", threads),
        "serving graph": _backend(bundle, "on", threads),
    }
    cases = [(b, graph, last_only) for b in batches for last_only in (True, False) for graph in backends]
    feeds = {b: _prompt(b, prompt, bundle.dims.vocab_size, seed=b) for b in batches}
    times: dict[tuple, tuple[list[float], list[float]]] = {c: ([], []) for c in cases}
    for c in cases:  # warm-up: first runs allocate and tune
        backends[c[1]].forward(*feeds[c[0]], last_only=c[2])
    for _ in range(repeats):
        for c in cases:
            b, graph, last_only = c
            t, cpu = time.perf_counter(), time.process_time()
            out = backends[graph].forward(*feeds[b], last_only=last_only)
            times[c][0].append(time.perf_counter() - t)
            times[c][1].append(time.process_time() - cpu)
            assert out.logits.shape[1] == (1 if last_only else prompt)
    for be in backends.values():
        be.close()
    return [
        {
            "batch": b,
            "prompt": prompt,
            "graph": graph,
            "logits": "last position" if last_only else "every position",
            "wall_ms_median": 1e3 * statistics.median(times[(b, graph, last_only)][0]),
            "wall_ms_min": 1e3 * min(times[(b, graph, last_only)][0]),
            "cpu_ms_median": 1e3 * statistics.median(times[(b, graph, last_only)][1]),
            "repeats": repeats,
        }
        for b, graph, last_only in cases
    ]


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serving.logits_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--batch", type=int, action="append", help="prefill batch sizes (default 1 and 8)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    ap.add_argument("--repeats", type=int, default=9, help="interleaved rounds (default 9)")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    ap.add_argument("--rss-bound", type=float, default=1.15, help="max RSS ratio serving / model.onnx")
    ap.add_argument("--out", type=Path, default=None, help="directory for logits-bench.json")
    ap.add_argument("--memory-config", choices=list(MEMORY_CONFIGS), help=argparse.SUPPRESS)
    ap.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    args = ap.parse_args(argv)
    bundle = Bundle.open(args.bundle, verify_hashes=False)
    if args.memory_config:  # the child process of measure_memory
        print(json.dumps(measure_memory(bundle, args.memory_config, args.threads, args.prompt)))
        return 0
    if bundle.manifest.serving is None:
        print(
            f"error: {args.bundle} has no serving graph (exported before it existed): re-export it",
            file=sys.stderr,
        )
        return 2
    load_before = _uptime()
    prefill = time_prefill(bundle, args.batch or [1, 8], args.prompt, args.repeats, args.threads)
    memory = (
        []
        if args.no_memory
        else [_memory_in_subprocess(args.bundle, c, args.threads, args.prompt) for c in MEMORY_CONFIGS]
    )
    load_after = _uptime()

    print(f"{bundle.name} ({bundle.manifest.precision}), ONNX Runtime CPU; uptime before: {load_before}")
    print(f"{'batch':>5} {'logits':<15} {'graph':<14} {'wall median':>12} {'wall min':>9} {'cpu median':>11}")
    for r in prefill:
        print(
            f"{r['batch']:>5} {r['logits']:<15} {r['graph']:<14} {r['wall_ms_median']:>9.1f} ms "
            f"{r['wall_ms_min']:>6.1f} ms {r['cpu_ms_median']:>8.1f} ms"
        )
    for b in sorted({r["batch"] for r in prefill}):
        get = {(r["graph"], r["logits"]): r for r in prefill if r["batch"] == b}
        old, new = get[("model.onnx", "last position")], get[("serving graph", "last position")]
        print(
            f"B={b}: generation prefill {old['wall_ms_median']:.1f} -> {new['wall_ms_median']:.1f} ms wall "
            f"({old['wall_ms_median'] / new['wall_ms_median']:.2f}x), {old['cpu_ms_median']:.1f} -> "
            f"{new['cpu_ms_median']:.1f} ms CPU ({old['cpu_ms_median'] / new['cpu_ms_median']:.2f}x)"
        )
    failed = False
    if memory:
        print(f"{'memory':<28} {'RSS loaded':>11} {'RSS after runs':>15} {'anon':>8} {'peak':>8}")
        for m in memory:
            ld, rn = m["loaded"], m["ran"]
            print(
                f"{m['config']:<28} {ld['VmRSS']:>7.0f} MiB {rn['VmRSS']:>11.0f} MiB "
                f"{rn['RssAnon']:>4.0f} MiB {rn['VmHWM']:>4.0f} MiB"
            )
        rss = {m["config"]: m["ran"]["VmRSS"] for m in memory}
        ratio = rss["serving graph (1 session)"] / rss["model.onnx (1 session)"]
        failed = ratio > args.rss_bound
        print(
            f"RSS serving graph / model.onnx: {ratio:.2f} (bound {args.rss_bound}): "
            f"{'FAIL' if failed else 'ok'}; two sessions: "
            f"{rss['both graphs (2 sessions)'] / rss['model.onnx (1 session)']:.2f}"
        )
    print(f"uptime after: {load_after}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        result = {
            "bundle": str(args.bundle),
            "precision": bundle.manifest.precision,
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": sys.version.split()[0],
            },
            "uptime_before": load_before,
            "uptime_after": load_after,
            "prefill": prefill,
            "memory": memory,
            "rss_bound": args.rss_bound,
            "rss_ok": not failed,
        }
        (args.out / "logits-bench.json").write_text(json.dumps(result, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
