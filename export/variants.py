"""Precision variants of the exported fp32 graph: fp32 (as is), fp16, ORT-fused, int8."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from export.deps import require


def _copy_onnx(src: Path, dst: Path) -> Path:
    """Copy a graph and its external data, keeping the data file name the graph refers to."""
    onnx = require("onnx")
    m = onnx.load(str(src), load_external_data=False)
    locations = {
        e.value for init in m.graph.initializer
        if init.data_location == onnx.TensorProto.EXTERNAL
        for e in init.external_data if e.key == "location"
    }
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    for loc in locations:
        shutil.copyfile(src.parent / loc, dst.parent / loc)
    return dst


def make_variant(fp32_path: Path, out_path: Path, precision: str, config: Any) -> Path:
    """Write the ``precision`` variant of ``fp32_path`` to ``out_path``; return its path."""
    if precision == "fp32":
        return _copy_onnx(Path(fp32_path), Path(out_path))
    raise NotImplementedError(f"precision {precision!r} is not implemented yet")
