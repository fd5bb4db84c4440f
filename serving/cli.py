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
from export.cli import BUNDLE

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

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
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Interface to bind; 127.0.0.1 keeps it local, 0.0.0.0 exposes it."
    ),
    port: int = typer.Option(50051, "--port", "-p", help="gRPC port (0 picks a free one)."),
    max_message_mb: int = typer.Option(
        256, "--max-message-mb", help="Largest gRPC message, MiB (full-vocabulary logits)."
    ),
    grace: float = typer.Option(
        10.0, "--grace", help="Seconds in-flight streams get to finish on SIGTERM/SIGINT."
    ),
    parity: str = typer.Option(
        "warn",
        "--parity",
        help="Startup canary: off | warn (failure -> health NOT_SERVING) | "
        "strict (failure -> refuse to start, exit 3).",
    ),
    shadow_rate: float = typer.Option(
        0.0, "--shadow-rate", help="Fraction of requests re-checked on the reference, off the hot path."
    ),
    metrics_port: int = typer.Option(
        0, "--metrics-port", help="Prometheus /metrics port on --host (0 = off)."
    ),
    workers: int = typer.Option(16, "--workers", help="gRPC worker threads."),
    threads: int | None = typer.Option(None, "--threads", help="Backend intra-op threads."),
    kv_slots: int | None = typer.Option(
        None,
        "--kv-slots",
        help="tensorrt: KV caches (so generations) live at once "
        "(default 2); more requests wait for a free one.",
    ),
    log_level: str = typer.Option("INFO", "--log-level", help="DEBUG, INFO, WARNING or ERROR."),
) -> None:
    """Serve a bundle over gRPC (our API + KServe v2 + health + reflection) until SIGTERM/SIGINT."""
    import logging

    from serving.server import ServeOptions
    from serving.server import serve as run

    if log_level.upper() not in LOG_LEVELS:
        print(f"error: --log-level {log_level!r} is not one of {', '.join(LOG_LEVELS)}", file=sys.stderr)
        raise typer.Exit(2)
    logging.basicConfig(
        level=log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    opts = ServeOptions(
        bundle=bundle,
        backend=backend,
        device=device,
        engine=engine,
        trt_runtime=trt_runtime,
        host=host,
        port=port,
        max_message_mb=max_message_mb,
        grace_s=grace,
        parity=parity,
        shadow_rate=shadow_rate,
        metrics_port=metrics_port,
        workers=workers,
        threads=threads,
        kv_slots=kv_slots,
    )
    try:
        code = run(opts)
    except (OSError, RuntimeError) as e:  # e.g. a CUDA or tokenizer failure not mapped upstream
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(2) from None
    raise typer.Exit(code)


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
) -> None:
    """Stream a generation from a running server to the terminal (greedy unless sampling is asked)."""
    import grpc

    from serving.client import Gpt2DeployClient

    with Gpt2DeployClient(server, timeout=timeout) as client:
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
            raise typer.Exit(1) from None
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
    json_path: Path | None = typer.Option(None, "--json", help="Also write the report as JSON here."),
) -> None:
    """Compare a backend with the PyTorch reference step by step; exit 1 when parity fails."""
    from export.manifest import BundleError
    from serving.errors import ServingError
    from serving.parity import ParityOptions, run_parity

    opts = ParityOptions(
        bundle=str(bundle),
        backend=backend,
        device=device,
        engine=engine,
        trt_runtime=trt_runtime,
        prompt=prompt,
        max_new_tokens=max_new_tokens,
        reference_device=reference_device,
        tolerance=tolerance,
    )
    try:
        report = run_parity(opts)
    except (BundleError, ServingError, ValueError, ImportError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(2) from None
    print(report)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"options": vars(opts), **report.to_json()}, indent=2) + "\n")
    raise typer.Exit(0 if report else 1)


export_cli.register(app)
deploy_cli.register(app)
app.command("serve")(serve)
app.command("generate")(generate)
app.command("parity")(parity)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
