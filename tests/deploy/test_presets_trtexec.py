"""Profiles from presets and the trtexec command line (pure logic, no TensorRT)."""

from __future__ import annotations

import pytest

from deploy.presets import (
    CONTEXT_PROFILE,
    ENGINE_PRECISIONS,
    GENERATION_PROFILE,
    PRESETS,
    ProfileLimits,
    ProfileSpec,
    compute_profiles,
    get_preset,
    profile_summary,
)
from deploy.trtexec import format_command, shape_spec, trtexec_command
from export.contract import IOContract

GPT2 = IOContract(n_layer=12, n_head=12, head_dim=64, vocab_size=50257)


def _profiles(preset: str, n_positions: int = 1024, **over):
    return compute_profiles(GPT2, ProfileLimits.resolve(get_preset(preset), n_positions, **over))


def test_every_preset_fits_its_memory_story():
    assert set(PRESETS) == {"server", "orin-nano", "orin-nx", "agx-orin"}
    for p in PRESETS.values():
        assert 1 <= p.opt_batch <= p.max_batch and 1 <= p.opt_prompt <= p.max_prompt <= p.max_context
        assert p.precision in ENGINE_PRECISIONS and p.workspace > 0 and p.why
    # the smallest device gets the smallest limits
    nano, server = PRESETS["orin-nano"], PRESETS["server"]
    assert nano.max_batch < server.max_batch and nano.workspace < server.workspace


def test_context_profile_has_empty_past_and_generation_profile_one_token():
    ctx, gen = _profiles("orin-nx")
    assert ctx.name == "context" and gen.name == "generation"
    assert ctx.axis_range(GPT2, "past") == (0, 0, 0)
    assert ctx.axis_range(GPT2, "seq") == (1, 128, 512)
    assert ctx.axis_range(GPT2, "total") == (1, 128, 512)
    assert gen.axis_range(GPT2, "seq") == (1, 1, 1)
    assert gen.axis_range(GPT2, "past") == (1, 512, 1023)
    assert gen.axis_range(GPT2, "total") == (2, 513, 1024)
    assert ctx.axis_range(GPT2, "batch") == gen.axis_range(GPT2, "batch") == (1, 1, 4)
    # every input has a shape in both profiles; KV shapes carry the fixed head dims
    for p in (ctx, gen):
        assert set(p.shapes) == set(GPT2.input_names)
    assert ctx.shapes["past_key_values.11.value"] == ((1, 12, 0, 64), (1, 12, 0, 64), (4, 12, 0, 64))
    assert gen.shapes["attention_mask"] == ((1, 2), (1, 513), (4, 1024))
    # the backend selects profiles by these indices: they must point at the profiles built
    profiles = _profiles("orin-nx")
    assert profiles[CONTEXT_PROFILE].axis_range(GPT2, "past") == (0, 0, 0)
    assert profiles[GENERATION_PROFILE].axis_range(GPT2, "seq") == (1, 1, 1)


def test_limits_are_clipped_to_the_model_and_overridable():
    ctx, gen = _profiles("server", n_positions=256)
    assert ctx.axis_range(GPT2, "seq")[2] == 256 and gen.axis_range(GPT2, "total")[2] == 256
    ctx, gen = _profiles("server", max_batch=3, max_context=300, max_prompt=100)
    assert ctx.axis_range(GPT2, "batch") == (1, 3, 3)  # opt batch clipped to the max
    assert ctx.axis_range(GPT2, "seq") == (1, 100, 100)
    assert gen.axis_range(GPT2, "past")[2] == 299
    with pytest.raises(ValueError, match="max batch must be >= 1.*max context must be >= 2"):
        ProfileLimits.resolve(get_preset("server"), 1024, max_batch=0, max_context=1)
    with pytest.raises(ValueError, match="unknown preset 'jetson'; presets are: server, orin-nano"):
        get_preset("jetson")


def test_profile_json_round_trip_and_summary():
    profiles = _profiles("agx-orin")
    assert [ProfileSpec.from_json(p.to_json()) for p in profiles] == profiles
    summary = profile_summary(profiles, GPT2)
    assert summary[0] == {
        "name": "context",
        "batch": [1, 4, 8],
        "seq": [1, 128, 1024],
        "past": [0, 0, 0],
        "total": [1, 128, 1024],
    }


def test_trtexec_command_line():
    profiles = _profiles("orin-nano")
    argv = trtexec_command(
        "m.onnx",
        "e.engine",
        profiles,
        precision="fp16",
        workspace=1 << 30,
        opt_level=4,
        version_compatible=True,
        exclude_lean_runtime=True,
        hardware_compat="ampere_plus",
        timing_cache="t.cache",
        fp32_layers=["node_layer_norm", "node_linear"],
    )
    assert argv[:4] == ["trtexec", "--onnx=m.onnx", "--saveEngine=e.engine", "--skipInference"]
    # one min/opt/max set per profile, context first
    mins = [a for a in argv if a.startswith("--minShapes=")]
    maxs = [a for a in argv if a.startswith("--maxShapes=")]
    assert len(mins) == len(maxs) == 2
    assert "past_key_values.0.key:1x12x0x64" in mins[0] and "past_key_values.0.key:2x12x511x64" in maxs[1]
    assert "input_ids:2x256" in maxs[0] and "input_ids:2x1" in maxs[1]
    for flag in (
        "--fp16",
        "--noTF32",
        "--precisionConstraints=obey",
        "--layerPrecisions=node_layer_norm:fp32,node_linear:fp32",
        "--layerOutputTypes=node_layer_norm:fp32,node_linear:fp32",
        "--memPoolSize=workspace:1024",
        "--builderOptimizationLevel=4",
        "--versionCompatible",
        "--excludeLeanRuntime",
        "--hardwareCompatibilityLevel=ampere+",
        "--timingCacheFile=t.cache",
    ):
        assert flag in argv, flag
    fp32 = trtexec_command("m.onnx", "e.engine", profiles, precision="fp32", tf32=True)
    assert not any(a.startswith(("--fp16", "--bf16", "--noTF32", "--precisionConstraints")) for a in fp32)
    typed = trtexec_command(
        "m.onnx", "e.engine", profiles, precision="fp16", strongly_typed=True, fp32_layers=["x"]
    )
    assert "--stronglyTyped" in typed and "--fp16" not in typed and "--precisionConstraints=obey" not in typed
    assert shape_spec({"a": (1, 0, 3)}) == "a:1x0x3"
    assert format_command(["trtexec", "--onnx=a b.onnx"]) == "trtexec \\\n    '--onnx=a b.onnx'"
