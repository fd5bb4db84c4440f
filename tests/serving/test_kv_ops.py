"""KV-cache operations (join, select rows, trim) of every backend against a dense reference.

The ONNX Runtime and torch backends run on the CPU here, on real prefilled caches of the tiny
bundle; the TensorRT backend's copy plans (``serving.backends.kv_layout``) run through their
numpy executor on flat buffers laid out as TensorRT lays them out.
"""

from __future__ import annotations

import numpy as np
import pytest

from serving.backends import BackendOptions, create_backend
from serving.backends.kv_layout import join_plan, run_plan_numpy, select_plan
from serving.errors import InvalidInput


@pytest.fixture(scope="module", params=["onnxruntime", "torch"])
def backend(request, tiny_bundle):
    be = create_backend(request.param, tiny_bundle, BackendOptions(threads=1)).load()
    yield be
    be.close()


def host(cache) -> list[np.ndarray]:
    """Every past tensor of a cache as numpy, in contract order (layer 0 key, value, ...)."""
    if hasattr(cache, "values"):  # OrtKVCache
        return [v.numpy() for v in cache.values]
    return [t.numpy() for layer in cache.layers for t in layer]  # TorchKVCache


def prefill(backend, ids):
    ids = np.asarray([ids], dtype=np.int64)
    n = ids.shape[1]
    return backend.forward(ids, np.ones_like(ids), np.arange(n)[None], None, last_only=True)


def pad_left(a: np.ndarray, length: int) -> np.ndarray:
    return np.pad(a, ((0, 0), (0, 0), (length - a.shape[2], 0), (0, 0)))


def test_join_select_trim_equal_the_dense_reference(backend):
    rng = np.random.default_rng(0)
    a = prefill(backend, rng.integers(0, 50000, 5)).present
    b = prefill(backend, rng.integers(0, 50000, 9)).present
    c = prefill(backend, rng.integers(0, 50000, 2)).present
    ha, hb, hc = host(a), host(b), host(c)

    joined = backend.join([a, b, c])
    assert (joined.batch, joined.length) == (3, 9)
    want = [
        np.concatenate([pad_left(x, 9), y, pad_left(z, 9)], 0) for x, y, z in zip(ha, hb, hc, strict=True)
    ]
    for got, w in zip(host(joined), want, strict=True):
        np.testing.assert_array_equal(got, w)  # a copy: bit-exact, zeros in the padding

    picked = backend.select(joined, [2, 0], 5)  # drop row 1 (the longest) and 4 pad columns
    assert (picked.batch, picked.length) == (2, 5)
    for got, w in zip(host(picked), want, strict=True):
        np.testing.assert_array_equal(got, w[[2, 0]][:, :, 4:])

    trimmed = backend.trim(picked, 2)
    for got, w in zip(host(trimmed), want, strict=True):
        np.testing.assert_array_equal(got, w[[2, 0]][:, :, 7:])


def test_a_joined_row_decodes_like_its_solo_run(backend):
    """The semantic check: after join and select, each row's next logits equal its own run."""
    rng = np.random.default_rng(1)
    p1, p2 = rng.integers(0, 50000, 4), rng.integers(0, 50000, 11)
    a, b = prefill(backend, p1), prefill(backend, p2)
    joined = backend.join([a.present, b.present])
    mask = np.zeros((2, 12), dtype=np.int64)
    mask[0, 7:] = 1
    mask[1, :] = 1
    tok = np.array([[7], [9]])
    out = backend.forward(tok, mask, np.array([[4], [11]]), joined, last_only=True)
    solo_a = backend.forward(tok[:1], np.ones((1, 5), np.int64), np.array([[4]]), a.present, last_only=True)
    solo_b = backend.forward(tok[1:], np.ones((1, 12), np.int64), np.array([[11]]), b.present, last_only=True)
    np.testing.assert_allclose(out.logits[0], solo_a.logits[0], atol=1e-5)
    np.testing.assert_allclose(out.logits[1], solo_b.logits[0], atol=1e-5)
    # The short row alone again, trimmed to its real length: still the same continuation.
    kept = backend.select(out.present, [0], 5)
    nxt = backend.forward(np.array([[3]]), np.ones((1, 6), np.int64), np.array([[5]]), kept, last_only=True)
    ref = backend.forward(
        np.array([[3]]), np.ones((1, 6), np.int64), np.array([[5]]), solo_a.present, last_only=True
    )
    np.testing.assert_allclose(nxt.logits, ref.logits, atol=1e-5)


def test_kv_ops_validate_their_arguments(backend):
    a = prefill(backend, [1, 2, 3]).present
    with pytest.raises(InvalidInput, match="at least one"):
        backend.join([])
    with pytest.raises(InvalidInput, match=r"distinct indices in \[0, 1\)"):
        backend.select(a, [0, 0])
    with pytest.raises(InvalidInput, match=r"length must be in \[0, 3\]"):
        backend.select(a, [0], 4)
    assert backend.select(a, [0]) is a  # nothing to do: no copy


# --- the TensorRT backend's copy plans, on flat host buffers -------------------------------------
def flat(t: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(t).ravel().copy()


@pytest.mark.parametrize("shapes", [[(2, 5), (1, 9)], [(3, 4), (2, 4), (1, 1)], [(1, 0), (2, 3)]])
def test_join_plan_equals_pad_and_concatenate(shapes):
    rng = np.random.default_rng(len(shapes))
    heads, hd = 3, 4
    tensors = [rng.standard_normal((r, heads, n, hd)).astype(np.float32) for r, n in shapes]
    plan = join_plan(shapes, heads, hd)
    width = max(n for _, n in shapes)
    dst = np.full(plan.rows * heads * width * hd, np.nan, dtype=np.float32)  # garbage must be overwritten
    run_plan_numpy(plan, [flat(t) for t in tensors], dst)
    want = np.concatenate([pad_left(t, width) for t in tensors], 0)
    np.testing.assert_array_equal(dst.reshape(want.shape), want)
    assert len(plan.copies) == sum(n > 0 for _, n in shapes)  # one 2-D copy per source


@pytest.mark.parametrize(
    "keep,length", [([0, 1, 2, 3], 6), ([3, 1], 2), ([1, 2, 0], 0), ([2], 6), ([0, 1, 3], 4)]
)
def test_select_plan_equals_fancy_indexing(keep, length):
    rng = np.random.default_rng(7)
    heads, hd, rows, past = 2, 3, 4, 6
    src = rng.standard_normal((rows, heads, past, hd)).astype(np.float32)
    plan = select_plan((rows, past), keep, length, heads, hd)
    dst = np.full(len(keep) * heads * length * hd, np.nan, dtype=np.float32)
    run_plan_numpy(plan, [flat(src)], dst)
    want = src[keep][:, :, past - length :]
    np.testing.assert_array_equal(dst.reshape(want.shape), want)
    runs = sum(1 for i, r in enumerate(keep) if i == 0 or keep[i - 1] != r - 1)
    assert len(plan.copies) == (runs if length else 0)  # consecutive rows merge into one copy


def test_plans_refuse_impossible_layouts():
    with pytest.raises(ValueError, match="at least one"):
        join_plan([], 2, 2)
    with pytest.raises(ValueError, match="longer than"):
        join_plan([(1, 5)], 2, 2, length=3)
    with pytest.raises(ValueError, match="distinct"):
        select_plan((2, 3), [1, 1], 2, 2, 2)
    with pytest.raises(ValueError, match=r"length must be in \[0, 3\]"):
        select_plan((2, 3), [0], 4, 2, 2)
