"""The onnxruntime and torch backends on the real exported tiny bundle: steps, KV cache, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from export.compare import compare_logits, tolerance_for
from serving.backends import BackendOptions, create_backend
from serving.errors import BackendUnavailable, InvalidInput, OutOfRange

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ort_backend(tiny_bundle):
    with create_backend("onnxruntime", tiny_bundle, BackendOptions(threads=1)) as b:
        yield b


@pytest.fixture(scope="module")
def torch_backend(tiny_bundle):
    with create_backend("torch", tiny_bundle) as b:
        yield b


def _left_padded():
    """Two rows, the second left-padded by 3: ids, mask, position ids."""
    ids = np.array(
        [[464, 2068, 7586, 21831, 18045, 625], [50256, 50256, 50256, 15496, 995, 11]], dtype=np.int64
    )
    mask = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]], dtype=np.int64)
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return ids, mask, pos


def _decode_steps(backend, steps: int = 3):
    """Prefill the left-padded batch, then feed `steps` fixed tokens; logits of every step."""
    ids, mask, pos = _left_padded()
    out = backend.forward(ids, mask, pos)
    logits, cache = [out.logits], out.present
    next_pos = pos[:, -1:] + 1
    for t in range(steps):
        mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
        out = backend.forward(np.array([[100 + t], [200 + t]]), mask, next_pos + t, cache)
        logits.append(out.logits)
        cache = out.present
    return logits, cache


def test_ort_and_torch_agree_step_by_step_with_left_padding(ort_backend, torch_backend):
    ort_logits, ort_cache = _decode_steps(ort_backend)
    ref_logits, ref_cache = _decode_steps(torch_backend)
    _, mask, _ = _left_padded()
    valid = [mask.astype(bool)] + [None] * 3  # padded prefill positions are meaningless
    for step, (r, g, v) in enumerate(zip(ref_logits, ort_logits, valid)):
        result = compare_logits(r, g, v, tolerance_for("fp32"), f"step {step}")
        assert result, str(result)
    assert ort_cache.length == ref_cache.length == 6 + 3
    assert ort_cache.batch == 2


def test_ort_kv_cache_stays_in_ortvalues(ort_backend, tiny_bundle):
    c = tiny_bundle.contract
    empty = ort_backend.empty_cache(3)
    assert empty.length == 0
    assert [v.shape() for v in empty.values] == [[3, c.n_head, 0, c.head_dim]] * (2 * c.n_layer)
    ids = np.array([[1, 2, 3, 4]] * 3)
    out = ort_backend.forward(ids, np.ones((3, 4), np.int64), np.tile(np.arange(4), (3, 1)), empty)
    present = out.present
    assert all(type(v).__name__ == "OrtValue" for v in present.values)
    assert [v.shape() for v in present.values] == [[3, c.n_head, 4, c.head_dim]] * (2 * c.n_layer)
    assert present.values[0].device_name().lower() == "cpu"
    # present of step t is past of step t+1: the same OrtValue objects are bound, not copies
    nxt = ort_backend.forward(np.array([[5]] * 3), np.ones((3, 5), np.int64), np.full((3, 1), 4), present)
    assert nxt.present.length == 5
    assert [v.shape()[2] for v in nxt.present.values] == [5] * (2 * c.n_layer)
    # the cache written by ORT holds the same keys as recomputing the whole sequence
    full = ort_backend.forward(
        np.array([[1, 2, 3, 4, 5]] * 3), np.ones((3, 5), np.int64), np.tile(np.arange(5), (3, 1))
    )
    np.testing.assert_allclose(nxt.present.values[0].numpy(), full.present.values[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(nxt.logits[:, -1], full.logits[:, -1], atol=1e-4)


@pytest.mark.parametrize("name", ["onnxruntime", "torch"])
def test_last_only_returns_the_last_position(name, ort_backend, torch_backend):
    backend = {"onnxruntime": ort_backend, "torch": torch_backend}[name]
    ids, mask, pos = _left_padded()
    full = backend.forward(ids, mask, pos).logits
    last = backend.forward(ids, mask, pos, last_only=True).logits
    assert full.shape == (2, 6, 50257) and last.shape == (2, 1, 50257)
    assert last.dtype == np.float32
    np.testing.assert_array_equal(last[:, 0], full[:, -1])


def test_forward_validates_shapes_ids_and_context(ort_backend):
    with pytest.raises(InvalidInput, match=r"attention_mask shape \[1, 3\] != .* = \[1, 2\]"):
        ort_backend.forward(np.array([[1, 2]]), np.ones((1, 3), np.int64), np.array([[0, 1]]))
    with pytest.raises(InvalidInput, match=r"\[0, 50257\)"):
        ort_backend.forward(np.array([[50257]]), np.ones((1, 1), np.int64), np.array([[0]]))
    with pytest.raises(OutOfRange, match="256 positions"):
        ort_backend.forward(np.zeros((1, 257), np.int64), np.ones((1, 257), np.int64), np.arange(257)[None])
    from serving.backends.torch_backend import TorchKVCache

    with pytest.raises(TypeError, match="OrtKVCache"):  # another backend's cache is refused
        ort_backend.forward(
            np.array([[1]]), np.ones((1, 1), np.int64), np.array([[0]]), TorchKVCache(1, 0, [])
        )


def test_unknown_provider_lists_the_available_ones(tiny_bundle):
    import onnxruntime as ort

    opts = BackendOptions(providers=["NoSuchExecutionProvider"])
    backend = create_backend("onnxruntime", tiny_bundle, opts)
    with pytest.raises(BackendUnavailable) as e:
        backend.load()
    assert "NoSuchExecutionProvider" in str(e.value)
    for p in ort.get_available_providers():
        assert p in str(e.value)
    with pytest.raises(BackendUnavailable, match="'cpu', 'cuda' or 'cuda:N'"):
        create_backend("onnxruntime", tiny_bundle, BackendOptions(device="tpu")).load()


def test_cuda_absent_is_a_clear_error(tiny_bundle):
    import onnxruntime as ort
    import torch

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(BackendUnavailable, match="onnxruntime-gpu"):
            create_backend("onnxruntime", tiny_bundle, BackendOptions(device="cuda")).load()
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="no CUDA GPU"):
            create_backend("torch", tiny_bundle, BackendOptions(device="cuda")).load()
    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA for both backends; the gpu tests cover it")


def test_info_names_what_runs(ort_backend, torch_backend):
    assert ort_backend.info()["providers"] == ["CPUExecutionProvider"]
    assert ort_backend.info()["backend"] == "onnxruntime"
    info = torch_backend.info()
    assert info["backend"] == "torch" and info["attn_implementation"] == "sdpa"


def test_onnxruntime_serving_path_never_imports_torch(tiny_bundle):
    code = f"""
import sys
import numpy as np
from export.manifest import Bundle
from serving.backends import create_backend
from serving.generation import Generator, GenerationRequest
from serving.parity import teacher_forced_parity
from serving.tokenizer import Tokenizer
b = Bundle.open({str(tiny_bundle.root)!r})
gen = Generator(create_backend("onnxruntime", b).load(), Tokenizer.from_dir(b.tokenizer_dir))
final = gen.generate(GenerationRequest(gen.tokenizer.encode("Hello"), max_new_tokens=3))
assert final.completion_tokens == 3, final
heavy = [m for m in ("torch", "transformers", "tensorrt") if m in sys.modules]
assert not heavy, heavy
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_a_failed_load_frees_what_it_created(tiny_bundle):
    from serving.backends.ort_backend import OrtBackend

    closed = []

    class FailsAfterSession(OrtBackend):
        """The real ORT load, then a failure (as a TensorRT load failing after its allocations)."""

        def _load_impl(self):
            super()._load_impl()
            raise RuntimeError("late failure")

        def _close_impl(self):
            closed.append(self._session is not None)
            super()._close_impl()

    b = FailsAfterSession(tiny_bundle)
    with pytest.raises(RuntimeError, match="late failure"):
        b.load()
    assert closed == [True] and b._session is None and not b.is_loaded
