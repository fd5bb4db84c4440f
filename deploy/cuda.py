"""CUDA device helpers on cuda-python (imported lazily): the runtime module, error checking, device
queries; the TensorRT module a runtime choice imports, and why TensorRT cannot run here.

    info = cuda_device_info(0)          # name, compute capability, memory, integrated (Jetson)
    cuda_check(cudart().cudaSetDevice(0), "cudaSetDevice")

Only the standard library is imported at module level.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from deploy.engine import parse_compute_capability
from export.deps import require

# The modules each TensorRT runtime choice (``serve --trt-runtime``) imports, in the order tried. The
# lean runtime's import name is ``tensorrt_lean`` (the ``tensorrt-lean`` meta package); the
# ``tensorrt-lean-cu13-bindings`` wheel alone installs it as ``tensorrt_lean_bindings``.
TENSORRT_MODULES: dict[str, tuple[str, ...]] = {
    "auto": ("tensorrt", "tensorrt_lean", "tensorrt_lean_bindings"),
    "tensorrt": ("tensorrt",),
    "tensorrt_lean": ("tensorrt_lean", "tensorrt_lean_bindings"),
}


def cudart() -> Any:
    """cuda-python's runtime module: ``cuda.bindings.runtime`` (cuda-python >= 12.6; the only path in
    13.x), else the legacy ``cuda.cudart`` of older 12.x releases."""
    try:
        from cuda.bindings import runtime

        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart as legacy

        return legacy
    except ImportError:
        return require("cuda.bindings.runtime")  # raises MissingDependencyError naming the extra


def cuda_check(result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(err, *values)`` tuple, raising on an error code.

    Every cuda-python call returns the error first (cuda-python's documented convention).
    """
    rt = cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != int(rt.cudaError_t.cudaSuccess):
        _, msg = rt.cudaGetErrorString(err)
        text = msg.decode() if isinstance(msg, bytes) else str(msg)
        raise RuntimeError(f"CUDA error in {what}: {getattr(err, 'name', err)}: {text}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    compute_capability: str
    total_memory: int
    integrated: bool  # Jetson: GPU shares the host's memory

    @property
    def bf16(self) -> bool:
        """bf16 tensor-core math exists from Ampere (compute capability 8.0) on; Orin is 8.7."""
        return parse_compute_capability(self.compute_capability) >= (8, 0)


def cuda_device_info(index: int = 0) -> DeviceInfo:
    """Name, compute capability and memory of CUDA device ``index``.

    Raises:
        MissingDependencyError: cuda-python is not installed.
        RuntimeError: no usable CUDA device/driver (the CUDA error is in the message).
    """
    rt = cudart()
    count = cuda_check(rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
    if index >= count:
        raise RuntimeError(f"CUDA device {index} does not exist; {count} device(s) visible")
    prop = cuda_check(rt.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    name = (
        prop.name.decode(errors="replace").rstrip("\x00") if isinstance(prop.name, bytes) else str(prop.name)
    )
    return DeviceInfo(
        index, name, f"{prop.major}.{prop.minor}", int(prop.totalGlobalMem), bool(prop.integrated)
    )


def set_cuda_device(index: int) -> None:
    """Make CUDA device ``index`` current for this thread (``cudaSetDevice``), so that a TensorRT
    builder or runtime created afterwards works on it.

    Raises:
        MissingDependencyError: cuda-python is not installed.
        RuntimeError: the device does not exist or cannot be used (the CUDA error is in the message).
    """
    rt = cudart()
    cuda_check(rt.cudaSetDevice(index), f"cudaSetDevice({index})")


def import_tensorrt_runtime(runtime: str = "auto") -> tuple[Any, str]:
    """The first module of ``TENSORRT_MODULES[runtime]`` that imports, and its kind ("tensorrt" or
    "tensorrt_lean": ``RuntimeInfo.module``).

    Raises:
        ImportError: none imports; the message lists every attempt (``name: error``, "; " apart).
    """
    errors = []
    for name in TENSORRT_MODULES[runtime]:
        try:
            mod = importlib.import_module(name)
        except ImportError as e:
            errors.append(f"{name}: {e}")
            continue
        return mod, ("tensorrt" if name == "tensorrt" else "tensorrt_lean")
    raise ImportError("; ".join(errors))


def tensorrt_unavailable_reason(module: str = "tensorrt") -> str | None:
    """Why TensorRT cannot run here (None when ``import <module>`` and a CUDA GPU both work).

    The `trt` tests skip with this reason; ``make gpu-check`` prints it.
    """
    names = TENSORRT_MODULES[module] if module == "tensorrt_lean" else (module,)
    for name in names:
        try:
            importlib.import_module(name)
            break
        except ImportError as e:
            err = e
    else:
        return (
            f"{module} is not installed here (import {module}: {err}); the trt tests run where NVIDIA's "
            "tensorrt wheel, a TensorRT container or JetPack provides it (`make test-gpu`)"
        )
    try:
        cuda_device_info(0)
    except Exception as e:  # noqa: BLE001 - any failure means no usable GPU
        return f"{module} imports but no CUDA GPU is usable ({type(e).__name__}: {e})"
    return None
