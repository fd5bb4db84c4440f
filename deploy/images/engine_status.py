"""Whether a bundle holds a TensorRT engine that can run on this machine (asked by entrypoint.sh).

    python3 engine_status.py BUNDLE [--device N] [--runtime auto|tensorrt|tensorrt_lean]
                             [--trust-engine-host-code]

Prints one line and exits 0 when an engine can run here (it is named), 1 when none can (no engine
recorded, TensorRT or the GPU unusable, or every engine built for another GPU / TensorRT version /
graph, or a plan with host code that is not trusted), 2 when the bundle cannot be read. The rules
and the order (newest first) are the TensorRT backend's (``deploy.engine.check_engine``), applied
without loading the engine.
"""

from __future__ import annotations

import argparse
import sys

from deploy.cuda import TENSORRT_MODULES, cuda_device_info, import_tensorrt_runtime
from deploy.engine import TRUST_HOST_CODE_FLAG, EngineEntry, RuntimeInfo, check_engine
from export.manifest import Bundle, BundleError


def runtime_info(device: int, runtime: str) -> RuntimeInfo:
    """The TensorRT module and GPU an engine would be loaded with; RuntimeError saying why not."""
    try:
        trt, kind = import_tensorrt_runtime(runtime)
    except ImportError as e:
        raise RuntimeError(f"TensorRT cannot be imported ({e})") from None
    try:
        gpu = cuda_device_info(device)
    except Exception as e:  # noqa: BLE001 - cuda-python missing, no driver, no such device
        raise RuntimeError(f"CUDA device {device} is not usable ({type(e).__name__}: {e})") from None
    return RuntimeInfo(kind, str(trt.__version__), gpu.compute_capability, gpu.name)


def engine_status(
    bundle_dir: str, device: int = 0, runtime: str = "auto", trust_host_code: bool = False
) -> tuple[int, str]:
    """(exit code, one line) as described in the module docstring."""
    try:
        bundle = Bundle.open(bundle_dir, verify_hashes=False)  # `serve` verifies every hash
    except BundleError as e:
        return 2, str(e).replace("\n", " ")
    raw = bundle.manifest.engines
    if not raw:
        return 1, f"no engine: {bundle.root} has no TensorRT engine recorded"
    try:
        rt = runtime_info(device, runtime)
    except RuntimeError as e:
        return 1, f"no engine can run here: {e}"
    reasons = []
    for d in reversed(raw):  # newest first, as the backend picks
        try:
            entry = EngineEntry.from_json(d)
        except (TypeError, ValueError) as e:
            reasons.append(f"malformed entry ({e})")
            continue
        verdict = check_engine(bundle, entry, rt, trust_host_code)
        if verdict:
            return 0, f"engine ok: {entry.file} runs on {rt.gpu_name} with {rt.module} {rt.tensorrt_version}"
        reasons.append(f"{entry.file}: {verdict}")
    return 1, f"no engine can run on {rt.gpu_name} (sm {rt.compute_capability}): " + " | ".join(reasons)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--device", type=int, default=0, help="CUDA device index (default 0).")
    p.add_argument("--runtime", choices=sorted(TENSORRT_MODULES), default="auto")
    p.add_argument(TRUST_HOST_CODE_FLAG, dest="trust", action="store_true", help="as `serve`'s flag")
    args = p.parse_args(argv)
    code, line = engine_status(args.bundle, args.device, args.runtime, args.trust)
    print(line)
    return code


if __name__ == "__main__":
    sys.exit(main())
