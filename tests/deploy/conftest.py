"""The `trt`-marked tests skip, with the reason, where TensorRT or a GPU is missing."""

from __future__ import annotations

import pytest

from deploy.cuda import tensorrt_unavailable_reason


@pytest.fixture(scope="session")
def trt_or_skip() -> None:
    reason = tensorrt_unavailable_reason()
    if reason:
        pytest.skip(reason)
