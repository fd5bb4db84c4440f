"""``gpt2-deploy parity BUNDLE --backend X``: teacher-forced generation parity against the reference."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from deploy.commands import options as opt


def register(app: typer.Typer) -> None:
    app.command("parity")(parity)


def parity(
    bundle: Path = opt.BUNDLE,
    backend: str = opt.BACKEND,
    device: str | None = opt.DEVICE,
    engine: str | None = opt.ENGINE,
    trt_runtime: str = opt.TRT_RUNTIME,
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
