"""PyTorch GPT-2 -> one ONNX decoder graph with the KV cache as flat inputs and outputs.

torch's dynamo exporter at opset 18 (an opset-17 graph it writes is rejected by ONNX Runtime; 18
keeps LayerNormalization as one node), traced with past > 0 so no past length is baked in as a
constant, the mask length given its own symbol (``total``) because an exporter cannot express
``past + seq``. The tied lm_head/wte weight is stored once.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from export import contract as C
from export.cache_adapter import forward_with_cache
from export.contract import IOContract
from export.deps import require
from export.errors import OptionsError
from export.variants import external_locations

DEFAULT_OPSET = 18
# ONNX protobufs cannot exceed 2 GiB; above this estimated size the weights go to external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
PROTOBUF_LIMIT = 2**31
# The additive attention-mask value. transformers fills masked scores with finfo(float32).min,
# which becomes -inf in fp16 and turns fully masked (left-padding) rows into NaN, and NaN * 0 then
# leaks into every later position through the value matmul. -1e4 is finite in fp16 and still
# gives exp(-1e4 - max) == 0 exactly in fp32, so fp32 parity is unchanged.
MASK_FILL_VALUE = -1.0e4


def flat_kv_decoder(model: Any) -> Any:
    """Wrap ``model`` so its forward takes and returns the KV cache as flat tensors.

    forward(input_ids, attention_mask, position_ids, *past) -> (logits, *present), with
    ``past``/``present`` ordered layer by layer, key then value, each (B, nh, T, hs).
    """
    torch: Any = require("torch")

    class FlatKVDecoder(torch.nn.Module):
        def __init__(self, model: Any):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
            logits, present = forward_with_cache(
                self.model,
                pairs,
                input_ids=input_ids,  # (B, S)
                attention_mask=attention_mask,  # (B, P + S)
                position_ids=position_ids,  # (B, S)
            )
            return (logits, *[t for kv in present for t in kv])  # (B, S, V), (B, nh, P + S, hs)...

    return FlatKVDecoder(model).eval()


def example_inputs(contract: IOContract, batch: int = 2, seq: int = 3, past: int = 4) -> tuple:
    """Inputs to trace with. past > 0: tracing at past == 0 would bake that length in."""
    torch = require("torch")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, contract.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv = [
        torch.randn(batch, contract.n_head, past, contract.head_dim, generator=g) for _ in contract.past_names
    ]
    return (ids, mask, pos, *kv)


def estimated_onnx_bytes(model: Any) -> int:
    """fp32 size of the unique parameters (tied weights counted once: ``parameters()`` yields a
    shared Parameter once; also right for a model on the meta device, which has no storage)."""
    return sum(p.numel() * 4 for p in model.parameters())


def export_onnx(
    model: Any, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET, external_data: bool | None = None
) -> Path:
    """Export ``model`` (a GPT2LMHeadModel) to ``path`` following the I/O contract.

    Args:
        model: The PyTorch model, eval mode, fp32.
        path: Where to write the .onnx file (external data goes beside it as ``<name>.data``).
        opset: ONNX opset; >= 18 with the dynamo exporter.
        external_data: Force weights into an external file (True), inline them (False), or decide
            by size (None: external above ~1.8 GB, the protobuf limit being 2 GiB).

    Raises:
        OptionsError: opset < 18, or ``external_data=False`` for weights over 2 GiB (checked before
            any tracing, rather than failing in protobuf at the end).
    """
    torch = require("torch")
    if opset < 18:
        raise OptionsError(
            f"opset {opset} is not supported: the dynamo exporter needs opset >= 18 "
            "(a down-converted opset-17 graph is rejected by ONNX Runtime)"
        )
    contract = IOContract.for_config(model.config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = estimated_onnx_bytes(model)
    if external_data is None:
        external_data = size > EXTERNAL_DATA_THRESHOLD
    elif not external_data and size >= PROTOBUF_LIMIT:
        raise OptionsError(
            f"--no-external-data: the weights are {size / 2**30:.1f} GiB and one ONNX file "
            "(a protobuf) cannot exceed 2 GiB; drop --no-external-data (the weights then go "
            "to model.onnx.data beside the graph)"
        )

    Dim = torch.export.Dim
    batch, seq, past, total = Dim(C.BATCH), Dim(C.SEQ), Dim(C.PAST), Dim(C.TOTAL)
    kv_axes = tuple({0: batch, 2: past} for _ in contract.past_names)
    dynamic_shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, kv_axes)

    with torch.no_grad(), warnings.catch_warnings():
        # "The axis name: seq will not be used, since it shares the same shape constraints with
        # another axis: seq" - the exporter renaming an axis to itself; nothing to act on
        warnings.filterwarnings("ignore", message=r".*axis name: .* will not be used", category=UserWarning)
        program = torch.onnx.export(
            flat_kv_decoder(model),
            example_inputs(contract),
            dynamo=True,
            opset_version=opset,
            input_names=contract.input_names,
            output_names=contract.output_names,
            dynamic_shapes=dynamic_shapes,
            optimize=True,
            verbose=False,
        )
    program.save(str(path), external_data=external_data)
    _postprocess(path, contract)
    return path


def _postprocess(path: Path, contract: IOContract) -> None:
    """Name the present axis ``total`` and make the attention-mask fill value fp16-safe."""
    onnx = require("onnx")
    from onnx import numpy_helper

    # load_external_data=False: big weights stay where they are; only small tensors are edited.
    m = onnx.load(str(path), load_external_data=False)
    for out in m.graph.output:
        for d in out.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param not in (C.BATCH, C.SEQ, C.PAST, C.TOTAL):
                d.dim_param = C.TOTAL  # exporter writes "past + seq"

    limit = np.finfo(np.float32).min / 2

    def make_finite(t: Any) -> None:  # a small fp32 tensor holding the mask fill: rewrite it
        if t.data_location == onnx.TensorProto.EXTERNAL or t.data_type != onnx.TensorProto.FLOAT:
            return
        a = numpy_helper.to_array(t)
        if a.size <= 16 and np.any(a < limit):
            t.CopyFrom(
                numpy_helper.from_array(np.where(a < limit, MASK_FILL_VALUE, a).astype(np.float32), t.name)
            )

    for init in m.graph.initializer:
        make_finite(init)
    for node in m.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    make_finite(attr.t)
    onnx.save(m, str(path))


# --- the serving graph: the lm_head on selected positions only ----------------------------------
# Ops the lm_head may be after a variant rewrote it; input 0 is the (batch, seq, n_embd) activation
# in each (fp32/fp16/int8: MatMul, ort-fused: FusedMatMul, int4: MatMulNBits).
LM_HEAD_OPS = ("MatMul", "FusedMatMul", "MatMulNBits")
# What may stand between the lm_head and the ``logits`` output (elementwise, position-preserving).
_AFTER_HEAD_OPS = ("Cast", "Identity")
_SLICE_PREFIX = "logits_positions"


def select_logits_positions(model: Any, positions: str) -> dict[str, Any]:
    """Rewrite a decoder graph (the main contract) in place so the lm_head runs on some positions.

    A Slice ("kept") or Gather ("last") on axis 1 (seq) of the lm_head's input selects the
    positions; nothing above the final LayerNorm changes and no initializer is touched, so the
    rewritten graph refers to the very same weights (by name, and for external data by file and
    offset).

    Args:
        model: An ``onnx.ModelProto`` following ``IOContract`` (``logits_positions="all"``), any
            precision variant; weights need not be loaded.
        positions: "kept" (adds the ``logits_to_keep`` input: 0 -> every position, k -> the last k;
            the serving graph) or "last" (the last position, index seq - 1 in every row).

    Returns:
        What was done, for the manifest: the lm_head node and op, the nodes added.

    Raises:
        ValueError: ``positions`` is not "kept"/"last", or the graph's logits do not come from a
            (batch, seq, n_embd) matmul this function knows (``LM_HEAD_OPS``).
    """
    onnx = require("onnx")
    TensorProto, helper = onnx.TensorProto, onnx.helper
    if positions not in ("kept", "last"):
        raise ValueError(f"positions must be 'kept' or 'last', got {positions!r}")
    g = model.graph
    if C.LOGITS_TO_KEEP in {i.name for i in g.input} or any(
        n.name.startswith(_SLICE_PREFIX + "/") for n in g.node
    ):
        raise ValueError("the graph already selects its logits positions (it is a serving graph)")
    outputs = {o.name: o for o in g.output}
    if C.LOGITS not in outputs:
        raise ValueError(f"the graph has no {C.LOGITS!r} output")
    prod = {out: node for node in g.node for out in node.output}
    after, node = [], prod.get(C.LOGITS)
    while node is not None and node.op_type in _AFTER_HEAD_OPS:
        after.append(node)
        node = prod.get(node.input[0])
    if node is None or node.op_type not in LM_HEAD_OPS:
        found = node.op_type if node is not None else "a graph input"
        raise ValueError(
            f"cannot find the lm_head producing {C.LOGITS!r}: expected one of {', '.join(LM_HEAD_OPS)} "
            f"(through {', '.join(_AFTER_HEAD_OPS)} only), found {found}"
        )
    head = node
    ranks = {
        vi.name: len(vi.type.tensor_type.shape.dim)
        for vi in (*g.value_info, *g.input)
        if vi.type.tensor_type.HasField("shape")
    }
    if ranks.get(head.input[0], 3) != 3:
        raise ValueError(
            f"the lm_head {head.name!r} takes a rank-{ranks[head.input[0]]} input; selecting positions "
            "needs it as (batch, seq, n_embd)"
        )

    p = _SLICE_PREFIX
    sliced = f"{p}/hidden"
    if positions == "last":
        # Gather of index [-1] on the seq axis: (batch, 1, n_embd), the 1 static for shape inference
        # and TensorRT alike (a Slice's length would be a runtime expression there)
        inits = [helper.make_tensor(f"{p}/last", TensorProto.INT64, [1], [-1])]
        nodes = [
            helper.make_node("Gather", [head.input[0], f"{p}/last"], [sliced], name=f"{p}/Gather", axis=1)
        ]
    else:  # Slice from -logits_to_keep to the end of the seq axis: -0 == 0 keeps every position
        inits = [
            helper.make_tensor(f"{p}/shape", TensorProto.INT64, [1], [1]),
            helper.make_tensor(f"{p}/ends", TensorProto.INT64, [1], [np.iinfo(np.int64).max]),
            helper.make_tensor(f"{p}/axes", TensorProto.INT64, [1], [1]),
        ]
        nodes = [
            helper.make_node("Neg", [C.LOGITS_TO_KEEP], [f"{p}/neg"], name=f"{p}/Neg"),
            helper.make_node("Reshape", [f"{p}/neg", f"{p}/shape"], [f"{p}/starts"], name=f"{p}/Reshape"),
            helper.make_node(
                "Slice", [head.input[0], f"{p}/starts", f"{p}/ends", f"{p}/axes"], [sliced], name=f"{p}/Slice"
            ),
        ]
        g.input.append(helper.make_tensor_value_info(C.LOGITS_TO_KEEP, TensorProto.INT64, []))
    g.initializer.extend(inits)
    at = list(g.node).index(head)
    for k, n in enumerate(nodes):
        g.node.insert(at + k, n)
    head.input[0] = sliced

    # the logits' seq axis is now "kept" (or 1); intermediate shapes below the slice are stale
    stale = {t for n in (head, *after) for t in n.output}
    keep_vi = [vi for vi in g.value_info if vi.name not in stale]
    del g.value_info[:]
    g.value_info.extend(keep_vi)
    dim = outputs[C.LOGITS].type.tensor_type.shape.dim[1]
    dim.Clear()
    if positions == "last":
        dim.dim_value = 1
    else:
        dim.dim_param = C.KEPT
    return {
        "logits_positions": positions,
        "lm_head": head.name,
        "lm_head_op": head.op_type,
        "nodes_added": [n.name for n in nodes],
    }


def write_logits_graph(src: str | os.PathLike, dst: str | os.PathLike, positions: str) -> dict[str, Any]:
    """Write ``src`` with its lm_head on ``positions`` only (``select_logits_positions``) to ``dst``.

    A graph with external data keeps pointing at the same data file (no second copy of the
    weights on disk), so ``dst`` must be in ``src``'s directory; a self-contained graph is written
    self-contained (its weights copied into ``dst``).

    Raises:
        ValueError: see ``select_logits_positions``; or ``dst`` is elsewhere than an external
            ``src``'s directory.
    """
    onnx = require("onnx")
    src, dst = Path(src), Path(dst)
    m = onnx.load(str(src), load_external_data=False)
    external = sorted(external_locations(m))
    if external and dst.parent.resolve() != src.parent.resolve():
        raise ValueError(
            f"{src} keeps its weights in {external}: the graph derived from it must sit in the same "
            f"directory ({src.parent}), not in {dst.parent}"
        )
    details = select_logits_positions(m, positions)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(m, str(dst))
    return {**details, "shared_external_data": external}
