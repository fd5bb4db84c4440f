"""The engine manifest entry and the compatibility decision (pure logic, no TensorRT)."""

from __future__ import annotations

import pytest

from deploy.engine import (
    EngineEntry,
    RuntimeInfo,
    check_compatibility,
    check_host_code,
    lean_library_version,
    parse_compute_capability,
    parse_version,
    upsert_engine,
)


def entry(**over) -> EngineEntry:
    base = dict(
        file="engines/server-fp16.engine",
        tensorrt_version="10.13.3.9",
        gpu_name="NVIDIA H100",
        compute_capability="9.0",
        precision="fp16",
        profiles=[],
        onnx_file="model.onnx",
        onnx_sha256="ab" * 32,
        flags={"version_compatible": False, "hardware_compatibility_level": "none"},
    )
    flags = {**base["flags"], **over.pop("flags", {})}
    return EngineEntry(**{**base, **over, "flags": flags})


def rt(**over) -> RuntimeInfo:
    return RuntimeInfo(
        **{
            "module": "tensorrt",
            "tensorrt_version": "10.13.3.9",
            "compute_capability": "9.0",
            "gpu_name": "NVIDIA H100",
            **over,
        }
    )


def test_versions_parse():
    assert parse_version("10.13.3.9") == (10, 13, 3, 9)
    assert parse_version("11.0.0rc1") == (11, 0, 0)
    assert parse_compute_capability("8.7") == (8, 7) and parse_compute_capability((9, 0)) == (9, 0)
    with pytest.raises(ValueError):
        parse_version("dev")


def test_entry_json_round_trip_and_upsert():
    e = entry(tf32=True, precision="fp32")
    assert EngineEntry.from_json(e.to_json()) == e
    assert e.tolerance_name == "tf32" and entry().tolerance_name == "fp16"
    assert entry(precision="fp32").tolerance_name == "fp32"
    with pytest.raises(ValueError, match="lacks"):
        EngineEntry.from_json({"file": "x.engine"})
    engines = upsert_engine([{"file": "engines/a.engine"}, e.to_json()], e)
    assert [d["file"] for d in engines] == ["engines/a.engine", e.file]  # replaced, moved last (newest)


def test_same_version_same_gpu_is_compatible():
    assert check_compatibility(entry(), rt())


def test_plain_engine_refused_on_another_tensorrt_version_with_both_versions_named():
    c = check_compatibility(entry(), rt(tensorrt_version="10.14.1.48"))
    assert not c
    assert "10.13.3.9" in str(c) and "10.14.1.48" in str(c) and "--version-compatible" in str(c)


def test_plain_engine_refused_on_another_architecture():
    c = check_compatibility(entry(), rt(compute_capability="8.7", gpu_name="Orin"))
    assert not c and "compute capability 9.0" in str(c) and "8.7" in str(c)
    assert "not portable across GPU architectures" in str(c)


def test_version_compatible_engine_runs_on_later_versions_and_lean_but_not_older():
    vc = entry(flags={"version_compatible": True})
    assert check_compatibility(vc, rt(tensorrt_version="10.14.1.48"))
    assert check_compatibility(vc, rt(module="tensorrt_lean", tensorrt_version="11.4.0.106"))
    older = check_compatibility(vc, rt(tensorrt_version="10.8.0.43"))
    assert not older and "newer than this runtime" in str(older)
    # the lean runtime refuses plain engines, whatever the version
    plain_on_lean = check_compatibility(entry(), rt(module="tensorrt_lean"))
    assert not plain_on_lean and "runs only version-compatible engines" in str(plain_on_lean)


def test_excluded_lean_runtime_needs_the_same_version():
    e = entry(flags={"version_compatible": True, "exclude_lean_runtime": True})
    assert check_compatibility(e, rt(module="tensorrt_lean"))
    c = check_compatibility(e, rt(module="tensorrt_lean", tensorrt_version="10.14.1.48"))
    assert not c and "tensorrt-lean==10.13.3.9" in str(c)
    major_only = check_compatibility(
        e, rt(tensorrt_version="10.14.1.48", lean_library="/x/libnvinfer_lean.so.10")
    )
    assert major_only and "does not name its full version" in str(major_only)
    exact = check_compatibility(
        e, rt(tensorrt_version="10.14.1.48", lean_library="/x/libnvinfer_lean.so.10.13.3")
    )
    assert exact and not exact.notes
    wrong = check_compatibility(
        e, rt(tensorrt_version="10.14.1.48", lean_library="/x/libnvinfer_lean.so.10.14.1")
    )
    assert not wrong and "is version 10.14.1: pass libnvinfer_lean of 10.13.3.9" in str(wrong)
    assert not check_compatibility(
        e, rt(tensorrt_version="11.0.0.1", lean_library="/x/libnvinfer_lean.so.11")
    )


def test_lean_library_version_from_the_file_name():
    assert lean_library_version("/x/libnvinfer_lean.so.10.13.3") == (10, 13, 3)
    assert lean_library_version("/x/libnvinfer_lean.so.10") == (10,)
    assert lean_library_version("C:\\TensorRT\\nvinfer_lean_10.dll") == (10,)
    assert lean_library_version("/x/libnvinfer_lean.so") == ()


def test_version_compatible_engine_refuses_an_older_patch_release():
    vc = entry(flags={"version_compatible": True})
    c = check_compatibility(vc, rt(tensorrt_version="10.13.1.2"))
    assert not c and "newer than this runtime" in str(c)


def test_hardware_compatibility_levels():
    amp = entry(flags={"hardware_compatibility_level": "ampere_plus"}, compute_capability="8.0")
    assert check_compatibility(amp, rt(compute_capability="8.9"))
    turing = check_compatibility(amp, rt(compute_capability="7.5", gpu_name="T4"))
    assert not turing and ">= 8.0" in str(turing)
    same = entry(flags={"hardware_compatibility_level": "same_compute_capability"})
    assert check_compatibility(same, rt(gpu_name="NVIDIA H200"))
    # level none, same CC, another GPU: allowed with a note (TensorRT has the last word)
    c = check_compatibility(entry(), rt(gpu_name="NVIDIA H200"))
    assert c and "H200" in c.notes[0]
    # every problem is reported at once
    both = check_compatibility(entry(), rt(tensorrt_version="10.0.1.6", compute_capability="8.6"))
    assert len(both.problems) == 2


def test_engines_with_host_code_need_an_explicit_opt_in():
    """A version-compatible plan embeds the lean runtime (executable host code): refused unless
    trusted, with a message saying why and naming the flag; plans without host code need nothing."""
    vc = entry(flags={"version_compatible": True})
    assert vc.embeds_host_code
    refused = check_host_code(vc, trusted=False)
    assert not refused
    msg = str(refused)
    assert "--trust-engine-host-code" in msg and "executable host code" in msg and vc.file in msg
    assert "does not prove who built it" in msg
    assert check_host_code(vc, trusted=True)
    excluded = entry(flags={"version_compatible": True, "exclude_lean_runtime": True})
    assert not excluded.embeds_host_code and check_host_code(excluded, trusted=False)
    assert not entry().embeds_host_code and check_host_code(entry(), trusted=False)


def test_engine_tolerance_is_picked_by_export_compare():
    from export.compare import tolerance_for_run

    for e in (entry(), entry(precision="fp32"), entry(precision="fp32", tf32=True), entry(precision="bf16")):
        want = tolerance_for_run("fp32", device="cuda", tf32=e.tf32, engine_precision=e.precision)
        assert e.tolerance_name == want.name
    assert [e.tolerance_name for e in (entry(precision="fp32"), entry(precision="fp32", tf32=True))] == [
        "fp32",
        "tf32",
    ]
