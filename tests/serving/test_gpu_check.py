"""`make gpu-check` without a GPU: its skip paths (no GPU; torch but no onnxruntime-gpu; no
onnxruntime at all, simulated with an import blocker), the targets evaluated from given numbers, its
JSON, a rehearsal of every row on the CPU, and that it installs and downloads nothing."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from serving import gpu_check
from serving.gpu_check import (
    CUDA_EP,
    FAIL,
    PASS,
    SCHEMA,
    SKIP,
    WHEEL_HINT,
    CheckReport,
    GpuCheckOptions,
    Row,
    availability,
    detect_environment,
    evaluate_targets,
    run_checks,
)

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(
    fp16=False,
    batches=(1, 2),
    streams=(1, 2),
    new_tokens=4,
    rounds=1,
    parity_tokens=6,
    parity_prompts=2,
    trt=True,
    budget_s=300.0,
)


def test_report_table_and_truthiness():
    r = CheckReport(rows=[Row("a", PASS, "ok", 1.0), Row("bb", SKIP, "no GPU")])
    assert r and "bb" in r.table() and "no GPU" in r.table()
    r.rows.append(Row("c", FAIL, "boom"))
    assert not r and r.to_json()["passed"] is False


def env(**kw):
    base = {
        "torch": "2.11.0+cu130",
        "torch_cuda": True,
        "gpu": "NVIDIA H200",
        "onnxruntime": "1.31.1",
        "onnxruntime_error": None,
        "onnxruntime_providers": [CUDA_EP, "CPUExecutionProvider"],
        "tensorrt": None,
    }
    return {**base, **kw}


def test_availability_names_what_is_missing():
    full = availability(env())
    assert full["torch"] is None and full["onnxruntime"] is None and full["onnx"] is None
    assert "TensorRT not installed" in full["tensorrt"]
    # the lent H200 of measured-facts: torch with CUDA, onnxruntime's CPU build only
    cpu_build = availability(env(onnxruntime_providers=["CPUExecutionProvider"]))
    assert cpu_build["torch"] is None and cpu_build["onnx"] is None
    assert (
        f"has no {CUDA_EP}" in cpu_build["onnxruntime"] and "not onnxruntime-gpu" in cpu_build["onnxruntime"]
    )
    assert WHEEL_HINT in cpu_build["onnxruntime"]
    # torch only: onnxruntime not importable at all
    none = availability(env(onnxruntime=None, onnxruntime_error="ImportError: blocked"))
    assert none["torch"] is None
    assert none["onnxruntime"].startswith("onnxruntime is not importable (ImportError: blocked)")
    assert none["onnx"].startswith("onnxruntime is not importable")
    # a CPU machine
    cpu = availability(env(torch_cuda=False, gpu=None, onnxruntime_providers=["CPUExecutionProvider"]))
    assert cpu["torch"] == cpu["onnxruntime"] == "no GPU"
    assert (
        availability(env(torch_cuda=False))["torch"]
        == "torch 2.11.0+cu130 has no CUDA (a CPU build, or no driver)"
    )
    trt = availability(env(tensorrt="10.13.0"))
    assert trt["tensorrt"] is None
    # a rehearsal on the CPU runs the torch and ONNX Runtime rows there, never TensorRT
    rehearsal = availability(
        env(torch_cuda=False, gpu=None, onnxruntime_providers=["CPUExecutionProvider"]), "cpu"
    )
    assert rehearsal["torch"] is None and rehearsal["onnxruntime"] is None


def speed(step_ms: float, batch: int) -> dict:
    return {"step_ms": step_ms, "tokens_per_s": 1e3 * batch / step_ms}


def measured(b1=0.8, hf=4.8, b32=1.2, fp32=True, fp16=True, greedy=True, tokens=128) -> dict:
    par = {"passed": fp32, "max_abs": 1.9e-3, "tolerance": "tf32", "atol": 2e-2, "first_diverging_step": None}
    return {
        "speed": {
            "onnxruntime": {"1": speed(b1, 1), "32": speed(b32, 32)},
            "hf-generate": {"1": speed(hf, 1)},
        },
        "parity": {
            "fp32": par,
            "fp16": {**par, "passed": fp16, "tolerance": "fp16", "atol": 5e-2, "first_diverging_step": 7},
            "greedy": {"equal": greedy, "tokens": tokens, "sequences": 2, "common_prefix": [tokens, tokens]},
        },
    }


def statuses(rows: list[Row]) -> list[str]:
    return [r.status for r in rows]


def test_targets_are_evaluated_from_the_numbers():
    rows = evaluate_targets(measured())
    assert len(rows) == 6 and statuses(rows) == [PASS] * 6, [(r.step, r.detail) for r in rows]
    assert "0.800 ms/token" in rows[0].detail and rows[1].data["value"] == pytest.approx(6.0)
    assert rows[2].data["value"] == pytest.approx(32 / 1.2 * 0.8)  # B=32 tokens/s over B=1's
    # at the bounds: <= 1.0 ms, >= 4x, >= 20x pass; just past them fails
    assert statuses(evaluate_targets(measured(b1=1.0, hf=4.0, b32=1.6)))[:3] == [PASS, PASS, PASS]
    assert statuses(evaluate_targets(measured(b1=1.01, hf=4.0, b32=1.62)))[:3] == [FAIL, FAIL, FAIL]
    failing = evaluate_targets(measured(fp32=False, fp16=False, greedy=False))
    assert statuses(failing)[3:] == [FAIL, FAIL, FAIL]
    assert "first diverging step 7" in failing[4].detail
    assert statuses(evaluate_targets(measured(tokens=64)))[5] == FAIL  # equal, but not 128 of them


def test_targets_missing_a_number_are_skip_with_the_reason():
    m = {"skipped": {"speed onnxruntime": "onnxruntime 1.32.0 has no CUDAExecutionProvider"}}
    rows = evaluate_targets(m)
    assert statuses(rows) == [SKIP] * 6
    assert "has no CUDAExecutionProvider" in rows[0].detail and rows[0].detail.startswith("not measured")
    assert rows[3].detail == "not measured: the run did not get there"


def check_schema(saved: dict, report: CheckReport) -> None:
    assert saved["schema"] == SCHEMA and saved["passed"] is bool(report)
    assert {"environment", "options", "rows", "measurements", "duration_s"} <= set(saved)
    assert {"gpu", "torch", "onnxruntime", "onnxruntime_providers", "tensorrt"} <= set(saved["environment"])
    for row in saved["rows"]:
        assert set(row) == {"step", "status", "detail", "seconds", "data"}
        assert row["status"] in (PASS, FAIL, SKIP) and isinstance(row["seconds"], float)
    assert [r["step"] for r in saved["rows"]] == [r.step for r in report.rows]
    assert set(saved["measurements"]["availability"]) == {"torch", "onnxruntime", "onnx", "tensorrt"}
    for per_batch in saved["measurements"].get("speed", {}).values():
        for b, s in per_batch.items():
            assert s["batch"] == int(b) and s["step_ms"] > 0 and s["tokens_per_s"] > 0


INSTALLERS = ("pip", "install", "download", "curl", "wget", "git", "apt", "conda", "uv")


class ProcessLog:
    """Records every process started during the check (libraries may start some: ctypes runs
    ``ldconfig -p`` to find a library); none may install or download anything."""

    def __init__(self, monkeypatch):
        self.commands: list[str] = []
        for name in ("run", "Popen", "call", "check_call", "check_output"):
            monkeypatch.setattr(subprocess, name, self.wrap(getattr(subprocess, name)))
        monkeypatch.setattr(gpu_check.os, "system", self.wrap(gpu_check.os.system))

    def wrap(self, original):
        def record(*args, **kwargs):
            cmd = args[0] if args else kwargs.get("args")
            self.commands.append(cmd if isinstance(cmd, str) else " ".join(map(str, cmd)))
            return original(*args, **kwargs)

        return record

    def installers(self) -> list[str]:
        words = lambda c: {Path(w).name for w in c.replace("=", " ").split()}  # noqa: E731
        return [c for c in self.commands if words(c) & set(INSTALLERS) or " -m pip" in c]


def test_a_rehearsal_runs_every_cpu_row_and_writes_the_json(tiny_bundle, tmp_path, monkeypatch):
    procs = ProcessLog(monkeypatch)
    work = tmp_path / "work"  # where an earlier run exported the bundle: found again, not re-exported
    work.mkdir()
    (work / "tiny-seed0-fp32").symlink_to(tiny_bundle.root)
    report = run_checks(GpuCheckOptions(out=tmp_path, device="cpu", model="tiny", work=work, **SMALL))
    rows = {r.step: r for r in report.rows}
    failed = [(r.step, r.detail) for r in report.rows if r.status == FAIL]
    assert report and not failed, failed
    assert str(tiny_bundle.root) not in rows["bundle fp32 (export tiny)"].detail  # opened from work/
    assert str(work / "tiny-seed0-fp32") in rows["bundle fp32 (export tiny)"].detail
    for step in (
        "greedy onnxruntime[cpu] == torch[cpu]",
        "parity fp32 onnxruntime[cpu] vs torch[cpu]",
        "batched vs solo onnxruntime[cpu]",
        "speed hf-generate[cpu] (transformers generate, fp32)",
        "speed onnxruntime[cpu] fp32 (scheduler)",
        "streams onnxruntime[cpu] over gRPC",
    ):
        assert rows[step].status == PASS, (step, rows[step].detail)
    m = report.measurements
    assert m["parity"]["greedy"]["equal"] and m["parity"]["fp32"]["tolerance"] == "fp32"
    assert "first diverging step: none" in rows["parity fp32 onnxruntime[cpu] vs torch[cpu]"].detail
    for b, s in m["speed"]["onnxruntime"].items():  # the GPU's reduced path, rehearsed on the CPU EP
        assert s["reduced_forwards"] == s["forwards"] > 0 and s["top_k_fallbacks"] == 0, b
    assert [r["streams"] for r in m["streams"]["onnxruntime"]] == [1, 2]
    assert rows["targets"].status == SKIP and "rehearsal" in rows["targets"].detail
    assert "TensorRT not installed" in rows["tensorrt: build an engine (server preset)"].detail or (
        rows["tensorrt: build an engine (server preset)"].detail == "a CPU rehearsal (--device cpu)"
    )
    check_schema(json.loads((tmp_path / "gpu_check.json").read_text()), report)
    assert procs.installers() == [], procs.commands


def test_without_a_gpu_every_gpu_row_says_why(tiny_bundle, tmp_path, monkeypatch):
    why = availability(detect_environment())
    if why["torch"] is None or why["onnxruntime"] is None:
        pytest.skip("this machine has a usable GPU: `make gpu-check` runs these rows for real")
    procs = ProcessLog(monkeypatch)
    report = run_checks(GpuCheckOptions(out=tmp_path, bundle=tiny_bundle.root, **SMALL))
    rows = {r.step: r for r in report.rows}
    assert report  # SKIPs do not fail a machine without a GPU
    assert rows["bundle fp32 (open " + str(tiny_bundle.root) + ")"].status == PASS
    assert rows["load torch reference [cuda]"].detail == why["torch"]
    assert rows["load onnxruntime[cuda] fp32"].detail == why["onnxruntime"]
    assert rows["speed hf-generate[cuda] (transformers generate, fp32)"].detail == why["torch"]
    ran = [r.step for r in report.rows if r.status != SKIP]
    assert ran == ["environment", f"bundle fp32 (open {tiny_bundle.root})"], ran
    targets = [r for r in report.rows if r.step.startswith("target:")]
    assert len(targets) == 6 and all(
        r.status == SKIP and r.detail.startswith("not measured") for r in targets
    )
    assert why["onnxruntime"] in targets[0].detail  # the reason reaches the target it blocks
    check_schema(json.loads((tmp_path / "gpu_check.json").read_text()), report)
    assert procs.installers() == [], procs.commands


BLOCKER = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is blocked for this test")
        return None
sys.meta_path.insert(0, _Block())
"""


def test_without_onnxruntime_it_says_so_and_skips_those_rows(tmp_path):
    """A machine with torch but no onnxruntime (the lent H200 had no onnxruntime-gpu): the ONNX
    rows are SKIP naming the wheel to carry, nothing is exported, and the run still succeeds."""
    code = BLOCKER.format(blocked={"onnxruntime"}) + textwrap.dedent(
        f"""
        from pathlib import Path
        from serving.gpu_check import GpuCheckOptions, run_checks
        report = run_checks(GpuCheckOptions(out=Path({str(tmp_path)!r}), model="tiny", fp16=True, trt=True))
        assert "onnxruntime" not in sys.modules
        sys.exit(0 if report else 1)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = {r["step"]: r for r in saved["rows"]}
    assert saved["environment"]["onnxruntime"] is None
    assert "blocked for this test" in saved["environment"]["onnxruntime_error"]
    bundle = rows["bundle fp32 (export tiny)"]
    assert bundle["status"] == SKIP and bundle["detail"].startswith("onnxruntime is not importable")
    ort_reason = saved["measurements"]["availability"]["onnxruntime"]
    assert WHEEL_HINT in ort_reason
    assert all(r["status"] == SKIP for s, r in rows.items() if "onnxruntime[" in s), rows
    assert "bundle fp16 (export tiny)" in rows and rows["bundle fp16 (export tiny)"]["status"] == SKIP


def test_it_installs_and_downloads_nothing():
    """The only process it can start is the local pytest of ``--trt-tests``; no pip, no network."""
    tree = ast.parse((ROOT / "serving" / "gpu_check.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & {"pip", "ensurepip", "urllib", "http", "requests", "socket", "huggingface_hub"}
    calls = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and isinstance(n.func.value, ast.Name)
        and n.func.value.id in ("subprocess", "os")
        and n.func.attr in ("run", "Popen", "call", "check_call", "check_output", "system", "execv", "execvp")
    ]
    assert len(calls) == 1  # trt_tests_row
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "trt_tests_row")
    cmd = next(n for n in ast.walk(fn) if isinstance(n, ast.Assign) and n.targets[0].id == "cmd")
    words = [c.value for c in ast.walk(cmd.value) if isinstance(c, ast.Constant)]
    assert words[:2] == ["-m", "pytest"] and not {"pip", "install", "download"} & set(words)
