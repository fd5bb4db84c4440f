"""Build a TensorRT engine from a bundle's ONNX graph and record it in the bundle.

    bundle = Bundle.open("bundles/tiny")
    entry = build_engine(bundle, BuildOptions(preset="orin-nano", precision="fp16"))

Steps (TensorRT 10/11 Python API; each step's model is named where it is not obvious):
1. parse the ONNX with ``OnnxParser.parse_from_file`` (so external data is found beside the graph,
   as Polygraphy's ``NetworkFromOnnxPath`` does) and report every parser error with its node;
2. two optimization profiles from the preset (``deploy.presets.compute_profiles``);
3. precision: fp32 (TF32 off unless asked), fp16 or bf16 with LayerNorm, Softmax and the logits
   kept in fp32 -- on TensorRT 10 through layer precision constraints (``layer.precision``,
   ``set_output_type`` and ``BuilderFlag.OBEY_PRECISION_CONSTRAINTS``); TensorRT 11 removed weak
   typing (every network is strongly typed, the FP16/BF16 builder flags are gone), so there the
   graph itself is converted to mixed precision before parsing, with the same ops kept in fp32;
4. workspace limit (``set_memory_pool_limit(MemoryPoolType.WORKSPACE, ...)``), builder optimization
   level, version compatibility / lean-runtime exclusion, hardware compatibility level;
5. a timing cache loaded from and saved beside the engine (Polygraphy's ``CreateConfig`` /
   ``EngineBytesFromNetwork``: ``create_timing_cache`` + ``set_timing_cache``, then
   ``get_timing_cache().combine(previous, ignore_mismatch=True)`` and ``serialize()``);
6. a progress bar fed by ``IProgressMonitor`` (NVIDIA's ``simple_progress_monitor`` sample);
7. ``build_serialized_network``; the plan and cache go to ``BUNDLE/engines/``, and an
   ``EngineEntry`` to ``Manifest.engines`` and ``Manifest.files``.

``plan_build`` (everything but TensorRT) is pure and backs ``--print-trtexec`` and the CPU tests.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from deploy.engine import ENGINES_DIR, HARDWARE_COMPAT_LEVELS, EngineEntry, cuda_device_info, upsert_engine
from deploy.presets import (
    PRECISIONS,
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
from export.manifest import Bundle

MAX_OPT_LEVEL = 5  # TensorRT 10/11: builder optimization levels 0..5, default 3


class BuildError(RuntimeError):
    """The engine could not be built; the message lists every reason found."""


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'4G', '512MiB', '1073741824' -> bytes (binary units: 1G = 2**30)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r}; use bytes or a number with K, M, G or T (e.g. 2G, 512M)")
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
        device: CUDA device index to build on.
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
        """Raise ValueError listing every invalid option (names -> values, all at once)."""
        problems = []
        try:
            get_preset(self.preset)
        except ValueError as e:
            problems.append(str(e))
        if self.precision is not None and self.precision not in PRECISIONS:
            problems.append(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.workspace is not None:
            try:
                if parse_size(self.workspace) <= 0:
                    problems.append("workspace must be > 0")
            except ValueError as e:
                problems.append(str(e))
        if self.opt_level is not None and not 0 <= self.opt_level <= MAX_OPT_LEVEL:
            problems.append(f"opt level must be in 0..{MAX_OPT_LEVEL}, got {self.opt_level}")
        if self.exclude_lean_runtime and not self.version_compatible:
            problems.append("--exclude-lean-runtime needs --version-compatible (TensorRT rejects it alone)")
        if self.hardware_compat not in HARDWARE_COMPAT_LEVELS:
            problems.append(
                f"hardware compat {self.hardware_compat!r} is not one of {', '.join(HARDWARE_COMPAT_LEVELS)}"
            )
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", self.name):
            problems.append(f"engine name {self.name!r} may hold only letters, digits, '.', '_' and '-'")
        if problems:
            raise ValueError("invalid build options:\n" + "\n".join(f"  - {p}" for p in problems))


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

    @property
    def engine_path(self) -> Path:
        return self.bundle.root / self.engine_rel

    @property
    def timing_cache_rel(self) -> str | None:
        """The cache's bundle-relative path, or None when it lives outside the bundle."""
        try:
            return self.timing_cache.resolve().relative_to(self.bundle.root.resolve()).as_posix()
        except ValueError:
            return None

    def trtexec(self, *, fp32_layers: list[str] | None = None, strongly_typed: bool = False) -> list[str]:
        o = self.options
        if fp32_layers is None and self.precision != "fp32":
            fp32_layers = onnx_fp32_node_names(self.bundle.onnx_path)
        return trtexec_command(
            self.bundle.onnx_path,
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


def plan_build(bundle: Bundle, options: BuildOptions) -> BuildPlan:
    """Resolve options against the preset and the model; compute the profiles. No TensorRT needed."""
    options.check()
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
    if bundle.manifest.precision not in ("fp32", precision):
        notes.append(f"the bundle's graph is {bundle.manifest.precision}; building {precision} from it")
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
    )


# --- ONNX helpers (onnx only; no TensorRT) ----------------------------------------------------------
FP32_OPS = ("LayerNormalization", "Softmax")


def _logits_path_nodes(graph: Any) -> list[str]:
    """ONNX nodes from the logits output back to (and including) the lm_head MatMul/Gemm."""
    producer = {o: n for n in graph.node for o in n.output}
    inits = {i.name for i in graph.initializer}
    names, tensor = [], LOGITS
    for _ in range(8):  # lm_head is at most a few nodes (MatMul [+ Reshape/Transpose]) from the output
        node = producer.get(tensor)
        if node is None:
            break
        names.append(node.name)
        if node.op_type in ("MatMul", "Gemm"):
            break
        tensor = next((i for i in node.input if i and i not in inits and i in producer), None)
        if tensor is None:
            break
    return names


def onnx_fp32_node_names(onnx_path: Path) -> list[str]:
    """Names of the ONNX nodes kept in fp32 for reduced precision (TensorRT's ONNX parser names the
    layers it creates after these nodes, which is what trtexec's --layerPrecisions matches)."""
    onnx = require("onnx")
    m = onnx.load(str(onnx_path), load_external_data=False)
    names = [n.name for n in m.graph.node if n.op_type in FP32_OPS and n.name]
    return names + [n for n in _logits_path_nodes(m.graph) if n and n not in names]


def convert_onnx_mixed_precision(src: Path, dst: Path, precision: str) -> Path:
    """Write an fp16 copy of ``src`` with fp32 I/O, LayerNorm, Softmax and the logits path in fp32.

    For TensorRT 11, which builds only strongly typed networks: the types must be in the graph.
    Uses onnxruntime's pure-Python float16 converter (``keep_io_types`` keeps the I/O contract).
    """
    if precision != "fp16":
        raise BuildError(
            f"{precision} on TensorRT 11+ needs a graph that carries {precision} types (TensorRT 11 removed "
            "the BF16/FP16 builder flags); convert it with NVIDIA ModelOpt AutoCast "
            "(python -m modelopt.onnx.autocast --low_precision_type bf16 ...) or build fp16/fp32"
        )
    onnx = require("onnx")
    float16 = require("onnxruntime.transformers.float16")
    model = onnx.load(str(src))  # with external data
    block_ops = list(getattr(float16, "DEFAULT_OP_BLOCK_LIST", [])) + list(FP32_OPS)
    model = float16.convert_float_to_float16(
        model, keep_io_types=True, op_block_list=block_ops, node_block_list=_logits_path_nodes(model.graph)
    )
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst), save_as_external_data=True, location=dst.name + ".data")
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


def _pin_fp32_layers(trt: Any, network: Any) -> dict[str, int]:
    """Keep normalization, softmax and the logits path in fp32 in a weakly typed (TensorRT 10) network.

    ``layer.precision`` sets the compute type and ``set_output_type`` the output types; both take
    effect only under ``BuilderFlag.OBEY_PRECISION_CONSTRAINTS`` (Polygraphy's CreateConfig warns
    when precisions are set without it).
    """
    float_types = {trt.float32, trt.float16, getattr(trt, "bfloat16", trt.float16)}

    def pin(layer: Any) -> None:
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype in float_types:
                layer.set_output_type(j, trt.float32)

    counts = {"normalization": 0, "softmax": 0, "logits": 0}
    producer: dict[str, Any] = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            producer[layer.get_output(j).name] = layer
        if layer.type == trt.LayerType.NORMALIZATION:
            pin(layer)
            counts["normalization"] += 1
        elif layer.type == trt.LayerType.SOFTMAX:
            pin(layer)
            counts["softmax"] += 1
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


def _load_timing_cache(config: Any, path: Path, notes: list[str]) -> Any:
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        # A cache from another GPU/TensorRT version: start empty, keep the old one for combining.
        notes.append(f"timing cache {path} was made on another device/version; started an empty one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def _save_timing_cache(config: Any, path: Path) -> None:
    cache = config.get_timing_cache()
    if cache is None:
        return
    if path.is_file():
        previous = config.create_timing_cache(path.read_bytes())
        if previous is not None:
            cache.combine(previous, ignore_mismatch=True)
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
        ValueError: invalid options (all listed).
        MissingDependencyError: TensorRT (or cuda-python) is not installed.
        BuildError: the parser, the GPU or the builder refused (every reason listed).
    """
    plan = plan_build(bundle, options)
    trt = require("tensorrt")
    major = int(str(trt.__version__).split(".")[0])
    device = cuda_device_info(options.device)
    notes = list(plan.notes)
    if plan.precision == "bf16" and not device.bf16:
        raise BuildError(
            f"bf16 needs compute capability >= 8.0 (Ampere or newer); {device.name} is "
            f"{device.compute_capability}: build fp16 or fp32"
        )

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    onnx_path = bundle.onnx_path
    strongly_typed = major >= 11
    tmp = None
    if strongly_typed and plan.precision != "fp32" and bundle.manifest.precision == "fp32":
        tmp = tempfile.TemporaryDirectory(prefix="gpt2-deploy-trt-")
        onnx_path = convert_onnx_mixed_precision(onnx_path, Path(tmp.name) / "model.onnx", plan.precision)
        notes.append(
            "TensorRT 11 is strongly typed: the graph was converted to fp16 (fp32 I/O, LayerNorm, "
            "Softmax and logits) before parsing"
        )
    try:
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
            fp32_layers = _pin_fp32_layers(trt, network)
            _set_flag(trt, config, "OBEY_PRECISION_CONSTRAINTS")
            if not fp32_layers.get("normalization"):
                notes.append("no normalization layer found to keep in fp32 (LayerNorm decomposed?)")
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
        _load_timing_cache(config, plan.timing_cache, notes)
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
        _save_timing_cache(config, plan.timing_cache)
    finally:
        if tmp is not None:
            tmp.cleanup()

    manifest = bundle.manifest
    entry = EngineEntry(
        file=plan.engine_rel,
        timing_cache=plan.timing_cache_rel,
        tensorrt_version=str(trt.__version__),
        gpu_name=device.name,
        compute_capability=device.compute_capability,
        precision=plan.precision,
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
    manifest = manifest.with_files(bundle.root, roles)
    bundle.update_manifest(replace(manifest, engines=upsert_engine(manifest.engines, entry)))
    return entry
