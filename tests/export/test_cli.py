"""The `export` and `inspect` commands, driven in-process (typer's CliRunner) and as a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from serving.cli import app

runner = CliRunner()
CLI = Path(sys.executable).with_name("gpt2-deploy")


def test_export_tiny_then_inspect(tmp_path):
    out = tmp_path / "b"
    r = runner.invoke(
        app,
        [
            "export",
            "--model",
            "tiny",
            "--out",
            str(out),
            "--seed",
            "1",
            "--name",
            "tiny-cli",
            "--no-reference",
        ],
    )
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["name"] == "tiny-cli" and summary["precision"] == "fp32"
    assert summary["validation"].startswith("PASS")
    # progress lines only: the exporter's own chatter is captured
    assert "[2/6] exporting fp32 ONNX" in r.stderr and "torchvision" not in r.stderr
    assert "Writing model shards" not in r.stderr

    r = runner.invoke(app, ["inspect", str(out), "--files"])
    assert r.exit_code == 0, r.output
    assert "model.onnx" in r.stdout and json.loads(r.stdout.split("\n}\n")[0] + "}")["n_positions"] == 256

    (out / "config.json").write_text("{}")
    r = runner.invoke(app, ["inspect", str(out)])
    assert r.exit_code == 1
    assert "config.json: size is 2 bytes" in r.stderr and "Traceback" not in r.output


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_failed_validation_leaves_the_previous_bundle_and_keeps_the_failure_apart(
    tiny_bundle, tmp_path, monkeypatch
):
    """Bug: a re-export whose validation failed replaced the good bundle (engines included)."""
    from export import compare
    from export.manifest import Bundle

    monkeypatch.setitem(compare.PRECISION_TOLERANCES, "fp32", compare.Tolerance("fp32", 0.0, 1.0))
    out = tmp_path / "b"
    shutil.copytree(tiny_bundle.root, out)
    (out / "engines").mkdir()
    (out / "engines" / "server-fp16.engine").write_bytes(b"a previous engine")
    before = _tree(out)
    r = runner.invoke(app, ["export", "--model", "tiny", "--out", str(out), "--no-reference", "--quiet"])
    assert r.exit_code == 1
    assert r.stderr.count("[FAIL]") >= 3 and "validation failed (" in r.stderr
    assert "Traceback" not in r.output
    assert _tree(out) == before  # every file of the previous bundle, byte for byte
    Bundle.open(out)
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("b.failed-")]
    assert len(kept) == 1 and sorted(p.name for p in tmp_path.iterdir()) == sorted(["b", kept[0].name])
    assert f"the failing bundle is kept in {kept[0]} for inspection" in " ".join(r.stderr.split())
    failed = Bundle.open(kept[0])  # a complete bundle to inspect, its report in the manifest
    assert failed.manifest.validation["passed"] is False and (kept[0] / "engines").exists() is False


def test_existing_foreign_directory_is_refused(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    r = runner.invoke(app, ["export", "--model", "tiny", "--out", str(tmp_path)])
    assert r.exit_code == 1 and "is not empty and is not a gpt2-deploy bundle" in r.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


@pytest.mark.skipif(not CLI.exists(), reason="the gpt2-deploy console script is not installed in this venv")
def test_console_script_bad_model_name(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(
        [str(CLI), "export", "--model", "no-such-model", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert p.returncode != 0
    assert "error: --model 'no-such-model' is not a preset" in p.stderr and "tiny" in p.stderr
    assert "Traceback" not in p.stderr + p.stdout


def test_make_export_wraps_the_cli(tmp_path):
    """`make export` runs the CLI with MODEL/OUT/PRECISION/SEED passed through: the CLI's own checks
    answer (fast: they fail before any export), and make fails with it."""
    make = shutil.which("make")
    if make is None or not CLI.exists():
        pytest.skip("make or the console script is missing")
    root = Path(__file__).resolve().parents[2]

    def run(*assignments):
        return subprocess.run(
            [make, "-s", "export", "MODEL=tiny", f"OUT={tmp_path}/b", *assignments],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=120,
        )

    bad_precision = run("PRECISION=fp8")
    assert bad_precision.returncode != 0 and "'fp8' is not one of" in bad_precision.stderr
    bad_seed = run("SEED=many")
    assert bad_seed.returncode != 0 and "Invalid value for '--seed'" in bad_seed.stderr
    assert not (tmp_path / "b").exists()
