"""PyTorch GPT-2 -> one ONNX decoder graph with the KV cache as flat inputs and outputs.

Recipe (see shared notes, re-measured here): torch's dynamo exporter at opset 18 (it cannot
produce 17 that ORT accepts; 18 still has LayerNormalization as one node), traced with past > 0
so no past length is baked in as a constant, the mask length given its own symbol (``total``)
because an exporter cannot express ``past + seq``. The tied lm_head/wte weight is stored once.
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
    torch = require("torch")

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
