"""Backends by name. Listing them imports nothing heavy: classes are resolved on first use."""

from __future__ import annotations

import importlib

from export.errors import OptionsError
from export.manifest import Bundle
from serving.backends.base import Backend, BackendLimits, BackendOptions, KVCache, StepOutput

# name -> "module:Class"; resolved lazily so `--help` and the ORT path never import torch/tensorrt.
REGISTRY: dict[str, str] = {
    "torch": "serving.backends.torch_backend:TorchBackend",
    "onnxruntime": "serving.backends.ort_backend:OrtBackend",
    "tensorrt": "serving.backends.trt_backend:TensorRTBackend",
}


def default_device(backend: str) -> str:
    """The device a backend runs on unless told otherwise: TensorRT needs CUDA, the rest use CPU."""
    return "cuda" if backend == "tensorrt" else "cpu"


def backend_options(
    backend: str,
    device: str | None = None,
    *,
    threads: int | None = None,
    engine: str | None = None,
    trt_runtime: str = "auto",
    trust_engine_host_code: bool = False,
) -> BackendOptions:
    """BackendOptions from the CLI-level settings every command shares.

    ``trust_engine_host_code`` (tensorrt only): load engines that carry executable host code (the
    lean runtime in a version-compatible plan); off by default (``--trust-engine-host-code``).
    """
    extra: dict = {"runtime": trt_runtime} if backend == "tensorrt" else {}
    if backend == "tensorrt" and trust_engine_host_code:
        extra["trust_engine_host_code"] = True
    return BackendOptions(
        device=device or default_device(backend), threads=threads, engine=engine, extra=extra
    )


def backend_class(name: str) -> type[Backend]:
    try:
        target = REGISTRY[name]
    except KeyError:
        raise OptionsError(
            f"unknown backend {name!r}; available backends are: {', '.join(REGISTRY)}"
        ) from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)


def create_backend(name: str, bundle: Bundle, options: BackendOptions | None = None) -> Backend:
    """Construct (cheaply; call ``load()`` to start it) the backend called ``name``."""
    return backend_class(name)(bundle, options)


__all__ = [
    "REGISTRY",
    "Backend",
    "BackendLimits",
    "BackendOptions",
    "KVCache",
    "StepOutput",
    "backend_class",
    "backend_options",
    "create_backend",
    "default_device",
]
