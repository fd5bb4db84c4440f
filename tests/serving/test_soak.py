"""``python -m serving.soak`` in CI size: a real `gpt2-deploy serve` subprocess, 3 clients for 24 s."""

from __future__ import annotations

import importlib.util
import json

import pytest

from export.errors import OptionsError
from serving.soak import SoakOptions, main


def test_soak_options_are_checked(tmp_path):
    with pytest.raises(OptionsError, match="streams must be in"):
        SoakOptions(streams=0, out=tmp_path).check()
    with pytest.raises(OptionsError, match="warm-up"):
        SoakOptions(minutes=0.5, warmup_s=40, out=tmp_path).check()
    assert main(["--streams", "0", "--out", str(tmp_path)]) == 2


@pytest.mark.slow
def test_a_short_soak_has_no_unexpected_outcome(tiny_bundle, tmp_path, capsys):
    rc = main(
        ["--streams", "3", "--minutes", "0.4", "--bundle", str(tiny_bundle.root), "--out", str(tmp_path)]
        + ["--threads", "1", "--sample", "0.5"]
    )
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "soak.json").read_text())
    assert rc == (0 if result["goal"]["passed"] else 1), result["goal"]
    assert "goal: " in printed and "RSS MiB: start" in printed

    # every request got its answer: valid ones OK, cancelled/deadline ones their code, bad ones theirs
    assert result["unexpected_count"] == 0, result["unexpected"]
    assert not result["client_failures"] and not result["server"]["log_errors"]
    outcomes = result["outcomes"]
    for action in ("greedy", "sampled", "bad", "cancel"):
        assert sum(outcomes.get(action, {}).values()) > 0, (action, outcomes)
    assert outcomes["greedy"].get("OK", 0) > 0 and outcomes["bad"].get("expected", 0) > 0
    codes = {c["code"] for c in result["codes"]}
    assert {"OK", "INVALID_ARGUMENT", "CANCELLED"} <= codes
    assert all(c["expected"] for c in result["codes"])

    # the server stopped cleanly and memory was sampled through the run
    assert result["server"]["exit_code"] == 0
    rss = result["rss_mib"]
    assert 0 < rss["start"] and 0 < rss["after_warmup"] <= rss["peak"] and 0 < rss["end"] <= rss["peak"]
    assert len(result["samples"]) >= 30 and all(s["health"] == "SERVING" for s in result["samples"])
    assert result["tokens"]["total"] > 0 and result["tokens"]["per_s"] > 0
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "soak.png").stat().st_size > 10_000
