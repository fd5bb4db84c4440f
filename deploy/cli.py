"""The deploy stage's command: ``gpt2-deploy build BUNDLE`` (ONNX -> TensorRT engine).

The module top imports only typer, the standard library and ``deploy.presets`` (standard library
only); the builder (and TensorRT, lazily) is imported inside the command body, so
``gpt2-deploy --help`` and ``--print-trtexec`` work where TensorRT is not installed.
"""

from __future__ import annotations

from pathlib import Path

import typer

from deploy.presets import ENGINE_PRECISIONS, PRESETS, preset_help
from export.cli import BUNDLE, fail

PRESET_NAMES = "|".join(PRESETS)


def build(
    bundle: Path = BUNDLE,
    preset: str = typer.Option(
        "server",
        help=f"Edge preset ({PRESET_NAMES}): batch, context, workspace and precision for a target. "
        f"{preset_help()}.",
    ),
    precision: str = typer.Option(
        None, help=f"{'|'.join(ENGINE_PRECISIONS)} (default: the preset's). fp32 and fp16 bundles only."
    ),
    workspace: str = typer.Option(None, help="Builder workspace limit, e.g. 2G or 512M (default: preset's)."),
    opt_level: int = typer.Option(
        None, "--opt-level", help="Builder optimization level 0-5 (TensorRT default 3)."
    ),
    version_compatible: bool = typer.Option(
        False,
        "--version-compatible",
        help="Engine runs on later TensorRT versions and on the lean runtime (tensorrt_lean).",
    ),
    exclude_lean_runtime: bool = typer.Option(
        False,
        "--exclude-lean-runtime",
        help="With --version-compatible: leave the lean runtime out "
        "of the plan (the loader brings the same version's).",
    ),
    hardware_compat: str = typer.Option(
        "none", "--hardware-compat", help="none|ampere_plus|same_compute_capability."
    ),
    timing_cache: Path = typer.Option(
        None, "--timing-cache", help="Timing cache to load and update (default: beside the engine)."
    ),
    tf32: bool = typer.Option(False, "--tf32", help="Allow TF32 in fp32 layers."),
    max_batch: int = typer.Option(None, "--max-batch", help="Override the preset's max batch."),
    max_context: int = typer.Option(None, "--max-context", help="Override the preset's max context."),
    max_prompt: int = typer.Option(None, "--max-prompt", help="Override the preset's max prompt (prefill)."),
    name: str = typer.Option(None, help="Engine file stem (default <preset>-<precision>[-vc])."),
    device: int = typer.Option(0, help="CUDA device index to build on."),
    print_trtexec: bool = typer.Option(
        False,
        "--print-trtexec",
        help="Print the equivalent trtexec command line and exit (needs no TensorRT).",
    ),
    trt_major: int = typer.Option(
        None,
        "--trt-major",
        help="TensorRT major version (10 or 11) --print-trtexec writes for (default: the installed "
        "tensorrt's, else 10). 11's trtexec is strongly typed only: an fp16 conversion step comes first.",
    ),
    no_progress: bool = typer.Option(False, "--no-progress", help="No build progress bars."),
) -> None:
    """Build a TensorRT engine from BUNDLE's ONNX graph into BUNDLE/engines/ (needs TensorRT + GPU)."""
    from deploy.trt_build import BuildError, BuildOptions, build_engine, plan_build
    from deploy.trtexec import format_command, installed_trt_major
    from export.deps import MissingDependencyError
    from export.errors import EXIT_FAILED, EXIT_OPTIONS, OptionsError
    from export.manifest import Bundle, BundleError

    opts = BuildOptions(
        preset=preset,
        precision=precision,
        workspace=workspace,
        opt_level=opt_level,
        version_compatible=version_compatible,
        exclude_lean_runtime=exclude_lean_runtime,
        hardware_compat=hardware_compat,
        timing_cache=timing_cache,
        tf32=tf32,
        max_batch=max_batch,
        max_context=max_context,
        max_prompt=max_prompt,
        name=name,
        progress=not no_progress,
        device=device,
    )
    try:
        b = Bundle.open(bundle, verify_hashes=not print_trtexec)
        if print_trtexec:
            plan = plan_build(b, opts)
            major = trt_major if trt_major is not None else installed_trt_major()
            steps = plan.trtexec_steps(major)
            typer.echo(
                f"# {plan.preset.name}: {plan.preset.description}; {plan.engine_precision}; profiles "
                f"context (past 0, seq 1..{plan.limits.max_prompt}) and generation (seq 1, past "
                f"1..{plan.limits.max_context - 1}), batch 1..{plan.limits.max_batch}; TensorRT {major}"
            )
            if plan.preset.why:
                typer.echo(f"# why: {plan.preset.why}")
            for note in plan.notes:
                typer.echo(f"# note: {note}")
            typer.echo("\n".join(format_command(step) for step in steps))
            return
        entry = build_engine(b, opts)
    except (OptionsError, BundleError, MissingDependencyError, BuildError) as e:
        raise fail(str(e), EXIT_OPTIONS if isinstance(e, OptionsError) else EXIT_FAILED) from None
    typer.echo(
        f"built {b.root / entry.file} in {entry.build_seconds:.1f} s: TensorRT {entry.tensorrt_version}, "
        f"{entry.gpu_name} (sm {entry.compute_capability}), {entry.precision}"
    )
    for p in entry.profile_summary:
        typer.echo(f"  profile {p['name']}: batch {p['batch']}, seq {p['seq']}, past {p['past']}")
    for note in entry.notes:
        typer.echo(f"  note: {note}")


def register(app: typer.Typer) -> None:
    app.command("build")(build)
