"""Generate (or check) the Python gRPC code for the .proto files in this directory.

    python -m serving.proto.generate           # regenerate serving/proto/*_pb2*.py(i)
    python -m serving.proto.generate --check   # exit 1 if the committed files are stale

protoc runs with the repository root as the include path and each .proto named by its path
(``serving/proto/x.proto``), so the generated modules are ``serving.proto.x_pb2`` and the
``*_pb2_grpc`` modules import them as ``from serving.proto import x_pb2``: no import rewriting.

The check regenerates into a temporary directory and compares line by line. Only the generator's
version stamps are masked, each matched whole at its known place (``_normalized``), so a newer
grpcio-tools in CI does not make unchanged protos look stale and no other line (a method path, a
message name) can ever be hidden by the masking.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
ROOT = PROTO_DIR.parents[1]
REL_DIR = PROTO_DIR.relative_to(ROOT)  # serving/proto
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

VERSION = r"\d+\.\d+\.\d+(?:[.-]?[A-Za-z0-9]+)*"
# Whole lines that only stamp the generator's version (fullmatch: nothing else on the line).
_STAMP_LINES = (
    re.compile(rf"# Protobuf Python Version: {VERSION}"),  # *_pb2.py header
    re.compile(rf"GRPC_GENERATED_VERSION = '{VERSION}'"),  # *_pb2_grpc.py
)
# *_pb2.py: the protobuf runtime check; its major, minor, patch and suffix arguments are stamps.
_RUNTIME_CHECK = "_runtime_version.ValidateProtobufRuntimeVersion("
_RUNTIME_CHECK_ARGS = (
    re.compile(r"    _runtime_version\.Domain\.PUBLIC,"),  # compared, not masked
    re.compile(r"    \d+,"),
    re.compile(r"    \d+,"),
    re.compile(r"    \d+,"),
    re.compile(r"    '[A-Za-z0-9.-]*',"),
)
MASK = "<generator version>"


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def generated_files(directory: Path) -> dict[str, Path]:
    return {
        p.name: p for p in sorted(directory.iterdir()) if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
    }


def run_protoc(out_root: Path) -> Path:
    """Generate into ``out_root/serving/proto``; return that directory.

    Raises:
        MissingDependencyError: grpcio-tools is not installed.
        RuntimeError: protoc failed.
    """
    from export.deps import require

    protoc = require("grpc_tools.protoc")
    import importlib.resources

    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    out_dir = out_root / REL_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(p.relative_to(ROOT)) for p in proto_files()),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}: {' '.join(args[1:])}")
    return out_dir


def _normalized(text: str) -> list[str]:
    """The lines of a generated file with the generator's version stamps replaced by ``MASK``.

    A stamp is masked only where the generator writes it: a whole line of ``_STAMP_LINES``, or an
    argument line of the runtime check right after ``_RUNTIME_CHECK`` in exactly its generated
    shape. Anything else (a changed method path, a renamed field) is compared as written.
    """
    lines = text.splitlines()
    out = [MASK if any(p.fullmatch(line) for p in _STAMP_LINES) else line for line in lines]
    for i, line in enumerate(lines):
        args = lines[i + 1 : i + 1 + len(_RUNTIME_CHECK_ARGS)]
        if (
            line == _RUNTIME_CHECK
            and len(args) == len(_RUNTIME_CHECK_ARGS)
            and all(p.fullmatch(a) for p, a in zip(_RUNTIME_CHECK_ARGS, args))
        ):
            for j in range(i + 2, i + 1 + len(_RUNTIME_CHECK_ARGS)):  # the version arguments
                out[j] = MASK
    return out


def check(out_dir: Path, committed_dir: Path = PROTO_DIR) -> list[str]:
    """Compare freshly generated files in ``out_dir`` with the committed ones; list problems."""
    fresh, committed = generated_files(out_dir), generated_files(committed_dir)
    problems = []
    for name in sorted(fresh.keys() - committed.keys()):
        problems.append(f"{REL_DIR / name}: missing (not generated/committed)")
    for name in sorted(committed.keys() - fresh.keys()):
        problems.append(f"{REL_DIR / name}: no .proto generates it any more (delete it)")
    for name in sorted(fresh.keys() & committed.keys()):
        new, old = _normalized(fresh[name].read_text()), _normalized(committed[name].read_text())
        if new != old:
            diff = [
                d
                for d in difflib.unified_diff(old, new, lineterm="", n=0)
                if d[:1] in "+-" and not d.startswith(("+++", "---"))
            ]
            added = sum(d.startswith("+") for d in diff)
            removed = len(diff) - added
            first = diff[0] if diff else ""
            problems.append(f"{REL_DIR / name}: stale (+{added}/-{removed} lines; first: {first[:100]!r})")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serving.proto.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--check", action="store_true", help="fail if the committed generated files are stale"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = run_protoc(Path(tmp))
        if args.check:
            problems = check(out_dir)
            if problems:
                print(
                    "generated gRPC code is stale; run `make proto` and commit the result:", file=sys.stderr
                )
                for p in problems:
                    print(f"  - {p}", file=sys.stderr)
                return 1
            print(f"generated gRPC code is up to date ({len(proto_files())} protos)")
            return 0
        for name, path in generated_files(out_dir).items():
            (PROTO_DIR / name).write_text(path.read_text())
            print(f"wrote {REL_DIR / name}")
        for name in generated_files(PROTO_DIR).keys() - generated_files(out_dir).keys():
            (PROTO_DIR / name).unlink()
            print(f"removed stale {REL_DIR / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
