"""Precision variants of the exported fp32 graph: fp32 (as is), fp16, ORT-fused, int8, int4.

Every variant keeps the I/O contract unchanged (fp32 logits and KV cache at the graph boundary,
the same names and axes), so the serving backends and the validator treat them alike.

    fp32        the exporter's graph, copied
    fp16        weights and matmuls in fp16; LayerNorm, Softmax, the residual stream and the lm_head
                matmul (the logits) stay fp32 (ORT's float16 converter with block lists)
    ort-fused   fp32 with ONNX Runtime's contrib kernels: MultiHeadAttention, SkipLayerNormalization
                (onnxscript's ``optimize_for_ort``)
    int8        dynamic int8 quantization of the weight matmuls (ORT ``quantize_dynamic``), for CPU
                and edge; the lm_head stays fp32 because its weight is shared with the embedding
    int4        block-wise 4-bit weight-only quantization of the weight matmuls and the lm_head (ORT's
                ``MatMulNBitsQuantizer`` -> ``MatMulNBits``), for CPU and edge; see ``Int4Options``

Graphs with external data stay external (the data file is ``<model file>.data``), so variants of
models over 2 GB work the same way; the in-memory conversions never serialize one >2 GB protobuf.
"""

from __future__ import annotations

import collections
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from export.contract import LOGITS
from export.deps import require
from export.errors import OptionsError

# The graph variants `export --precision` writes (a TensorRT engine's are deploy.presets.ENGINE_PRECISIONS).
EXPORT_PRECISIONS = ("fp32", "fp16", "int8", "int4", "ort-fused")
# Op types kept in fp32 by every reduced-precision path (this fp16 variant and TensorRT's fp16/bf16
# builds): reductions whose fp16 sums lose precision.
FP32_OPS = ("LayerNormalization", "Softmax")
# Tensors at or above this many bytes go to the external data file when a graph is external.
EXTERNAL_SIZE_THRESHOLD = 1024


@dataclass
class VariantInfo:
    """What making a variant did, for the manifest's ``export.variant`` section."""

    precision: str
    nodes_before: int = 0
    nodes_after: int = 0
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        changed = {
            op: [self.ops_before.get(op, 0), self.ops_after.get(op, 0)]
            for op in sorted(set(self.ops_before) | set(self.ops_after))
            if self.ops_before.get(op, 0) != self.ops_after.get(op, 0)
        }
        return {
            "precision": self.precision,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "ops_changed_before_after": changed,
            **self.details,
        }


# --- file helpers ----------------------------------------------------------------------------------
def external_locations(graph: Any) -> set[str]:
    """The external data files a graph's initializers point to (empty for a self-contained graph).

    ``graph`` is a graph file's path, or an ``onnx.ModelProto`` already loaded (not read again).
    """
    onnx = require("onnx")
    m = graph if isinstance(graph, onnx.ModelProto) else onnx.load(str(graph), load_external_data=False)
    return {
        e.value
        for init in m.graph.initializer
        if init.data_location == onnx.TensorProto.EXTERNAL
        for e in init.external_data
        if e.key == "location"
    }


def _copy_onnx(src: Path, dst: Path, *, move: bool = False) -> Path:
    """Copy (or move) a graph and its external data, keeping the data file name it refers to."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    locations = external_locations(src)
    transfer = shutil.move if move else shutil.copyfile
    transfer(src, dst)
    for loc in locations:
        transfer(src.parent / loc, dst.parent / loc)
    return dst


def load_model(path: str | Path, *, with_data: bool = True) -> Any:
    """Load a graph with shapes inferred and (optionally) its external weights in memory.

    Shape inference runs before the weights are attached: a protobuf over 2 GiB cannot be
    serialized, which ``onnx.shape_inference.infer_shapes`` would have to do.
    """
    onnx = require("onnx")
    from onnx.external_data_helper import load_external_data_for_model

    path = Path(path)
    m = onnx.load(str(path), load_external_data=False)
    external = bool(external_locations(m))
    if not external:  # small enough to be one protobuf: infer shapes on it directly
        return onnx.shape_inference.infer_shapes(m)
    m = onnx.shape_inference.infer_shapes(m)  # initializers carry dims only: small
    if with_data:
        load_external_data_for_model(m, str(path.parent))
    return m


def save_model(model: Any, path: str | Path, *, external: bool) -> Path:
    """Save ``model`` to ``path``; with ``external`` its weights go to ``<name>.data`` beside it."""
    onnx = require("onnx")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()  # onnx appends to an existing data file
    if external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=EXTERNAL_SIZE_THRESHOLD,
        )
    else:
        onnx.save_model(model, str(path))
    return path


def op_counts(model: Any) -> dict[str, int]:
    return dict(sorted(collections.Counter(n.op_type for n in model.graph.node).items()))


# --- graph analysis --------------------------------------------------------------------------------
def _producers(graph: Any) -> dict[str, Any]:
    return {out: node for node in graph.node for out in node.output}


def _consumers(graph: Any) -> dict[str, list[Any]]:
    users: dict[str, list[Any]] = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            users[name].append(node)
    return users


def residual_adds(graph: Any) -> list[str]:
    """Names of the Add nodes that carry GPT-2's residual stream, found structurally.

    The stream starts at the embedding sum (an Add of two Gathers from 2-D initializers: wte and
    wpe) and every block adds its attention and MLP output onto it, so a residual Add is an Add
    with one input already on the stream. Nothing else consumes the stream except LayerNorm (which
    does not continue it), so the GELU's and the attention mask's Adds are not picked up.
    """
    inits = {i.name: i for i in graph.initializer}
    prod = _producers(graph)

    def is_embedding(name: str) -> bool:
        p = prod.get(name)
        return (
            p is not None
            and p.op_type == "Gather"
            and p.input[0] in inits
            and len(inits[p.input[0]].dims) == 2
        )

    stream: set[str] = set()
    names = []
    for node in graph.node:  # ONNX graphs are topologically sorted
        if node.op_type != "Add":
            continue
        if all(is_embedding(i) for i in node.input) or any(i in stream for i in node.input):
            stream.add(node.output[0])
            names.append(node.name)
    return names


def lm_head_path(graph: Any, logits: str = LOGITS) -> list[Any]:
    """The lm_head MatMul/Gemm with the shape-only nodes around it, logits side first.

    From ``logits`` back over Reshape/Cast/Identity to the matmul, then from the matmul's input
    back over Reshape/Identity/Flatten (the dynamo export flattens around it) to the final
    LayerNorm. Keeping all of them fp32 keeps the LayerNorm -> lm_head -> logits path unrounded.

    Raises:
        ValueError: no MatMul/Gemm produces ``logits`` (not a GPT-2 decoder graph).
    """
    prod = _producers(graph)
    path = []
    node = prod.get(logits)
    while node is not None and node.op_type in ("Reshape", "Cast", "Identity"):
        path.append(node)
        node = prod.get(node.input[0])
    if node is None or node.op_type not in ("MatMul", "Gemm"):
        raise ValueError(
            f"cannot find the lm_head MatMul/Gemm producing {logits!r} "
            f"(found {node.op_type if node is not None else 'a graph input'})"
        )
    path.append(node)
    node = prod.get(node.input[0])
    # Slice/Gather: the positions a serving graph keeps (export.onnx_export.select_logits_positions)
    while node is not None and node.op_type in ("Reshape", "Identity", "Flatten", "Slice", "Gather"):
        path.append(node)
        node = prod.get(node.input[0])
    return path


def fp32_node_names(graph: Any) -> dict[str, list[str]]:
    """Names of the nodes a reduced-precision graph or engine keeps in fp32, by reason.

    ``ops``: LayerNormalization and Softmax; ``residual_adds``: the residual stream
    (``residual_adds``); ``lm_head``: ``lm_head_path``. Used by ``to_fp16`` and by the TensorRT
    builder (whose ONNX parser names layers after these nodes) alike.
    """
    return {
        "ops": [n.name for n in graph.node if n.op_type in FP32_OPS and n.name],
        "residual_adds": residual_adds(graph),
        "lm_head": [n.name for n in lm_head_path(graph) if n.name],
    }


def gemm_to_matmul(model: Any) -> int:
    """Rewrite plain ``Gemm(A, B[, C])`` as ``MatMul(A, B)`` (+ ``Add C``), in place.

    The dynamo exporter flattens to 2-D around each Conv1D's Gemm. ORT's quantizer only quantizes
    MatMul, and onnxscript's fusions drop the flattening Reshapes around a Gemm (leaving a rank-3
    input ORT rejects), so both variants start from MatMul. Returns the number rewritten.
    """
    from onnx import helper

    nodes, n = [], 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = (
            attrs.get("transA", 0) == 0
            and attrs.get("transB", 0) == 0
            and attrs.get("alpha", 1.0) == 1.0
            and attrs.get("beta", 1.0) == 1.0
        )
        if node.op_type != "Gemm" or not plain:
            nodes.append(node)
            continue
        n += 1
        if len(node.input) > 2 and node.input[2]:
            mm = f"{node.output[0]}_matmul"
            nodes.append(helper.make_node("MatMul", list(node.input[:2]), [mm], name=f"{node.name}_matmul"))
            nodes.append(
                helper.make_node("Add", [mm, node.input[2]], [node.output[0]], name=f"{node.name}_bias")
            )
        else:
            nodes.append(helper.make_node("MatMul", list(node.input[:2]), list(node.output), name=node.name))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return n


def topological_sort(graph: Any) -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs, in place.

    Stable: nodes keep their relative order where the dependencies allow (Kahn's algorithm).
    """
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    prod = _producers(graph)
    pending = list(graph.node)
    ordered: list[Any] = []
    waiting: dict[str, list[int]] = collections.defaultdict(list)
    missing = []
    for idx, node in enumerate(pending):
        need = {i for i in node.input if i not in available and i in prod}
        missing.append(len(need))
        for name in need:
            waiting[name].append(idx)
    ready = collections.deque(i for i, m in enumerate(missing) if m == 0)
    while ready:
        idx = ready.popleft()
        node = pending[idx]
        ordered.append(node)
        for out in node.output:
            for j in waiting.pop(out, []):
                missing[j] -= 1
                if missing[j] == 0:
                    ready.append(j)
    if len(ordered) != len(pending):
        raise ValueError(f"the graph has a cycle: {len(pending) - len(ordered)} nodes cannot be ordered")
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def _elem_types(model: Any) -> dict[str, int]:
    types = {}
    for vi in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    return types


def drop_round_trip_casts(model: Any) -> int:
    """Remove fp32 -> fp16 -> fp32 Cast pairs, in place; returns how many were removed.

    ORT's converter types every intermediate tensor fp16, so between two fp32-kept nodes (a residual
    Add and the next LayerNorm, the final LayerNorm and the lm_head, the lm_head and the ``logits``
    output) it inserts a Cast down and a Cast back up: the value would still be rounded to fp16,
    which is exactly what keeping those nodes in fp32 is meant to avoid.
    """
    onnx = require("onnx")
    FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    outputs = {o.name for o in model.graph.output}
    inputs = {i.name for i in model.graph.input}
    removed, skipped = 0, set()
    while True:
        types, prod, users = _elem_types(model), _producers(model.graph), _consumers(model.graph)

        def cast_to(node: Any) -> int | None:
            if node is None or node.op_type != "Cast":
                return None
            return next((a.i for a in node.attribute if a.name == "to"), None)

        pair = None
        for up in model.graph.node:  # up: Y(fp16) -> Z(fp32), down: X(fp32) -> Y
            down = prod.get(up.input[0]) if up.op_type == "Cast" else None
            if (
                down is not None
                and up.name not in skipped
                and cast_to(up) == FLOAT
                and cast_to(down) == FLOAT16
                and types.get(down.input[0]) == FLOAT
                and down.input[0] not in inputs
            ):
                pair = (down, up)
                break
        if pair is None:
            return removed
        down, up = pair
        x, y, z = down.input[0], down.output[0], up.output[0]
        if z in outputs and x in outputs:  # both names are the graph's: leave this pair alone
            skipped.add(up.name)
            continue
        # a graph output keeps its name (the fp32 producer writes it directly); otherwise the
        # consumers of Z read X
        old, new = (x, z) if z in outputs else (z, x)
        for node in model.graph.node:
            node.input[:] = [new if n == old else n for n in node.input]
            node.output[:] = [new if n == old else n for n in node.output]
        model.graph.node.remove(up)
        if not [u for u in users.get(y, []) if u is not up] and y not in outputs:
            model.graph.node.remove(down)
        removed += 1


# --- the variants ----------------------------------------------------------------------------------
def to_fp16(model: Any) -> dict[str, Any]:
    """Convert ``model`` (shapes inferred, weights loaded) to mixed fp16, in place.

    Kept fp32: LayerNormalization and Softmax (reductions whose fp16 sums lose precision), the
    residual Adds (the stream grows over the blocks and carries every block's small update: in fp16
    those updates round away), and the lm_head matmul (its fp32 output is the logits). Graph inputs
    and outputs stay fp32 (``keep_io_types``). The attention-mask fill value is already -1e4 (see
    ``onnx_export.MASK_FILL_VALUE``), finite in fp16.
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    keep = fp32_node_names(model.graph)
    residual, head_path = keep["residual_adds"], keep["lm_head"]
    # value_info entries naming initializers would be retyped fp16 by the converter while the
    # initializer itself stays fp32 (when only fp32 nodes use it): drop them, types come from dims
    inits = {i.name for i in model.graph.initializer}
    value_info = [vi for vi in model.graph.value_info if vi.name not in inits]
    del model.graph.value_info[:]
    model.graph.value_info.extend(value_info)
    converted = convert_float_to_float16(
        model,
        keep_io_types=True,
        disable_shape_infer=True,
        op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP32_OPS],
        node_block_list=[*residual, *head_path],
    )
    if converted is not model:  # the converter edits in place and returns it; guard a change
        model.CopyFrom(converted)
    casts = drop_round_trip_casts(model)
    topological_sort(model.graph)  # the converter appends its Casts at the end of the node list
    return {
        "fp32_ops": list(FP32_OPS),
        "fp32_residual_adds": len(residual),
        "fp32_lm_head": head_path,
        "round_trip_casts_removed": casts,
    }


def int8_nodes(model: Any) -> list[str]:
    """MatMuls whose weight (input B) is an initializer: the ones dynamic quantization targets.

    Activation x activation MatMuls (attention scores, probs x V) are left alone, and so is the
    lm_head, whose weight reaches it through a Transpose of the embedding table it is tied to
    (quantizing it would store that table a second time).
    """
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


@dataclass(frozen=True)
class Int4Options:
    """How the int4 variant quantizes (defaults measured on gpt2-124m, docs/export.md "int4").

    Args:
        block_size: Weights per quantization block along K (the input dimension); each block has
            its own scale (and zero point when asymmetric). A power of two >= 16.
        symmetric: Symmetric blocks (no zero point) instead of asymmetric (scale + zero point).
        accuracy_level: ``MatMulNBits``' compute type: 0 (unset) / 1 fp32, 2 fp16, 3 bf16, 4 int8
            activations (ONNX Runtime's fastest CPU kernels).
        lm_head: Quantize the lm_head too. Its weight is tied to the embedding table, so this
            stores a transposed 4-bit copy for the matmul; the embedding lookup keeps the fp32 table.
    """

    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int = 4
    lm_head: bool = True

    def check(self) -> None:
        problems = []
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            problems.append(f"block_size must be a power of two >= 16, got {self.block_size}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            problems.append(f"accuracy_level must be 0..4, got {self.accuracy_level}")
        if problems:
            raise OptionsError("int4 options: " + "; ".join(problems))


def untie_lm_head(model: Any) -> str | None:
    """Give the lm_head MatMul its own (K, N) weight initializer, in place (weights loaded).

    The export reaches the lm_head through ``Transpose(tied embedding)``; weight-only quantizers
    only take a MatMul whose weight is an initializer. Adds ``<table>.lm_head_t`` (the transposed
    table), points the MatMul at it and drops the Transpose when nothing else reads it. Returns the
    new initializer's name, or None when the lm_head already reads an initializer.
    """
    from onnx import numpy_helper

    head = next(n for n in lm_head_path(model.graph) if n.op_type in ("MatMul", "Gemm"))
    inits = {i.name: i for i in model.graph.initializer}
    if head.op_type != "MatMul" or head.input[1] in inits:
        return None
    transpose = _producers(model.graph).get(head.input[1])
    perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None) if transpose else None
    if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in inits:
        return None
    if perm not in (None, [1, 0]):
        return None
    table = numpy_helper.to_array(inits[transpose.input[0]])
    name = f"{transpose.input[0]}.lm_head_t"
    model.graph.initializer.append(numpy_helper.from_array(table.T.copy(), name))
    head.input[1] = name
    if len(_consumers(model.graph)[transpose.output[0]]) == 0:
        model.graph.node.remove(transpose)
    return name


def _quantize_int4(model: Any, opts: Int4Options) -> tuple[Any, dict[str, Any]]:
    """Block-wise 4-bit weight-only quantization of the weight MatMuls (``MatMulNBits``), in memory."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    lm_head = untie_lm_head(model) if opts.lm_head else None
    nodes = int8_nodes(model)  # MatMuls whose weight is an initializer (the lm_head once untied)
    quant = MatMulNBitsQuantizer(
        model,
        bits=4,
        block_size=opts.block_size,
        is_symmetric=opts.symmetric,
        accuracy_level=opts.accuracy_level,
        op_types_to_quantize=("MatMul",),
    )
    log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = log.level
    log.setLevel(logging.WARNING)  # it logs a line per node at INFO
    try:
        quant.process()
    finally:
        log.setLevel(level)
    return quant.model.model, {
        "quantizer": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer",
        "bits": 4,
        "block_size": opts.block_size,
        "symmetric": opts.symmetric,
        "accuracy_level": opts.accuracy_level,
        "lm_head_quantized": lm_head is not None,
        "matmuls_quantized": len(nodes),
    }


def make_variant(
    fp32_path: Path,
    out_path: Path,
    precision: str,
    *,
    per_channel: bool = False,
    consume: bool = False,
    int4: Int4Options | None = None,
) -> VariantInfo:
    """Write the ``precision`` variant of ``fp32_path`` to ``out_path``.

    External data is kept if the fp32 graph has it (``<out name>.data`` beside ``out_path``).

    Args:
        fp32_path: The exporter's fp32 graph.
        out_path: Where to write the variant's .onnx file.
        precision: One of ``EXPORT_PRECISIONS``.
        per_channel: int8 only: one scale per output channel instead of one per tensor.
        int4: int4 only: block size, symmetry, compute type, lm_head (default ``Int4Options()``).
        consume: fp32 only: move ``fp32_path`` (a staging file) instead of copying it (6 GB for
            gpt2-xl).

    Raises:
        OptionsError: an unknown precision.
    """
    if precision not in EXPORT_PRECISIONS:
        raise OptionsError(
            f"precision {precision!r} is not supported; choose one of {', '.join(EXPORT_PRECISIONS)}"
        )
    onnx = require("onnx")
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    external = bool(external_locations(fp32_path))
    if precision == "fp32":
        counts = op_counts(onnx.load(str(fp32_path), load_external_data=False))
        _copy_onnx(fp32_path, out_path, move=consume)
        n = sum(counts.values())
        return VariantInfo("fp32", n, n, counts, counts, {"external_data": external})

    if precision in ("fp16", "int4"):
        model = load_model(fp32_path)  # the converters rewrite the weights: they must be in memory
        before = op_counts(model)
        if precision == "fp16":
            details = to_fp16(model)
        else:
            int4 = int4 or Int4Options()
            int4.check()
            gemms = gemm_to_matmul(model)
            model, details = _quantize_int4(model, int4)
            details["gemm_rewritten"] = gemms
        save_model(model, out_path, external=external)
        del model
    else:
        # Gemm -> MatMul needs no weights: rewrite the graph alone and save it beside the fp32
        # file, where its external data references still resolve, then let the tool read that.
        model = load_model(fp32_path, with_data=False)
        before = op_counts(model)
        gemms = gemm_to_matmul(model)
        nodes = int8_nodes(model)
        rewritten = fp32_path.with_name(f".{fp32_path.stem}.matmul.onnx")
        onnx.save_model(model, str(rewritten))
        del model
        try:
            if precision == "ort-fused":
                details = _fuse_for_ort(rewritten, out_path, external)
            else:
                details = _quantize_int8(rewritten, nodes, out_path, external, per_channel)
        finally:
            rewritten.unlink(missing_ok=True)
        details["gemm_rewritten"] = gemms
    after = op_counts(onnx.load(str(out_path), load_external_data=False))
    return VariantInfo(
        precision,
        sum(before.values()),
        sum(after.values()),
        before,
        after,
        {**details, "external_data": external},
    )


def _fuse_for_ort(src: Path, out_path: Path, external: bool) -> dict[str, Any]:
    """onnxscript's ``optimize_for_ort``: MultiHeadAttention, SkipLayerNormalization, FusedMatMul.

    ORT's own ``onnxruntime.transformers.optimizer`` (model_type="gpt2") fuses no attention on
    this graph and crashes on the dynamo export's bias-free lm_head; onnxscript's rewriter fuses
    attention once Gemm is MatMul(+Add). onnx_ir memory-maps external weights, so a large model
    is not held in memory twice.
    """
    ir = require("onnx_ir")
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    irm, counts = optimize_for_ort(ir.load(str(src)))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    data = out_path.with_name(out_path.name + ".data")
    if data.exists():
        data.unlink()
    ir.save(
        irm,
        str(out_path),
        external_data=data.name if external else None,
        size_threshold_bytes=EXTERNAL_SIZE_THRESHOLD,
    )
    return {
        "optimizer": "onnxscript.rewriter.ort_fusions.optimize_for_ort",
        "fusions": {k: v for k, v in counts.items() if v},
    }


def _quantize_int8(
    src: Path, nodes: list[str], out_path: Path, external: bool, per_channel: bool
) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out_path.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(
        src,
        out_path,
        op_types_to_quantize=["MatMul"],
        nodes_to_quantize=nodes,
        per_channel=per_channel,
        weight_type=QuantType.QInt8,
        use_external_data_format=external,
    )
    return {
        "quantizer": "onnxruntime.quantization.quantize_dynamic",
        "weight_type": "QInt8",
        "per_channel": per_channel,
        "matmuls_quantized": len(nodes),
    }
