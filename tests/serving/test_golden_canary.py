"""The startup canary and `parity --golden` against the bundle's golden record, without torch.

The torch-free runs are real `gpt2-deploy` processes in an interpreter where torch and
transformers cannot be imported (an import hook, as on a machine where `gpt2-deploy[cpu]` alone
is installed): the server reaches SERVING with the canary passed, and a deliberately perturbed
backend is refused (NOT_SERVING with --parity warn, exit 3 with --parity strict).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from serving.backends.ort_backend import OrtBackend
from serving.client import Gpt2DeployClient
from serving.server import EXIT_PARITY, ServeOptions, build_server, free_port

ROOT = Path(__file__).resolve().parents[2]
NO_TORCH = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} is not installed here (blocked for this test)")
sys.meta_path.insert(0, _Block())
"""
# A real ONNX Runtime backend whose logits really diverge, registered under a name of its own.
NOISY = """
import numpy as np
from serving import backends
from serving.backends.ort_backend import OrtBackend
class Noisy(OrtBackend):
    def _forward(self, *args):
        out = super()._forward(*args)
        out.logits = out.logits + np.random.default_rng(0).normal(0, 0.5, out.logits.shape).astype(np.float32)
        return out
backends.REGISTRY["noisy"] = "__main__:Noisy"
"""


def _python(code: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", NO_TORCH + textwrap.dedent(code), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _serve(bundle, port: int, *extra: str, noisy: bool = False) -> subprocess.Popen:
    run = 'from serving.cli import main\nsys.argv = ["gpt2-deploy", "serve", *sys.argv[1:]]\nmain()\n'
    code = (NOISY if noisy else "") + run
    args = [str(bundle.root), "--port", str(port), "--threads", "1", "--grace", "2", *extra]
    if noisy:
        args += ["--backend", "noisy"]
    return _python(code, *args)


def test_serve_without_torch_passes_the_golden_canary(tiny_bundle):
    port = free_port()
    proc = _serve(tiny_bundle, port, "--parity", "strict")
    try:
        with Gpt2DeployClient(f"127.0.0.1:{port}", timeout=30) as c:
            c.wait_until_serving(120, alive=lambda: proc.poll() is None)
            info = c.model_info()
            assert info.canary == "passed" and info.ready
            assert '"reference": "golden"' in info.canary_report_json
            assert len(c.generate("Hello", max_new_tokens=3, ignore_eos=True).result().token_ids) == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert "startup canary" in err and "golden" in err


def test_a_perturbed_backend_is_refused_without_torch(tiny_bundle):
    strict = _serve(tiny_bundle, free_port(), "--parity", "strict", noisy=True)
    _, err = strict.communicate(timeout=180)
    assert strict.returncode == EXIT_PARITY, err[-2000:]
    assert "startup canary FAILED" in err and "golden" in err
    port = free_port()
    warn = _serve(tiny_bundle, port, "--parity", "warn", noisy=True)
    try:
        with Gpt2DeployClient(f"127.0.0.1:{port}", timeout=30) as c:
            deadline = time.monotonic() + 120
            while c.health() != "NOT_SERVING" or c.model_info().canary != "failed":
                assert warn.poll() is None and time.monotonic() < deadline, "never reported the failure"
                time.sleep(0.2)
    finally:
        warn.send_signal(signal.SIGTERM)
        warn.communicate(timeout=60)
    assert warn.returncode == 0


def test_parity_golden_cli_works_without_torch(tiny_bundle):
    proc = _python(
        """
        from serving.cli import main
        sys.argv = ["gpt2-deploy", "parity", *sys.argv[1:]]
        main()
        """,
        str(tiny_bundle.root),
        "--golden",
    )
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, out + err
    assert (
        "golden parity onnxruntime" in out
        and "PASS" in out
        and "reference: the bundle's golden record" in out
    )


def test_golden_and_torch_canaries_agree_in_process(tiny_bundle):
    class Noisy(OrtBackend):
        def _forward(self, *args):
            out = super()._forward(*args)
            out.logits = out.logits + np.random.default_rng(1).normal(0, 1e-2, out.logits.shape).astype(
                np.float32
            )
            return out

    for reference in ("golden", "torch"):
        opts = ServeOptions(bundle=tiny_bundle.root, port=0, threads=1, canary_reference=reference)
        with build_server(opts) as good:
            assert good.runtime.canary == "passed" and good.runtime.canary_report.reference == reference
            assert (good.runtime._reference is None) == (reference == "golden")  # no torch loaded
        with build_server(opts, backend=Noisy(tiny_bundle)) as bad:
            assert bad.runtime.canary == "failed", bad.runtime.canary_report


def test_golden_canary_needs_a_record(tiny_bundle, tmp_path):
    import shutil

    from export.manifest import Bundle

    dst = tmp_path / "no-golden"
    shutil.copytree(tiny_bundle.root, dst)
    b = Bundle.open(dst)
    (dst / "golden.json").unlink()
    m = b.manifest
    from dataclasses import replace

    b.update_manifest(replace(m, files={k: v for k, v in m.files.items() if k != "golden.json"}))
    with pytest.raises(Exception, match="no golden record"):
        build_server(ServeOptions(bundle=dst, port=0, threads=1, parity="strict", canary_reference="golden"))
