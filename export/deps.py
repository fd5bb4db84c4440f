"""Lazy imports of heavy optional dependencies, with errors that name the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

# module -> (pip extra of gpt2-deploy that provides it, what it is needed for)
_EXTRAS = {
    "torch": ("torch", "PyTorch (export and the torch reference backend)"),
    "transformers": ("torch", "transformers (export and the torch reference backend)"),
    "onnx": ("export", "the onnx package"),
    "onnxruntime": ("onnxruntime", "ONNX Runtime"),
    "tensorrt": ("tensorrt", "the TensorRT builder/runtime"),
    "tensorrt_lean": ("tensorrt-lean", "the TensorRT lean runtime"),
    "cuda": ("tensorrt", "cuda-python (CUDA bindings for the TensorRT backend)"),
}


class MissingDependencyError(ImportError):
    """An optional dependency is not installed; the message says which extra provides it."""


def require(module: str) -> ModuleType:
    """Import ``module`` or raise MissingDependencyError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        extra, what = _EXTRAS.get(top, (None, top))
        hint = (
            f"install it with: pip install 'gpt2-deploy[{extra}]'"
            if extra
            else f"install the '{top}' package"
        )
        raise MissingDependencyError(f"{what} is required here but cannot be imported ({e}); {hint}") from e


def available(module: str) -> bool:
    """Whether ``module`` imports (without raising for a missing one)."""
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False
