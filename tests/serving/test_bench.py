"""serving.bench's logic on the tiny bundle (the real benchmark is `make bench`, not a test)."""

from __future__ import annotations

import json

from serving.bench import BenchOptions, main, run_bench


def test_bench_measures_both_backends_side_by_side(tiny_bundle, tmp_path):
    opts = BenchOptions(
        out=tmp_path,
        bundle=tiny_bundle.root,
        batches=[1, 2],
        prompt_len=4,
        new_tokens=3,
        repeats=1,
        threads=1,
    )
    result = run_bench(opts, tiny_bundle)
    assert {(r.backend, r.batch) for r in result.rows} == {
        (b, n) for b in ("torch", "onnxruntime") for n in (1, 2)
    }
    for r in result.rows:
        assert r.prefill_ms > 0 and r.decode_ms_per_step > 0 and r.runs == 1
        assert abs(r.decode_ms_per_token * r.batch - r.decode_ms_per_step) < 1e-9
    assert set(result.ratios()) == {1, 2}
    assert "B=2: onnxruntime vs torch" in result.table()


def test_bench_cli_writes_json(tiny_bundle, tmp_path, capsys):
    assert (
        main(
            [
                "--out",
                str(tmp_path),
                "--bundle",
                str(tiny_bundle.root),
                "--batches",
                "1",
                "--prompt-len",
                "3",
                "--new-tokens",
                "2",
                "--repeats",
                "1",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    data = json.loads((tmp_path / "bench-decode-tiny.json").read_text())
    assert [r["backend"] for r in data["rows"]] == ["torch", "onnxruntime"]
    assert data["baseline"] == "torch" and "1" in data["ratios_over_baseline"]["onnxruntime"]
    assert "| onnxruntime | 1 |" in capsys.readouterr().out


def test_bench_runs_a_precision_variant_of_the_preset(tmp_path):
    """`onnxruntime:int8` exports (and caches) the int8 variant of the same preset and seed."""
    opts = BenchOptions(
        out=tmp_path,
        model="tiny",
        backends=["onnxruntime", "onnxruntime:int8"],
        batches=[1],
        prompt_len=3,
        new_tokens=2,
        repeats=1,
        threads=1,
    )
    result = run_bench(opts)
    assert [r.backend for r in result.rows] == ["onnxruntime", "onnxruntime:int8"]
    assert (tmp_path / "bundles" / "tiny-seed0-int8" / "manifest.json").is_file()
    assert "B=1: onnxruntime:int8 vs onnxruntime" in result.table()
