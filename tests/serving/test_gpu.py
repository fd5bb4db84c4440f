"""CUDA checks of the torch and onnxruntime backends (`gpu` marker; `make test-gpu` runs them).

They skip here, saying why, and run on a machine with a CUDA GPU: the torch reference on CUDA and
ONNX Runtime's CUDA provider (onnxruntime-gpu) are each compared with the CPU fp32 reference,
teacher-forced (so one near-tie flip cannot cascade), within the "tf32" preset (GPU matmuls may
use TF32), and a generation runs to its length on the GPU.
"""

from __future__ import annotations

import pytest

from export.compare import tolerance_for
from serving.backends import BackendOptions, create_backend
from serving.generation import GenerationRequest, Generator
from serving.parity import check_generation_parity, reference_backend
from serving.tokenizer import Tokenizer

PROMPT = "The quick brown fox jumps over the lazy dog because"


def _torch_cuda_reason() -> str | None:
    try:
        import torch
    except ImportError as e:
        return f"torch is not installed ({e})"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch (torch.cuda.is_available() is False)"
    return None


def _ort_cuda_reason() -> str | None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (
            f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (providers: "
            f"{ort.get_available_providers()}); install onnxruntime-gpu on a CUDA machine"
        )
    return _torch_cuda_reason()


@pytest.fixture(scope="module")
def cpu_reference(tiny_bundle):
    with reference_backend(tiny_bundle, "cpu") as ref:
        yield ref


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_cuda_backend_matches_cpu_reference(tiny_bundle, cpu_reference, backend):
    reason = _torch_cuda_reason() if backend == "torch" else _ort_cuda_reason()
    if reason:
        pytest.skip(reason)
    tok = Tokenizer.from_dir(tiny_bundle.tokenizer_dir)
    with create_backend(backend, tiny_bundle, BackendOptions(device="cuda")) as served:
        report = check_generation_parity(
            served, cpu_reference, tok, tok.encode(PROMPT), 16, tolerance_for("tf32")
        )
        assert report, str(report)
        req = GenerationRequest(prompt_ids=tok.encode(PROMPT), max_new_tokens=16, stop_at_eos=False)
        final = Generator(served, tok).generate(req)
    assert final.finish_reason == "length" and len(final.token_ids) == 16
