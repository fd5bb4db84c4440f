"""Build a TensorRT engine from a bundle's ONNX graph and record it in the bundle.

    bundle = Bundle.open("bundles/tiny")
    entry = build_engine(bundle, BuildOptions(preset="orin-nano", precision="fp16"))

``plan_build`` decides everything that needs no TensorRT (limits, profiles, precision, file names)
and backs ``--print-trtexec`` and the CPU tests. ``build_engine`` writes the graph generation needs
(the lm_head on the last position only, ``write_generation_graph``), parses it, keeps LayerNorm,
Softmax, the residual Adds and the logits in fp32 (TensorRT 10: layer precision constraints;
TensorRT 11, strongly typed: the graph is converted to mixed precision first), builds with a timing
cache beside the engine, and records the ``EngineEntry`` under the bundle's manifest lock
(``record_engine``). Each step and why: docs/tensorrt.md "Build" and "Precision".
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from deploy.cuda import cuda_device_info, set_cuda_device
from deploy.engine import ENGINES_DIR, HARDWARE_COMPAT_LEVELS, EngineEntry, upsert_engine
from deploy.presets import (
    ENGINE_PRECISIONS,
    EdgePreset,
    ProfileLimits,
    ProfileSpec,
    compute_profiles,
    get_preset,
    profile_summary,
)
from deploy.trtexec import trtexec_command
from export.contract import LOGITS
from export.deps import require
from export.errors import OptionsError
from export.manifest import Bundle, Manifest
from export.validate import check_graph

MAX_OPT_LEVEL = 5  # TensorRT 10/11: builder optimization levels 0..5, default 3
# Bundle graphs TensorRT's ONNX parser takes: ort-fused uses com.microsoft contrib ops and int8
# MatMulInteger/DynamicQuantizeLinear, which it does not.
BUILDABLE_BUNDLE_PRECISIONS = ("fp32", "fp16")


class BuildError(RuntimeError):
    """The engine could not be built; the message lists every reason found."""


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'4G', '512MiB', '1073741824' -> bytes (binary units: 1G = 2**30)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise OptionsError(f"not a size: {text!r}; use bytes or a number with K, M, G or T (e.g. 2G, 512M)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


@dataclass
class BuildOptions:
    """What to build. None means "the preset's value" (or TensorRT's default for opt_level).

    Args:
        preset: server, orin-nano, orin-nx or agx-orin (``deploy.presets.PRESETS``).
        precision: fp32, fp16 or bf16.
        workspace: Builder workspace limit in bytes (or a size string, e.g. "2G").
        opt_level: Builder optimization level 0-5 (TensorRT's default is 3).
        version_compatible: Build a version-compatible engine (runs on later TensorRT versions and
            on the lean runtime ``tensorrt_lean``).
        exclude_lean_runtime: With version_compatible, leave the lean runtime out of the plan
            (smaller plan; the loader must bring the lean runtime of the same version).
        hardware_compat: none, ampere_plus or same_compute_capability.
        timing_cache: Timing cache path; defaults to ``engines/<name>.timing.cache`` in the bundle.
        tf32: Allow TF32 math in fp32 layers (faster; compared with the "tf32" tolerance).
        max_batch, max_context, max_prompt: Override the preset's limits.
        name: Engine file stem; defaults to ``<preset>-<precision>[-vc]``.
        progress: Show TensorRT's build progress.
        device: CUDA device index to build on (selected with cudaSetDevice before the builder).
    """

    preset: str = "server"
    precision: str | None = None
    workspace: int | str | None = None
    opt_level: int | None = None
    version_compatible: bool = False
    exclude_lean_runtime: bool = False
    hardware_compat: str = "none"
    timing_cache: Path | None = None
    tf32: bool = False
    max_batch: int | None = None
    max_context: int | None = None
    max_prompt: int | None = None
    name: str | None = None
    progress: bool = True
    device: int = 0

    def check(self) -> None:
        """Raise OptionsError listing every invalid option (names -> values, all at once)."""
        problems = []
        try:
            get_preset(self.preset)
        except OptionsError as e:
            problems.append(str(e))
        if self.precision is not None and self.precision not in ENGINE_PRECISIONS:
            problems.append(f"precision {self.precision!r} is not one of {', '.join(ENGINE_PRECISIONS)}")
        if self.workspace is not None:
            try:
                if parse_size(self.workspace) <= 0:
                    problems.append("workspace must be > 0")
            except OptionsError as e:
                problems.append(str(e))
        if self.opt_level is not None and not 0 <= self.opt_level <= MAX_OPT_LEVEL:
            problems.append(f"opt level must be in 0..{MAX_OPT_LEVEL}, got {self.opt_level}")
        if self.exclude_lean_runtime and not self.version_compatible:
            problems.append("--exclude-lean-runtime needs --version-compatible (TensorRT rejects it alone)")
        if self.hardware_compat not in HARDWARE_COMPAT_LEVELS:
            problems.append(
                f"hardware compat {self.hardware_compat!r} is not one of {', '.join(HARDWARE_COMPAT_LEVELS)}"
            )
        if self.device < 0:
            problems.append(f"device must be a CUDA device index >= 0, got {self.device}")
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", self.name):
            problems.append(f"engine name {self.name!r} may hold only letters, digits, '.', '_' and '-'")
        if problems:
            raise OptionsError("invalid build options:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class BuildPlan:
    """Everything about a build that can be decided without TensorRT."""

    bundle: Bundle
    options: BuildOptions
    preset: EdgePreset
    precision: str
    workspace: int
    limits: ProfileLimits
    profiles: list[ProfileSpec]
    engine_rel: str
    timing_cache: Path
    notes: list[str] = field(default_factory=list)
    engine_precision: str = ""  # what the engine computes in; set from ``precision`` if empty

    def __post_init__(self) -> None:
        self.engine_precision = self.engine_precision or self.precision

    @property
    def engine_path(self) -> Path:
        return self.bundle.root / self.engine_rel

    @property
    def generation_graph(self) -> Path:
        """Where the printed steps write the graph TensorRT builds from (``write_generation_graph``):
        beside the bundle's graph, whose external data it shares."""
        return generation_graph_path(self.bundle.onnx_path)

    @property
    def timing_cache_rel(self) -> str | None:
        """The cache's bundle-relative path, or None when it lives outside the bundle."""
        try:
            return self.timing_cache.resolve().relative_to(self.bundle.root.resolve()).as_posix()
        except ValueError:
            return None

    def trtexec(
        self,
        *,
        fp32_layers: list[str] | None = None,
        strongly_typed: bool = False,
        onnx_path: Path | None = None,
    ) -> list[str]:
        """The trtexec argv for this build (TensorRT 10 flags unless ``strongly_typed``)."""
        o = self.options
        if fp32_layers is None and self.precision != "fp32" and not strongly_typed:
            fp32_layers = onnx_fp32_node_names(self.bundle.onnx_path, last_position=True)
        return trtexec_command(
            onnx_path or self.generation_graph,
            self.engine_path,
            self.profiles,
            precision=self.precision,
            tf32=o.tf32,
            workspace=self.workspace,
            opt_level=o.opt_level,
            version_compatible=o.version_compatible,
            exclude_lean_runtime=o.exclude_lean_runtime,
            hardware_compat=o.hardware_compat,
            timing_cache=self.timing_cache,
            fp32_layers=fp32_layers or [],
            strongly_typed=strongly_typed,
        )

    def trtexec_steps(self, trt_major: int = 10) -> list[list[str]]:
        """The commands equivalent to this build with TensorRT ``trt_major``'s trtexec, in order.

        First the command that writes the graph generation needs (``write_generation_graph``: the
        lm_head on the last position only), then trtexec on it: TensorRT 10 with precision flags and
        fp32 layer constraints; TensorRT 11 (strongly typed, no precision flags) with
        ``--stronglyTyped``, and for fp16 from an fp32 bundle the first command also converts that
        graph to mixed precision (``export.variants``' fp16 variant, what ``build`` does).

        Raises:
            OptionsError: ``trt_major`` is not 10 or 11, or bf16 for TensorRT 11 (needs a converter
                this project does not ship).
        """
        if trt_major not in (10, 11):
            raise OptionsError(f"--trt-major must be 10 or 11, got {trt_major}")
        # double-quoted literals (JSON strings are Python literals): the shell quotes stay readable
        src, last = json.dumps(str(self.bundle.onnx_path)), json.dumps(str(self.generation_graph))
        derive = [
            "python",
            "-c",
            f"from deploy.trt_build import write_generation_graph; write_generation_graph({src}, {last})",
        ]
        if trt_major == 10:
            return [derive, self.trtexec()]
        if self.precision == "fp32" or self.bundle.manifest.precision != "fp32":
            return [derive, self.trtexec(strongly_typed=True)]
        if self.precision != "fp16":
            raise OptionsError(
                f"{self.precision} with TensorRT 11 needs a graph that carries {self.precision} types "
                "(its trtexec has no --bf16); convert it with NVIDIA ModelOpt AutoCast or build fp16/fp32"
            )
        converted = self.engine_path.with_suffix(".fp16.onnx")
        code = (
            "from deploy.trt_build import write_generation_graph; from export.variants import make_variant; "
            f'make_variant(write_generation_graph({src}, {last}), {json.dumps(str(converted))}, "fp16")'
        )
        return [["python", "-c", code], self.trtexec(strongly_typed=True, onnx_path=converted)]


def plan_build(bundle: Bundle, options: BuildOptions) -> BuildPlan:
    """Resolve options against the preset and the model; compute the profiles. No TensorRT needed.

    Raises:
        OptionsError: invalid options, a bundle whose graph TensorRT cannot parse, or a precision
            the bundle's graph cannot give (bf16 from an fp16 graph).
    """
    options.check()
    bundle_precision = bundle.manifest.precision
    if bundle_precision not in BUILDABLE_BUNDLE_PRECISIONS:
        raise OptionsError(
            f"the bundle's graph is {bundle_precision}; TensorRT builds from "
            f"{' or '.join(BUILDABLE_BUNDLE_PRECISIONS)} bundles only (ort-fused uses ONNX Runtime's "
            "com.microsoft contrib ops and int8 MatMulInteger/DynamicQuantizeLinear, which TensorRT's "
            "ONNX parser does not take); export an fp32 bundle (`gpt2-deploy export --precision fp32`) "
            "and choose the engine's precision with `build --precision`"
        )
    preset = get_preset(options.preset)
    precision = options.precision or preset.precision
    limits = ProfileLimits.resolve(
        preset,
        bundle.dims.n_positions,
        max_batch=options.max_batch,
        max_context=options.max_context,
        max_prompt=options.max_prompt,
    )
    profiles = compute_profiles(bundle.contract, limits)
    name = options.name or f"{preset.name}-{precision}{'-vc' if options.version_compatible else ''}"
    engine_rel = f"{ENGINES_DIR}/{name}.engine"
    cache = options.timing_cache or bundle.root / ENGINES_DIR / f"{name}.timing.cache"
    notes = []
    if options.max_context is not None and options.max_context > limits.max_context:
        notes.append(
            f"--max-context {options.max_context} is more than the model's "
            f"{bundle.dims.n_positions} positions: clipped to {limits.max_context}"
        )
    if options.max_prompt is not None and options.max_prompt > limits.max_prompt:
        notes.append(
            f"--max-prompt {options.max_prompt} is more than the max context: clipped to {limits.max_prompt}"
        )
    engine_precision = precision
    if bundle_precision == "fp16" and precision == "bf16":
        # TensorRT 11 (strongly typed) would run the graph's fp16 types; TensorRT 10 would mix them
        raise OptionsError(
            "the bundle's graph is fp16 (its weights and matmuls carry fp16 types), so a bf16 engine "
            "cannot be built from it: TensorRT would compute in fp16, not bf16; export an fp32 bundle "
            "for a bf16 engine, or build this one with --precision fp16"
        )
    if bundle_precision == "fp16" and precision == "fp32":
        engine_precision = "fp16"
        notes.append(
            "the bundle's graph is fp16 (its weights and matmuls carry fp16 types), so this fp32 "
            "build computes in fp16 and is recorded as fp16; export an fp32 bundle for an fp32 "
            "engine"
        )
    return BuildPlan(
        bundle,
        options,
        preset,
        precision,
        parse_size(options.workspace) if options.workspace is not None else preset.workspace,
        limits,
        profiles,
        engine_rel,
        Path(cache),
        notes,
        engine_precision,
    )


# --- ONNX helpers (onnx only; no TensorRT) ----------------------------------------------------------
def generation_graph_path(onnx_path: Path) -> Path:
    """``model.onnx`` -> ``model_last.onnx`` beside it (``write_generation_graph``'s default)."""
    return onnx_path.with_name(f"{onnx_path.stem}_last.onnx")


def write_generation_graph(src: str | Path, dst: str | Path | None = None) -> Path:
    """Write the graph a TensorRT engine is built from: ``src`` (a bundle's graph, the main
    contract) with its lm_head on the last position only (``logits_positions="last"``: logits
    (batch, 1, vocab)); generation reads nothing else, and the engine's logits buffer shrinks from
    B_max x max_prompt x V to B_max x 1 x V. It refers to ``src``'s weights (external data shared),
    so ``dst`` (default ``generation_graph_path(src)``) must be in ``src``'s directory when ``src``
    has external data. Returns ``dst``.

    Raises:
        BuildError: the graph's lm_head was not found (``select_logits_positions``), or ``dst`` is
            elsewhere than an external ``src``'s directory.
    """
    from export.onnx_export import write_logits_graph

    src = Path(src)
    dst = Path(dst) if dst is not None else generation_graph_path(src)
    try:
        write_logits_graph(src, dst, "last")
    except ValueError as e:
        raise BuildError(f"cannot write the generation graph of {src}: {e}") from None
    return dst


def onnx_fp32_names(onnx_path: Path, *, last_position: bool = False) -> dict[str, list[str]]:
    """``export.variants.fp32_node_names`` of the graph at ``onnx_path`` (weights not loaded), or,
    with ``last_position``, of the generation graph derived from it (``write_generation_graph``)."""
    onnx = require("onnx")
    from export.onnx_export import select_logits_positions
    from export.variants import fp32_node_names

    m = onnx.load(str(onnx_path), load_external_data=False)
    if last_position:
        select_logits_positions(m, "last")
    return fp32_node_names(m.graph)


def onnx_fp32_node_names(onnx_path: Path, *, last_position: bool = False) -> list[str]:
    """Names of the ONNX nodes kept in fp32 for reduced precision, LayerNorm/Softmax first, the
    lm_head last (TensorRT's ONNX parser names the layers it creates after these nodes, which is
    what trtexec's --layerPrecisions matches)."""
    groups = onnx_fp32_names(onnx_path, last_position=last_position)
    names = [*groups["ops"], *groups["residual_adds"], *reversed(groups["lm_head"])]
    return list(dict.fromkeys(names))


def convert_onnx_mixed_precision(src: Path, dst: Path, precision: str) -> Path:
    """Write the fp16 variant of ``src`` to ``dst`` (``export.variants.make_variant``: fp32 I/O,
    LayerNorm, Softmax, residual Adds and the lm_head path in fp32), for TensorRT 11's strongly
    typed networks, where the types must be in the graph.

    Raises:
        BuildError: ``precision`` is not fp16 (bf16 needs another converter).
    """
    if precision != "fp16":
        raise BuildError(
            f"{precision} on TensorRT 11+ needs a graph that carries {precision} types (TensorRT 11 removed "
            "the BF16/FP16 builder flags); convert it with NVIDIA ModelOpt AutoCast "
            "(python -m modelopt.onnx.autocast --low_precision_type bf16 ...) or build fp16/fp32"
        )
    from export.variants import make_variant

    make_variant(src, dst, "fp16")
    return dst


# --- TensorRT ------------------------------------------------------------------------------------------
def _make_progress_monitor(trt: Any, enabled: bool) -> Any:
    """An ``IProgressMonitor`` drawing one tqdm bar per build phase (NVIDIA's simple_progress_monitor
    sample: ``phase_start(name, parent, num_steps)``, ``step_complete(name, step) -> bool`` (False
    cancels the build), ``phase_finish(name)``). TensorRT calls it from its own threads."""
    if not enabled or not hasattr(trt, "IProgressMonitor"):
        return None
    from tqdm import tqdm

    class _Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._bars: dict[str, Any] = {}
            self._depth: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            depth = self._depth.get(parent_phase, -1) + 1 if parent_phase else 0
            self._depth[phase_name] = depth
            self._bars[phase_name] = tqdm(
                total=max(num_steps, 1),
                desc="  " * depth + phase_name,
                leave=depth == 0,
                file=sys.stderr,
                position=depth,
            )

        def step_complete(self, phase_name: str, step: int) -> bool:
            bar = self._bars.get(phase_name)
            if bar is not None:
                bar.update(step + 1 - bar.n)  # ``step`` is the zero-based index of the finished step
            return True

        def phase_finish(self, phase_name: str) -> None:
            bar = self._bars.pop(phase_name, None)
            if bar is not None:
                bar.close()
            self._depth.pop(phase_name, None)

    return _Monitor()


def _parse_onnx(trt: Any, builder: Any, logger: Any, onnx_path: Path, flags: int) -> tuple[Any, Any]:
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(onnx_path))
    if not ok or parser.num_errors:
        lines = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            node = getattr(e, "node_name", lambda: "")() or f"#{e.node()}"
            op = getattr(e, "node_operator", lambda: "")()
            lines.append(f"node {node}{f' ({op})' if op else ''}: {e.desc()} [{e.code()}]")
        raise BuildError(
            f"TensorRT's ONNX parser rejected {onnx_path}:\n"
            + "\n".join(f"  - {line}" for line in lines or ["no error recorded; see the log above"])
        )
    return network, parser


def _pin_fp32_layers(trt: Any, network: Any, onnx_names: dict[str, list[str]]) -> dict[str, int]:
    """Keep normalization, softmax, the residual Adds and the logits path in fp32 in a weakly typed
    (TensorRT 10) network.

    Two rules: by layer type (NORMALIZATION, SOFTMAX), and by name: TensorRT's ONNX parser names
    each layer after the ONNX node it comes from, so the layers named like ``onnx_names``
    (``export.variants.fp32_node_names``: LayerNorm/Softmax, residual Adds, lm_head path) are
    pinned too; then the layers from the ``logits`` output back to the lm_head matmul.
    ``layer.precision`` sets the compute type and ``set_output_type`` the output types; both take
    effect only under ``BuilderFlag.OBEY_PRECISION_CONSTRAINTS`` (Polygraphy's CreateConfig warns
    when precisions are set without it). Returns counts per rule, and how many ONNX names matched
    no layer (``unmatched_onnx_names``).
    """
    float_types = {trt.float32, trt.float16, getattr(trt, "bfloat16", trt.float16)}

    def pin(layer: Any) -> None:
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype in float_types:
                layer.set_output_type(j, trt.float32)

    group_of = {name: group for group, names in onnx_names.items() for name in names}
    counts = {"normalization": 0, "softmax": 0, "logits": 0, **{g: 0 for g in onnx_names}}
    matched: set[str] = set()
    producer: dict[str, Any] = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            producer[layer.get_output(j).name] = layer
        if layer.type == trt.LayerType.NORMALIZATION:
            counts["normalization"] += 1
        elif layer.type == trt.LayerType.SOFTMAX:
            counts["softmax"] += 1
        if layer.name in group_of:
            counts[group_of[layer.name]] += 1
            matched.add(layer.name)
        if layer.type in (trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX) or layer.name in group_of:
            pin(layer)
    counts["unmatched_onnx_names"] = len(set(group_of) - matched)
    tensor = LOGITS
    for _ in range(8):  # walk back from the logits output to the lm_head matmul
        layer = producer.get(tensor)
        if layer is None:
            break
        pin(layer)
        counts["logits"] += 1
        if layer.type == trt.LayerType.MATRIX_MULTIPLY:
            break
        inputs = [layer.get_input(k) for k in range(layer.num_inputs)]
        nxt = [
            t
            for t in inputs
            if t is not None and t.name in producer and producer[t.name].type != trt.LayerType.CONSTANT
        ]
        if not nxt:
            break
        tensor = nxt[0].name
    return counts


def _check_network_io(network: Any, plan: BuildPlan) -> None:
    """The parsed network's inputs/outputs must be the contract's (names, all problems at once)."""
    contract = plan.bundle.contract
    got_in = [network.get_input(i).name for i in range(network.num_inputs)]
    got_out = [network.get_output(i).name for i in range(network.num_outputs)]
    problems = []
    if missing := sorted(set(contract.input_names) - set(got_in)):
        problems.append(f"inputs missing from the graph: {missing}")
    if extra := sorted(set(got_in) - set(contract.input_names)):
        problems.append(f"graph inputs not in the contract (no profile for them): {extra}")
    if missing := sorted(set(contract.output_names) - set(got_out)):
        problems.append(f"outputs missing from the graph: {missing}")
    logits = next((network.get_output(i) for i in range(network.num_outputs) if got_out[i] == LOGITS), None)
    if logits is not None and (len(logits.shape) != 3 or logits.shape[1] != 1):
        problems.append(
            f"{LOGITS} has shape {list(logits.shape)}; the generation graph's is (batch, 1, vocab) "
            "(the last position only)"
        )
    if problems:
        raise BuildError(
            "the ONNX graph does not match the bundle's I/O contract:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )


def _set_flag(trt: Any, config: Any, name: str) -> None:
    flag = getattr(trt.BuilderFlag, name, None)
    if flag is None:
        raise BuildError(f"this TensorRT ({trt.__version__}) has no BuilderFlag.{name}")
    config.set_flag(flag)


def _load_timing_cache(config: Any, path: Path, notes: list[str]) -> bool:
    """Load ``path`` into ``config``; False when it was made on another device/TensorRT version
    (then the build starts from an empty cache)."""
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        notes.append(
            f"timing cache {path} was made on another device/version; started an empty one "
            "(the file is overwritten with this build's)"
        )
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        return False
    return True


def _save_timing_cache(config: Any, path: Path, *, merge: bool) -> None:
    """Write the build's timing cache to ``path``; with ``merge``, combined with the file's entries
    (a cache that matched this device/version: ``combine(..., ignore_mismatch=False)``). A file
    that did not match is overwritten: merging it back would undo the check."""
    cache = config.get_timing_cache()
    if cache is None:
        return
    if merge and path.is_file():
        previous = config.create_timing_cache(path.read_bytes())
        if previous is not None:  # combine returns False when it refuses: this build's cache alone is kept
            cache.combine(previous, ignore_mismatch=False)
    _write_atomic(path, bytes(cache.serialize()))


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def build_engine(bundle: Bundle, options: BuildOptions) -> EngineEntry:
    """Build the engine ``options`` describe, write it (and its timing cache) into the bundle, and
    record it in the manifest.

    Raises:
        OptionsError: invalid options (all listed).
        MissingDependencyError: TensorRT (or cuda-python) is not installed.
        BuildError: the parser, the GPU or the builder refused (every reason listed).
    """
    plan = plan_build(bundle, options)
    trt = require("tensorrt")
    major = int(str(trt.__version__).split(".")[0])
    try:
        device = cuda_device_info(options.device)
        # the builder (and everything it allocates) works on the current device: make it --device
        set_cuda_device(options.device)
    except RuntimeError as e:
        raise BuildError(f"cannot use CUDA device {options.device}: {e}") from None
    notes = list(plan.notes)
    if plan.precision == "bf16" and not device.bf16:
        raise BuildError(
            f"bf16 needs compute capability >= 8.0 (Ampere or newer); {device.name} is "
            f"{device.compute_capability}: build fp16 or fp32"
        )

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = major >= 11
    tmp = None
    # beside the bundle's graph (its external data is shared), under a name no other build uses
    generation = generation_graph_path(bundle.onnx_path)
    generation = generation.with_name(f".{generation.stem}-{secrets.token_hex(4)}.onnx")
    try:
        onnx_path = write_generation_graph(bundle.onnx_path, generation)
        if problems := check_graph(onnx_path, bundle.contract.with_logits_positions("last")):
            raise BuildError(
                f"the generation graph of {bundle.onnx_path} is not valid: " + "; ".join(problems)
            )
        if strongly_typed and plan.precision != "fp32" and bundle.manifest.precision == "fp32":
            tmp = tempfile.TemporaryDirectory(prefix="gpt2-deploy-trt-")
            onnx_path = convert_onnx_mixed_precision(onnx_path, Path(tmp.name) / "model.onnx", plan.precision)
            notes.append(
                "TensorRT 11 is strongly typed: the graph was converted to fp16 (fp32 I/O, LayerNorm, "
                "Softmax, residual Adds and logits; export.variants' fp16 variant) before parsing"
            )
        # TensorRT 10: flags 0 is a weakly typed network, where builder precision flags apply.
        # TensorRT 11: every network is strongly typed (the creation flag is accepted and ignored).
        network, parser = _parse_onnx(trt, builder, logger, onnx_path, 0)
        _check_network_io(network, plan)

        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace)
        if options.opt_level is not None:
            config.builder_optimization_level = options.opt_level
        if not options.tf32:
            config.clear_flag(trt.BuilderFlag.TF32)  # TF32 is on by default (Polygraphy does the same)
        fp32_layers: dict[str, int] = {}
        if plan.precision != "fp32" and not strongly_typed:
            _set_flag(trt, config, "FP16" if plan.precision == "fp16" else "BF16")
            fp32_layers = _pin_fp32_layers(trt, network, onnx_fp32_names(onnx_path))
            _set_flag(trt, config, "OBEY_PRECISION_CONSTRAINTS")
            if not fp32_layers.get("normalization"):
                notes.append("no normalization layer found to keep in fp32 (LayerNorm decomposed?)")
            if fp32_layers.get("unmatched_onnx_names"):
                notes.append(
                    f"{fp32_layers['unmatched_onnx_names']} ONNX node(s) to keep in fp32 had no "
                    "TensorRT layer of the same name (not pinned)"
                )
        for i, spec in enumerate(plan.profiles):
            profile = builder.create_optimization_profile()
            for name, (lo, opt, hi) in spec.shapes.items():
                profile.set_shape(name, lo, opt, hi)
            index = config.add_optimization_profile(profile)
            if index != i:
                raise BuildError(
                    f"TensorRT rejected the {spec.name} profile (add_optimization_profile "
                    f"returned {index}); its shapes: {spec.to_json()['shapes']}"
                )
        if options.version_compatible:
            _set_flag(trt, config, "VERSION_COMPATIBLE")
            if options.exclude_lean_runtime:
                _set_flag(trt, config, "EXCLUDE_LEAN_RUNTIME")
        if options.hardware_compat != "none":
            level = getattr(trt.HardwareCompatibilityLevel, options.hardware_compat.upper(), None)
            if level is None:
                raise BuildError(
                    f"this TensorRT ({trt.__version__}) has no hardware compatibility level "
                    f"{options.hardware_compat!r}; it has {list(trt.HardwareCompatibilityLevel.__members__)}"
                )
            config.hardware_compatibility_level = level
        cache_matched = _load_timing_cache(config, plan.timing_cache, notes)
        monitor = _make_progress_monitor(trt, options.progress)
        if monitor is not None:
            config.progress_monitor = monitor  # must outlive the build: held by ``monitor`` here

        t0 = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        seconds = time.perf_counter() - t0
        if serialized is None:
            raise BuildError(
                "TensorRT could not build the engine (build_serialized_network returned None); "
                "the TensorRT log above says why"
            )
        _write_atomic(plan.engine_path, bytes(serialized))
        _save_timing_cache(config, plan.timing_cache, merge=cache_matched)
    finally:
        generation.unlink(missing_ok=True)
        if tmp is not None:
            tmp.cleanup()

    manifest = bundle.manifest
    entry = EngineEntry(
        file=plan.engine_rel,
        timing_cache=plan.timing_cache_rel,
        tensorrt_version=str(trt.__version__),
        gpu_name=device.name,
        compute_capability=device.compute_capability,
        precision=plan.engine_precision,
        tf32=options.tf32,
        profiles=[p.to_json() for p in plan.profiles],
        profile_summary=profile_summary(plan.profiles, bundle.contract),
        flags={
            "version_compatible": options.version_compatible,
            "exclude_lean_runtime": options.exclude_lean_runtime,
            "hardware_compatibility_level": options.hardware_compat,
            "builder_optimization_level": options.opt_level,
            "workspace_bytes": plan.workspace,
            "strongly_typed": strongly_typed,
        },
        preset=plan.preset.name,
        limits={
            "max_batch": plan.limits.max_batch,
            "max_context": plan.limits.max_context,
            "max_prompt": plan.limits.max_prompt,
            "opt_batch": plan.limits.opt_batch,
            "opt_prompt": plan.limits.opt_prompt,
            # built from the generation graph: the lm_head on the last position only
            "logits_positions": "last",
            "max_logits_shape": [plan.limits.max_batch, 1, bundle.contract.vocab_size],
        },
        build_seconds=round(seconds, 3),
        built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        onnx_file=manifest.model_file,
        onnx_sha256=manifest.files[manifest.model_file].sha256,
        fp32_layers=fp32_layers,
        notes=notes,
    )
    roles = {plan.engine_rel: "engine"}
    if plan.timing_cache_rel and plan.timing_cache.is_file():
        roles[plan.timing_cache_rel] = "timing-cache"
    record_engine(bundle, entry, roles)
    return entry


def record_engine(bundle: Bundle, entry: EngineEntry, roles: dict[str, str]) -> Manifest:
    """Record ``entry`` and its files (``roles``: bundle-relative path -> role, hashed here) in the
    bundle's manifest, against the manifest as it is on disk, under its lock (``Bundle.update_manifest``):
    engines recorded meanwhile by other builds are kept.

    Raises:
        BuildError: the bundle's graph changed since the engine was built from it (a re-export).
    """
    hashed = replace(bundle.manifest, files={}).with_files(bundle.root, roles).files  # outside the lock

    def add(current: Manifest) -> Manifest:
        onnx = current.files.get(entry.onnx_file)
        if onnx is None or onnx.sha256 != entry.onnx_sha256:
            raise BuildError(
                f"{bundle.root / entry.onnx_file} changed while the engine was built from it (re-exported?); "
                f"{entry.file} is not recorded: build again"
            )
        return replace(
            current, files={**current.files, **hashed}, engines=upsert_engine(current.engines, entry)
        )

    return bundle.update_manifest(add)
