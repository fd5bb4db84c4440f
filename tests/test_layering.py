"""Data flows one way, export -> deploy -> serving: a lower stage never imports a higher one.

Every module's imports are read from its syntax tree (imports inside functions and under
``TYPE_CHECKING`` count too), so a cycle cannot hide behind a lazy import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RANK = {"export": 0, "deploy": 1, "serving": 2}


def stage_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every absolute import of a stage package in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, n) for n in names if n.split(".")[0] in RANK]
    return found


def upward_imports(stage: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / stage).rglob("*.py")):
        for line, module in stage_imports(path):
            if RANK[module.split(".")[0]] > RANK[stage]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("stage", ["export", "deploy"])
def test_no_stage_imports_a_later_stage(stage):
    assert upward_imports(stage) == []


def test_the_check_sees_lazy_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from serving.server import serve\n    import deploy.cli\n")
    assert stage_imports(probe) == [(2, "serving.server"), (3, "deploy.cli")]


def test_each_stage_owns_its_commands():
    from typer.main import get_command

    from serving.cli import app

    owners = {}
    for name, cmd in get_command(app).commands.items():
        owners[name] = cmd.callback.__module__
    assert owners == {
        "export": "export.cli",
        "inspect": "export.cli",
        "build": "deploy.cli",
        "serve": "serving.cli",
        "generate": "serving.cli",
        "parity": "serving.cli",
        "health": "serving.cli",
    }
