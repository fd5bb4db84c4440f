"""serving.bench's quick path end to end on the tiny preset (the real benchmark is `make bench`, not a test).

One `--quick` run (module fixture) against the session's tiny bundle: transformers' generate, the
project's torch/onnxruntime backends, the int4 variant (exported from the bundle's own preset),
CTranslate2 where it is installed, Optimum (skipped by --quick), and the gRPC streams scenario.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from serving.bench import BenchOptions, main, run_bench
from serving.bench import peers as bench_peers
from serving.bench.core import BenchResult, Row, StreamRow, prefix_match
from serving.bench.streams import _Stream, summarize

SYSTEMS = "hf-generate,torch,onnxruntime,onnxruntime:int4,ctranslate2:int8,optimum"
HAS_CT2 = importlib.util.find_spec("ctranslate2") is not None


@pytest.fixture(scope="module")
def quick_run(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = [
        "--quick",
        "--out",
        str(out),
        "--bundle",
        str(tiny_bundle.root),
        "--systems",
        SYSTEMS,
        "--threads",
        "1",
    ]
    argv += ["--streams", "1,2", "--quiet"]
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    return out, buf.getvalue(), json.loads((out / "bench-tiny.json").read_text())


def test_quick_run_measures_every_system_with_its_parity(quick_run):
    _, stdout, data = quick_run
    assert data["schema"] == "gpt2-deploy-bench/2" and data["baseline"] == "hf-generate"
    assert data["options"]["quick"] is True and data["options"]["new_tokens"] == 16
    ran = {(r["system"], r["batch"]) for r in data["rows"]}
    expected = ["hf-generate", "torch", "onnxruntime", "onnxruntime:int4"] + (
        ["ctranslate2:int8"] if HAS_CT2 else []
    )
    assert ran == {(s, b) for s in expected for b in (1, 8)}
    for r in data["rows"]:
        assert (
            r["runs"] == 2 and r["prefill_ms"] > 0 and r["step_ms"] > 0 and r["step_ms_best"] <= r["step_ms"]
        )
        assert abs(r["ms_per_token"] * r["batch"] - r["step_ms"]) < 1e-6
        # speed is never quoted without its accuracy
        assert r["speedup_vs_generate"] > 0 and r["top1_agreement"] is not None and r["tolerance"]
        assert 0 <= r["greedy_match"] <= 1 and r["model_mb"] > 0
    by = {(r["system"], r["batch"]): r for r in data["rows"]}
    assert by[("hf-generate", 1)]["speedup_vs_generate"] == 1.0
    for system in ("torch", "onnxruntime"):  # fp32: same logits, the same greedy tokens
        r = by[(system, 1)]
        assert r["max_abs_logits"] < 1e-4 and r["top1_agreement"] == 1.0 and r["greedy_exact"], r
    int4 = by[("onnxruntime:int4", 1)]
    assert int4["tolerance"] == "int4" and int4["parity_passed"] and 0 < int4["max_abs_logits"] < 4
    assert data["systems"]["onnxruntime:int4"]["variant"]["block_size"] == 32
    if HAS_CT2:
        assert by[("ctranslate2:int8", 1)]["tolerance"] == "int8"
    # the table on stdout carries the same rows and the ratio column
    assert "| onnxruntime:int4 | 1 |" in stdout and "vs generate" in stdout and "max\\|Δlogits\\|" in stdout


def test_quick_run_reports_skips_with_their_reason(quick_run):
    _, stdout, data = quick_run
    skipped = {s["system"]: s for s in data["skipped"]}
    assert "not run by --quick" in skipped["optimum"]["reason"]
    assert "SKIP optimum: not run by --quick" in stdout
    if not HAS_CT2:
        assert skipped["ctranslate2:int8"]["install"].startswith("pip install 'gpt2-deploy[bench]'")


def test_quick_run_writes_machine_info_plots_and_streams(quick_run):
    out, stdout, data = quick_run
    m = data["machine"]
    assert m["cpu_count"] >= 1 and m["threads"] == 1 and isinstance(m["isa"], list)
    assert m["versions"]["onnxruntime"] and m["versions"]["transformers"] and m["loadavg_end"]
    assert sorted(p.rsplit("/", 1)[-1] for p in data["plots"]) == [
        "bench-latency-tiny.png",
        "bench-streams-tiny.png",
    ]
    for p in data["plots"]:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    streams = data["streams"]
    assert [(s["system"], s["streams"]) for s in streams] == [("onnxruntime", 1), ("onnxruntime", 2)]
    for s in streams:  # every stream got its 16 tokens over real gRPC
        assert s["errors"] == 0 and s["tokens"] == 16 * s["streams"] and s["tokens_per_s"] > 0
        assert 0 <= s["tbt_p50_ms"] <= s["tbt_p99_ms"] and 0 < s["ttft_p50_ms"] <= s["ttft_p99_ms"]
    assert "| onnxruntime | 2 |" in stdout


def test_missing_peers_are_skipped_with_their_install_line(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setitem(bench_peers.PEER_MODULES, "ctranslate2", "ctranslate2_absent_for_this_test")
    monkeypatch.setitem(bench_peers.PEER_MODULES, "llama.cpp", "llama_cpp_absent_for_this_test")
    opts = BenchOptions(
        out=tmp_path,
        bundle=tiny_bundle.root,
        systems=["onnxruntime", "ctranslate2:float32", "llama.cpp:q8_0"],
        batches=[1],
        prompt_len=4,
        new_tokens=3,
        rounds=1,
        threads=1,
        streams=[],
        parity_sequences=1,
        progress=False,
    )
    result = run_bench(opts, tiny_bundle)
    assert [r.system for r in result.rows] == ["onnxruntime"]
    lines = {s.system: s.line() for s in result.skipped}
    assert lines["ctranslate2:float32"].startswith(
        "SKIP ctranslate2:float32: ctranslate2_absent_for_this_test is not installed -- install: "
        "pip install 'gpt2-deploy[bench]'"
    )
    assert "pip install llama-cpp-python" in lines["llama.cpp:q8_0"]
    # no transformers row: the ratio column is empty rather than made up
    assert result.rows[0].speedup_vs_generate is None and result.int4_goal() is None


def test_prefix_match_and_int4_goal():
    assert prefix_match([[1, 2, 3, 4]], [[1, 2, 3, 4]]) == 1.0
    assert prefix_match([[1, 2, 9, 4], [5, 6, 7, 8]], [[1, 2, 3, 4], [5, 6, 7, 8]]) == pytest.approx(0.75)

    def row(system, step):
        return Row(system, "project", 1, 1, 1.0, 1.0, step, step, step, 1e3 / step, 1.0)

    result = BenchResult({}, {}, {}, [row("onnxruntime:int8", 10.0), row("onnxruntime:int4", 6.0)], [])
    goal = result.int4_goal()
    assert goal["int4_over_int8"] == pytest.approx(0.6) and goal["ratio_met"]
    assert not goal["met"]  # the peers were not measured: the goal cannot be claimed
    result.rows += [row("ctranslate2:int8", 7.0), row("llama.cpp:q8_0", 5.0)]
    goal = result.int4_goal()
    assert (
        goal["peers"]["ctranslate2:int8"]["int4_ahead"] and not goal["peers"]["llama.cpp:q8_0"]["int4_ahead"]
    )
    assert not goal["met"]


def test_streams_summary_counts_gaps_per_token():
    s1 = _Stream(start=0.0, stamps=[(0.1, 1), (0.2, 1), (0.4, 2)])
    s2 = _Stream(start=0.0, error="UNAVAILABLE")
    row = summarize("onnxruntime", [s1, s2])
    assert isinstance(row, StreamRow) and row.streams == 2 and row.errors == 1 and row.tokens == 4
    assert row.ttft_p50_ms == pytest.approx(100.0) and row.wall_s == pytest.approx(0.4)
    assert row.tokens_per_s == pytest.approx(10.0)
    assert row.tbt_p50_ms == pytest.approx(100.0)  # gaps: 0.1, then 0.1 + 0.1 for the 2-token message
