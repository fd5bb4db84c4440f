"""``make gpu-check``: everything a GPU machine can check here, in one run sized for a 10-minute session.

    python -m serving.gpu_check [--out DIR] [--bundle DIR] [--models tiny,gpt2-124m] [--budget 480]

Steps (each one a row of the summary table; a step that cannot run here is SKIP with the reason):
1. environment: GPU (torch.cuda or cuda-python), torch/onnxruntime/TensorRT/cuda-python versions;
2. per model (tiny, then the 124M shape while the time budget lasts): export a bundle, then
   teacher-forced parity of the torch reference on CUDA against the ONNX Runtime CPU backend
   (``serving.parity.teacher_forced_parity``), and the torch CPU reference against ONNX Runtime
   CPU as the baseline the CPU machine can also run;
3. the ``trt`` tests (pytest -m trt) wherever ``import tensorrt`` works.

Prints one table and writes ``gpu_check.json`` into ``--out`` (default ``gpu-check-results``).
Runs on a CPU-only machine too: the GPU rows say "no GPU".
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


@dataclass
class Row:
    step: str
    status: str
    detail: str = ""
    seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckReport:
    """All rows; truthy when nothing failed (SKIPs do not fail a CPU machine)."""

    rows: list[Row] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return all(r.status != FAIL for r in self.rows)

    def table(self) -> str:
        w = max([len(r.step) for r in self.rows] + [4])
        lines = [f"{'step':<{w}}  status  seconds  detail", f"{'-' * w}  ------  -------  ------"]
        lines += [f"{r.step:<{w}}  {r.status:<6}  {r.seconds:7.1f}  {r.detail}" for r in self.rows]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"passed": bool(self), "environment": self.environment, "rows": [asdict(r) for r in self.rows]}


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return None
    return str(getattr(mod, "__version__", "?"))


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
    """Versions and the GPU, without failing on anything missing."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "torch": _version("torch"),
        "onnxruntime": _version("onnxruntime"),
        "tensorrt": _version("tensorrt"),
        "tensorrt_lean": _version("tensorrt_lean"),
        "cuda_python": _dist_version("cuda-python", "cuda-bindings"),
        "gpu": None,
        "compute_capability": None,
        "torch_cuda": False,
    }
    try:
        import torch

        if torch.cuda.is_available():
            env["torch_cuda"] = True
            env["gpu"] = torch.cuda.get_device_name(0)
            env["compute_capability"] = "{}.{}".format(*torch.cuda.get_device_capability(0))
    except Exception:  # noqa: BLE001
        pass
    if env["gpu"] is None:
        try:
            from deploy.cuda import cuda_device_info

            info = cuda_device_info(0)
            env["gpu"], env["compute_capability"] = info.name, info.compute_capability
        except Exception as e:  # noqa: BLE001
            env["gpu_error"] = f"{type(e).__name__}: {e}"
    return env


def _timed(report: CheckReport, step: str, fn: Callable[[], tuple[str, str, dict]]) -> Row:
    t0 = time.perf_counter()
    try:
        status, detail, data = fn()
    except Exception as e:  # noqa: BLE001 - a crashed step is a FAIL row, the run goes on
        status, detail, data = FAIL, f"{type(e).__name__}: {e}"[:300], {}
    row = Row(step, status, detail, time.perf_counter() - t0, data)
    report.rows.append(row)
    print(f"[gpu-check] {row.status} {row.step} ({row.seconds:.1f} s) {row.detail}", flush=True)
    return row


def parity_row(
    bundle: Any,
    served_name: str,
    served_device: str,
    ref_device: str,
    prompts: int = 2,
    new_tokens: int = 8,
    seed: int = 0,
) -> tuple[str, str, dict]:
    """Teacher-forced parity: reference (torch on ``ref_device``) vs ``served_name`` on ``served_device``."""
    import numpy as np

    from serving.backends import BackendOptions, create_backend
    from serving.parity import reference_backend, teacher_forced_parity, tolerance_for_backend

    rng = np.random.default_rng(seed)
    n = bundle.dims.n_positions
    seqs = [
        rng.integers(0, bundle.dims.vocab_size, size=min(8 + new_tokens, n)).tolist() for _ in range(prompts)
    ]
    ref = reference_backend(bundle, ref_device)
    try:
        served = create_backend(served_name, bundle, BackendOptions(device=served_device)).load()
        try:
            # The CPU fp32 ONNX graph is held to the GPU/fp32 bound when the reference runs on CUDA.
            tol = tolerance_for_backend(
                bundle, served_name, ref_device if served_device == "cpu" else served_device
            )
            report = teacher_forced_parity(
                served, ref, seqs, tol, 8, title=f"{served_name}[{served_device}] vs torch[{ref_device}]"
            )
        finally:
            served.close()
    finally:
        ref.close()
    print(report, flush=True)
    detail = (
        f"max|Δ| {report.max_abs:.3g}, top-1 {report.top1_agreement:.2%} over "
        f"{len(report.cases)} steps (tolerance {tol.name}: atol {tol.atol:g})"
    )
    return (PASS if report else FAIL), detail, report.to_json()


def trt_tests_row(repo: Path, timeout: float) -> tuple[str, str, dict]:
    env = detect_environment()
    if env["tensorrt"] is None:
        return SKIP, "import tensorrt fails here (TensorRT not installed)", {}
    if env["gpu"] is None:
        return SKIP, "no GPU", {}
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


def run_checks(
    *,
    out: Path,
    models: list[str],
    bundle: Path | None = None,
    budget: float = 480.0,
    run_trt_tests: bool = True,
) -> CheckReport:
    """Run every step that fits ``budget`` seconds; return the report (also written to ``out``)."""
    start = time.perf_counter()
    report = CheckReport(environment=detect_environment())
    env = report.environment
    gpu = env["gpu"]
    cc = f" (sm {env['compute_capability']})" if gpu else ""
    env_line = (
        f"GPU: {gpu or 'no GPU'}{cc}; torch {env['torch']}, onnxruntime {env['onnxruntime']}, "
        f"tensorrt {env['tensorrt'] or '-'}, cuda-python {env['cuda_python'] or '-'}"
    )
    _timed(report, "environment", lambda: (PASS, env_line, {}))
    tmp = tempfile.TemporaryDirectory(prefix="gpu-check-")
    try:
        _run_steps(report, env, tmp.name, models, bundle, budget, run_trt_tests, start)
    finally:
        tmp.cleanup()

    print("\n" + report.table(), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report.to_json(), indent=2, default=str) + "\n")
    print(f"\nwritten: {out / 'gpu_check.json'}", flush=True)
    return report


def _run_steps(
    report: CheckReport,
    env: dict[str, Any],
    tmp: str,
    models: list[str],
    bundle: Path | None,
    budget: float,
    run_trt_tests: bool,
    start: float,
) -> None:
    """The export, parity and trt-test rows (``run_checks`` owns the temporary directory)."""
    gpu = env["gpu"]
    bundles: list[tuple[str, Any]] = []
    from export.manifest import Bundle

    if bundle is not None:

        def open_bundle(path: Path = Path(bundle)) -> tuple[str, str, dict]:
            b = Bundle.open(path)  # a BundleError (or a missing directory) is this row's FAIL
            bundles.append((path.name, b))
            return PASS, f"{b.name}, {b.manifest.precision} -> {b.root}", {}

        _timed(report, f"open bundle {Path(bundle).name}", open_bundle)
    for model in models:
        if time.perf_counter() - start > budget * 0.5:
            report.rows.append(Row(f"export {model}", SKIP, "time budget spent"))
            continue

        def export(model: str = model) -> tuple[str, str, dict]:
            from export.api import ExportOptions, export_bundle

            b = export_bundle(ExportOptions(model=model, out=Path(tmp) / model, quiet=True))
            bundles.append((model, b))
            return PASS, f"{b.dims.n_layer} layers, {b.dims.n_embd} dims -> {b.root}", {}

        _timed(report, f"export {model}", export)

    for name, b in bundles:
        if time.perf_counter() - start > budget * 0.8:
            report.rows.append(Row(f"parity {name}", SKIP, "time budget spent"))
            continue
        _timed(
            report,
            f"{name}: onnxruntime[cpu] vs torch[cpu]",
            lambda b=b: parity_row(b, "onnxruntime", "cpu", "cpu"),
        )
        if env["torch_cuda"]:
            _timed(
                report,
                f"{name}: onnxruntime[cpu] vs torch[cuda]",
                lambda b=b: parity_row(b, "onnxruntime", "cpu", "cuda"),
            )
        else:
            report.rows.append(
                Row(
                    f"{name}: onnxruntime[cpu] vs torch[cuda]",
                    SKIP,
                    "no GPU" if gpu is None else "torch has no CUDA",
                )
            )
    if run_trt_tests:
        left = max(30.0, budget - (time.perf_counter() - start))
        repo = Path(__file__).resolve().parents[1]
        _timed(report, "trt tests (pytest -m trt)", lambda: trt_tests_row(repo, left))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check-results")))
    p.add_argument("--bundle", type=Path, default=None, help="also check an existing bundle")
    p.add_argument("--models", default="tiny,gpt2-124m", help="presets to export and check, in order")
    p.add_argument("--budget", type=float, default=480.0, help="seconds; later steps are skipped past it")
    p.add_argument("--no-trt-tests", action="store_true")
    a = p.parse_args(argv)
    models = [m for m in a.models.split(",") if m]
    report = run_checks(
        out=a.out, models=models, bundle=a.bundle, budget=a.budget, run_trt_tests=not a.no_trt_tests
    )
    return 0 if report else 1


if __name__ == "__main__":
    sys.exit(main())
