"""Heavy optional dependencies stay optional (Polygraphy's tests/mod/test_dependencies.py habit).

Each check runs in a fresh interpreter with an import hook that makes the blocked packages
unimportable, as on a machine where they are not installed.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("export", "deploy", "serving")

BLOCKER = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked for this test")
        return None
sys.meta_path.insert(0, _Block())
"""


def _run(code: str, blocked: set[str]) -> subprocess.CompletedProcess:
    script = BLOCKER.format(blocked=sorted(blocked)) + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def all_modules() -> list[str]:
    mods = []
    for pkg in PACKAGES:
        mods.append(pkg)
        for info in pkgutil.walk_packages([str(ROOT / pkg)], prefix=pkg + "."):
            mods.append(info.name)
    return mods


def test_every_module_imports_without_tensorrt_or_cuda():
    mods = all_modules()
    assert len(mods) > 10, mods  # the walk found the project
    proc = _run(
        f"""
        import importlib
        failed = []
        for m in {mods!r}:
            try:
                importlib.import_module(m)
            except Exception as e:
                failed.append(f"{{m}}: {{type(e).__name__}}: {{e}}")
        print("\\n".join(failed))
        sys.exit(1 if failed else 0)
        """,
        {"tensorrt", "tensorrt_lean", "tensorrt_dispatch", "cuda", "pycuda"},
    )
    assert proc.returncode == 0, f"modules failing to import without tensorrt:\n{proc.stdout}{proc.stderr}"


def test_cli_help_and_ort_serving_path_import_without_torch_or_tensorrt():
    proc = _run(
        """
        import importlib
        for m in ("serving.cli", "export.cli", "deploy.cli", "serving.server", "serving.client",
                  "serving.generation", "serving.backends.ort_backend", "serving.parity",
                  "export.manifest"):
            importlib.import_module(m)
        assert "torch" not in sys.modules and "transformers" not in sys.modules
        from typer.testing import CliRunner
        from serving.cli import app
        res = CliRunner().invoke(app, ["--help"])
        assert res.exit_code == 0, res.output
        for cmd in ("export", "build", "serve", "generate", "parity"):
            assert cmd in res.output, (cmd, res.output)
        assert "torch" not in sys.modules, "--help imported torch"
        print("ok")
        """,
        {"torch", "transformers", "tensorrt", "tensorrt_lean", "cuda"},
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("module", ["torch", "tensorrt"])
def test_missing_dependency_names_the_extra(module):
    proc = _run(
        f"""
        from export.deps import require, MissingDependencyError
        try:
            require({module!r})
        except MissingDependencyError as e:
            print(e)
        """,
        {module},
    )
    assert "pip install 'gpt2-deploy[" in proc.stdout, proc.stdout + proc.stderr
