"""`--trust-engine-host-code` reaches the TensorRT backend's options from `serve` and `parity`, and
is off by default (the decision itself: tests/deploy/test_engine_entry.py, ``check_host_code``).

TensorRT is not needed: the commands are stopped where they would create the backend (no backend is
faked to run; the test looks only at the options it would have been given).
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from serving.backends import backend_options
from serving.cli import app
from serving.errors import BackendUnavailable

runner = CliRunner()


def test_backend_options_carry_the_opt_in_for_tensorrt_only():
    assert "trust_engine_host_code" not in backend_options("tensorrt").extra  # off by default
    assert backend_options("tensorrt", trust_engine_host_code=True).extra["trust_engine_host_code"] is True
    assert "trust_engine_host_code" not in backend_options("onnxruntime", trust_engine_host_code=True).extra


class _Stop(BackendUnavailable):
    """Raised where the backend would be created, after its options are recorded."""


@pytest.fixture
def created(monkeypatch):
    """Record the BackendOptions each command passes to create_backend, then stop it there."""
    import serving.backends
    import serving.server

    seen = []

    def record(name, bundle, options=None):
        seen.append((name, options))
        raise _Stop("stopped before loading (test)")

    monkeypatch.setattr(serving.backends, "create_backend", record)  # parity imports it from here
    monkeypatch.setattr(serving.server, "create_backend", record)
    return seen


@pytest.mark.parametrize("trust", [False, True])
def test_serve_and_parity_pass_the_flag_to_the_backend(tiny_bundle, created, trust):
    flag = ["--trust-engine-host-code"] if trust else []
    serve = runner.invoke(app, ["serve", str(tiny_bundle.root), "-b", "tensorrt", "--port", "0", *flag])
    parity = runner.invoke(app, ["parity", str(tiny_bundle.root), "-b", "tensorrt", *flag])
    assert serve.exit_code == parity.exit_code == 2, serve.output + parity.output  # cannot run: stopped
    assert [name for name, _ in created] == ["tensorrt", "tensorrt"]
    for _, options in created:
        assert bool(options.extra.get("trust_engine_host_code")) is trust
