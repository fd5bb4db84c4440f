"""The `gpt2-deploy` command line: the serving stage's commands and the root app.

Serving is the last stage, so the root app lives here and assembles every stage's commands:
``export``/``inspect`` (``export.cli``), ``build`` (``deploy.cli``), ``serve``/``generate``/
``parity`` (this module). Commands are thin: options go into a dataclass, one library function
runs. Heavy dependencies are imported inside the command bodies, so ``gpt2-deploy --help`` imports
neither torch nor tensorrt.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from deploy import cli as deploy_cli
from export import cli as export_cli
from export.cli import BUNDLE, fail
from export.errors import EXIT_FAILED, EXIT_OK, EXIT_OPTIONS, OptionsError
from serving.scheduler import SchedulerOptions

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
SCHEDULER = SchedulerOptions()  # the defaults the serve flags show

# Options every command that runs a backend shares, defined once.
BACKEND = typer.Option("onnxruntime", "--backend", "-b", help="onnxruntime, torch or tensorrt.")
DEVICE = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: cuda for tensorrt, else cpu).")
ENGINE = typer.Option(
    None, "--engine", help="TensorRT engine in the bundle (default: the newest one that can run here)."
)
TRT_RUNTIME = typer.Option(
    "auto",
    "--trt-runtime",
    help="TensorRT runtime: auto, tensorrt or tensorrt_lean (version-compatible engines only).",
)
TRUST_HOST_CODE = typer.Option(
    False,
    "--trust-engine-host-code",
    help="tensorrt: load an engine that carries executable host code (a version-compatible plan "
    "embeds TensorRT's lean runtime, which runs in this process). Only for engines you trust: the "
    "bundle's own hashes do not say who built them. Off by default (such engines are refused).",
)

# Client-side TLS and token options, shared by `generate` and `health`.
TLS = typer.Option(
    False, "--tls", help="Use TLS, trusting the system's root certificates (implied by --tls-ca/--tls-cert)."
)
TLS_CA = typer.Option(None, "--tls-ca", help="PEM CA bundle that signed the server's certificate (TLS).")
TLS_CLIENT_CERT = typer.Option(
    None, "--tls-cert", help="PEM client certificate, for a server with mutual TLS (with --tls-key)."
)
TLS_CLIENT_KEY = typer.Option(None, "--tls-key", help="PEM private key of --tls-cert.")
TLS_SERVER_NAME = typer.Option(
    None, "--tls-server-name", help="Check the server's certificate for this name instead of the host."
)
TOKEN_FILE = typer.Option(
    None,
    "--token-file",
    help="File whose first token is sent as 'authorization: Bearer <token>' (# comment lines skipped).",
)


def _client(server: str, timeout: float | None, tls, tls_ca, tls_cert, tls_key, tls_server_name, token_file):
    """A Gpt2DeployClient for the command's flags; a bad file is an `error:` line and exit 2."""
    from serving.client import Gpt2DeployClient
    from serving.security import read_token

    try:
        token = None if token_file is None else read_token(token_file, "--token-file")
        return Gpt2DeployClient(
            server,
            timeout=timeout,
            tls=True if tls else None,
            tls_ca=None if tls_ca is None else str(tls_ca),
            tls_cert=None if tls_cert is None else str(tls_cert),
            tls_key=None if tls_key is None else str(tls_key),
            tls_server_name=tls_server_name,
            token=token,
        )
    except OptionsError as e:
        raise fail(str(e), EXIT_OPTIONS) from None


app = typer.Typer(
    name="gpt2-deploy",
    help="GPT-2 from PyTorch to ONNX (KV cache), TensorRT and a gRPC runner that proves parity.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def serve(
    bundle: Path = BUNDLE,
    backend: str = BACKEND,
    device: str | None = DEVICE,
    engine: str | None = ENGINE,
    trt_runtime: str = TRT_RUNTIME,
    trust_engine_host_code: bool = TRUST_HOST_CODE,
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Interface to bind; 127.0.0.1 keeps it local, 0.0.0.0 exposes it."
    ),
    port: int = typer.Option(50051, "--port", "-p", help="gRPC port (0 picks a free one)."),
    max_request_mb: int = typer.Option(
        4, "--max-request-mb", help="Largest request, MiB; bigger ones are refused before decoding."
    ),
    max_message_mb: int = typer.Option(
        256, "--max-message-mb", help="Largest gRPC message, MiB (full-vocabulary logits)."
    ),
    grace: float = typer.Option(
        10.0, "--grace", help="Seconds in-flight streams get to finish on SIGTERM/SIGINT."
    ),
    drain_delay: float = typer.Option(
        0.0,
        "--drain-delay",
        help="On SIGTERM, seconds health says NOT_SERVING while the port still serves, before --grace "
        "starts (Kubernetes preStop pattern; see docs/deploy.md).",
    ),
    max_connection_age: float | None = typer.Option(
        None,
        "--max-connection-age",
        help="Close client connections after this many seconds so clients reconnect and spread over "
        "replicas behind a Service (default: never).",
    ),
    max_connection_age_grace: float = typer.Option(
        60.0, "--max-connection-age-grace", help="Seconds calls may finish on a connection being closed."
    ),
    parity: str = typer.Option(
        "warn",
        "--parity",
        help="Startup canary: off | warn (failure -> health NOT_SERVING) | "
        "strict (failure -> refuse to start, exit 3).",
    ),
    canary_reference: str = typer.Option(
        "auto",
        "--canary-reference",
        help="What the canary compares with: auto (the bundle's golden record when it has one, else "
        "the torch reference) | golden (PyTorch's answers stored at export; no torch needed) | torch.",
    ),
    shadow_rate: float = typer.Option(
        0.0, "--shadow-rate", help="Fraction of requests re-checked on the reference, off the hot path."
    ),
    metrics_port: int = typer.Option(
        0, "--metrics-port", help="Prometheus /metrics port on --host (0 = off)."
    ),
    threads: int | None = typer.Option(None, "--threads", help="Backend intra-op threads."),
    max_batch_size: int = typer.Option(
        SCHEDULER.max_batch_size,
        "--max-batch-size",
        help="Rows stepped together (capped by the backend, e.g. an engine's max batch).",
    ),
    max_batch_tokens: int = typer.Option(
        SCHEDULER.max_batch_tokens,
        "--max-batch-tokens",
        help="Padded tokens one decode step may hold: rows x (past width + 1).",
    ),
    max_prefill_tokens: int = typer.Option(
        SCHEDULER.max_prefill_tokens,
        "--max-prefill-tokens",
        help="Padded tokens of one prefill forward: rows x longest prompt (a longer prompt runs alone).",
    ),
    max_wait_ms: float = typer.Option(
        SCHEDULER.max_wait_ms,
        "--max-wait-ms",
        help="How long waiting requests may wait to share one prefill + join while a batch runs.",
    ),
    max_prompt_bytes: int | None = typer.Option(
        None,
        "--max-prompt-bytes",
        help="Prompt text refused before tokenising (default: what the context can hold, context x the "
        "longest token's bytes).",
    ),
    max_queue: int = typer.Option(
        SCHEDULER.max_queue,
        "--max-queue",
        help="Requests waiting for the model; one more is refused with RESOURCE_EXHAUSTED.",
    ),
    tls_cert: Path | None = typer.Option(
        None, "--tls-cert", help="PEM certificate chain of the server: serve TLS (with --tls-key)."
    ),
    tls_key: Path | None = typer.Option(
        None, "--tls-key", help="PEM private key (unencrypted) of --tls-cert."
    ),
    tls_client_ca: Path | None = typer.Option(
        None,
        "--tls-client-ca",
        help="PEM CA bundle: require client certificates signed by it (mutual TLS; needs --tls-cert).",
    ),
    auth_token_file: Path | None = typer.Option(
        None,
        "--auth-token-file",
        help="Accepted bearer tokens, one per line (several for rotation; re-read when it changes): every "
        "call needs 'authorization: Bearer <token>', except health and reflection.",
    ),
    auth_health: bool = typer.Option(
        False,
        "--auth-health",
        help="Require the token for gRPC health too (Kubernetes' gRPC probes send none).",
    ),
    auth_reflection: bool = typer.Option(
        False, "--auth-reflection", help="Require the token for server reflection too."
    ),
    log_level: str = typer.Option("INFO", "--log-level", help="DEBUG, INFO, WARNING or ERROR."),
) -> None:
    """Serve a bundle over gRPC (our API + KServe v2 + health + reflection) until SIGTERM/SIGINT."""
    import logging

    from serving.server import ServeOptions
    from serving.server import serve as run

    if log_level.upper() not in LOG_LEVELS:
        raise fail(f"--log-level {log_level!r} is not one of {', '.join(LOG_LEVELS)}", EXIT_OPTIONS)
    opts = ServeOptions(
        bundle=bundle,
        backend=backend,
        device=device,
        engine=engine,
        trt_runtime=trt_runtime,
        trust_engine_host_code=trust_engine_host_code,
        host=host,
        port=port,
        max_message_mb=max_message_mb,
        max_request_mb=max_request_mb,
        grace_s=grace,
        drain_delay_s=drain_delay,
        max_connection_age_s=max_connection_age,
        max_connection_age_grace_s=max_connection_age_grace,
        parity=parity,
        canary_reference=canary_reference,
        shadow_rate=shadow_rate,
        metrics_port=metrics_port,
        threads=threads,
        max_batch_size=max_batch_size,
        max_batch_tokens=max_batch_tokens,
        max_prefill_tokens=max_prefill_tokens,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        max_prompt_bytes=max_prompt_bytes,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_client_ca=tls_client_ca,
        auth_token_file=auth_token_file,
        auth_health=auth_health,
        auth_reflection=auth_reflection,
    )
    try:
        opts.check()
    except OptionsError as e:
        raise fail(str(e), EXIT_OPTIONS) from None
    logging.basicConfig(
        level=log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    raise typer.Exit(run(opts))  # startup errors are a logged message and an exit code already


def generate(
    text: str = typer.Argument(..., help="The prompt."),
    server: str = typer.Option("127.0.0.1:50051", "--server", "-s", help="HOST:PORT of the server."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n", help="Tokens to generate at most."),
    temperature: float | None = typer.Option(
        None, "--temperature", "-t", help="Sample with this temperature (0 = greedy)."
    ),
    top_k: int | None = typer.Option(None, "--top-k", help="Sample from the k most likely tokens."),
    top_p: float | None = typer.Option(None, "--top-p", help="Nucleus sampling mass."),
    seed: int | None = typer.Option(None, "--seed", help="Seed: same seed, same tokens."),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),
    stop_id: list[int] = typer.Option([], "--stop-id", help="Stop token id (repeatable)."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Keep going past end-of-text."),
    timeout: float = typer.Option(300.0, "--timeout", help="Deadline of the call, seconds."),
    tls: bool = TLS,
    tls_ca: Path | None = TLS_CA,
    tls_cert: Path | None = TLS_CLIENT_CERT,
    tls_key: Path | None = TLS_CLIENT_KEY,
    tls_server_name: str | None = TLS_SERVER_NAME,
    token_file: Path | None = TOKEN_FILE,
) -> None:
    """Stream a generation from a running server to the terminal (greedy unless sampling is asked)."""
    import grpc

    with _client(server, timeout, tls, tls_ca, tls_cert, tls_key, tls_server_name, token_file) as client:
        stream = client.generate(
            text,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=stop,
            stop_token_ids=stop_id,
            ignore_eos=ignore_eos,
        )
        try:
            for chunk in stream:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
        except grpc.RpcError as e:
            print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
            refused = e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE)
            raise typer.Exit(EXIT_OPTIONS if refused else EXIT_FAILED) from None
        except KeyboardInterrupt:
            stream.cancel()
            print("\n(cancelled)", file=sys.stderr)
            raise typer.Exit(130) from None
    sys.stdout.write("\n")
    f = stream.finish
    if f is not None:
        per_tok = sum(f.per_token_s) / len(f.per_token_s) * 1e3 if f.per_token_s else 0.0
        print(
            f"[{stream.finish_reason}: {f.prompt_tokens} prompt + {f.completion_tokens} new tokens, "
            f"first token {f.time_to_first_token_s * 1e3:.1f} ms, {per_tok:.2f} ms/token]",
            file=sys.stderr,
        )


def parity(
    bundle: Path = BUNDLE,
    backend: str = BACKEND,
    device: str | None = DEVICE,
    engine: str | None = ENGINE,
    trt_runtime: str = TRT_RUNTIME,
    trust_engine_host_code: bool = TRUST_HOST_CODE,
    prompt: str | None = typer.Option(
        None, "--prompt", help="Prompt text; without it the startup-canary prompts run."
    ),
    max_new_tokens: int = typer.Option(
        16,
        "--max-new-tokens",
        "-n",
        help="Steps to compare after the prompt (the reference's greedy tokens are fed to both).",
    ),
    reference_device: str = typer.Option("cpu", "--reference-device", help="Device of the torch reference."),
    tolerance: str | None = typer.Option(
        None,
        "--tolerance",
        help="Tolerance preset (fp32, tf32, fp16, int8, ...); default "
        "picks it from the bundle's precision and the device.",
    ),
    golden: bool = typer.Option(
        False,
        "--golden",
        help="Check against the bundle's golden record (PyTorch's answers stored at export) instead of "
        "a live torch reference: works without torch, on the record's own prompts.",
    ),
    batched: bool = typer.Option(
        False,
        "--batched",
        help="Also run the prompt in a batch with companion rows joining and leaving, and compare it "
        "with its solo run (the verdict needs both).",
    ),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the report as JSON here."),
) -> None:
    """Compare a backend with the PyTorch reference step by step; exit 1 when parity fails."""
    from export.deps import MissingDependencyError
    from export.manifest import BundleError
    from serving.errors import ServingError
    from serving.parity import ParityOptions, run_parity

    opts = ParityOptions(
        bundle=str(bundle),
        backend=backend,
        device=device,
        engine=engine,
        trt_runtime=trt_runtime,
        trust_engine_host_code=trust_engine_host_code,
        prompt=prompt,
        max_new_tokens=max_new_tokens,
        reference_device=reference_device,
        tolerance=tolerance,
        batched=batched,
        golden=golden,
    )
    try:
        report = run_parity(opts)
    except (OptionsError, BundleError, ServingError, MissingDependencyError) as e:
        # bad options, or the bundle/backend cannot run here
        raise fail(str(e), EXIT_OPTIONS) from None
    print(report)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"options": vars(opts), **report.to_json()}, indent=2) + "\n")
    raise typer.Exit(EXIT_OK if report else EXIT_FAILED)


def health(
    server: str = typer.Option("127.0.0.1:50051", "--server", "-s", help="HOST:PORT of the server."),
    service: str = typer.Option(
        "",
        "--service",
        help="Health service name: '' (the whole server, default), gpt2_deploy.v1.Gpt2Deploy or "
        "inference.GRPCInferenceService.",
    ),
    timeout: float = typer.Option(5.0, "--timeout", help="Seconds to wait for the answer."),
    tls: bool = TLS,
    tls_ca: Path | None = TLS_CA,
    tls_cert: Path | None = TLS_CLIENT_CERT,
    tls_key: Path | None = TLS_CLIENT_KEY,
    tls_server_name: str | None = TLS_SERVER_NAME,
    token_file: Path | None = TOKEN_FILE,
) -> None:
    """Ask a server's gRPC health service: exit 0 when SERVING, 1 otherwise (one line on stdout)."""
    with _client(server, None, tls, tls_ca, tls_cert, tls_key, tls_server_name, token_file) as client:
        status = client.health(service, timeout=timeout)
    print(f"{server} {service or '(server)'}: {status}")
    raise typer.Exit(0 if status == "SERVING" else 1)


export_cli.register(app)
deploy_cli.register(app)
app.command("serve")(serve)
app.command("generate")(generate)
app.command("parity")(parity)
app.command("health")(health)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
