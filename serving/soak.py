"""``python -m serving.soak``: mixed traffic for minutes against a real ``gpt2-deploy serve`` process.

    python -m serving.soak --streams 16 --minutes 10              # make soak STREAMS=16 MINUTES=10
    python -m serving.soak --streams 4 --minutes 0.5 --bundle bundles/tiny --out /tmp/soak

The server runs as a subprocess on a free port (the tiny preset, exported once into OUT/bundles,
unless ``--bundle``). N client threads, each on its own channel, keep requests going: greedy and
sampled generations (temperature / top-k / top-p, seeded), KServe streaming generations, Score,
clients that cancel mid-stream or set a short deadline, and bad requests of every kind. Reported:
outcomes by status code (expected or not), the server's RSS over time (start, after warm-up, peak,
end), tokens/s over time, health latency; a table on stdout, OUT/soak.json, OUT/soak.png (with
matplotlib) and the server's log in OUT/soak-server.log.

Exit 0 when the goal is met, 1 when it is missed, 2 when the soak could not run. The goal: no
unexpected outcome (INTERNAL or UNKNOWN anywhere, an error on a valid request, a bad request
answered with another code than its own), no ERROR line in the server log, RSS at the end under
load within ``--rss-tolerance`` (10%) above its level after warm-up, and a clean exit on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from export.errors import OptionsError

PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "def fibonacci(n):\n    return",
    "Once upon a time, in a land far away,",
    "Résumé: naïve café — 東京 😀",
]
CALL_TIMEOUT_S = 120.0  # a valid request that takes longer counts as a stall (unexpected)
STOP_TIMEOUT_S = 60.0
# Action -> weight in the mix.
MIX = {
    "greedy": 30,
    "sampled": 25,
    "kserve-stream": 10,
    "score": 5,
    "cancel": 10,
    "deadline": 8,
    "bad": 12,
}
OK = "OK"


@dataclass(frozen=True)
class SoakOptions:
    """What to run.

    Args:
        streams: Concurrent client threads, each on its own channel.
        minutes: How long the load runs.
        out: Results directory (JSON, PNG, server log; the exported bundle in OUT/bundles).
        bundle: Serve this bundle instead of exporting the tiny preset.
        backend: The served backend.
        threads: Backend intra-op threads (None: the runtime decides).
        warmup_s: RSS after warm-up is measured at this point (None: 20% of the run, 5-120 s).
        sample_s: Seconds between RSS samples (None: the run / 300, 0.5-5 s).
        rss_tolerance: RSS at the end may be this fraction above its level after warm-up.
        seed: Seeds every client's choices.
        plot: Write OUT/soak.png (needs matplotlib).
        serve_args: Extra ``gpt2-deploy serve`` arguments.
    """

    streams: int = 16
    minutes: float = 10.0
    out: Path = Path("bench-results/soak")
    bundle: Path | None = None
    backend: str = "onnxruntime"
    threads: int | None = None
    warmup_s: float | None = None
    sample_s: float | None = None
    rss_tolerance: float = 0.10
    seed: int = 0
    plot: bool = True
    serve_args: tuple[str, ...] = ()

    @property
    def duration_s(self) -> float:
        return self.minutes * 60.0

    @property
    def warmup(self) -> float:
        return self.warmup_s if self.warmup_s is not None else min(120.0, max(5.0, 0.2 * self.duration_s))

    @property
    def sample(self) -> float:
        return self.sample_s if self.sample_s is not None else min(5.0, max(0.5, self.duration_s / 300))

    @property
    def window_s(self) -> float:
        """RSS levels are the median of the samples in a window this long."""
        return min(30.0, max(3 * self.sample, self.duration_s / 10))

    def check(self) -> None:
        problems = []
        if not 1 <= self.streams <= 1024:
            problems.append(f"streams must be in [1, 1024], got {self.streams}")
        if not 0.1 <= self.minutes <= 24 * 60:
            problems.append(f"minutes must be in [0.1, 1440], got {self.minutes}")
        if not 0 < self.warmup < self.duration_s - self.window_s:
            problems.append(
                f"warm-up ({self.warmup:g} s) must end before the last RSS window "
                f"({self.window_s:g} s) of the run ({self.duration_s:g} s)"
            )
        if not 0.1 <= self.sample <= 60:
            problems.append(f"sample_s must be in [0.1, 60], got {self.sample}")
        if not 0 <= self.rss_tolerance <= 10:
            problems.append(f"rss_tolerance must be in [0, 10], got {self.rss_tolerance}")
        if self.bundle is not None and not Path(self.bundle).is_dir():
            problems.append(f"bundle {str(self.bundle)!r} is not a directory")
        if problems:
            raise OptionsError("invalid soak options: " + "; ".join(problems))


# --- outcomes --------------------------------------------------------------------------------
@dataclass
class Outcome:
    action: str
    code: str  # "OK" or a status code name
    expected: bool
    detail: str = ""


@dataclass
class Stats:
    """Outcomes and streamed tokens, shared by the client threads."""

    counts: Counter = field(default_factory=Counter)  # (action, code, expected) -> n
    unexpected: list[dict] = field(default_factory=list)  # the first few, with their messages
    tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_tokens(self, n: int) -> None:
        with self.lock:
            self.tokens += n

    def record(self, o: Outcome) -> None:
        with self.lock:
            self.counts[(o.action, o.code, o.expected)] += 1
            if not o.expected and len(self.unexpected) < 50:
                self.unexpected.append({"action": o.action, "code": o.code, "detail": o.detail[:500]})


def _code_of(e: grpc.RpcError) -> tuple[str, str]:
    return e.code().name, (e.details() or "")


def _call(action: str, allowed: set[str], fn: Callable[[], Any]) -> Outcome:
    """Run ``fn``; the outcome is OK or the status it failed with, expected when in ``allowed``."""
    try:
        fn()
    except grpc.RpcError as e:
        code, details = _code_of(e)
        ok = code in allowed and code not in ("INTERNAL", "UNKNOWN") and bool(details.strip())
        ok = ok and len(details.encode()) < 4096
        return Outcome(action, code, ok, details)
    return Outcome(action, OK, OK in allowed)


# --- the client side -------------------------------------------------------------------------
class Traffic:
    """The requests one client thread sends (its own channel and random stream)."""

    def __init__(self, address: str, index: int, opts: SoakOptions, stats: Stats, dims: dict[str, Any]):
        from serving.client import Gpt2DeployClient
        from serving.proto import grpc_service_pb2_grpc as kgrpc

        self.client = Gpt2DeployClient(address, timeout=CALL_TIMEOUT_S)
        self.kserve = kgrpc.GRPCInferenceServiceStub(self.client.channel)
        self.rng = random.Random(opts.seed * 100_003 + index)
        self.stats = stats
        self.vocab = dims["vocab_size"]
        self.context = dims["n_positions"]
        self.model = dims["name"]
        self.bad = self._bad_requests()

    def close(self) -> None:
        self.client.close()

    def step(self) -> Outcome:
        action = self.rng.choices(list(MIX), weights=list(MIX.values()))[0]
        return getattr(self, "_" + action.replace("-", "_"))()

    def _prompt(self) -> str | list[int]:
        if self.rng.random() < 0.3:
            return [self.rng.randrange(self.vocab) for _ in range(self.rng.randint(1, 48))]
        return self.rng.choice(PROMPTS)

    def _stream(self, call, cancel_after: int | None = None) -> None:
        for i, message in enumerate(call):
            self.stats.add_tokens(len(message.token_ids))
            if cancel_after is not None and i + 1 >= cancel_after:
                call.cancel()

    # --- valid requests
    def _greedy(self) -> Outcome:
        call = self.client.generate(
            self._prompt(), max_new_tokens=self.rng.randint(8, 64), ignore_eos=self.rng.random() < 0.5
        )
        return _call("greedy", {OK}, lambda: self._stream(call))

    def _sampled(self) -> Outcome:
        rng = self.rng
        call = self.client.generate(
            self._prompt(),
            max_new_tokens=rng.randint(8, 64),
            temperature=rng.choice([0.7, 1.0, 1.3]),
            top_k=rng.choice([None, 20, 50]),
            top_p=rng.choice([None, 0.9, 0.95]),
            seed=rng.randrange(2**32),
            stop=["\n\n"] if rng.random() < 0.3 else (),
            ignore_eos=rng.random() < 0.5,
        )
        return _call("sampled", {OK}, lambda: self._stream(call))

    def _kserve_stream(self) -> Outcome:
        from serving.proto import grpc_service_pb2 as kpb

        rng = self.rng
        inputs = [
            _bytes_input("text_input", rng.choice(PROMPTS).encode()),
            _typed("max_tokens", "INT32", int_contents=[rng.randint(8, 48)]),
            _typed("stream", "BOOL", bool_contents=[True]),
            _typed("temperature", "FP32", fp32_contents=[rng.choice([0.0, 0.8])]),
            _typed("random_seed", "UINT64", uint64_contents=[rng.randrange(2**63)]),
        ]
        request = kpb.ModelInferRequest(model_name=self.model + "-generate", inputs=inputs)

        def run() -> None:
            for m in self.kserve.ModelStreamInfer(iter([request]), timeout=CALL_TIMEOUT_S):
                if m.error_message:
                    raise _InStream(m.error_message)
                final = m.infer_response.parameters["triton_final_response"].bool_param
                self.stats.add_tokens(0 if final else 1)

        return _in_stream("kserve-stream", {OK}, run)

    def _score(self) -> Outcome:
        ids = [self.rng.randrange(self.vocab) for _ in range(self.rng.randint(2, 64))]
        return _call("score", {OK}, lambda: self.client.score(ids, top_k=5))

    def _cancel(self) -> Outcome:
        call = self.client.generate(self._prompt(), max_new_tokens=128, ignore_eos=True)
        after = self.rng.randint(1, 24)
        return _call("cancel", {OK, "CANCELLED"}, lambda: self._stream(call, cancel_after=after))

    def _deadline(self) -> Outcome:
        timeout = self.rng.uniform(0.05, 1.0)
        call = self.client.generate(self._prompt(), max_new_tokens=128, ignore_eos=True, timeout=timeout)
        return _call("deadline", {OK, "DEADLINE_EXCEEDED"}, lambda: self._stream(call))

    # --- bad requests
    def _bad(self) -> Outcome:
        name, codes, fn = self.rng.choice(self.bad)
        outcome = _in_stream(f"bad: {name}", codes, fn)
        outcome.action = "bad"
        outcome.detail = f"{name}: {outcome.detail}"
        return outcome

    def _bad_requests(self) -> list[tuple[str, set[str], Callable[[], Any]]]:
        from serving.proto import grpc_service_pb2 as kpb

        c, v, n = self.client, self.vocab, self.context
        ident = lambda b: b  # noqa: E731 - bytes straight to the wire
        raw_generate = c.channel.unary_stream(
            "/gpt2_deploy.v1.Gpt2Deploy/Generate", request_serializer=ident, response_deserializer=ident
        )
        forward = self.model
        infer = self.kserve.ModelInfer
        ids = _typed("input_ids", "INT64", [1, 1], int64_contents=[1])

        def stream_bad() -> None:
            request = kpb.ModelInferRequest(model_name=forward, inputs=[_typed("nope", "INT64", [1])])
            for m in self.kserve.ModelStreamInfer(iter([request]), timeout=CALL_TIMEOUT_S):
                if m.error_message:
                    raise _InStream(m.error_message)

        invalid, out_of_range = {"INVALID_ARGUMENT"}, {"OUT_OF_RANGE"}
        return [
            ("empty prompt", invalid, lambda: c.generate("", max_new_tokens=4).result()),
            (
                "token id outside the vocabulary",
                invalid,
                lambda: c.generate([v + 7], max_new_tokens=4).result(),
            ),
            ("max_new_tokens 0", invalid, lambda: c.generate("Hi", max_new_tokens=0).result()),
            ("past the context", out_of_range, lambda: c.generate("Hi", max_new_tokens=n).result()),
            ("temperature NaN", invalid, lambda: c.generate("Hi", temperature=math.nan).result()),
            ("top_p 0", invalid, lambda: c.generate("Hi", top_p=0.0).result()),
            ("17 stop strings", invalid, lambda: c.generate("Hi", stop=[str(i) for i in range(17)]).result()),
            ("a 1 MiB prompt", out_of_range, lambda: c.generate("a" * (1 << 20), max_new_tokens=2).result()),
            (
                "a 5 MiB request",
                {"RESOURCE_EXHAUSTED"},
                lambda: c.generate("a" * (5 << 20), max_new_tokens=2).result(),
            ),
            ("undecodable bytes", invalid, lambda: list(raw_generate(b"\xff\xff\xff\x07", timeout=30))),
            ("score top_k -1", invalid, lambda: c.score([1, 2, 3], top_k=-1)),
            (
                "unknown model",
                {"NOT_FOUND"},
                lambda: infer(kpb.ModelInferRequest(model_name="nope"), timeout=30),
            ),
            (
                "element count overflow",
                invalid,
                lambda: infer(
                    kpb.ModelInferRequest(
                        model_name=forward,
                        inputs=[_typed("input_ids", "INT64", [2**32, 2**32])],
                        raw_input_contents=[b"\x00" * 8],
                    ),
                    timeout=30,
                ),
            ),
            (
                "raw and typed contents",
                invalid,
                lambda: infer(
                    kpb.ModelInferRequest(
                        model_name=forward, inputs=[ids], raw_input_contents=[b"\x01" + b"\0" * 7]
                    ),
                    timeout=30,
                ),
            ),
            ("unknown input in a stream", invalid, stream_bad),
        ]


class _InStream(Exception):
    """A ModelStreamInfer error_message ("CODE: message")."""


def _in_stream(action: str, allowed: set[str], fn: Callable[[], Any]) -> Outcome:
    try:
        return _call(action, allowed, fn)
    except _InStream as e:
        code, _, text = str(e).partition(": ")
        ok = code in allowed and bool(text.strip()) and len(str(e).encode()) < 4096
        return Outcome(action, code, ok, text)


def _typed(name: str, datatype: str, shape: list[int] | None = None, **contents: list) -> Any:
    from serving.proto import grpc_service_pb2 as kpb

    t = kpb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape or [1])
    if contents:
        t.contents.CopyFrom(kpb.InferTensorContents(**contents))
    return t


def _bytes_input(name: str, value: bytes) -> Any:
    return _typed(name, "BYTES", [1], bytes_contents=[value])


# --- the server side -------------------------------------------------------------------------
def _rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


def _bundle(opts: SoakOptions, progress: Callable[[str], None]) -> Path:
    from export.manifest import MANIFEST_FILE, Bundle, BundleError

    if opts.bundle is not None:
        return Bundle.open(opts.bundle).root
    root = Path(opts.out) / "bundles" / "tiny-seed0"
    if (root / MANIFEST_FILE).is_file():
        try:
            return Bundle.open(root).root
        except BundleError as e:
            progress(f"re-exporting: {e}")
    from export.api import ExportOptions, export_bundle

    progress(f"exporting the tiny preset to {root} (once) ...")
    return export_bundle(ExportOptions(model="tiny", out=root, seed=0, quiet=True)).root


def _level(samples: list[dict], t0: float, t1: float) -> float | None:
    """Median RSS (MiB) of the samples taken in [t0, t1] of the load."""
    values = [s["rss_mib"] for s in samples if t0 <= s["t"] <= t1]
    return float(statistics.median(values)) if values else None


def run_soak(opts: SoakOptions, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Start the server, run the load, stop the server; the results as a JSON-able dict."""
    from export.manifest import Bundle
    from serving.client import Gpt2DeployClient
    from serving.server import free_port

    opts.check()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = Bundle.open(_bundle(opts, progress))
    port = free_port()
    address = f"127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "serving.cli",
        "serve",
        str(bundle.root),
        "--port",
        str(port),
        "--backend",
        opts.backend,
        "--log-level",
        "WARNING",
        *(["--threads", str(opts.threads)] if opts.threads else []),
        *opts.serve_args,
    ]
    log_path = out / "soak-server.log"
    machine = {"cpus": os.cpu_count(), "loadavg_start": list(os.getloadavg()), "uptime_start": _uptime()}
    stats = Stats()
    samples: list[dict] = []
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            with Gpt2DeployClient(address) as probe:
                try:
                    probe.wait_until_serving(600, alive=lambda: proc.poll() is None)
                except TimeoutError as e:
                    raise RuntimeError(f"the server did not start: {e}; see {log_path}") from None
                info = probe.model_info(timeout=30)
                dims = {"vocab_size": info.vocab_size, "n_positions": info.n_positions, "name": info.name}
                rss_start = _rss_kib(proc.pid)[0] / 1024
                progress(
                    f"soak: {info.name} on {info.backend}, pid {proc.pid}, RSS {rss_start:.0f} MiB; "
                    f"{opts.streams} streams for {opts.minutes:g} min (warm-up {opts.warmup:g} s) ..."
                )
                load = _run_load(address, opts, stats, samples, proc.pid, probe, dims, progress)
                time.sleep(max(2.0, 2 * opts.sample))  # idle: the trimmer runs every second
                rss_idle = _rss_kib(proc.pid)[0] / 1024
                health_end = probe.health()
        finally:
            t0 = time.monotonic()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            stop_s = time.monotonic() - t0
    machine["loadavg_end"] = list(os.getloadavg())
    machine["uptime_end"] = _uptime()
    log_errors = [
        line.rstrip() for line in log_path.read_text(errors="replace").splitlines() if " ERROR " in line
    ]
    return _summarize(
        opts,
        stats,
        samples,
        load,
        rss_start,
        rss_idle,
        health_end,
        proc.returncode,
        stop_s,
        log_errors,
        machine,
        info,
        command,
    )


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _run_load(address, opts, stats, samples, pid, probe, dims, progress) -> dict[str, Any]:
    stop = threading.Event()
    failures: list[str] = []

    def client(i: int) -> None:
        traffic = Traffic(address, i, opts, stats, dims)
        try:
            while not stop.is_set():
                stats.record(traffic.step())
        except Exception as e:  # noqa: BLE001 - a client that breaks is reported, not fatal
            failures.append(f"client {i}: {type(e).__name__}: {e}")
        finally:
            traffic.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(opts.streams)]
    t_start = time.monotonic()
    for t in threads:
        t.start()
    next_report = 60.0
    while (now := time.monotonic() - t_start) < opts.duration_s:
        h0 = time.perf_counter()
        health = probe.health(timeout=10)
        health_ms = (time.perf_counter() - h0) * 1e3
        rss, hwm = _rss_kib(pid)
        with stats.lock:
            tokens = stats.tokens
        samples.append(
            {
                "t": round(now, 2),
                "rss_mib": rss / 1024,
                "hwm_mib": hwm / 1024,
                "tokens": tokens,
                "health": health,
                "health_ms": round(health_ms, 2),
            }
        )
        if now >= next_report:
            progress(f"  {now / 60:4.1f} min: RSS {rss / 1024:.0f} MiB, {tokens} tokens")
            next_report += 60.0
        time.sleep(max(0.0, opts.sample - (time.monotonic() - t_start - now)))
    stop.set()
    for t in threads:
        t.join(CALL_TIMEOUT_S + 10)
    return {"load_s": time.monotonic() - t_start, "client_failures": failures}


def _summarize(
    opts,
    stats,
    samples,
    load,
    rss_start,
    rss_idle,
    health_end,
    exit_code,
    stop_s,
    log_errors,
    machine,
    info,
    command,
) -> dict[str, Any]:
    w = opts.window_s
    warm = _level(samples, opts.warmup - w, opts.warmup)
    end = _level(samples, opts.duration_s - w, opts.duration_s)
    peak = max((s["rss_mib"] for s in samples), default=float("nan"))
    hwm = max((s["hwm_mib"] for s in samples), default=float("nan"))
    rates = [
        {"t": b["t"], "tokens_per_s": (b["tokens"] - a["tokens"]) / (b["t"] - a["t"])}
        for a, b in zip(samples, samples[1:])
        if b["t"] > a["t"]
    ]
    measured = [r["tokens_per_s"] for r in rates if r["t"] > opts.warmup]
    health_ms = [s["health_ms"] for s in samples]
    by_action: dict[str, Counter] = {}
    codes: Counter = Counter()
    for (action, code, expected), n in stats.counts.items():
        by_action.setdefault(action, Counter())[
            OK if code == OK else ("expected" if expected else "unexpected")
        ] += n
        codes[(code, expected)] += n
    unexpected = sum(n for (_, _, expected), n in stats.counts.items() if not expected)
    reasons = []
    if unexpected:
        reasons.append(f"{unexpected} unexpected outcome(s)")
    if load["client_failures"]:
        reasons.append(f"{len(load['client_failures'])} client thread(s) broke")
    if log_errors:
        reasons.append(f"{len(log_errors)} ERROR line(s) in the server log")
    if warm is None or end is None:
        reasons.append("too few RSS samples")
    elif end > warm * (1 + opts.rss_tolerance):
        reasons.append(
            f"RSS at the end {end:.0f} MiB > {1 + opts.rss_tolerance:.2f} x {warm:.0f} MiB after warm-up"
        )
    if any(s["health"] != "SERVING" for s in samples) or health_end != "SERVING":
        reasons.append("health was not SERVING throughout")
    if exit_code != 0:
        reasons.append(f"the server exited {exit_code} on SIGTERM")
    total_tokens = stats.tokens
    return {
        "options": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
            "warmup_s": opts.warmup,
            "sample_s": opts.sample,
            "window_s": w,
        },
        "model": info.name,
        "backend": info.backend,
        "command": command,
        "machine": machine,
        "outcomes": {a: dict(c) for a, c in sorted(by_action.items())},
        "codes": [{"code": c, "expected": e, "count": n} for (c, e), n in sorted(codes.items())],
        "unexpected": stats.unexpected,
        "unexpected_count": unexpected,
        "client_failures": load["client_failures"],
        "tokens": {
            "total": total_tokens,
            "per_s": total_tokens / load["load_s"] if load["load_s"] > 0 else 0.0,
            "per_s_after_warmup_min": min(measured, default=float("nan")),
            "per_s_after_warmup_max": max(measured, default=float("nan")),
            "timeline": rates,
        },
        "rss_mib": {
            "start": rss_start,
            "after_warmup": warm,
            "peak": peak,
            "hwm": hwm,
            "end": end,
            "idle_after": rss_idle,
            "end_vs_warmup": (end / warm - 1) if warm and end else None,
        },
        "health_ms": {
            "p50": float(np.percentile(health_ms, 50)) if health_ms else None,
            "p99": float(np.percentile(health_ms, 99)) if health_ms else None,
            "max": max(health_ms, default=None),
        },
        "server": {"exit_code": exit_code, "stop_s": stop_s, "log_errors": log_errors[:20]},
        "samples": samples,
        "goal": {"passed": not reasons, "reasons": reasons},
    }


# --- report ----------------------------------------------------------------------------------
def table(result: dict[str, Any]) -> str:
    o, m, r, t = result["options"], result["machine"], result["rss_mib"], result["tokens"]
    lines = [
        f"soak: {result['model']} on {result['backend']}, {o['streams']} streams x {o['minutes']:g} min "
        f"(warm-up {o['warmup_s']:g} s); {m['cpus']} CPUs, load {m['loadavg_start'][0]:.2f} at start, "
        f"{m['loadavg_end'][0]:.2f} at the end (1-min average; a shared machine)",
        f"{'action':<14} {'ok':>7} {'expected errors':>16} {'unexpected':>11}",
    ]
    for action, c in result["outcomes"].items():
        lines.append(
            f"{action:<14} {c.get(OK, 0):>7} {c.get('expected', 0):>16} {c.get('unexpected', 0):>11}"
        )
    lines.append(
        "codes: "
        + ", ".join(
            f"{c['code']} {c['count']}{'' if c['expected'] else ' UNEXPECTED'}" for c in result["codes"]
        )
    )
    lines.append(
        f"tokens: {t['total']} streamed, {t['per_s']:.0f}/s over the run "
        f"({t['per_s_after_warmup_min']:.0f}-{t['per_s_after_warmup_max']:.0f}/s per sample after warm-up)"
    )

    def mib(x):
        return "-" if x is None else f"{x:.0f}"

    change = r["end_vs_warmup"]
    lines.append(
        f"RSS MiB: start {mib(r['start'])}, after warm-up {mib(r['after_warmup'])}, peak {mib(r['peak'])} "
        f"(VmHWM {mib(r['hwm'])}), end {mib(r['end'])}"
        + ("" if change is None else f" ({change:+.1%} vs after warm-up; goal <= +{o['rss_tolerance']:.0%})")
        + f", idle after the load {mib(r['idle_after'])}"
    )
    h, s = result["health_ms"], result["server"]
    if h["p50"] is not None:
        lines.append(
            f"health Check under load: p50 {h['p50']:.1f} ms, p99 {h['p99']:.1f} ms, max {h['max']:.1f} ms"
        )
    lines.append(
        f"server: SIGTERM -> exit {s['exit_code']} in {s['stop_s']:.1f} s; ERROR lines in its log: "
        f"{len(s['log_errors'])}"
    )
    for u in result["unexpected"][:10]:
        lines.append(f"  unexpected: {u['action']} -> {u['code']}: {u['detail'][:200]}")
    g = result["goal"]
    lines.append("goal: " + ("PASSED" if g["passed"] else "MISSED: " + "; ".join(g["reasons"])))
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path:
    """RSS and tokens/s over time (raises ImportError without matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples, rates = result["samples"], result["tokens"]["timeline"]
    o, r = result["options"], result["rss_mib"]
    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    ax1.plot([s["t"] / 60 for s in samples], [s["rss_mib"] for s in samples], label="server RSS")
    if r["after_warmup"]:
        ax1.axhline(r["after_warmup"], color="gray", ls=":", label="after warm-up")
        ax1.axhline(r["after_warmup"] * (1 + o["rss_tolerance"]), color="red", ls="--", label="goal limit")
    ax1.set_ylabel("RSS (MiB)")
    ax1.legend(loc="lower right")
    ax2.plot([x["t"] / 60 for x in rates], [x["tokens_per_s"] for x in rates], color="tab:green")
    ax2.set_ylabel("tokens/s")
    ax2.set_xlabel("minutes")
    for ax in (ax1, ax2):
        ax.axvline(o["warmup_s"] / 60, color="gray", ls="--", lw=0.8)
    fig.suptitle(f"soak: {result['model']} on {result['backend']}, {o['streams']} streams")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def parse(argv: list[str] | None = None) -> SoakOptions:
    ap = argparse.ArgumentParser(
        prog="python -m serving.soak",
        description="N concurrent clients with mixed valid, cancelled and bad requests against a "
        "`gpt2-deploy serve` subprocess for M minutes; errors by code, server RSS and tokens/s over time. "
        "Exit 1 when the goal (no unexpected outcome, RSS end within tolerance of after warm-up) is missed.",
    )
    ap.add_argument("--streams", type=int, default=16, help="concurrent clients (default 16)")
    ap.add_argument("--minutes", type=float, default=10.0, help="how long the load runs (default 10)")
    ap.add_argument("--bundle", type=Path, default=None, help="serve this bundle (default: the tiny preset)")
    ap.add_argument("--out", type=Path, default=Path("bench-results/soak"), help="results and the bundle")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--threads", type=int, default=None, help="backend intra-op threads")
    ap.add_argument("--warmup", type=float, default=None, help="seconds (default 20%% of the run, 5-120)")
    ap.add_argument("--sample", type=float, default=None, help="seconds between RSS samples")
    ap.add_argument("--rss-tolerance", type=float, default=0.10, help="allowed RSS growth (default 0.10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-plot", action="store_true", help="no PNG")
    ap.add_argument("--serve-args", default="", help="extra `gpt2-deploy serve` arguments, one string")
    a = ap.parse_args(argv)
    return SoakOptions(
        streams=a.streams,
        minutes=a.minutes,
        out=a.out,
        bundle=a.bundle,
        backend=a.backend,
        threads=a.threads,
        warmup_s=a.warmup,
        sample_s=a.sample,
        rss_tolerance=a.rss_tolerance,
        seed=a.seed,
        plot=not a.no_plot,
        serve_args=tuple(shlex.split(a.serve_args)),
    )


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    try:
        result = run_soak(opts, progress=lambda m: print(m, file=sys.stderr, flush=True))
    except (OptionsError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(opts.out)
    path = out / "soak.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    written = [str(path)]
    if opts.plot:
        try:
            written.append(str(plot(result, out / "soak.png")))
        except ImportError as e:
            print(f"no plot: {e} (pip install matplotlib, or 'gpt2-deploy[bench]')", file=sys.stderr)
    print(table(result))
    print("wrote " + ", ".join(written + [str(out / "soak-server.log")]))
    return 0 if result["goal"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
