"""The ``trtexec`` command line equivalent to a ``gpt2-deploy build`` (``build --print-trtexec``),
for building with NVIDIA's own tool, e.g. JetPack's ``/usr/src/tensorrt/bin/trtexec``.

    argv = trtexec_command(onnx, engine, profiles, precision="fp16", fp32_layers=names)
    print(format_command(argv))

Pure string work: no TensorRT, torch or GPU needed. The flag spellings per TensorRT major (11
dropped the precision flags: strongly typed only) are in docs/tensorrt.md "Build".
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from deploy.presets import MiB, ProfileSpec


def shape_spec(shapes: dict[str, tuple[int, ...]]) -> str:
    """``{'input_ids': (1, 8)}`` -> ``input_ids:1x8`` (comma-joined, trtexec's spec syntax)."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in shape)}" for name, shape in shapes.items())


def trtexec_command(
    onnx_path: str | Path,
    engine_path: str | Path,
    profiles: Sequence[ProfileSpec],
    *,
    precision: str = "fp32",
    tf32: bool = False,
    workspace: int | None = None,
    opt_level: int | None = None,
    version_compatible: bool = False,
    exclude_lean_runtime: bool = False,
    hardware_compat: str = "none",
    timing_cache: str | Path | None = None,
    fp32_layers: Sequence[str] = (),
    strongly_typed: bool = False,
) -> list[str]:
    """The argv of a ``trtexec`` run that builds the same engine.

    Args:
        onnx_path: The graph to parse (its external data must sit beside it).
        engine_path: Where ``--saveEngine`` writes the plan.
        profiles: Optimization profiles, in order (context first, then generation).
        precision: fp32, fp16 or bf16. With ``strongly_typed`` the graph carries the types and
            no precision flag is given (TensorRT 11 removed ``--fp16/--bf16``).
        tf32: Allow TF32 for fp32 math (trtexec's default); False adds ``--noTF32``.
        workspace: Workspace memory-pool limit in bytes.
        opt_level: Builder optimization level (0-5).
        version_compatible: ``--versionCompatible`` (runs on later TensorRT and the lean runtime).
        exclude_lean_runtime: ``--excludeLeanRuntime`` (only with version_compatible).
        hardware_compat: none, ampere_plus or same_compute_capability.
        timing_cache: ``--timingCacheFile`` (loaded and saved).
        fp32_layers: TensorRT layer names to keep in fp32 (LayerNorm, Softmax, logits).
        strongly_typed: ``--stronglyTyped`` (TensorRT 10.x opt-in; always on in 11.x).
    """
    argv = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}", "--skipInference"]
    for p in profiles:
        argv.append(f"--minShapes={shape_spec({k: v[0] for k, v in p.shapes.items()})}")
        argv.append(f"--optShapes={shape_spec({k: v[1] for k, v in p.shapes.items()})}")
        argv.append(f"--maxShapes={shape_spec({k: v[2] for k, v in p.shapes.items()})}")
    if strongly_typed:
        argv.append("--stronglyTyped")
    elif precision == "fp16":
        argv.append("--fp16")
    elif precision == "bf16":
        argv.append("--bf16")
    if not tf32:
        argv.append("--noTF32")
    if fp32_layers and precision != "fp32" and not strongly_typed:
        spec = ",".join(f"{name}:fp32" for name in fp32_layers)
        argv += ["--precisionConstraints=obey", f"--layerPrecisions={spec}", f"--layerOutputTypes={spec}"]
    if workspace is not None:
        argv.append(f"--memPoolSize=workspace:{max(1, workspace // MiB)}")
    if opt_level is not None:
        argv.append(f"--builderOptimizationLevel={opt_level}")
    if version_compatible:
        argv.append("--versionCompatible")
        if exclude_lean_runtime:
            argv.append("--excludeLeanRuntime")
    if hardware_compat == "ampere_plus":
        argv.append("--hardwareCompatibilityLevel=ampere+")
    elif hardware_compat == "same_compute_capability":
        argv.append("--hardwareCompatibilityLevel=sameComputeCapability")
    if timing_cache is not None:
        argv.append(f"--timingCacheFile={timing_cache}")
    return argv


def installed_trt_major(default: int = 10) -> int:
    """The major version of the installed TensorRT wheel, read from its package metadata (nothing
    is imported, so this is cheap and works without a GPU); ``default`` when none is installed."""
    from importlib import metadata

    for dist in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11"):
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        head = version.split(".")[0]
        if head.isdigit():
            return int(head)
    return default


def format_command(argv: Sequence[str]) -> str:
    """Shell-quoted, one flag per line with backslash continuations (copy-pasteable)."""
    return " \\\n    ".join(shlex.quote(a) for a in argv)
