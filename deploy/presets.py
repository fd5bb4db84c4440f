"""Edge presets and the TensorRT optimization profiles derived from them.

A preset names a deployment target and the limits an engine is built for there (max batch, max
context, max prompt per prefill, workspace, default precision); ``ProfileLimits.resolve`` clips
them to the model's ``n_positions`` and the overrides, and ``compute_profiles`` derives the two
profiles: "context" (prefill, past = 0) and "generation" (decode, seq = 1). Why the limits are what
they are: each preset's ``why`` (shown by ``build --help``) and docs/tensorrt.md "Presets".

Only the standard library is imported here: ``--print-trtexec`` and the CPU tests read it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from export.contract import BATCH, PAST, SEQ, TOTAL, IOContract
from export.errors import OptionsError

GiB = 1 << 30
MiB = 1 << 20

# What a TensorRT engine computes in (`build --precision`; a bundle's graph variants are
# export.variants.EXPORT_PRECISIONS).
ENGINE_PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class EdgePreset:
    """Build limits for one deployment target.

    Args:
        name: The preset's CLI name.
        description: The target hardware.
        max_batch: Largest batch either profile accepts.
        max_context: Longest past + new tokens (clipped to the model's n_positions).
        max_prompt: Longest prompt run as one prefill (longer prompts are continued token by token
            through the generation profile by the backend).
        opt_batch: Batch size the kernels are tuned for.
        opt_prompt: Prompt length the prefill kernels are tuned for.
        workspace: Builder memory-pool (workspace) limit in bytes: scratch memory for tactics.
        precision: Default engine precision.
        why: Where the numbers come from (shown in ``gpt2-deploy build --help``'s --preset help and
            in the ``--print-trtexec`` header).
    """

    name: str
    description: str
    max_batch: int
    max_context: int
    max_prompt: int
    opt_batch: int
    opt_prompt: int
    workspace: int
    precision: str
    why: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# Memory budgets (``memory_budget``; every part per preset in docs/tensorrt.md "Memory budget"). GPT-2
# 124M in fp16: ~311 MiB of weights (the tied embedding / lm_head table stays fp32). The KV cache per
# token per sequence is n_layer * 2 * n_embd * 4 bytes = 72 KiB in fp32 I/O, and one cache is a
# ping-pong pair at the maximum shape: 2 * max_batch * max_context * 72 KiB (the backend allocates
# several: the running batch, a prefill before it joins, a solo run). The logits buffer is
# max_batch x 1 x vocab (engines are built from the generation graph, the lm_head on the last
# position only): 3 MiB on `server`, where every prompt position's logits took 3.1 GiB.
PRESETS: dict[str, EdgePreset] = {
    "server": EdgePreset(
        "server",
        "data-centre GPU (A100/H100/L40, 24-80 GB)",
        max_batch=16,
        max_context=1024,
        max_prompt=1024,
        opt_batch=8,
        opt_prompt=128,
        workspace=8 * GiB,
        precision="fp16",
        why="KV ping-pong at B=16, T=1024: 2.4 GB per cache for 124M, 20 GB for 1.5B: fits a 24 GB "
        "card for 124M-355M and an 80 GB card for every size; logits B x 1 x V: 3 MB; 8 GiB "
        "workspace lets the builder try every tactic.",
    ),
    "orin-nano": EdgePreset(
        "orin-nano",
        "Jetson Orin Nano 8 GB (shared CPU/GPU LPDDR5, 68-102 GB/s)",
        max_batch=2,
        max_context=512,
        max_prompt=256,
        opt_batch=1,
        opt_prompt=64,
        workspace=1 * GiB,
        precision="fp16",
        why="8 GB is shared with the OS and the app (~3-4 GB usable for inference); KV ping-pong "
        "at B=2, T=512 is 150 MB per cache for 124M; a 1 GiB workspace keeps the build itself "
        "from being OOM-killed on the device.",
    ),
    "orin-nx": EdgePreset(
        "orin-nx",
        "Jetson Orin NX 16 GB (shared LPDDR5, 102 GB/s)",
        max_batch=4,
        max_context=1024,
        max_prompt=512,
        opt_batch=1,
        opt_prompt=128,
        workspace=2 * GiB,
        precision="fp16",
        why="~10 GB usable: KV ping-pong at B=4, T=1024 is 600 MB per cache for 124M, 1.6 GB for "
        "355M; 2 GiB workspace.",
    ),
    "agx-orin": EdgePreset(
        "agx-orin",
        "Jetson AGX Orin 64 GB (shared LPDDR5, 205 GB/s)",
        max_batch=8,
        max_context=1024,
        max_prompt=1024,
        opt_batch=4,
        opt_prompt=128,
        workspace=4 * GiB,
        precision="fp16",
        why="~50 GB usable: KV ping-pong at B=8, T=1024 is 1.2 GB per cache for 124M, 10 GB for "
        "1.5B; 4 GiB workspace.",
    ),
}


def preset_help() -> str:
    """One line per preset for ``build --help``: name, target, default precision and ``why``."""
    return "; ".join(f"{p.name}: {p.description}, {p.precision} ({p.why})" for p in PRESETS.values())


def get_preset(name: str) -> EdgePreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise OptionsError(f"unknown preset {name!r}; presets are: {', '.join(PRESETS)}") from None


@dataclass(frozen=True)
class ProfileSpec:
    """One optimization profile: input name -> (min, opt, max) shapes."""

    name: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    def axis_range(self, contract: IOContract, axis: str) -> tuple[int, int, int]:
        """(min, opt, max) of one symbolic axis, read back from the shapes."""
        for spec in contract.inputs:
            if axis in spec.shape:
                i = spec.shape.index(axis)
                lo, opt, hi = self.shapes[spec.name]
                return lo[i], opt[i], hi[i]
        raise KeyError(axis)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ProfileSpec:
        return cls(
            d["name"],
            {
                k: tuple(tuple(int(x) for x in s) for s in v)  # type: ignore[misc]
                for k, v in d["shapes"].items()
            },
        )


CONTEXT_PROFILE = 0
GENERATION_PROFILE = 1


@dataclass(frozen=True)
class ProfileLimits:
    """The limits profiles are computed from (a preset, clipped to the model and overrides)."""

    max_batch: int
    max_context: int
    max_prompt: int
    opt_batch: int
    opt_prompt: int

    @classmethod
    def resolve(
        cls,
        preset: EdgePreset,
        n_positions: int,
        *,
        max_batch: int | None = None,
        max_context: int | None = None,
        max_prompt: int | None = None,
    ) -> ProfileLimits:
        """Clip the preset (or the overrides) to the model's context; check consistency.

        Raises:
            OptionsError: listing every inconsistent limit.
        """
        b = max_batch if max_batch is not None else preset.max_batch
        ctx = min(max_context if max_context is not None else preset.max_context, n_positions)
        prompt = min(max_prompt if max_prompt is not None else preset.max_prompt, ctx)
        problems = []
        if b < 1:
            problems.append(f"max batch must be >= 1, got {b}")
        if ctx < 2:
            problems.append(f"max context must be >= 2 (one prompt token + one generated), got {ctx}")
        if prompt < 1:
            problems.append(f"max prompt must be >= 1, got {prompt}")
        if problems:
            raise OptionsError("; ".join(problems))
        return cls(b, ctx, prompt, min(preset.opt_batch, b), min(preset.opt_prompt, prompt))


def compute_profiles(contract: IOContract, limits: ProfileLimits) -> list[ProfileSpec]:
    """The context and generation profiles for every input of ``contract``.

    The context profile has past = 0 in min, opt and max: the past KV inputs are empty tensors
    (B, nh, 0, hs). TensorRT 10+ accepts zero-length dimensions in a profile; at run time an empty
    tensor still needs a non-null address (the backend binds its preallocated buffers).
    """
    b, ctx, prompt = limits.max_batch, limits.max_context, limits.max_prompt
    ob = limits.opt_batch
    # (min, opt, max) per axis, per profile
    context_axes = {
        BATCH: (1, ob, b),
        SEQ: (1, limits.opt_prompt, prompt),
        PAST: (0, 0, 0),
        TOTAL: (1, limits.opt_prompt, prompt),
    }
    opt_past = max(1, ctx // 2)
    generation_axes = {
        BATCH: (1, ob, b),
        SEQ: (1, 1, 1),
        PAST: (1, opt_past, ctx - 1),
        TOTAL: (2, opt_past + 1, ctx),
    }

    def shapes(axes: dict[str, tuple[int, int, int]]):
        out = {}
        for spec in contract.inputs:
            mins, opts, maxs = [], [], []
            for a in spec.shape:
                lo, opt, hi = axes[a] if isinstance(a, str) else (a, a, a)
                mins.append(lo)
                opts.append(opt)
                maxs.append(hi)
            out[spec.name] = (tuple(mins), tuple(opts), tuple(maxs))
        return out

    return [ProfileSpec("context", shapes(context_axes)), ProfileSpec("generation", shapes(generation_axes))]


def profile_summary(profiles: list[ProfileSpec], contract: IOContract) -> list[dict[str, Any]]:
    """Per-profile axis ranges, for the manifest and the CLI's printout."""
    return [
        {"name": p.name, **{axis: list(p.axis_range(contract, axis)) for axis in (BATCH, SEQ, PAST, TOTAL)}}
        for p in profiles
    ]


# --- memory budget ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryBudget:
    """Device memory of an engine at its limits, by part, in bytes (docs/tensorrt.md "Memory budget").

    ``weights`` and ``activations`` are estimates from the model's shape (the plan's file size and
    ``ICudaEngine.device_memory_size_v2`` are the measurements); ``kv_per_row``, ``kv``, ``logits``
    and ``inputs`` are the buffers the TensorRT backend allocates at load, exactly.

    Args:
        weights: Matmul weights in the engine precision; the tied embedding / lm_head table in fp32
            (the lm_head is kept fp32) once (a second, fp16 copy for the embedding lookup may add
            vocab x n_embd x 2).
        kv_per_row: One sequence at max_context, both ping-pong halves: 2 x T_max x n_layer x 2 x
            n_embd x 4 (fp32 KV I/O).
        kv: ``kv_caches`` caches of max_batch rows each.
        logits: The logits buffer, B_max x positions x V x 4 (positions 1 for the generation graph).
        logits_all_positions: What it is for a graph returning every position: B_max x max_prompt x V x 4.
        inputs: input_ids, position_ids (B_max x max_prompt) and attention_mask (B_max x T_max), int64.
        activations: The largest intermediates of a context-profile run at B_max x max_prompt: the
            attention scores (B x heads x S x S, fp32: Softmax is kept fp32; none with a fused
            attention kernel) and the MLP's hidden layer (B x S x 4 n_embd).
    """

    weights: int
    kv_per_row: int
    kv: int
    kv_caches: int
    logits: int
    logits_all_positions: int
    inputs: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.logits + self.inputs + self.activations

    @property
    def total_all_positions(self) -> int:
        """``total`` with the logits of every prompt position (engines built before the generation graph)."""
        return self.total - self.logits + self.logits_all_positions

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total, "total_all_positions": self.total_all_positions}


def memory_budget(
    contract: IOContract,
    n_positions: int,
    limits: ProfileLimits,
    *,
    precision: str,
    kv_caches: int,
    logits_positions: int = 1,
) -> MemoryBudget:
    """The device memory an engine of ``limits`` needs for a model of ``contract``'s shape.

    Args:
        contract: The model's I/O contract (layers, heads, head size, vocabulary).
        n_positions: The model's position table size (wpe).
        limits: The engine's limits (``ProfileLimits.resolve``).
        precision: The engine precision (fp32, fp16, bf16): bytes per matmul weight.
        kv_caches: How many KV caches the backend allocates (each a ping-pong pair of max_batch rows).
        logits_positions: Logits positions per row the engine returns (1: the generation graph).
    """
    e, v, layers = contract.n_head * contract.head_dim, contract.vocab_size, contract.n_layer
    b, t, s = limits.max_batch, limits.max_context, limits.max_prompt
    wbytes = 4 if precision == "fp32" else 2
    blocks = layers * (12 * e * e + 13 * e)  # c_attn 3E^2+3E, c_proj E^2+E, MLP 8E^2+5E, 2 LayerNorms 4E
    weights = wbytes * (blocks + n_positions * e) + 4 * (v * e + 2 * e)  # + tied table and ln_f in fp32
    kv_per_row = 2 * t * layers * 2 * e * 4
    scores = b * contract.n_head * s * s * 4
    mlp = b * s * 4 * e * wbytes
    return MemoryBudget(
        weights=weights,
        kv_per_row=kv_per_row,
        kv=kv_caches * b * kv_per_row,
        kv_caches=kv_caches,
        logits=b * logits_positions * v * 4,
        logits_all_positions=b * s * v * 4,
        inputs=(2 * b * s + b * t) * 8,
        activations=scores + mlp,
    )
