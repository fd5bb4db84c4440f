"""`make demo` end to end: a real `gpt2-deploy serve` subprocess, streamed, checked, SIGTERMed."""

from __future__ import annotations

import io

from serving.demo import DemoOptions, run_demo


def test_demo_streams_checks_parity_and_exits_zero_on_sigterm(tiny_bundle):
    out = io.StringIO()
    rc = run_demo(DemoOptions(bundle=tiny_bundle.root, max_new_tokens=8), out=out)
    text = out.getvalue()
    assert rc == 0, text  # SIGTERM -> NOT_SERVING -> stop(grace) -> backends closed -> exit 0
    assert "SERVING after" in text and "startup canary passed" in text
    assert "generation parity onnxruntime vs torch: PASS" in text
    assert "step 8 (token" in text  # per-step report: prefill + 8 teacher-forced steps
    assert "server exited with code 0" in text
