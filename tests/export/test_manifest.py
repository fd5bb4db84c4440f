"""Manifest round trip and schema errors; Bundle.open's precise messages for broken bundles."""

from __future__ import annotations

import json

import pytest

from export.contract import IOContract
from export.manifest import MANIFEST_FILE, SCHEMA_VERSION, Bundle, BundleError, Manifest, ModelDims


def _manifest() -> Manifest:
    dims = ModelDims(
        n_layer=2,
        n_head=4,
        n_embd=64,
        vocab_size=50257,
        n_positions=256,
        eos_token_id=50256,
        bos_token_id=50256,
    )
    return Manifest(
        name="tiny",
        source="tiny",
        dims=dims,
        contract=IOContract(2, 4, 16, 50257),
        model_file="model.onnx",
        precision="fp32",
        files={},
        export={"opset": 18},
        validation={"passed": True},
    )


def test_round_trip(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"graph")
    (tmp_path / "config.json").write_text("{}")
    m = _manifest().with_files(tmp_path, {"model.onnx": "onnx", "config.json": "config"})
    m.write(tmp_path)
    back = Manifest.from_json(json.loads((tmp_path / MANIFEST_FILE).read_text()))
    assert back == m
    assert back.files["model.onnx"].bytes == 5 and len(back.files["model.onnx"].sha256) == 64
    assert back.dims.n_positions == 256 and back.dims.head_dim == 16
    b = Bundle.open(tmp_path)
    assert b.name == "tiny" and b.onnx_path == tmp_path / "model.onnx"


def test_schema_errors_are_named(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"graph")
    _manifest().with_files(tmp_path, {"model.onnx": "onnx"}).write(tmp_path)
    raw = json.loads((tmp_path / MANIFEST_FILE).read_text())

    def write(d):
        (tmp_path / MANIFEST_FILE).write_text(json.dumps(d))

    write({**raw, "schema_version": SCHEMA_VERSION + 1})
    with pytest.raises(
        BundleError,
        match=rf"schema_version {SCHEMA_VERSION + 1} is not supported; "
        rf"this gpt2-deploy reads version {SCHEMA_VERSION}",
    ):
        Bundle.open(tmp_path)
    write({**raw, "schema": "someone-else"})
    with pytest.raises(BundleError, match=r"schema 'someone-else', expected 'gpt2-deploy.bundle'"):
        Bundle.open(tmp_path)
    write({k: v for k, v in raw.items() if k != "dims"})
    with pytest.raises(BundleError, match=r"manifest.json is malformed: KeyError: 'dims'"):
        Bundle.open(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(BundleError, match="manifest.json is not valid JSON"):
        Bundle.open(tmp_path)


def test_tampered_and_missing_files_are_all_listed(bundle_copy):
    with open(bundle_copy / "model.onnx", "r+b") as f:  # same size, different bytes
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    (bundle_copy / "tokenizer.json").unlink()
    with pytest.raises(BundleError) as e:
        Bundle.open(bundle_copy)
    msg = str(e.value)
    assert len(e.value.problems) == 2, msg
    assert "model.onnx: sha256 is" in msg and "(modified after export?)" in msg
    assert "tokenizer.json: missing (tokenizer," in msg
    # without hash checks the tampered file passes; the missing one still does not
    with pytest.raises(BundleError, match="tokenizer.json: missing"):
        Bundle.open(bundle_copy, verify_hashes=False)


def test_truncated_file_reports_its_size(bundle_copy):
    data = (bundle_copy / "config.json").read_bytes()
    (bundle_copy / "config.json").write_bytes(data[:-10])
    with pytest.raises(
        BundleError,
        match=rf"config.json: size is {len(data) - 10} bytes, "
        rf"manifest says {len(data)}",
    ):
        Bundle.open(bundle_copy)


def test_foreign_and_missing_directories(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(
        BundleError,
        match=r"no manifest.json \(found: \['weights.bin'\]\); create a bundle "
        r"with `gpt2-deploy export`",
    ):
        Bundle.open(tmp_path)
    with pytest.raises(BundleError, match="the directory does not exist"):
        Bundle.open(tmp_path / "nope")
    with pytest.raises(BundleError, match="it is a file, not a bundle directory"):
        Bundle.open(tmp_path / "weights.bin")


# --- concurrent writers (bug: two `build` runs lost a manifest entry) ------------------------------------
WRITERS, UPDATES = 4, 15


def _add_keys(root, writer: int, start) -> None:
    """One writer: wait for the others, then add UPDATES keys of its own, one update each."""
    from dataclasses import replace

    start.wait()
    b = Bundle.open(root, verify_hashes=False)
    for i in range(UPDATES):
        b.update_manifest(lambda m, k=f"w{writer}-{i}": replace(m, export={**m.export, k: True}))


def _race(root, start, spawn) -> None:
    workers = [spawn(target=_add_keys, args=(root, w, start)) for w in range(WRITERS)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert all(getattr(w, "exitcode", 0) == 0 for w in workers)


def _check_every_update_kept(root) -> None:
    m = Bundle.open(root).manifest
    want = {f"w{w}-{i}" for w in range(WRITERS) for i in range(UPDATES)}
    assert want <= set(m.export), f"lost updates: {sorted(want - set(m.export))[:5]}"
    leftovers = sorted(p.name for p in root.iterdir() if p.name.endswith(".tmp"))
    assert leftovers == []  # every temporary manifest was renamed into place or removed


def test_concurrent_threads_keep_every_update(tmp_path):
    import threading

    (tmp_path / "model.onnx").write_bytes(b"graph")
    _manifest().with_files(tmp_path, {"model.onnx": "onnx"}).write(tmp_path)
    _race(tmp_path, threading.Barrier(WRITERS), threading.Thread)
    _check_every_update_kept(tmp_path)


def test_concurrent_processes_keep_every_update(tmp_path):
    import multiprocessing

    (tmp_path / "model.onnx").write_bytes(b"graph")
    _manifest().with_files(tmp_path, {"model.onnx": "onnx"}).write(tmp_path)
    ctx = multiprocessing.get_context("fork")
    _race(tmp_path, ctx.Barrier(WRITERS), ctx.Process)
    _check_every_update_kept(tmp_path)


def test_update_reads_the_manifest_on_disk_not_the_one_opened(tmp_path):
    from dataclasses import replace

    (tmp_path / "model.onnx").write_bytes(b"graph")
    _manifest().with_files(tmp_path, {"model.onnx": "onnx"}).write(tmp_path)
    first, second = Bundle.open(tmp_path), Bundle.open(tmp_path)
    first.update_manifest(lambda m: replace(m, export={**m.export, "a": 1}))
    written = second.update_manifest(lambda m: replace(m, export={**m.export, "b": 2}))
    assert written.export == {"opset": 18, "a": 1, "b": 2} == Bundle.open(tmp_path).manifest.export
    assert second.manifest == written


def test_a_held_lock_times_out_with_a_bundle_error(tmp_path):
    from export.manifest import LOCK_FILE, manifest_lock

    with manifest_lock(tmp_path):
        with pytest.raises(BundleError, match=rf"{LOCK_FILE} is held by another writer for more than 0.2 s"):
            with manifest_lock(tmp_path, timeout=0.2):
                pass
    with manifest_lock(tmp_path, timeout=0.2):  # released: free again
        pass
