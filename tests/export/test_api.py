"""ExportOptions checks and the Progress steps' output capture (no export needed)."""

from __future__ import annotations

import os
import sys

import pytest

from export.api import ExportOptions, Progress, export_bundle
from export.sources import SourceError


def test_progress_captures_chatter_and_replays_it_only_on_unexpected_failure(capfd):
    p = Progress(total=3)
    with p.step("noisy step"):
        print("python chatter")
        os.write(2, b"native chatter\n")  # what C++ libraries (ONNX Runtime) write
    out, err = capfd.readouterr()
    assert "chatter" not in out + err
    assert "[1/3] noisy step ..." in err and "[1/3] noisy step: done in" in err
    assert "noisy step" in p.timings

    with pytest.raises(SourceError):
        with p.step("user error"):
            print("irrelevant detail")
            raise SourceError("bad --model")
    out, err = capfd.readouterr()
    assert "irrelevant detail" not in out + err  # the error message says it all

    with pytest.raises(RuntimeError):
        with p.step("crash"):
            print("the clue", file=sys.stderr)
            raise RuntimeError("boom")
    _, err = capfd.readouterr()
    assert "captured output (last lines)" in err and "the clue" in err


def test_verbose_and_quiet(capfd):
    with Progress(total=1, verbose=True).step("loud"):
        print("shown")
    out, err = capfd.readouterr()
    assert "shown" in out and "[1/1] loud" in err
    with Progress(total=1, quiet=True).step("silent"):
        pass
    out, err = capfd.readouterr()
    assert out == err == ""


def test_options_are_checked_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"precision 'fp8' is not supported; choose one of fp32, fp16, int8, "
                                         r"ort-fused"):
        export_bundle(ExportOptions(model="tiny", out=tmp_path / "b", precision="fp8"))
    assert not (tmp_path / "b").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file; give a directory path"):
        export_bundle(ExportOptions(model="tiny", out=tmp_path / "file", quiet=True))


def test_a_crashed_export_leaves_no_half_written_bundle(tmp_path, monkeypatch, capfd):
    from export import variants

    def crash(*args, **kwargs):
        print("converter internals")
        raise RuntimeError("converter crashed")

    monkeypatch.setattr(variants, "make_variant", crash)
    out = tmp_path / "b"
    with pytest.raises(RuntimeError, match="converter crashed"):
        export_bundle(ExportOptions(model="tiny", out=out, reference=False))
    assert not out.exists()  # so the next export to the same --out is not refused
    assert "converter internals" in capfd.readouterr().err  # the failed step's captured output
