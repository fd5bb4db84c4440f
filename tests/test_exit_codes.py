"""Every command exits 2 for bad options (README "Exit codes"), and a bug keeps its traceback."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from export.errors import EXIT_OPTIONS
from serving.cli import app

runner = CliRunner()


def _bad_option_cases(bundle: str) -> list[tuple[list[str], str]]:
    """(argv, what the error says) per command; each fails on its options, before any work."""
    return [
        (["export", "--model", "tiny", "--out", "x", "--precision", "fp8"], "'fp8' is not one of"),
        (["export", "--model", "tiny", "--out", "x", "--int8-per-channel"], "--int8-per-channel applies"),
        (["inspect", bundle, "--no-such-flag"], "No such option"),
        (["build", bundle, "--preset", "nope", "--print-trtexec"], "unknown preset 'nope'"),
        (["build", bundle, "--opt-level", "9", "--print-trtexec"], "opt level must be in 0..5"),
        (["serve", bundle, "--parity", "sometimes", "--port", "0"], "parity must be one of"),
        (["serve", bundle, "--backend", "nope", "--port", "0"], "backend must be one of"),
        (["serve", bundle, "--log-level", "LOUD"], "--log-level 'LOUD'"),
        (["generate", "--max-new-tokens", "many", "Hi"], "Invalid value for '--max-new-tokens'"),
        (["parity", bundle, "--backend", "nope"], "unknown backend 'nope'"),
        (["parity", bundle, "--tolerance", "loose"], "no tolerance preset for precision 'loose'"),
        (["health", "--timeout", "soon"], "Invalid value for '--timeout'"),
    ]


def test_every_command_exits_2_for_bad_options(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `export --out x` would write here if it got that far
    commands = set()
    for argv, says in _bad_option_cases(str(tiny_bundle.root)):
        res = runner.invoke(app, argv, env={"COLUMNS": "400", "NO_COLOR": "1"})
        assert res.exit_code == EXIT_OPTIONS, (argv, res.exit_code, res.output)
        assert says in res.output, (argv, res.output)
        assert res.exception is None or isinstance(res.exception, SystemExit), (argv, res.exception)
        commands.add(argv[0])
    assert commands == {c.name for c in app.registered_commands}  # every command is covered
    assert list(tmp_path.iterdir()) == []  # nothing was exported


@pytest.mark.parametrize("command", ["parity", "serve"])
def test_a_bug_is_not_reported_as_a_user_error(tiny_bundle, monkeypatch, command):
    """The commands catch domain errors only: an internal RuntimeError keeps its traceback."""
    import serving.parity
    import serving.server

    def bug(*args, **kwargs):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(serving.parity, "run_parity", bug)
    monkeypatch.setattr(serving.server, "serve", bug)
    res = runner.invoke(app, [command, str(tiny_bundle.root)])
    assert isinstance(res.exception, RuntimeError) and "an internal bug" in str(res.exception)
    assert "error: an internal bug" not in res.output
