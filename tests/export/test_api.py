"""ExportOptions checks and the Progress steps' output capture (no export needed)."""

from __future__ import annotations

import os
import sys

import pytest

from export.api import ExportOptions, Progress, export_bundle
from export.errors import OptionsError
from export.sources import SourceError
from export.variants import EXPORT_PRECISIONS


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
    with pytest.raises(
        OptionsError, match=rf"precision 'fp8' is not supported; choose one of {', '.join(EXPORT_PRECISIONS)}"
    ):
        export_bundle(ExportOptions(model="tiny", out=tmp_path / "b", precision="fp8"))
    per_channel = ExportOptions(model="tiny", out=tmp_path / "b", precision="fp16", int8_per_channel=True)
    with pytest.raises(OptionsError, match=r"--int8-per-channel applies to --precision int8 only"):
        export_bundle(per_channel)
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
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no half-written bundle, no temp dir
    assert "converter internals" in capfd.readouterr().err  # the failed step's captured output


def test_a_directory_with_a_foreign_manifest_is_refused_and_left_intact(tmp_path):
    app = tmp_path / "webapp"
    app.mkdir()
    (app / "manifest.json").write_text('{"name": "app"}')
    (app / "index.html").write_text("<html></html>")
    with pytest.raises(FileExistsError, match=r"not a gpt2-deploy bundle: its manifest.json has schema None"):
        export_bundle(ExportOptions(model="tiny", out=app, quiet=True))
    assert sorted(p.name for p in app.iterdir()) == ["index.html", "manifest.json"]
    assert (app / "manifest.json").read_text() == '{"name": "app"}'
    (app / "manifest.json").write_text("not json")
    with pytest.raises(FileExistsError, match=r"schema 'unreadable \(JSONDecodeError\)'"):
        export_bundle(ExportOptions(model="tiny", out=app, quiet=True))
    assert (app / "index.html").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["webapp"]  # no temporary directory left


def test_a_failed_re_export_keeps_the_previous_bundle(tiny_bundle, tmp_path, monkeypatch):
    import shutil

    from export import variants
    from export.manifest import Bundle

    out = tmp_path / "b"
    shutil.copytree(tiny_bundle.root, out)
    (out / "engines").mkdir()
    (out / "engines" / "server-fp16.engine").write_bytes(b"plan")  # not hashed: Bundle.open ignores it
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))

    def crash(*args, **kwargs):
        raise RuntimeError("converter crashed")

    monkeypatch.setattr(variants, "make_variant", crash)
    with pytest.raises(RuntimeError, match="converter crashed"):
        export_bundle(ExportOptions(model="tiny", out=out, reference=False, validate=False, quiet=True))
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
    assert (out / "engines" / "server-fp16.engine").read_bytes() == b"plan"
    Bundle.open(out)  # hashes still match
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # the temporary directory is gone


def test_the_swap_waits_for_a_writer_holding_the_previous_bundles_manifest_lock(tmp_path):
    """A build recording its engine in the previous bundle finishes before the new bundle moves in."""
    import threading
    import time

    from export.api import _swap_in
    from export.manifest import manifest_lock

    out, work = tmp_path / "b", tmp_path / ".b.tmp-1"
    out.mkdir()
    (out / "manifest.json").write_text("old")
    work.mkdir()
    (work / "manifest.json").write_text("new")
    held, release = threading.Event(), threading.Event()

    def writer():
        with manifest_lock(out):
            held.set()
            release.wait(5)

    t = threading.Thread(target=writer)
    t.start()
    held.wait(5)
    threading.Timer(0.5, release.set).start()
    t0 = time.monotonic()
    _swap_in(work, out)
    waited = time.monotonic() - t0
    t.join()
    assert waited >= 0.4, waited
    assert (out / "manifest.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # the previous bundle is gone
