"""`make gpu-check` on a CPU-only machine: it runs, says "no GPU", and still checks what the CPU can."""

from __future__ import annotations

import json
from pathlib import Path

from serving.gpu_check import FAIL, PASS, SKIP, CheckReport, Row, detect_environment, run_checks


def test_report_table_and_truthiness():
    r = CheckReport(rows=[Row("a", PASS, "ok", 1.0), Row("bb", SKIP, "no GPU")])
    assert r and "bb" in r.table() and "no GPU" in r.table()
    r.rows.append(Row("c", FAIL, "boom"))
    assert not r and r.to_json()["passed"] is False


def test_runs_on_this_machine(tiny_bundle, tmp_path):
    env = detect_environment()
    report = run_checks(out=tmp_path, models=[], bundle=tiny_bundle.root, budget=120, run_trt_tests=True)
    rows = {r.step: r for r in report.rows}
    assert rows["environment"].status == PASS
    # the CPU baseline really ran: ONNX Runtime against the torch reference on the tiny bundle
    cpu = rows["tiny: onnxruntime[cpu] vs torch[cpu]"]
    assert cpu.status == PASS and cpu.data["cases"], cpu.detail
    gpu_row = rows["tiny: onnxruntime[cpu] vs torch[cuda]"]
    trt_row = rows["trt tests (pytest -m trt)"]
    if env["gpu"] is None:
        assert (
            "no GPU" in rows["environment"].detail and gpu_row.status == SKIP and gpu_row.detail == "no GPU"
        )
    if env["tensorrt"] is None:
        assert trt_row.status == SKIP and "TensorRT not installed" in trt_row.detail
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["step"] for r in saved["rows"]] == [r.step for r in report.rows]


def test_a_bad_bundle_is_a_fail_row_not_a_crash(tmp_path):
    import tempfile

    before = {p.name for p in Path(tempfile.gettempdir()).glob("gpu-check-*")}
    report = run_checks(
        out=tmp_path / "out", models=[], bundle=tmp_path / "no-bundle", budget=60, run_trt_tests=False
    )
    row = next(r for r in report.rows if r.step == "open bundle no-bundle")
    assert row.status == FAIL and "no-bundle" in row.detail and not report
    assert "cuda_python" in report.environment  # reported (None where cuda-python is not installed)
    assert "cuda-python" in report.rows[0].detail
    assert {p.name for p in Path(tempfile.gettempdir()).glob("gpu-check-*")} == before  # cleaned up
