"""Copy plans for KV-cache join/select on flat buffers (the TensorRT backend's device memory).

A cache tensor of ``rows`` rows and past length ``length`` is stored densely, row-major, as
``(rows, heads, length, head_dim)``: that is what TensorRT reads as ``past_key_values.*`` and
writes as ``present.*``. Joining and selecting rows therefore moves whole (row, head) blocks of
``length * head_dim`` elements, and rows with uniform strides merge into one 2-D copy
(``cudaMemcpy2DAsync``: ``height`` blocks of ``width`` elements, source and destination pitches).

    plan = join_plan([(2, 5), (1, 9)], heads=12, head_dim=64)   # -> Plan(rows=3, length=9, ...)
    run_plan_numpy(plan, [src_a, src_b], dst)                    # the same plan, on host arrays

Planning is pure Python, so the row bookkeeping is tested on CPU against a dense reference
(``numpy.pad`` + ``concatenate``, fancy indexing + slicing); the backend executes the same plan
with CUDA copies. Offsets, widths and pitches are in elements.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Copy2D:
    """``height`` blocks of ``width`` elements from source ``src`` to the destination."""

    src: int  # which source buffer (index into the plan's sources)
    src_offset: int
    src_pitch: int
    dst_offset: int
    dst_pitch: int
    width: int
    height: int


@dataclass(frozen=True)
class Zero2D:
    """``height`` blocks of ``width`` zeros in the destination (left padding: masked, but it must
    hold finite values, because 0 * NaN in the attention's weighted sum is still NaN)."""

    dst_offset: int
    dst_pitch: int
    width: int
    height: int


@dataclass(frozen=True)
class Plan:
    """How to build one destination tensor (rows, heads, length, head_dim) from source tensors."""

    rows: int
    length: int
    copies: tuple[Copy2D, ...]
    zeros: tuple[Zero2D, ...] = ()

    @property
    def elements(self) -> int:
        return sum(c.width * c.height for c in self.copies) + sum(z.width * z.height for z in self.zeros)


def join_plan(caches: list[tuple[int, int]], heads: int, head_dim: int, length: int | None = None) -> Plan:
    """Stack ``caches`` (each (rows, length)) in order, each right-aligned in the common length.

    Each source becomes one 2-D copy (rows x heads blocks) plus one zero fill of its padding.
    """
    if not caches:
        raise ValueError("join needs at least one cache")
    width = max(n for _, n in caches) if length is None else length
    if any(n > width for _, n in caches):
        raise ValueError(f"a cache is longer than the joined length {width}")
    copies, zeros = [], []
    row = 0
    for i, (rows, n) in enumerate(caches):
        if rows < 1:
            raise ValueError(f"cache {i} has no rows")
        base = row * heads * width * head_dim
        if n > 0:
            copies.append(
                Copy2D(
                    i,
                    0,
                    n * head_dim,
                    base + (width - n) * head_dim,
                    width * head_dim,
                    n * head_dim,
                    rows * heads,
                )
            )
        if n < width:
            zeros.append(Zero2D(base, width * head_dim, (width - n) * head_dim, rows * heads))
        row += rows
    return Plan(row, width, tuple(copies), tuple(zeros))


def select_plan(source: tuple[int, int], keep: list[int], length: int, heads: int, head_dim: int) -> Plan:
    """Rows ``keep`` (in that order) of a cache (rows, past), keeping its last ``length`` positions.

    Consecutive source rows that stay consecutive merge into one copy.
    """
    rows, past = source
    if not keep:
        raise ValueError("select needs at least one row")
    if any(not 0 <= r < rows for r in keep) or len(set(keep)) != len(keep):
        raise ValueError(f"rows must be distinct indices in [0, {rows}), got {keep}")
    if not 0 <= length <= past:
        raise ValueError(f"length must be in [0, {past}], got {length}")
    copies = []
    if length > 0:
        k = 0
        while k < len(keep):
            run = 1
            while k + run < len(keep) and keep[k + run] == keep[k] + run:
                run += 1
            copies.append(
                Copy2D(
                    0,
                    (keep[k] * heads * past + (past - length)) * head_dim,
                    past * head_dim,
                    k * heads * length * head_dim,
                    length * head_dim,
                    length * head_dim,
                    run * heads,
                )
            )
            k += run
    return Plan(len(keep), length, tuple(copies))


def run_plan_numpy(plan: Plan, sources: list[np.ndarray], dst: np.ndarray) -> None:
    """Execute ``plan`` on flat host arrays (what the CUDA executor does with device pointers)."""
    for c in plan.copies:
        for h in range(c.height):
            s = c.src_offset + h * c.src_pitch
            d = c.dst_offset + h * c.dst_pitch
            dst[d : d + c.width] = sources[c.src][s : s + c.width]
    for z in plan.zeros:
        for h in range(z.height):
            d = z.dst_offset + h * z.dst_pitch
            dst[d : d + z.width] = 0
