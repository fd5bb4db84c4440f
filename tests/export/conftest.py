from __future__ import annotations

import shutil

import pytest


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    """A writable copy of the tiny bundle's directory (for tests that tamper with it)."""
    dst = tmp_path / "copy"
    shutil.copytree(tiny_bundle.root, dst)
    return dst
