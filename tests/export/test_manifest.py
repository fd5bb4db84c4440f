"""Manifest round trip and schema errors; Bundle.open's precise messages for broken bundles."""

from __future__ import annotations

import json
import shutil

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


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(tiny_bundle.root, dst)
    return dst


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
