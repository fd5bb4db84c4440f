"""`gpt2-deploy build`: option checks, the build plan on a real bundle, --print-trtexec without TensorRT,
the error when TensorRT is absent; and (marked trt) real fp32/fp16 engine builds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deploy.cli import app
from deploy.engine import EngineEntry, tensorrt_unavailable_reason
from deploy.trt_build import BuildOptions, build_engine, onnx_fp32_node_names, parse_size, plan_build
from export.deps import MissingDependencyError
from export.manifest import Bundle

REPO = Path(__file__).resolve().parents[2]


def test_parse_size():
    assert parse_size("2G") == 2 << 30 and parse_size("512MiB") == 512 << 20 and parse_size("1024") == 1024
    with pytest.raises(ValueError, match="not a size: 'lots'"):
        parse_size("lots")


def test_options_report_every_problem_at_once():
    bad = BuildOptions(
        preset="jetson",
        precision="int4",
        workspace="x",
        opt_level=9,
        exclude_lean_runtime=True,
        hardware_compat="turing",
        name="../evil",
    )
    with pytest.raises(ValueError) as e:
        bad.check()
    msg = str(e.value)
    for part in (
        "unknown preset 'jetson'",
        "precision 'int4'",
        "not a size: 'x'",
        "opt level must be in 0..5",
        "--exclude-lean-runtime needs --version-compatible",
        "hardware compat 'turing'",
        "engine name '../evil'",
    ):
        assert part in msg, part


def test_plan_on_the_tiny_bundle(tiny_bundle):
    plan = plan_build(tiny_bundle, BuildOptions(preset="orin-nano", version_compatible=True))
    assert plan.precision == "fp16" and plan.workspace == 1 << 30
    assert plan.engine_rel == "engines/orin-nano-fp16-vc.engine"
    assert plan.timing_cache == tiny_bundle.root / "engines" / "orin-nano-fp16-vc.timing.cache"
    assert plan.timing_cache_rel == "engines/orin-nano-fp16-vc.timing.cache"
    # the tiny model has 256 positions: the preset's 512 is clipped
    assert (plan.limits.max_context, plan.limits.max_prompt, plan.limits.max_batch) == (256, 256, 2)
    assert plan.profiles[1].axis_range(tiny_bundle.contract, "past") == (1, 128, 255)


def test_fp32_nodes_found_in_the_exported_graph(tiny_bundle):
    names = onnx_fp32_node_names(tiny_bundle.onnx_path)
    import onnx

    ops = {
        n.name: n.op_type for n in onnx.load(str(tiny_bundle.onnx_path), load_external_data=False).graph.node
    }
    kinds = [ops[n] for n in names]
    # 2 blocks x 2 LayerNorms + ln_f, one Softmax per block, and the lm_head matmul last
    assert kinds.count("LayerNormalization") == 5 and kinds.count("Softmax") == 2
    assert kinds[-1] in ("MatMul", "Gemm")


def test_print_trtexec_cli(tiny_bundle):
    res = CliRunner().invoke(
        app,
        [
            "build",
            str(tiny_bundle.root),
            "--preset",
            "orin-nx",
            "--precision",
            "fp32",
            "--opt-level",
            "2",
            "--workspace",
            "512M",
            "--print-trtexec",
        ],
    )
    assert res.exit_code == 0, res.output
    assert (
        "trtexec" in res.output and "--noTF32" in res.output and "--memPoolSize=workspace:512" in res.output
    )
    assert "--builderOptimizationLevel=2" in res.output and "past_key_values.1.value:4x4x255x16" in res.output
    assert not (tiny_bundle.root / "engines").exists()  # printing builds nothing


def test_bad_cli_options_exit_2_with_the_reasons(tiny_bundle):
    res = CliRunner().invoke(app, ["build", str(tiny_bundle.root), "--preset", "nope", "--print-trtexec"])
    assert res.exit_code == 2 and "unknown preset 'nope'" in res.output


def test_print_trtexec_works_without_torch_and_tensorrt(tiny_bundle):
    """A fresh interpreter where torch and tensorrt cannot be imported at all."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['tensorrt'] = None; "
        "sys.modules['transformers'] = None; sys.argv = ['gpt2-deploy'] + sys.argv[1:]; "
        "from deploy.cli import main; main()"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "build",
            str(tiny_bundle.root),
            "--print-trtexec",
            "--preset",
            "agx-orin",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--fp16" in proc.stdout and "--layerPrecisions=" in proc.stdout


@pytest.mark.skipif(tensorrt_unavailable_reason() is None, reason="TensorRT is installed here")
def test_build_without_tensorrt_names_the_extra(tiny_bundle):
    with pytest.raises(MissingDependencyError, match=r"gpt2-deploy\[tensorrt\]"):
        build_engine(tiny_bundle, BuildOptions(preset="orin-nano", progress=False))
    res = CliRunner().invoke(app, ["build", str(tiny_bundle.root), "--no-progress"])
    assert res.exit_code == 1 and "TensorRT" in res.output


# --- real builds (TensorRT + GPU) ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trt_bundle(tiny_bundle, tmp_path_factory, trt_or_skip):
    """A private copy of the tiny bundle to build engines into (the session bundle stays clean)."""
    import shutil

    dst = tmp_path_factory.mktemp("trt") / "tiny"
    shutil.copytree(tiny_bundle.root, dst)
    return Bundle.open(dst)


@pytest.mark.trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_build_tiny_engine(trt_bundle, precision):
    opts = BuildOptions(preset="orin-nano", precision=precision, max_batch=2, opt_level=1, progress=False)
    entry = build_engine(trt_bundle, opts)
    again = Bundle.open(trt_bundle.root)  # hashes of engine + timing cache check out
    recorded = EngineEntry.from_json(again.manifest.engines[-1])
    assert recorded == entry and entry.precision == precision
    assert again.manifest.files[entry.file].role == "engine"
    assert (trt_bundle.root / entry.file).stat().st_size > 0
    assert entry.timing_cache and (trt_bundle.root / entry.timing_cache).is_file()
    assert entry.onnx_sha256 == again.manifest.files["model.onnx"].sha256
    assert [p["name"] for p in entry.profile_summary] == ["context", "generation"]
    if precision == "fp16" and not entry.flags["strongly_typed"]:
        assert entry.fp32_layers["normalization"] >= 5 and entry.fp32_layers["logits"] >= 1
