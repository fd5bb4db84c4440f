"""The committed gRPC code is fresh, and the check notices when it is not."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from serving.proto import generate

ROOT = Path(__file__).resolve().parents[2]


def test_committed_code_is_fresh():
    proc = subprocess.run(
        [sys.executable, "-m", "serving.proto.generate", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "up to date (2 protos)" in proc.stdout


def test_check_reports_stale_missing_and_extra_files(tmp_path):
    fresh = generate.run_protoc(tmp_path / "fresh")
    committed = tmp_path / "committed"
    shutil.copytree(generate.PROTO_DIR, committed)
    assert generate.check(fresh, committed) == []
    stale = committed / "gpt2_deploy_pb2.py"
    stale.write_text(stale.read_text() + "# edited by hand\n")
    (committed / "grpc_service_pb2.pyi").unlink()
    (committed / "old_pb2.py").write_text("")
    problems = "\n".join(generate.check(fresh, committed))
    assert "gpt2_deploy_pb2.py: stale" in problems
    assert "grpc_service_pb2.pyi: missing" in problems
    assert "old_pb2.py: no .proto generates it" in problems


def test_version_stamps_alone_are_not_staleness(tmp_path):
    fresh = generate.run_protoc(tmp_path / "fresh")
    committed = tmp_path / "committed"
    shutil.copytree(generate.PROTO_DIR, committed)
    grpc_file = committed / "gpt2_deploy_pb2_grpc.py"
    text = grpc_file.read_text()
    stamp = next(line for line in text.splitlines() if line.startswith("GRPC_GENERATED_VERSION"))
    grpc_file.write_text(text.replace(stamp, "GRPC_GENERATED_VERSION = '9.99.0'"))
    assert generate.check(fresh, committed) == []
