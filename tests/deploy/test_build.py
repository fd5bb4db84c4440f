"""`gpt2-deploy build`: option checks, the build plan on a real bundle, --print-trtexec without TensorRT,
the error when TensorRT is absent; and (marked trt) real fp32/fp16 engine builds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deploy.cuda import tensorrt_unavailable_reason
from deploy.engine import EngineEntry
from deploy.trt_build import (
    BuildError,
    BuildOptions,
    build_engine,
    onnx_fp32_names,
    onnx_fp32_node_names,
    parse_size,
    plan_build,
)
from export.deps import MissingDependencyError
from export.errors import OptionsError
from export.manifest import Bundle
from serving.cli import app

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
        device=-1,
    )
    with pytest.raises(OptionsError) as e:
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
        "device must be a CUDA device index >= 0, got -1",
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
    # 2 blocks x 2 LayerNorms + ln_f, one Softmax per block, the residual Adds (embedding sum + 2 per
    # block) and the lm_head matmul
    assert kinds.count("LayerNormalization") == 5 and kinds.count("Softmax") == 2
    assert kinds.count("Add") == 5 and kinds.count("MatMul") + kinds.count("Gemm") == 1
    groups = onnx_fp32_names(tiny_bundle.onnx_path)
    assert len(groups["residual_adds"]) == 5 and names == list(dict.fromkeys(names))  # no duplicates


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
        "from serving.cli import main; main()"
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
        # pinned by ONNX node name: the residual stream (embedding sum + 2 per block) and the lm_head
        assert entry.fp32_layers["residual_adds"] >= 4 and entry.fp32_layers["lm_head"] >= 1


@pytest.mark.trt
def test_build_on_a_missing_device_is_a_build_error(trt_bundle):
    with pytest.raises(BuildError, match="cannot use CUDA device 99"):
        build_engine(trt_bundle, BuildOptions(preset="orin-nano", device=99, progress=False))


def _with_precision(bundle, tmp_path, precision):
    """A copy of the tiny bundle whose manifest says ``precision`` (plan_build reads only that)."""
    import dataclasses
    import shutil

    dst = tmp_path / f"tiny-{precision}"
    shutil.copytree(bundle.root, dst)
    b = Bundle.open(dst)
    b.update_manifest(lambda m: dataclasses.replace(m, precision=precision))
    return Bundle.open(dst)


@pytest.mark.parametrize("precision", ["int8", "ort-fused"])
def test_bundles_tensorrt_cannot_parse_are_refused(tiny_bundle, tmp_path, precision):
    b = _with_precision(tiny_bundle, tmp_path, precision)
    with pytest.raises(
        OptionsError,
        match=rf"graph is {precision}; TensorRT builds from fp32 or fp16 bundles"
        r" only .* export an fp32 bundle",
    ):
        plan_build(b, BuildOptions())
    res = CliRunner().invoke(app, ["build", str(b.root), "--print-trtexec"])
    assert res.exit_code == 2 and "fp32 or fp16 bundles only" in res.output


def test_fp32_build_of_an_fp16_bundle_records_fp16(tiny_bundle, tmp_path):
    b = _with_precision(tiny_bundle, tmp_path, "fp16")
    plan = plan_build(b, BuildOptions(precision="fp32"))
    assert plan.precision == "fp32" and plan.engine_precision == "fp16"
    assert any("computes in fp16 and is recorded as fp16" in n for n in plan.notes)
    assert plan_build(b, BuildOptions(precision="fp16")).engine_precision == "fp16"


def test_bf16_from_an_fp16_bundle_is_refused_not_recorded_as_bf16(tiny_bundle, tmp_path):
    """The graph carries fp16 types: TensorRT 11 would run fp16 and the entry would say bf16 (then
    checked with bf16's looser tolerance). Refused before anything is built, with the way out."""
    b = _with_precision(tiny_bundle, tmp_path, "fp16")
    with pytest.raises(OptionsError, match=r"graph is fp16 .* a bf16 engine cannot be built from it"):
        plan_build(b, BuildOptions(precision="bf16"))
    for major in ("10", "11"):
        res = CliRunner().invoke(
            app, ["build", str(b.root), "--precision", "bf16", "--trt-major", major, "--print-trtexec"]
        )
        assert res.exit_code == 2 and "export an fp32 bundle for a bf16 engine" in res.output, res.output
    assert plan_build(tiny_bundle, BuildOptions(precision="bf16")).engine_precision == "bf16"  # fp32 bundle


def test_clipped_overrides_are_noted_and_printed(tiny_bundle):
    plan = plan_build(tiny_bundle, BuildOptions(preset="server", max_context=4096, max_prompt=1000))
    assert (plan.limits.max_context, plan.limits.max_prompt) == (256, 256)
    assert "--max-context 4096 is more than the model's 256 positions: clipped to 256" in plan.notes
    assert "--max-prompt 1000 is more than the max context: clipped to 256" in plan.notes
    assert not plan_build(tiny_bundle, BuildOptions(preset="server", max_context=128)).notes
    res = CliRunner().invoke(
        app, ["build", str(tiny_bundle.root), "--max-context", "4096", "--print-trtexec"]
    )
    assert res.exit_code == 0 and "# note: --max-context 4096 is more than" in res.output


def test_print_trtexec_for_tensorrt_11_converts_first(tiny_bundle, tmp_path):
    """TensorRT 11's trtexec has no --fp16/--layerPrecisions: the printed conversion step (run here
    for real) writes the fp16 graph, and the trtexec line builds it strongly typed."""
    import onnx

    from deploy.trtexec import format_command

    res = CliRunner().invoke(
        app, ["build", str(tiny_bundle.root), "--preset", "orin-nano", "--trt-major", "11", "--print-trtexec"]
    )
    assert res.exit_code == 0, res.output
    out = res.output
    assert "TensorRT 11" in out and "make_variant(" in out and "--stronglyTyped" in out
    for removed in ("--fp16", "--bf16", "--precisionConstraints", "--layerPrecisions", "--layerOutputTypes"):
        assert removed not in out
    plan = plan_build(tiny_bundle, BuildOptions(preset="orin-nano"))
    convert, trtexec = plan.trtexec_steps(11)
    converted = plan.engine_path.with_suffix(".fp16.onnx")
    assert f"--onnx={converted}" in trtexec
    assert format_command(convert) in out
    # the printed step, run as printed, but writing into tmp_path (the session bundle stays clean)
    code = convert[2].replace(str(converted), str(tmp_path / "m.onnx"))
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
    g = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in g.graph.initializer)
    # fp32 needs no conversion (only the generation graph, then trtexec); TensorRT 10 keeps the
    # precision flags; bf16 has no converter here
    derive, _ = plan_build(tiny_bundle, BuildOptions(precision="fp32")).trtexec_steps(11)
    assert "write_generation_graph(" in derive[2] and "make_variant(" not in derive[2]
    assert "--fp16" in plan.trtexec_steps(10)[-1]
    with pytest.raises(OptionsError, match="ModelOpt AutoCast"):
        plan_build(tiny_bundle, BuildOptions(precision="bf16")).trtexec_steps(11)
    with pytest.raises(OptionsError, match="--trt-major must be 10 or 11, got 9"):
        plan.trtexec_steps(9)


def test_build_help_lists_the_presets_with_their_reasons():
    from deploy.presets import PRESETS

    res = CliRunner().invoke(app, ["build", "--help"], env={"COLUMNS": "400"})
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    for p in PRESETS.values():
        assert p.name in text and p.description.split()[0] in text
    assert "KV ping-pong" in text  # a ``why``


# --- recording engines: concurrent builds keep every entry ---------------------------------------------
def _fake_built(bundle, name: str) -> tuple[EngineEntry, dict[str, str]]:
    """What build_engine has before it records: a plan file on disk and its entry (no TensorRT:
    only the manifest bookkeeping is under test here; nothing pretends this plan runs)."""
    rel = f"engines/{name}.engine"
    (bundle.root / rel).parent.mkdir(exist_ok=True)
    (bundle.root / rel).write_bytes(name.encode() * 64)
    m = bundle.manifest
    entry = EngineEntry(
        file=rel,
        tensorrt_version="10.13.3.9",
        gpu_name="test",
        compute_capability="9.0",
        precision="fp16",
        profiles=[],
        onnx_file=m.model_file,
        onnx_sha256=m.files[m.model_file].sha256,
    )
    return entry, {rel: "engine"}


def _record_in_process(root: str, names: list[str], start) -> None:
    from deploy.trt_build import record_engine

    start.wait()
    for name in names:
        b = Bundle.open(root, verify_hashes=False)  # each build opens the bundle, builds, then records
        record_engine(b, *_fake_built(b, name))


def test_concurrent_builds_record_every_engine(tiny_bundle, tmp_path):
    import multiprocessing
    import shutil

    root = tmp_path / "b"
    shutil.copytree(tiny_bundle.root, root)
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(3)
    names = [[f"p{p}-{i}" for i in range(8)] for p in range(3)]
    procs = [ctx.Process(target=_record_in_process, args=(str(root), n, start)) for n in names]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    b = Bundle.open(root)  # every engine file recorded with its hash, nothing else lost
    recorded = sorted(e["file"] for e in b.manifest.engines)
    assert recorded == sorted(f"engines/{n}.engine" for ns in names for n in ns)
    assert all(b.manifest.files[f].role == "engine" for f in recorded)
    assert b.manifest.files.keys() >= tiny_bundle.manifest.files.keys()


def test_an_engine_of_a_re_exported_graph_is_not_recorded(tiny_bundle, tmp_path):
    import dataclasses
    import shutil

    from deploy.trt_build import record_engine
    from export.manifest import FileEntry

    root = tmp_path / "b"
    shutil.copytree(tiny_bundle.root, root)
    b = Bundle.open(root)
    entry, roles = _fake_built(b, "server-fp16")
    Bundle.open(root).update_manifest(  # meanwhile the graph was replaced
        lambda m: dataclasses.replace(
            m, files={**m.files, m.model_file: FileEntry("0" * 64, m.files[m.model_file].bytes, "onnx")}
        )
    )
    with pytest.raises(BuildError, match=r"model.onnx changed while the engine was built from it"):
        record_engine(b, entry, roles)
    assert json.loads((root / "manifest.json").read_text())["engines"] == []
