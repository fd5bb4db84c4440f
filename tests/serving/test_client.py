"""The Python client and the `generate` / `serve` commands against a real server."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from serving.cli import app
from serving.client import Gpt2DeployClient
from serving.generation import GenerationRequest
from serving.server import ServeOptions, build_server, free_port

runner = CliRunner()


@pytest.fixture(scope="module")
def server(tiny_bundle):
    with build_server(ServeOptions(bundle=tiny_bundle.root, port=0, threads=1, parity="off")) as running:
        yield running


def test_generate_command_streams_greedy_text(server):
    rt = server.runtime
    want = rt.generator.generate(GenerationRequest(rt.encode("Hello, my name is"), 8))
    res = runner.invoke(
        app, ["generate", "--server", server.address, "--max-new-tokens", "8", "Hello, my name is"]
    )
    assert res.exit_code == 0, res.output
    assert want.text in res.output
    assert f"{want.completion_tokens} new tokens" in res.output and "ms/token" in res.output


def test_generate_command_seeded_sampling_and_stop(server):
    args = [
        "generate",
        "-s",
        server.address,
        "-n",
        "12",
        "--temperature",
        "0.8",
        "--top-k",
        "40",
        "--top-p",
        "0.9",
        "--seed",
        "3",
        "--ignore-eos",
        "Once upon a time",
    ]
    a, b = runner.invoke(app, args), runner.invoke(app, args)
    assert a.exit_code == b.exit_code == 0
    assert a.output.split("\n[")[0] == b.output.split("\n[")[0]  # the text; timings differ
    with Gpt2DeployClient(server.address) as c:
        want = c.generate(
            "Once upon a time",
            max_new_tokens=12,
            temperature=0.8,
            top_k=40,
            top_p=0.9,
            seed=3,
            ignore_eos=True,
        ).result()
    assert want.text in a.output
    stop_id = want.token_ids[0]
    res = runner.invoke(app, args + ["--stop-id", str(stop_id)])
    assert res.exit_code == 0 and "[stop: " in res.output


def test_generate_command_errors(server):
    res = runner.invoke(app, ["generate", "-s", server.address, "-n", "0", "Hi"])
    assert res.exit_code == 2  # the server refused the request's options: exit 2, like every bad option
    assert "error: INVALID_ARGUMENT: max_new_tokens must be an integer in [1, 4096], got 0" in res.output
    res = runner.invoke(app, ["generate", "-s", f"127.0.0.1:{free_port()}", "--timeout", "2", "Hi"])
    assert res.exit_code == 1 and "error: UNAVAILABLE" in res.output


def test_serve_command_start_errors(tmp_path, tiny_bundle):
    res = runner.invoke(app, ["serve", str(tmp_path / "nope"), "--port", "0"])
    assert res.exit_code == 2
    res = runner.invoke(app, ["serve", str(tiny_bundle.root), "--parity", "sometimes", "--port", "0"])
    assert res.exit_code == 2


def test_client_health_and_wait(server):
    with Gpt2DeployClient(server.address) as c:
        c.wait_until_serving(timeout=5)
        assert c.health() == "SERVING"
    with Gpt2DeployClient(f"127.0.0.1:{free_port()}") as c:
        assert c.health(timeout=0.5) == "UNREACHABLE"
        with pytest.raises(TimeoutError, match="last health: UNREACHABLE"):
            c.wait_until_serving(timeout=0.5)
