"""The concurrent-streams scenario: N gRPC clients generating at once against one real server.

The server is a ``gpt2-deploy serve`` process on a free loopback port, as it is deployed (a
server in the benchmark's own process would share its interpreter lock with the clients), and
each client is the project's ``Gpt2DeployClient`` (its own channel), all started together; every
streamed message is stamped on arrival. Reported per N: aggregate tokens/s (all tokens over the
wall time from the first request to the last token), time between tokens (p50/p99 over every
stream's gaps) and time to first token (p50/p99).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from export.manifest import Bundle
from serving.bench.core import Progress, StreamRow
from serving.server import free_port


@dataclass
class _Stream:
    start: float = 0.0
    stamps: list[tuple[float, int]] = field(default_factory=list)  # (arrival, tokens in the message)
    error: str | None = None


def _one_pass(clients: list, prompts: list[list[int]], new_tokens: int) -> list[_Stream]:
    streams = [_Stream() for _ in clients]
    barrier = threading.Barrier(len(clients))

    def run(i: int) -> None:
        s = streams[i]
        try:
            barrier.wait(timeout=60)
            s.start = time.perf_counter()
            call = clients[i].generate(prompts[i % len(prompts)], max_new_tokens=new_tokens, ignore_eos=True)
            for msg in call:
                if msg.token_ids:
                    s.stamps.append((time.perf_counter(), len(msg.token_ids)))
        except Exception as e:  # noqa: BLE001 - a failed stream is counted, not fatal
            s.error = f"{type(e).__name__}: {e}"

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return streams


def summarize(system: str, streams: list[_Stream]) -> StreamRow:
    """Aggregate tokens/s, time-between-tokens and time-to-first-token percentiles of one pass."""
    ok = [s for s in streams if s.error is None and s.stamps]
    tokens = sum(n for s in ok for _, n in s.stamps)
    gaps, ttft = [], []
    for s in ok:
        ttft.append(s.stamps[0][0] - s.start)
        for (a, _), (b, n) in zip(s.stamps, s.stamps[1:]):
            gaps.extend([(b - a) / n] * n)  # a message with n tokens: n equal gaps
    wall = (max(s.stamps[-1][0] for s in ok) - min(s.start for s in ok)) if ok else float("nan")

    def pct(values: list[float], q: float) -> float:
        return float(np.percentile(values, q) * 1e3) if values else float("nan")

    return StreamRow(
        system=system,
        streams=len(streams),
        tokens=tokens,
        wall_s=wall,
        tokens_per_s=tokens / wall if ok and wall > 0 else 0.0,
        tbt_p50_ms=pct(gaps, 50),
        tbt_p99_ms=pct(gaps, 99),
        ttft_p50_ms=pct(ttft, 50),
        ttft_p99_ms=pct(ttft, 99),
        errors=len(streams) - len(ok),
    )


def run_streams(
    label: str,
    bundle: Bundle,
    counts: list[int],
    new_tokens: int,
    prompts: list[list[int]],
    threads: int,
    rounds: int,
    progress: Progress,
) -> list[StreamRow]:
    """Serve ``bundle`` with the ``label``'s backend and run every client count ``rounds`` times
    (the best pass by aggregate tokens/s is kept)."""
    from serving.client import Gpt2DeployClient

    backend = label.partition(":")[0]
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serving.cli",
            "serve",
            str(bundle.root),
            "--backend",
            backend,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--parity",
            "off",
            "--threads",
            str(threads),
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.DEVNULL,
    )
    rows = []
    clients = [Gpt2DeployClient(f"127.0.0.1:{port}", timeout=600) for _ in range(max(counts))]
    try:
        clients[0].wait_until_serving(timeout=300, alive=lambda: server.poll() is None)
        _one_pass(clients[:1], prompts, min(4, new_tokens))  # warm-up
        for n in counts:
            passes = []
            for r in range(rounds):
                progress(f"streams: {label} {n} concurrent x {new_tokens} tokens (pass {r + 1}/{rounds}) ...")
                passes.append(summarize(label, _one_pass(clients[:n], prompts, new_tokens)))
            best = max(passes, key=lambda row: row.tokens_per_s)
            progress(
                f"streams: {label} x{n}: {best.tokens_per_s:.1f} tok/s, time between tokens p50 "
                f"{best.tbt_p50_ms:.1f} ms / p99 {best.tbt_p99_ms:.1f} ms, "
                f"TTFT p50 {best.ttft_p50_ms:.0f} ms" + (f", {best.errors} failed" if best.errors else "")
            )
            rows.append(best)
    finally:
        for c in clients:
            c.close()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    return rows
