"""The export stage's commands: ``export`` (model -> validated bundle) and ``inspect`` (bundle).

Thin over ``export.api``: options go into ``ExportOptions``; errors the user can fix are printed as
one message (no traceback), exit 2 for bad options and 1 otherwise (``export.errors``). Heavy
imports happen inside the commands.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path

import typer

from export.errors import EXIT_FAILED, EXIT_OPTIONS, OptionsError
from export.variants import EXPORT_PRECISIONS

BUNDLE = typer.Argument(..., help="Bundle directory (from `gpt2-deploy export`).")

# typer wants an Enum for a choice; made from export.variants' list so the two cannot drift (mypy
# cannot see the members of an Enum made from a computed dict, hence the ignore)
Precision = Enum("Precision", {p.replace("-", "_"): p for p in EXPORT_PRECISIONS}, type=str)  # type: ignore[misc]


def fail(message: str, code: int = EXIT_FAILED) -> typer.Exit:
    """Print ``error: MESSAGE`` on stderr; the exit to raise (every stage's commands use it)."""
    print(f"error: {message}", file=sys.stderr)
    return typer.Exit(code)


def export(
    model: str = typer.Option(
        ...,
        "--model",
        "-m",
        help="Preset (tiny, gpt2-124m, gpt2-355m, gpt2-774m, "
        "gpt2-1.5b), hub name (gpt2, gpt2-medium, ...) or local HF directory.",
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="Bundle directory to write (a previous bundle "
        "there is replaced; a non-empty foreign directory is refused).",
    ),
    precision: Precision = typer.Option("fp32", "--precision", "-p", help="Graph variant."),
    seed: int = typer.Option(0, "--seed", help="Weight seed of a preset."),
    name: str | None = typer.Option(
        None, "--name", help="Model name in the manifest (default: the preset, hub or directory name)."
    ),
    external_data: bool | None = typer.Option(
        None,
        "--external-data/--no-external-data",
        help="Weights in model.onnx.data, shared by model.onnx and the serving graph (default); "
        "--no-external-data writes self-contained graphs (the weights twice on disk).",
    ),
    validate: bool = typer.Option(
        True, "--validate/--no-validate", help="Compare the graph with PyTorch (a failure exits 1)."
    ),
    reference: bool = typer.Option(
        True, "--reference/--no-reference", help="Store the PyTorch checkpoint in BUNDLE/reference."
    ),
    golden: bool = typer.Option(
        True,
        "--golden/--no-golden",
        help="Store the golden parity record in BUNDLE/golden.json (the reference's answers on the "
        "canary prompts: parity checks without torch).",
    ),
    int8_per_channel: bool = typer.Option(
        False, "--int8-per-channel", help="int8: one weight scale per output channel."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines."),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Show the exporter's and ONNX Runtime's own output."
    ),
) -> None:
    """Export a GPT-2 to a validated ONNX bundle (decoder graph with KV cache + tokenizer + manifest)."""
    from export.api import USER_ERRORS, ExportOptions, FailedExportError, describe, export_bundle

    opts = ExportOptions(
        model=model,
        out=out,
        precision=precision.value,
        seed=seed,
        name=name,
        external_data=external_data,
        validate=validate,
        reference=reference,
        golden=golden,
        quiet=quiet,
        verbose=verbose,
        int8_per_channel=int8_per_channel,
    )
    try:
        bundle = export_bundle(opts)
    except FailedExportError as e:
        # the report (printed above unless --quiet) lists every failure; repeat it when quiet
        if quiet:
            print(e.report, file=sys.stderr)
        n = len(e.report.errors) + sum(not c for c in e.report.cases)
        raise fail(
            f"validation failed ({n} failure{'s' * (n != 1)}); {out} is unchanged; the failing bundle "
            f"is kept in {e.kept} for inspection (its manifest holds the report; delete it when done)"
        ) from None
    except OptionsError as e:
        raise fail(str(e), EXIT_OPTIONS) from None
    except USER_ERRORS as e:
        raise fail(str(e)) from None
    print(describe(bundle))


def inspect(
    bundle: Path = BUNDLE,
    verify_hashes: bool = typer.Option(True, "--verify/--no-verify", help="Check every file's sha256."),
    files: bool = typer.Option(False, "--files", help="List the files with sizes and roles."),
) -> None:
    """Open a bundle (schema, files and hashes checked) and print its summary."""
    from export.api import describe
    from export.manifest import Bundle, BundleError

    try:
        b = Bundle.open(bundle, verify_hashes=verify_hashes)
    except BundleError as e:
        raise fail(str(e)) from None
    print(describe(b))
    if files:
        for rel, f in sorted(b.manifest.files.items()):
            print(f"{f.bytes:>14,d}  {f.role:<12} {rel}")


def register(app: typer.Typer) -> None:
    app.command("export")(export)
    app.command("inspect")(inspect)
