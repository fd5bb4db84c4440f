"""Shared fixtures: the `tiny` preset exported once per session (a real export, real ONNX)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """The `tiny` preset (2 layers, 64 dims, 4 heads, 50257 vocab, 256 positions), fp32, seed 0."""
    from export.api import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    return export_bundle(ExportOptions(model="tiny", out=out, seed=0, quiet=True))
