"""``make gpu-check``: the GPU path measured in one run sized for a 10-minute GPU session.

    python -m serving.gpu_check [--out DIR] [--bundle DIR] [--fp16-bundle DIR] [--budget 480]
    python -m serving.gpu_check --device cpu --model tiny --no-fp16   # a rehearsal on the CPU

Rows (each PASS, FAIL or SKIP with its reason; docs/gpu.md): the environment; the fp32 bundle
of the 124M shape (exported, or ``--bundle``) and its fp16 variant; teacher-forced parity of
ONNX Runtime CUDA fp32 (TF32 on and off) and fp16 against the torch CUDA reference, with the
first diverging step and the tolerance used; greedy tokens against the reference; batched vs
solo on the GPU; ms/token at B=1, 8, 32 for transformers' generate, ONNX Runtime CUDA through
the scheduler and TensorRT where importable; concurrent gRPC streams; then the issue's targets
evaluated from those numbers. It installs nothing and reaches no network: what is missing (no
GPU, no onnxruntime-gpu, no TensorRT) is a SKIP that says so. Writes ``gpu_check.json`` into
``--out`` and prints a table; exit 1 when a row failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
SCHEMA = "gpt2-deploy-gpu-check/2"
CUDA_EP = "CUDAExecutionProvider"
WHEEL_HINT = "carry an onnxruntime-gpu wheel to this machine (docs/gpu.md)"

# The targets (an H100/H200-class GPU; checked here, never by a timed unit test).
TARGET_B1_MS = 1.0  # ONNX Runtime CUDA, B=1 decode, ms/token
TARGET_VS_HF = 4.0  # ... at least this many times transformers' generate in the same run
TARGET_B32_SCALING = 20.0  # B=32 aggregate tokens/s over B=1 tokens/s
TARGET_GREEDY_TOKENS = 128  # greedy tokens equal to the reference's


@dataclass
class Row:
    step: str
    status: str
    detail: str = ""
    seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckReport:
    """All rows; truthy when nothing failed (SKIPs do not fail a machine that lacks something)."""

    rows: list[Row] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    measurements: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0

    def __bool__(self) -> bool:
        return all(r.status != FAIL for r in self.rows)

    def table(self) -> str:
        w = max([len(r.step) for r in self.rows] + [4])
        lines = [f"{'step':<{w}}  status  seconds  detail", f"{'-' * w}  ------  -------  ------"]
        lines += [f"{r.step:<{w}}  {r.status:<6}  {r.seconds:7.1f}  {r.detail}" for r in self.rows]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "passed": bool(self),
            "environment": self.environment,
            "options": self.options,
            "rows": [asdict(r) for r in self.rows],
            "measurements": self.measurements,
            "duration_s": round(self.duration_s, 1),
        }


@dataclass(frozen=True)
class GpuCheckOptions:
    """What to check.

    Args:
        out: Where ``gpu_check.json`` goes (exported bundles go to a temporary directory).
        model: Preset exported when no ``bundle`` is given (the speed targets are for gpt2-124m).
        bundle: An fp32 bundle (with its reference checkpoint) to use instead of exporting.
        work: Where exported bundles are kept, and found again by a later run (a rerun in the same
            GPU session skips the exports); None: a temporary directory, removed at the end.
        fp16_bundle: Its fp16 variant (same weights); None exports one when ``fp16``.
        fp16: Check the fp16 variant.
        device: cuda (or cuda:N); cpu rehearses every row on the CPU (numbers that are not GPU
            numbers: the targets are SKIP there).
        budget_s: Seconds for the whole run; a step whose estimate no longer fits is SKIP.
        parity_tokens: Greedy reference tokens per parity sequence (the target is 128).
        parity_prompts: Parity sequences.
        batches: Batch sizes of the speed rows.
        streams: Concurrent gRPC clients of the streams rows.
        prompt_len: Prompt tokens per row of the speed rows.
        new_tokens: Tokens generated per row of the speed rows and per stream.
        rounds: Timed runs per (system, batch); the median is reported.
        trt: Build a TensorRT engine and measure it when ``import tensorrt`` works.
        trt_tests: Also run the ``trt``-marked tests (pytest -m trt) when TensorRT is there.
        seed: Weights of an exported preset, and the prompts.
    """

    out: Path = Path("gpu-check-results")
    model: str = "gpt2-124m"
    bundle: Path | None = None
    work: Path | None = None
    fp16_bundle: Path | None = None
    fp16: bool = True
    device: str = "cuda"
    budget_s: float = 480.0
    parity_tokens: int = TARGET_GREEDY_TOKENS
    parity_prompts: int = 2
    batches: tuple[int, ...] = (1, 8, 32)
    streams: tuple[int, ...] = (1, 8, 32)
    prompt_len: int = 32
    new_tokens: int = 64
    rounds: int = 3
    trt: bool = True
    trt_tests: bool = False
    seed: int = 0

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


# --- environment ---------------------------------------------------------------------------------
def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return None
    return str(getattr(mod, "__version__", "?"))


def _import_error(module: str) -> str | None:
    try:
        __import__(module)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        return f"{type(e).__name__}: {e}"
    return None


def _dist_version(*dists: str) -> str | None:
    """An installed distribution's version from its metadata (nothing imported)."""
    from importlib import metadata

    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def detect_environment() -> dict[str, Any]:
    """Versions, the GPU and ONNX Runtime's providers, without failing on anything missing."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "onnxruntime": _version("onnxruntime"),
        "onnxruntime_error": None,
        "onnxruntime_dist": _dist_version("onnxruntime-gpu", "onnxruntime"),
        "onnxruntime_providers": [],
        "tensorrt": _version("tensorrt"),
        "tensorrt_lean": _version("tensorrt_lean"),
        "cuda_python": _dist_version("cuda-python", "cuda-bindings"),
        "gpu": None,
        "compute_capability": None,
        "torch_cuda": False,
    }
    if env["onnxruntime"] is None:
        env["onnxruntime_error"] = _import_error("onnxruntime")
    else:
        import onnxruntime as ort

        env["onnxruntime_providers"] = list(ort.get_available_providers())
    try:
        import torch

        if torch.cuda.is_available():
            env["torch_cuda"] = True
            env["gpu"] = torch.cuda.get_device_name(0)
            env["compute_capability"] = "{}.{}".format(*torch.cuda.get_device_capability(0))
    except Exception:  # noqa: BLE001 - torch missing or its CUDA broken: cuda-python is asked next
        pass
    if env["gpu"] is None:
        try:
            from deploy.cuda import cuda_device_info

            info = cuda_device_info(0)
            env["gpu"], env["compute_capability"] = info.name, info.compute_capability
        except Exception as e:  # noqa: BLE001 - no cuda-python, driver or device: reported, not raised
            env["gpu_error"] = f"{type(e).__name__}: {e}"
    return env


def availability(env: dict[str, Any], device: str = "cuda") -> dict[str, str | None]:
    """Why each family of rows cannot run here (None: it can), from ``detect_environment()``.

    Keys: ``torch`` (the reference and transformers' generate on ``device``), ``onnxruntime``
    (the ONNX Runtime backend on ``device``), ``onnx`` (exporting and opening bundles: any
    onnxruntime build), ``tensorrt``.
    """
    gpu = device.startswith("cuda")
    no_gpu = "no GPU"  # (how cuda-python failed to find one, if it is installed: env["gpu_error"])
    ort_missing = f"onnxruntime is not importable ({env.get('onnxruntime_error') or 'not installed'})"
    if env.get("torch") is None:
        torch_reason = "torch is not installed"
    elif gpu and env.get("gpu") is None:
        torch_reason = no_gpu
    elif gpu and not env.get("torch_cuda"):
        torch_reason = f"torch {env['torch']} has no CUDA (a CPU build, or no driver)"
    else:
        torch_reason = None
    if env.get("onnxruntime") is None:
        ort_reason: str | None = f"{ort_missing}; {WHEEL_HINT}"
    elif gpu and env.get("gpu") is None:
        ort_reason = no_gpu
    elif gpu and CUDA_EP not in env.get("onnxruntime_providers", []):
        ort_reason = (
            f"onnxruntime {env['onnxruntime']} has no {CUDA_EP} (providers: "
            f"{env.get('onnxruntime_providers')}): this is not onnxruntime-gpu; {WHEEL_HINT}"
        )
    else:
        ort_reason = None
    if env.get("tensorrt") is None:
        trt_reason: str | None = "import tensorrt fails here (TensorRT not installed)"
    elif env.get("gpu") is None:
        trt_reason = no_gpu
    elif not gpu:
        trt_reason = "a CPU rehearsal (--device cpu)"
    else:
        trt_reason = None
    return {
        "torch": torch_reason,
        "onnxruntime": ort_reason,
        "onnx": None if env.get("onnxruntime") is not None else ort_missing,
        "tensorrt": trt_reason,
    }


def prepare_onnxruntime() -> str:
    """Make the CUDA EP's libraries loadable before the first CUDA session (``ort.preload_dlls``:
    CUDA/cuDNN from the nvidia-* wheels or torch's; ORT >= 1.21). Says what it did."""
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return f"onnxruntime {ort.__version__} has no preload_dlls (the system's CUDA libraries are used)"
    try:
        preload()
    except Exception as e:  # noqa: BLE001 - the session's own error will say more if CUDA is unusable
        return f"preload_dlls failed: {type(e).__name__}: {e}"
    return "preload_dlls() done"


# --- targets (pure: evaluated from the measurements) ---------------------------------------------
def _speed(m: dict[str, Any], system: str, batch: int) -> dict[str, Any] | None:
    return m.get("speed", {}).get(system, {}).get(str(batch))


def _missing(m: dict[str, Any], *keys: str) -> str:
    reasons = [m.get("skipped", {}).get(k) for k in keys]
    unique = list(dict.fromkeys(r for r in reasons if r))
    return "not measured: " + ("; ".join(unique) or "the run did not get there")


def evaluate_targets(m: dict[str, Any], ort: str = "onnxruntime", hf: str = "hf-generate") -> list[Row]:
    """The issue's targets as PASS/FAIL rows from ``measurements`` (SKIP: a number is missing).

    ``m["speed"][system][str(B)]`` holds ``step_ms`` and ``tokens_per_s``; ``m["parity"]`` holds
    ``fp32``, ``fp16`` (``passed``, ``max_abs``, ``tolerance``), and ``greedy`` (``equal``,
    ``tokens``); ``m["skipped"]`` says why something was not measured.
    """
    rows: list[Row] = []
    b1, hf1, b32 = _speed(m, ort, 1), _speed(m, hf, 1), _speed(m, ort, 32)

    name = f"target: {ort} B=1 <= {TARGET_B1_MS:g} ms/token"
    if b1 is None:
        rows.append(Row(name, SKIP, _missing(m, f"speed {ort}")))
    else:
        ok = b1["step_ms"] <= TARGET_B1_MS
        rows.append(
            Row(name, PASS if ok else FAIL, f"{b1['step_ms']:.3f} ms/token", data={"value": b1["step_ms"]})
        )

    name = f"target: {ort} B=1 >= {TARGET_VS_HF:g}x {hf}"
    if b1 is None or hf1 is None:
        rows.append(Row(name, SKIP, _missing(m, f"speed {ort}", f"speed {hf}")))
    else:
        ratio = hf1["step_ms"] / b1["step_ms"]
        detail = f"{ratio:.2f}x ({hf} {hf1['step_ms']:.3f} ms vs {b1['step_ms']:.3f} ms)"
        rows.append(Row(name, PASS if ratio >= TARGET_VS_HF else FAIL, detail, data={"value": ratio}))

    name = f"target: {ort} B=32 >= {TARGET_B32_SCALING:g}x B=1 tokens/s"
    if b1 is None or b32 is None:
        rows.append(Row(name, SKIP, _missing(m, f"speed {ort}")))
    else:
        ratio = b32["tokens_per_s"] / b1["tokens_per_s"]
        detail = f"{ratio:.1f}x ({b32['tokens_per_s']:.0f} vs {b1['tokens_per_s']:.0f} tokens/s)"
        rows.append(Row(name, PASS if ratio >= TARGET_B32_SCALING else FAIL, detail, data={"value": ratio}))

    parity = m.get("parity", {})
    for key, name in (
        ("fp32", "target: fp32 parity per step within the stated TF32 tolerance"),
        ("fp16", "target: fp16 parity within its preset"),
    ):
        p = parity.get(key)
        if p is None:
            rows.append(Row(name, SKIP, _missing(m, f"parity {key}")))
        else:
            detail = f"max|Δ| {p['max_abs']:.3g} vs {p['tolerance']} atol {p['atol']:g}"
            if p.get("first_diverging_step") is not None:
                detail += f", first diverging step {p['first_diverging_step']}"
            rows.append(Row(name, PASS if p["passed"] else FAIL, detail))

    name = f"target: greedy tokens equal to the reference for {TARGET_GREEDY_TOKENS} tokens"
    g = parity.get("greedy")
    if g is None:
        rows.append(Row(name, SKIP, _missing(m, "parity greedy")))
    else:
        ok = bool(g["equal"]) and g["tokens"] >= TARGET_GREEDY_TOKENS
        detail = f"{g['tokens']} tokens x {g['sequences']}: common prefix {g['common_prefix']}"
        rows.append(Row(name, PASS if ok else FAIL, detail))
    return rows


# --- running rows ---------------------------------------------------------------------------------
class Budget:
    """The run's time budget: a step whose estimate no longer fits is skipped (saying so)."""

    def __init__(self, total_s: float, scale: float = 1.0):
        self.total_s = total_s
        self.scale = scale
        self.t0 = time.perf_counter()

    @property
    def left_s(self) -> float:
        return self.total_s - (time.perf_counter() - self.t0)

    def refuses(self, estimate_s: float) -> str | None:
        need = estimate_s * self.scale
        if need <= self.left_s:
            return None
        return (
            f"time budget: ~{need:.0f} s needed, {max(0.0, self.left_s):.0f} s of {self.total_s:.0f} s left"
        )


# Rough seconds per step for the 124M shape on an H100/H200 machine (scaled down for smaller bundles).
ESTIMATES_S = {
    "export": 90.0,
    "load": 15.0,
    "parity": 30.0,
    "greedy": 20.0,
    "batched": 30.0,
    "speed": 25.0,
    "streams": 45.0,
    "trt_build": 240.0,
    "trt_tests": 120.0,
}


class Runner:
    """Runs steps into a report: timing, a crash is a FAIL row, the budget or a missing input a
    SKIP row. ``have`` holds what later steps use (bundles, backends, sequences) and ``why_not``
    why something is not there, so every dependent row (and target) names the first cause."""

    def __init__(self, report: CheckReport, budget: Budget):
        self.report = report
        self.budget = budget
        self.have: dict[str, Any] = {}
        self.why_not: dict[str, str] = {}

    def needs(self, *keys: str) -> str | None:
        """Why a step needing ``keys`` cannot run (the first missing one's reason), or None."""
        for k in keys:
            if k not in self.have:
                return self.why_not.get(k, f"no {k} (see above)")
        return None

    def skip(self, step: str, reason: str, key: str | None = None, provides: str | None = None) -> Row:
        row = Row(step, SKIP, reason)
        self.report.rows.append(row)
        self.report.measurements.setdefault("skipped", {})[key or step] = reason
        if provides:
            self.why_not.setdefault(provides, reason)
        print(f"[gpu-check] SKIP {step}: {reason}", flush=True)
        return row

    def run(
        self,
        step: str,
        fn: Callable[[], tuple[str, str, dict]],
        *,
        estimate: str | None = None,
        needs: str | None = None,
        key: str | None = None,
        provides: str | None = None,
    ) -> Row:
        """Run ``fn`` unless ``needs`` (a reason) or the budget says no. ``key`` names the
        measurement it makes (``measurements["skipped"][key]`` when it cannot), ``provides`` what
        it puts in ``have``."""
        if needs:
            return self.skip(step, needs, key, provides)
        refused = self.budget.refuses(ESTIMATES_S[estimate]) if estimate else None
        if refused:
            return self.skip(step, refused, key, provides)
        t0 = time.perf_counter()
        try:
            status, detail, data = fn()
        except Exception as e:  # noqa: BLE001 - a crashed step is a FAIL row, the run goes on
            status, detail, data = FAIL, f"{type(e).__name__}: {e}"[:400], {}
        row = Row(step, status, detail, time.perf_counter() - t0, data)
        self.report.rows.append(row)
        if status != PASS:
            self.report.measurements.setdefault("skipped", {}).setdefault(key or step, f"{step}: {detail}")
        if provides and provides not in self.have:
            self.why_not[provides] = detail if status == SKIP else f"{step} failed"
        print(f"[gpu-check] {row.status} {row.step} ({row.seconds:.1f} s) {row.detail}", flush=True)
        return row


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab - 1, (n, length)).tolist()


def _speed_cell(per_batch: dict[str, dict[str, Any]]) -> str:
    cells = []
    for b, s in per_batch.items():
        cells.append(f"B={b} {s['step_ms']:.3f} ms/step ({s['tokens_per_s']:.0f} tok/s)")
    return ", ".join(cells)


def _timing(step_runs: list[list[float]], batch: int) -> dict[str, Any]:
    """Median over runs of each run's median decode step (seconds lists), as ms and tokens/s."""
    import statistics

    medians = [statistics.median(s) * 1e3 for s in step_runs if s]
    step = statistics.median(medians)
    return {
        "batch": batch,
        "step_ms": step,
        "step_ms_best": min(medians),
        "ms_per_token_aggregate": step / batch,
        "tokens_per_s": 1e3 * batch / step,
        "runs": len(medians),
    }


def hf_generate_speed(model: Any, opts: GpuCheckOptions, vocab: int) -> dict[str, dict[str, Any]]:
    """transformers' ``generate`` (greedy, PyTorch eager mode, sdpa) on ``opts.device``: per batch."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from serving.bench.core import Run

    device = torch.device(opts.device)
    prompts = _prompts(max(opts.batches), opts.prompt_len, vocab, opts.seed)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(batch: int, new_tokens: int) -> list[float]:
        stamps: list[float] = []

        class Stamp(LogitsProcessor):
            def __call__(self, input_ids, scores):
                sync()  # the logits are really there, not just launched
                stamps.append(time.perf_counter())
                return scores

        ids = torch.tensor(prompts[:batch], dtype=torch.long, device=device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                eos_token_id=None,
                pad_token_id=0,
                logits_processor=LogitsProcessorList([Stamp()]),
            )
        sync()
        return Run.from_stamps([[]], t0, stamps, time.perf_counter()).step_s

    out = {}
    for b in opts.batches:
        run(b, 4)  # warm-up (kernels, allocator)
        out[str(b)] = _timing([run(b, opts.new_tokens) for _ in range(opts.rounds)], b)
    return out


def scheduler_speed(backend: Any, bundle: Any, opts: GpuCheckOptions) -> dict[str, dict[str, Any]]:
    """The project's backend through the batching scheduler (``Generator.run_batch``): per batch."""
    from serving.generation import Generator
    from serving.scheduler import SchedulerOptions
    from serving.tokenizer import Tokenizer

    top = max(opts.batches)
    sched_opts = SchedulerOptions(
        max_batch_size=top,
        max_prefill_tokens=max(1024, top * opts.prompt_len),
        max_batch_tokens=max(16384, top * (opts.prompt_len + opts.new_tokens + 1)),
    )
    prompts = _prompts(top, opts.prompt_len, bundle.dims.vocab_size, opts.seed)
    out = {}
    with Generator(backend, Tokenizer.from_dir(bundle.tokenizer_dir), scheduler_options=sched_opts) as gen:
        sched = gen.scheduler
        for b in opts.batches:
            gen.run_batch(prompts[:b], 4, stop_at_eos=False)  # warm-up
            before = sched.steps, sched.reduced_steps, sched.top_k_fallbacks
            runs = [
                gen.run_batch(prompts[:b], opts.new_tokens, stop_at_eos=False).step_s
                for _ in range(opts.rounds)
            ]
            out[str(b)] = _timing(runs, b)
            # how the timed steps ran: reduced to the top-k on the device, and rows that fell back
            out[str(b)]["forwards"] = sched.steps - before[0]
            out[str(b)]["reduced_forwards"] = sched.reduced_steps - before[1]
            out[str(b)]["top_k_fallbacks"] = sched.top_k_fallbacks - before[2]
    return out


def streams_speed(bundle: Any, backend: str, opts: GpuCheckOptions, engine: str | None = None) -> list[dict]:
    """The concurrent-streams scenario (``serving.bench.streams``) against a server on ``opts.device``."""
    from serving.bench.streams import _one_pass, summarize
    from serving.client import Gpt2DeployClient
    from serving.server import ServeOptions, build_server

    top = max(opts.streams)
    serve = ServeOptions(
        bundle=bundle.root,
        backend=backend,
        device=opts.device,
        engine=engine,
        host="127.0.0.1",
        port=0,
        parity="off",
        max_batch_size=top,
        max_prefill_tokens=max(1024, top * opts.prompt_len),
    )
    prompts = _prompts(top, opts.prompt_len, bundle.dims.vocab_size, opts.seed + 1)
    rows = []
    with build_server(serve) as server:
        clients = [Gpt2DeployClient(server.address, timeout=300) for _ in range(top)]
        try:
            clients[0].wait_until_serving(timeout=120)
            _one_pass(clients[:1], prompts, 4)  # warm-up
            for n in opts.streams:
                rows.append(
                    asdict(
                        summarize(
                            f"{backend}[{opts.device}]", _one_pass(clients[:n], prompts, opts.new_tokens)
                        )
                    )
                )
        finally:
            for c in clients:
                c.close()
    return rows


def _parity_data(report: Any, tol: Any, extra: dict[str, Any]) -> tuple[str, str, dict]:
    print(report, flush=True)
    first = report.first_diverging_step
    first = "none" if first is None else first
    detail = (
        f"max|Δ| {report.max_abs:.3g}, top-1 {report.top1_agreement:.2%} over {len(report.cases)} steps; "
        f"tolerance {tol.name} (atol {tol.atol:g}); first diverging step: {first}"
    )
    data = {
        "passed": bool(report),
        "max_abs": report.max_abs,
        "top1": report.top1_agreement,
        "tolerance": tol.name,
        "atol": tol.atol,
        "first_diverging_step": report.first_diverging_step,
        "first_diverging": report.first_diverging,
        **extra,
    }
    return (PASS if report else FAIL), detail, data


def _parity_prompts(opts: GpuCheckOptions, bundle: Any) -> tuple[list[list[int]], list[int], int]:
    """The parity sequences' prompts (``parity_prompts`` of them, 12, 19, ... tokens), their lengths
    and the greedy tokens that follow each (``parity_tokens``, as far as the context allows)."""
    lens = [12 + 7 * i for i in range(opts.parity_prompts)]
    tokens = min(opts.parity_tokens, bundle.dims.n_positions - max(lens))
    rows = _prompts(len(lens), max(lens), bundle.dims.vocab_size, opts.seed + 2)
    return [p[:k] for p, k in zip(rows, lens, strict=True)], lens, tokens


def run_checks(opts: GpuCheckOptions | None = None, **overrides: Any) -> CheckReport:
    """Run every row that fits the budget; return the report (also written to ``opts.out``)."""
    opts = opts or GpuCheckOptions()
    if overrides:
        opts = GpuCheckOptions(**{**asdict(opts), **overrides})
    report = CheckReport(environment=detect_environment(), options=opts.to_json())
    budget = Budget(opts.budget_s)
    runner = Runner(report, budget)
    env = report.environment
    why = availability(env, opts.device)
    report.measurements["availability"] = why
    gpu = env["gpu"]
    cc = f" (sm {env['compute_capability']})" if gpu else ""
    env_line = (
        f"GPU: {gpu or 'no GPU'}{cc}; torch {env['torch']}{' +CUDA' if env['torch_cuda'] else ''}, "
        f"onnxruntime {env['onnxruntime'] or '-'} ({env['onnxruntime_dist'] or 'not installed'}; "
        f"CUDA EP {'yes' if CUDA_EP in env['onnxruntime_providers'] else 'no'}), "
        f"tensorrt {env['tensorrt'] or '-'}, cuda-python {env['cuda_python'] or '-'}"
    )
    runner.run("environment", lambda: (PASS, env_line, {}))
    tmp = tempfile.TemporaryDirectory(prefix="gpu-check-")
    work = opts.work or Path(tmp.name)
    try:
        _bundle_rows(runner, opts, why, work, "fp32")
        _load_rows(runner, opts, why, "fp32")
        _parity_rows(runner, opts)
        _speed_rows(runner, opts, why)
        if opts.fp16:
            _bundle_rows(runner, opts, why, work, "fp16")
            _load_rows(runner, opts, why, "fp16")
            _fp16_rows(runner, opts)
        else:
            runner.skip("fp16", "not asked (--no-fp16)", "parity fp16")
        _trt_rows(runner, opts, why)
    finally:
        for value in runner.have.values():
            if hasattr(value, "is_loaded"):  # a backend
                try:
                    value.close()
                except Exception:  # noqa: BLE001 - closing is best effort at the end of a check
                    pass
        tmp.cleanup()
        if opts.on_gpu:
            report.rows += evaluate_targets(report.measurements)
        else:
            report.rows.append(
                Row("targets", SKIP, f"a rehearsal on {opts.device}: the targets are for a GPU")
            )
        report.duration_s = time.perf_counter() - budget.t0
        print("\n" + report.table(), flush=True)
        opts.out.mkdir(parents=True, exist_ok=True)
        path = opts.out / "gpu_check.json"
        path.write_text(json.dumps(report.to_json(), indent=2, default=str) + "\n")
        print(f"\nwritten: {path}", flush=True)
    return report


def _bundle_rows(
    runner: Runner, opts: GpuCheckOptions, why: dict[str, str | None], work: Path, precision: str
) -> None:
    """The fp32 bundle (``--bundle``, exported, or exported into ``--work`` by an earlier run) or its
    fp16 variant: ``have["bundle fp32"]``."""
    given = opts.bundle if precision == "fp32" else opts.fp16_bundle

    cached = work / f"{opts.model}-seed{opts.seed}-{precision}"

    def step() -> tuple[str, str, dict]:
        from export.manifest import MANIFEST_FILE, Bundle

        if given is not None:
            b = Bundle.open(given)
        elif (cached / MANIFEST_FILE).is_file():  # exported into --work by an earlier run
            b = Bundle.open(cached)
        else:
            from export.api import ExportOptions, export_bundle

            fp16 = precision == "fp16"
            b = export_bundle(
                ExportOptions(
                    model=opts.model,
                    out=cached,
                    seed=opts.seed,
                    precision=precision,
                    reference=not fp16,  # the fp16 rows use the fp32 bundle's reference (same weights)
                    golden=False,
                    validate=not fp16,  # checked below, against the reference on the GPU
                    quiet=True,
                )
            )
        if b.manifest.precision != precision:
            return FAIL, f"{b.root} is a {b.manifest.precision} bundle, not {precision}", {}
        runner.have[f"bundle {precision}"] = b
        d = b.dims
        return PASS, f"{b.name} {precision}: {d.n_layer} layers, {d.n_embd} dims -> {b.root}", {}

    # A bundle is for the ONNX Runtime and TensorRT rows: with neither possible, none is exported.
    unused = None if why["onnxruntime"] is None or why["tensorrt"] is None else why["onnxruntime"]
    needs = why["onnx"] or (None if given else unused)
    if precision == "fp16":
        needs = needs or runner.needs("bundle fp32") or why["onnxruntime"]
    runner.run(
        f"bundle {precision} ({f'open {given}' if given else f'export {opts.model}'})",
        step,
        estimate=None if given else "export",
        needs=needs,
        key=f"parity {precision}",
        provides=f"bundle {precision}",
    )
    fp32 = runner.have.get("bundle fp32")
    if precision == "fp32" and fp32 is not None:  # the estimates are for the 124M shape
        runner.budget.scale = max(0.05, fp32.dims.n_layer * fp32.dims.n_embd**2 / (12 * 768**2))


def _load_rows(runner: Runner, opts: GpuCheckOptions, why: dict[str, str | None], precision: str) -> None:
    """The torch reference (with fp32) and the ONNX Runtime backend of the bundle, on the device."""
    dev = opts.device
    bundle = f"bundle {precision}"
    if precision == "fp32":

        def reference() -> tuple[str, str, dict]:
            from serving.parity import reference_backend

            runner.have["reference"] = reference_backend(runner.have[bundle], dev)
            return PASS, f"torch reference on {dev}", {}

        needs = runner.needs(bundle) or why["torch"]
        runner.run(
            f"load torch reference [{dev}]", reference, estimate="load", needs=needs, provides="reference"
        )

    def load() -> tuple[str, str, dict]:
        from serving.backends import BackendOptions, create_backend

        note = prepare_onnxruntime() if opts.on_gpu else "a rehearsal on the CPU EP"
        # a rehearsal runs the GPU's reduced path (device top-k) on the CPU EP
        extra = {} if opts.on_gpu else {"device_top_k": "on"}
        be = create_backend(
            "onnxruntime", runner.have[bundle], BackendOptions(device=dev, extra=extra)
        ).load()
        info = be.info()
        if opts.on_gpu and CUDA_EP not in info["providers"]:
            be.close()
            return FAIL, f"the session runs on {info['providers']}, not CUDA ({note})", info
        runner.have[f"onnxruntime {precision}"] = be
        detail = (
            f"providers {info['providers']}, tf32 {info['tf32']}, device top-k {info['device_top_k']}; {note}"
        )
        return PASS, detail, info

    runner.run(
        f"load onnxruntime[{dev}] {precision}",
        load,
        estimate="load",
        needs=runner.needs(bundle) or why["onnxruntime"],
        provides=f"onnxruntime {precision}",
    )


def _parity_rows(runner: Runner, opts: GpuCheckOptions) -> None:
    """Greedy tokens, fp32 teacher-forced parity (TF32 on, and off), batched vs solo."""
    from export.compare import tolerance_for_run

    m = runner.report.measurements
    dev = opts.device
    have = runner.have

    def greedy() -> tuple[str, str, dict]:
        from serving.bench.core import common_prefix
        from serving.parity import greedy_continuations

        prompts, lens, tokens = _parity_prompts(opts, have["bundle fp32"])
        ref = greedy_continuations(have["reference"], prompts, tokens)
        got = greedy_continuations(have["onnxruntime fp32"], prompts, tokens)  # the scheduler: device top-k
        have["sequences"] = (ref, lens)
        prefix = [common_prefix(r[k:], g[k:]) for r, g, k in zip(ref, got, lens, strict=True)]
        equal = ref == got
        m.setdefault("parity", {})["greedy"] = {
            "equal": equal,
            "tokens": tokens,
            "sequences": len(lens),
            "common_prefix": prefix,
        }
        detail = f"{tokens} greedy tokens x {len(lens)}: common prefix {prefix}"
        return (PASS if equal else FAIL), detail, {"reference": ref, "served": got}

    both = runner.needs("reference", "onnxruntime fp32")
    runner.run(
        f"greedy onnxruntime[{dev}] == torch[{dev}]",
        greedy,
        estimate="greedy",
        needs=both,
        key="parity greedy",
        provides="sequences",
    )

    def parity(backend: Any, key: str) -> tuple[str, str, dict]:
        from serving.parity import served_tolerance, teacher_forced_parity

        tol = served_tolerance(backend)  # TF32 as the loaded session reports it decides
        seqs, lens = have["sequences"]
        title = f"{backend.name}[{dev}] {key} vs torch[{dev}]"
        report = teacher_forced_parity(backend, have["reference"], seqs, tol, lens, title=title)
        status, detail, data = _parity_data(report, tol, {"tf32": backend.info().get("tf32")})
        m.setdefault("parity", {})[key] = {k: v for k, v in data.items() if k != "first_diverging"}
        return status, detail, data

    m.setdefault("parity", {})["default_tolerance"] = tolerance_for_run("fp32", device=dev).name
    runner.run(
        f"parity fp32 onnxruntime[{dev}] vs torch[{dev}]"
        + (" (TF32 on: ORT's default)" if opts.on_gpu else ""),
        lambda: parity(have["onnxruntime fp32"], "fp32"),
        estimate="parity",
        needs=runner.needs("reference", "onnxruntime fp32", "sequences"),
        key="parity fp32",
    )
    if opts.on_gpu:

        def no_tf32() -> tuple[str, str, dict]:
            from serving.backends import BackendOptions, create_backend

            options = BackendOptions(device=dev, extra={"tf32": False})
            with create_backend("onnxruntime", have["bundle fp32"], options) as be:
                return parity(be, "fp32_no_tf32")

        runner.run(
            f"parity fp32 onnxruntime[{dev}] vs torch[{dev}] (TF32 off)",
            no_tf32,
            estimate="parity",
            needs=runner.needs("reference", "onnxruntime fp32", "sequences"),
            key="parity fp32_no_tf32",
        )

    def batched() -> tuple[str, str, dict]:
        from serving.parity import batched_parity, served_tolerance
        from serving.tokenizer import Tokenizer

        served = have["onnxruntime fp32"]
        tol = served_tolerance(served)
        seqs, lens = have["sequences"]
        tok = Tokenizer.from_dir(have["bundle fp32"].tokenizer_dir)
        report = batched_parity(served, have["reference"], tok, seqs[0][: lens[0]], 24, tol)
        print(report, flush=True)
        solo = report.vs_solo
        vs_solo = (
            "-"
            if solo is None
            else f"max|Δ| {solo.max_abs:.3g} ({solo.tolerance.name}, {'PASS' if solo else 'FAIL'})"
        )
        detail = (
            f"vs solo: {vs_solo}; vs reference: max|Δ| {report.max_abs:.3g} ({tol.name}); "
            f"batch sizes {sorted(set(report.batch_sizes))}"
        )
        return (PASS if report else FAIL), detail, report.to_json()

    runner.run(
        f"batched vs solo onnxruntime[{dev}]",
        batched,
        estimate="batched",
        needs=runner.needs("reference", "onnxruntime fp32", "sequences"),
        key="parity batched",
    )


def _speed_rows(runner: Runner, opts: GpuCheckOptions, why: dict[str, str | None]) -> None:
    """transformers' generate, the ONNX Runtime backend through the scheduler, gRPC streams."""
    m = runner.report.measurements
    dev = opts.device
    have = runner.have

    def hf() -> tuple[str, str, dict]:
        import torch
        import transformers

        transformers.utils.logging.disable_progress_bar()
        fp32 = have.get("bundle fp32")
        model: Any
        if fp32 is not None:
            from export.manifest import REFERENCE_DIR

            model = transformers.GPT2LMHeadModel.from_pretrained(
                fp32.root / REFERENCE_DIR, dtype=torch.float32, attn_implementation="sdpa"
            )
        else:  # no bundle (no onnxruntime here): the preset's own weights time the same
            from export.sources import load_source

            model = load_source(opts.model, opts.seed).model
        model = model.to(dev).eval()
        try:
            per = hf_generate_speed(model, opts, model.config.vocab_size)
        finally:
            del model
            if opts.on_gpu:
                torch.cuda.empty_cache()
        m.setdefault("speed", {})["hf-generate"] = per
        return PASS, _speed_cell(per), per

    runner.run(
        f"speed hf-generate[{dev}] (transformers generate, fp32)",
        hf,
        estimate="speed",
        needs=why["torch"],
        key="speed hf-generate",
    )

    def ort() -> tuple[str, str, dict]:
        be = have["onnxruntime fp32"]
        per = scheduler_speed(be, have["bundle fp32"], opts)
        m.setdefault("speed", {})["onnxruntime"] = per
        return PASS, _speed_cell(per) + f"; device top-k {be.reduces_top_k}", per

    runner.run(
        f"speed onnxruntime[{dev}] fp32 (scheduler)",
        ort,
        estimate="speed",
        needs=runner.needs("onnxruntime fp32"),
        key="speed onnxruntime",
    )

    def streams() -> tuple[str, str, dict]:
        have.pop("onnxruntime fp32").close()  # the server loads its own: one copy on the GPU at a time
        rows = streams_speed(have["bundle fp32"], "onnxruntime", opts)
        m.setdefault("streams", {})["onnxruntime"] = rows
        return _streams_result(rows)

    runner.run(
        f"streams onnxruntime[{dev}] over gRPC",
        streams,
        estimate="streams",
        needs=runner.needs("onnxruntime fp32"),
        key="streams onnxruntime",
    )
    runner.skip(
        "streams hf-generate", "transformers' generate has no server here: its speed rows are the baseline"
    )


def _streams_result(rows: list[dict]) -> tuple[str, str, dict]:
    detail = ", ".join(
        f"{r['streams']} streams {r['tokens_per_s']:.0f} tok/s (TBT p50 {r['tbt_p50_ms']:.2f} ms"
        + (f", {r['errors']} failed)" if r["errors"] else ")")
        for r in rows
    )
    return (FAIL if any(r["errors"] for r in rows) else PASS), detail, {"rows": rows}


def _fp16_rows(runner: Runner, opts: GpuCheckOptions) -> None:
    """fp16 against the fp32 torch reference (its preset), and its speed."""
    m = runner.report.measurements
    dev = opts.device
    have = runner.have

    def parity16() -> tuple[str, str, dict]:
        from serving.parity import greedy_continuations, served_tolerance, teacher_forced_parity

        served, bundle = have["onnxruntime fp16"], have["bundle fp16"]
        tol = served_tolerance(served)
        if "sequences" in have:
            seqs, lens = have["sequences"]
        else:
            prompts, lens, tokens = _parity_prompts(opts, bundle)
            seqs = greedy_continuations(have["reference"], prompts, tokens)
        title = f"{served.name}[{dev}] fp16 vs torch[{dev}] fp32"
        report = teacher_forced_parity(served, have["reference"], seqs, tol, lens, title=title)
        status, detail, data = _parity_data(report, tol, {})
        m.setdefault("parity", {})["fp16"] = {k: v for k, v in data.items() if k != "first_diverging"}
        return status, detail, data

    runner.run(
        f"parity fp16 onnxruntime[{dev}] vs torch[{dev}] fp32",
        parity16,
        estimate="parity",
        needs=runner.needs("reference", "onnxruntime fp16"),
        key="parity fp16",
    )

    def speed16() -> tuple[str, str, dict]:
        per = scheduler_speed(have["onnxruntime fp16"], have["bundle fp16"], opts)
        m.setdefault("speed", {})["onnxruntime:fp16"] = per
        return PASS, _speed_cell(per), per

    runner.run(
        f"speed onnxruntime[{dev}] fp16 (scheduler)",
        speed16,
        estimate="speed",
        needs=runner.needs("onnxruntime fp16"),
        key="speed onnxruntime:fp16",
    )


def _trt_rows(runner: Runner, opts: GpuCheckOptions, why: dict[str, str | None]) -> None:
    """Where ``import tensorrt`` works: an engine of the fp32 bundle, its speed and streams."""
    m = runner.report.measurements
    dev = opts.device
    have = runner.have
    asked = None if opts.trt else "not asked (--no-trt)"

    def build() -> tuple[str, str, dict]:
        from deploy.trt_build import BuildOptions, build_engine

        top = max(max(opts.batches), max(opts.streams))
        bundle = have["bundle fp32"]
        for old in reversed(bundle.manifest.engines):  # built by an earlier run (--work) or given
            if (old.get("limits") or {}).get("max_batch", 0) >= top:
                have["engine"] = old["file"]
                return PASS, f"{old.get('precision')} engine {old['file']} (already in the bundle)", dict(old)
        entry = build_engine(bundle, BuildOptions(preset="server", max_batch=top, progress=False))
        have["engine"] = entry.file
        return (
            PASS,
            f"{entry.precision} engine {entry.file} in {entry.build_seconds:.0f} s",
            {"engine": entry.file},
        )

    runner.run(
        "tensorrt: build an engine (server preset)",
        build,
        estimate="trt_build",
        needs=why["tensorrt"] or asked or runner.needs("bundle fp32"),
        key="speed tensorrt",
        provides="engine",
    )

    def speed() -> tuple[str, str, dict]:
        from serving.backends import BackendOptions, create_backend

        options = BackendOptions(device=dev, engine=have["engine"])
        with create_backend("tensorrt", have["bundle fp32"], options) as be:
            per = scheduler_speed(be, have["bundle fp32"], opts)
        m.setdefault("speed", {})["tensorrt"] = per
        return PASS, _speed_cell(per), per

    needs = why["tensorrt"] or asked or runner.needs("engine")
    runner.run(
        f"speed tensorrt[{dev}] (scheduler)", speed, estimate="speed", needs=needs, key="speed tensorrt"
    )

    def streams() -> tuple[str, str, dict]:
        rows = streams_speed(have["bundle fp32"], "tensorrt", opts, engine=have["engine"])
        m.setdefault("streams", {})["tensorrt"] = rows
        return _streams_result(rows)

    runner.run(
        f"streams tensorrt[{dev}] over gRPC", streams, estimate="streams", needs=needs, key="streams tensorrt"
    )
    if opts.trt_tests:
        repo = Path(__file__).resolve().parents[1]
        runner.run(
            "trt tests (pytest -m trt)",
            lambda: trt_tests_row(repo, max(30.0, runner.budget.left_s)),
            estimate="trt_tests",
            needs=why["tensorrt"],
        )


def trt_tests_row(repo: Path, timeout: float) -> tuple[str, str, dict]:
    """The ``trt``-marked tests, in a local pytest process (nothing is installed or downloaded)."""
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        "trt",
        "-rs",
        "-p",
        "no:cacheprovider",
        "tests/deploy",
        "tests/serving",
    ]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=timeout)
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    print("\n".join(tail[-40:]), flush=True)
    summary = next(
        (
            line
            for line in reversed(tail)
            if " passed" in line or " failed" in line or " skipped" in line or "error" in line
        ),
        "no summary line",
    )
    return (
        (PASS if proc.returncode == 0 else FAIL),
        summary.strip("= "),
        {"returncode": proc.returncode, "tail": tail[-40:]},
    )


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m serving.gpu_check", description=(__doc__ or "").split("\n\n")[0]
    )
    d = GpuCheckOptions()
    p.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT", str(d.out))), help="results directory"
    )
    p.add_argument("--model", default=d.model, help="preset to export when no --bundle is given")
    p.add_argument("--bundle", type=Path, default=None, help="an fp32 bundle (with its reference) to use")
    p.add_argument("--fp16-bundle", type=Path, default=None, help="its fp16 variant (else exported)")
    p.add_argument("--work", type=Path, default=None, help="keep exported bundles here (a rerun reuses them)")
    p.add_argument("--no-fp16", action="store_true", help="skip the fp16 rows")
    p.add_argument("--device", default=d.device, help="cuda or cuda:N; cpu rehearses every row on the CPU")
    p.add_argument(
        "--budget", type=float, default=d.budget_s, help="seconds; steps that no longer fit are SKIP"
    )
    p.add_argument("--parity-tokens", type=int, default=d.parity_tokens)
    p.add_argument("--batches", default=",".join(map(str, d.batches)))
    p.add_argument("--streams", default=",".join(map(str, d.streams)))
    p.add_argument("--new-tokens", type=int, default=d.new_tokens)
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--no-trt", action="store_true", help="skip the TensorRT rows")
    p.add_argument("--trt-tests", action="store_true", help="also run pytest -m trt (where TensorRT is)")
    a = p.parse_args(argv)
    opts = GpuCheckOptions(
        out=a.out,
        model=a.model,
        bundle=a.bundle,
        work=a.work,
        fp16_bundle=a.fp16_bundle,
        fp16=not a.no_fp16,
        device=a.device,
        budget_s=a.budget,
        parity_tokens=a.parity_tokens,
        batches=_ints(a.batches),
        streams=_ints(a.streams),
        new_tokens=a.new_tokens,
        rounds=a.rounds,
        trt=not a.no_trt,
        trt_tests=a.trt_tests,
    )
    return 0 if run_checks(opts) else 1


if __name__ == "__main__":
    sys.exit(main())
