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


def _committed_copy(tmp_path):
    fresh = generate.run_protoc(tmp_path / "fresh")
    committed = tmp_path / "committed"
    shutil.copytree(generate.PROTO_DIR, committed)
    return fresh, committed


def _edit(path, old, new):
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new))


def test_version_stamps_alone_are_not_staleness(tmp_path):
    """Another protoc / grpcio-tools release rewrites only its version stamps: not stale."""
    fresh, committed = _committed_copy(tmp_path)
    grpc_file = committed / "gpt2_deploy_pb2_grpc.py"
    stamp = next(
        line for line in grpc_file.read_text().splitlines() if line.startswith("GRPC_GENERATED_VERSION")
    )
    _edit(grpc_file, stamp, "GRPC_GENERATED_VERSION = '9.99.0'")
    pb2 = committed / "gpt2_deploy_pb2.py"
    text = pb2.read_text()
    header = next(line for line in text.splitlines() if line.startswith("# Protobuf Python Version: "))
    _edit(pb2, header, "# Protobuf Python Version: 8.0.0-rc1")
    # the runtime check's major, minor, patch and suffix arguments
    lines = pb2.read_text().splitlines()
    i = lines.index("_runtime_version.ValidateProtobufRuntimeVersion(")
    lines[i + 2 : i + 6] = ["    8,", "    0,", "    0,", "    '-rc1',"]
    pb2.write_text("\n".join(lines) + "\n")
    assert generate.check(fresh, committed) == []


def test_a_changed_rpc_method_path_is_stale(tmp_path):
    """The method paths in *_pb2_grpc.py are real code: a changed one must be reported."""
    fresh, committed = _committed_copy(tmp_path)
    grpc_file = committed / "gpt2_deploy_pb2_grpc.py"
    _edit(grpc_file, "'/gpt2_deploy.v1.Gpt2Deploy/Generate',", "'/gpt2_deploy.v1.Gpt2Deploy/Generate2',")
    problems = generate.check(fresh, committed)
    # the path is written twice (the stub and the experimental API): both lines differ
    assert len(problems) == 1 and "gpt2_deploy_pb2_grpc.py: stale (+2/-2 lines" in problems[0], problems
    assert "Gpt2Deploy/Generate2'" in problems[0]


def test_lines_next_to_the_stamps_are_still_compared(tmp_path):
    """Only the stamps themselves are masked: the runtime check's proto path, a string argument in
    the same shape elsewhere, and a stamp line with more on it all count."""
    fresh, committed = _committed_copy(tmp_path)
    pb2 = committed / "gpt2_deploy_pb2.py"
    _edit(pb2, "    'serving/proto/gpt2_deploy.proto'\n)", "    'serving/proto/other.proto'\n)")
    kserve = committed / "grpc_service_pb2_grpc.py"
    path = next(line for line in kserve.read_text().splitlines() if line.strip().startswith("'/inference."))
    _edit(kserve, path, path.replace("/inference.", "/inference2."))
    grpc_file = committed / "gpt2_deploy_pb2_grpc.py"
    stamp = next(
        line for line in grpc_file.read_text().splitlines() if line.startswith("GRPC_GENERATED_VERSION")
    )
    _edit(grpc_file, stamp, stamp + "; import os")
    problems = "\n".join(generate.check(fresh, committed))
    for name in ("gpt2_deploy_pb2.py", "grpc_service_pb2_grpc.py", "gpt2_deploy_pb2_grpc.py"):
        assert f"{name}: stale" in problems, problems
