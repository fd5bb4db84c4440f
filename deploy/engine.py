"""A TensorRT engine's manifest entry, and the decisions whether a runtime may load it.

The builder records one ``EngineEntry`` per engine in ``Manifest.engines``; the TensorRT backend
picks the newest entry that ``check_engine`` passes: the graph and plan are the bundle's,
``check_compatibility`` (TensorRT version, lean runtime, GPU) and ``check_host_code`` (a plan with
executable host code needs an explicit opt-in), so a mismatch is refused with a message naming what
was built and what is running. The rules, from TensorRT's "Engine Compatibility" documentation:
docs/tensorrt.md "Portability and the lean runtime".
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from export.compare import tolerance_for_run

ENGINES_DIR = "engines"
HARDWARE_COMPAT_LEVELS = ("none", "ampere_plus", "same_compute_capability")


def parse_version(v: str) -> tuple[int, ...]:
    """'10.13.3.9' -> (10, 13, 3, 9); non-numeric tails are dropped ('11.0.0rc1' -> (11, 0, 0))."""
    out = []
    for part in str(v).split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group()))
    if not out:
        raise ValueError(f"not a version string: {v!r}")
    return tuple(out)


def lean_library_version(path: str) -> tuple[int, ...]:
    """The version in a lean runtime library's file name: ``libnvinfer_lean.so.10.13.3`` ->
    (10, 13, 3), ``libnvinfer_lean.so.10`` -> (10,), ``nvinfer_lean_10.dll`` -> (10,), no
    version -> ()."""
    name = re.split(r"[\\/]", str(path))[-1]
    m = re.search(r"\.so\.(\d+(?:\.\d+)*)$", name) or re.search(r"_(\d+)\.dll$", name, re.IGNORECASE)
    return tuple(int(x) for x in m.group(1).split(".")) if m else ()


def parse_compute_capability(cc: str | tuple[int, int]) -> tuple[int, int]:
    if isinstance(cc, tuple):
        return int(cc[0]), int(cc[1])
    major, _, minor = str(cc).partition(".")
    return int(major), int(minor or 0)


@dataclass(frozen=True)
class EngineEntry:
    """One built engine, as recorded in ``Manifest.engines`` (newest last).

    Args:
        file: Bundle-relative path of the plan (``engines/<name>.engine``).
        timing_cache: Bundle-relative path of the timing cache saved beside it (or None).
        tensorrt_version: ``tensorrt.__version__`` of the builder.
        gpu_name: The build GPU's name.
        compute_capability: The build GPU's compute capability, "major.minor".
        precision: fp32, fp16 or bf16.
        tf32: Whether TF32 matmuls were allowed (fp32 engines compare with the "tf32" tolerance).
        profiles: ``ProfileSpec.to_json()`` for each optimization profile, in profile order.
        profile_summary: Per-profile axis ranges (batch/seq/past/total).
        flags: version_compatible, exclude_lean_runtime, hardware_compatibility_level,
            builder_optimization_level, workspace_bytes, strongly_typed.
        preset: The edge preset the limits came from.
        limits: The resolved limits (max_batch, max_context, max_prompt, opt_*).
        build_seconds: Wall time of ``build_serialized_network``.
        built_at: UTC timestamp (ISO 8601).
        onnx_file: Bundle-relative ONNX path it was built from.
        onnx_sha256: That file's sha256 (the engine is stale if the bundle's graph changes).
        fp32_layers: TensorRT 10 reduced precision: layers pinned to fp32 per rule (by type:
            normalization, softmax; by ONNX node name: ops, residual_adds, lm_head; the walk back
            from the logits: logits) and ``unmatched_onnx_names``.
        notes: Anything the build wants the reader to know (warnings).
    """

    file: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    profiles: list[dict[str, Any]]
    onnx_file: str
    onnx_sha256: str
    timing_cache: str | None = None
    tf32: bool = False
    profile_summary: list[dict[str, Any]] = field(default_factory=list)
    flags: dict[str, Any] = field(default_factory=dict)
    preset: str = ""
    limits: dict[str, Any] = field(default_factory=dict)
    build_seconds: float = 0.0
    built_at: str = ""
    fp32_layers: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def version_compatible(self) -> bool:
        return bool(self.flags.get("version_compatible", False))

    @property
    def exclude_lean_runtime(self) -> bool:
        return bool(self.flags.get("exclude_lean_runtime", False))

    @property
    def hardware_compatibility_level(self) -> str:
        return str(self.flags.get("hardware_compatibility_level", "none"))

    @property
    def tolerance_name(self) -> str:
        """The ``export.compare`` tolerance preset this engine is held to (``tolerance_for_run``)."""
        return tolerance_for_run(
            self.precision, device="cuda", tf32=self.tf32, engine_precision=self.precision
        ).name

    @property
    def embeds_host_code(self) -> bool:
        """A version-compatible plan carries TensorRT's lean runtime, executable host code, unless it
        was built with --exclude-lean-runtime."""
        return self.version_compatible and not self.exclude_lean_runtime

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EngineEntry:
        known = {f for f in cls.__dataclass_fields__}
        missing = [
            k
            for k in (
                "file",
                "tensorrt_version",
                "gpu_name",
                "compute_capability",
                "precision",
                "profiles",
                "onnx_file",
                "onnx_sha256",
            )
            if k not in d
        ]
        if missing:
            raise ValueError(f"engine entry {d.get('file', '?')!r} lacks {missing}")
        return cls(**{k: v for k, v in d.items() if k in known})


def upsert_engine(engines: list[dict[str, Any]], entry: EngineEntry) -> list[dict[str, Any]]:
    """``engines`` with ``entry`` replacing any entry for the same file, appended last (newest)."""
    return [e for e in engines if e.get("file") != entry.file] + [entry.to_json()]


@dataclass(frozen=True)
class RuntimeInfo:
    """What is about to load an engine: the TensorRT module and the GPU.

    Args:
        module: "tensorrt" (full runtime) or "tensorrt_lean".
        tensorrt_version: That module's ``__version__``.
        compute_capability: The GPU's "major.minor".
        gpu_name: The GPU's name.
        lean_library: A lean runtime library loaded with ``Runtime.load_runtime`` (or None); its
            version is taken from the file name when it carries one (see ``lean_library_version``).
    """

    module: str
    tensorrt_version: str
    compute_capability: str
    gpu_name: str = ""
    lean_library: str | None = None


@dataclass
class Compatibility:
    """The decision: truthy when the runtime may load the engine; ``problems`` say why not."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        if self:
            return "compatible" + (f" ({'; '.join(self.notes)})" if self.notes else "")
        return "; ".join(self.problems)


TRUST_HOST_CODE_FLAG = "--trust-engine-host-code"


def check_host_code(entry: EngineEntry, trusted: bool) -> Compatibility:
    """Whether ``entry``'s plan may be loaded as far as its executable host code goes.

    A version-compatible plan embeds TensorRT's lean runtime, a native library that runs in the
    loading process (TensorRT loads it only with ``Runtime.engine_host_code_allowed``). The bundle's
    sha256 of the plan sits in the same directory as the plan, so it says nothing about who wrote
    either: such a plan is loaded only when the operator says it is trusted (``trusted``).
    """
    out = Compatibility()
    if entry.embeds_host_code and not trusted:
        out.problems.append(
            f"{entry.file} is a version-compatible engine: it carries TensorRT's lean runtime as "
            "executable host code, which would run in this process when the plan loads, and a hash "
            "stored beside it in the bundle does not prove who built it; pass "
            f"{TRUST_HOST_CODE_FLAG} if you trust the bundle's origin, or rebuild the engine without "
            "--version-compatible (or with --exclude-lean-runtime)"
        )
    return out


def check_compatibility(entry: EngineEntry, rt: RuntimeInfo) -> Compatibility:
    """Whether ``rt`` may load ``entry``'s engine (every reason it may not, at once)."""
    out = Compatibility()
    built, running = parse_version(entry.tensorrt_version), parse_version(rt.tensorrt_version)
    vc = entry.version_compatible
    built_s = f"TensorRT {entry.tensorrt_version}"
    run_s = f"{rt.module} {rt.tensorrt_version}"

    # --- TensorRT version ---------------------------------------------------------------------
    if rt.module == "tensorrt_lean" and not vc:
        out.problems.append(
            f"the engine was built without --version-compatible, and the lean runtime ({run_s}) "
            "runs only version-compatible engines; rebuild with --version-compatible or install the "
            "full 'tensorrt' package"
        )
    if not vc:
        if built[:3] != running[:3]:
            out.problems.append(
                f"the engine was built with {built_s} and this runtime is {run_s}; a plain engine runs "
                "only on the TensorRT version that built it: rebuild it here (`gpt2-deploy build`) or "
                "build with --version-compatible"
            )
    elif entry.exclude_lean_runtime:
        same = built[:3] == running[:3]
        need = (
            f"the engine was built with {built_s} as version-compatible without an embedded lean "
            f"runtime (--exclude-lean-runtime); it needs the lean runtime of exactly that version"
        )
        if not same and not rt.lean_library:
            out.problems.append(
                f"{need}, and this runtime is {run_s}: install tensorrt-lean=={entry.tensorrt_version} or "
                "pass the matching libnvinfer_lean library"
            )
        elif not same:
            lib = lean_library_version(rt.lean_library or "")
            n = min(len(lib), 3)
            if lib and lib[:n] != built[:n]:
                out.problems.append(
                    f"{need}, and the lean library {rt.lean_library} is version "
                    f"{'.'.join(map(str, lib))}: pass libnvinfer_lean of {entry.tensorrt_version}"
                )
            elif n < 3:
                out.notes.append(
                    f"the lean library {rt.lean_library} does not name its full version; it must be "
                    f"the one of {built_s} (checked: {'major ' + str(lib[0]) if lib else 'nothing'})"
                )
    elif running[:3] < built[:3]:
        out.problems.append(
            f"the engine was built with {built_s}, newer than this runtime ({run_s}); a "
            "version-compatible engine runs on its own and later TensorRT versions only"
        )
    elif built[:3] != running[:3]:
        out.notes.append(f"version-compatible engine from {built_s} on {run_s}")

    # --- GPU ----------------------------------------------------------------------------------
    level = entry.hardware_compatibility_level
    b_cc, r_cc = (
        parse_compute_capability(entry.compute_capability),
        parse_compute_capability(rt.compute_capability),
    )
    if level == "ampere_plus":
        if r_cc < (8, 0):
            out.problems.append(
                f"the engine was built with hardware compatibility 'ampere_plus', which needs compute "
                f"capability >= 8.0; this GPU ({rt.gpu_name or '?'}) is {rt.compute_capability}"
            )
    elif b_cc != r_cc:
        hint = (
            ""
            if level != "none"
            else "; engines are not portable across GPU architectures: rebuild on this device, or build "
            "with --hardware-compat ampere_plus for Ampere and newer discrete GPUs"
        )
        out.problems.append(
            f"the engine was built on {entry.gpu_name} (compute capability {entry.compute_capability}) "
            f"and this GPU is {rt.gpu_name or '?'} (compute capability {rt.compute_capability}){hint}"
        )
    elif level == "none" and rt.gpu_name and entry.gpu_name and rt.gpu_name != entry.gpu_name:
        out.notes.append(
            f"built on {entry.gpu_name}, running on {rt.gpu_name} (same compute capability); "
            "TensorRT may still reject the plan or run it slower"
        )
    return out


def check_engine(bundle: Any, entry: EngineEntry, rt: RuntimeInfo, trust_host_code: bool) -> Compatibility:
    """Whether ``rt`` may run ``entry`` from ``bundle`` (an ``export.manifest.Bundle``): the graph it
    was built from is still the bundle's, its plan file is there, ``check_compatibility`` and
    ``check_host_code``. The one rule the backend and the image's engine check both pick by."""
    problems = []
    onnx = bundle.manifest.files.get(entry.onnx_file)
    if onnx is not None and onnx.sha256 != entry.onnx_sha256:
        problems.append(
            f"it was built from a different {entry.onnx_file} (sha256 {entry.onnx_sha256[:12]}..., "
            f"the bundle's is {onnx.sha256[:12]}...): rebuild it"
        )
    if not (bundle.root / entry.file).is_file():
        problems.append(f"{entry.file} is missing")
    compat = check_compatibility(entry, rt)
    problems += compat.problems + check_host_code(entry, trust_host_code).problems
    return Compatibility(problems, compat.notes)
