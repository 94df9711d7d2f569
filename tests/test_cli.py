"""The command line: explain prints a plan, demo trains both models and checks they agree."""
from __future__ import annotations

from dataclasses import replace

import pytest

from runlora_fx import cli
from runlora_fx.demo import DemoConfig, run


def test_explain_prints_plan_and_candidates(capsys):
    assert cli.main(["explain", "512", "64", "96", "--rank", "4", "--dropout", "0.1", "--candidates"]) == 0
    out = capsys.readouterr().out
    assert "Program:" in out and "Saved for backward" in out and "Candidates not dominated" in out


def test_unknown_argument_is_an_error():
    with pytest.raises(SystemExit):
        cli.main(["explain", "512", "64", "96", "--rnk", "4"])


def test_tiny_demo_trains_both_and_agrees():
    lines = []
    cfg = DemoConfig(hidden=32, ffn=48, layers=1, heads=4, vocab=64, batch=2, seq=16, steps=3, calibrate=False)
    result = run(cfg, out=lines.append)
    text = "\n".join(lines)
    assert result["losses_agree"] and "losses agree: yes" in text
    assert result["saved_bytes"]["runlora_fx"] < result["saved_bytes"]["peft"]  # dropout 0.05: masks as bools
    assert len(result["losses"]["peft"]) == 3 and "q_proj" in text
    # the floor: the frozen model (no LoRA) trains beside them, and the share of LoRA's cost removed is reported
    assert len(result["losses"]["frozen"]) == 3 and "share of it removed by runlora_fx" in text
    assert result["saved_bytes"]["frozen"] < result["saved_bytes"]["peft"]


@pytest.mark.parametrize("cached,flag,want", [(False, True, 1), (True, True, 0), (False, False, 0)])
def test_demo_calibrates_once_when_no_profile_is_cached(monkeypatch, cached, flag, want):
    """The demo reports measured speed, so it plans with this device's calibration: measured first when none is
    cached (unless told not to), never again once it is."""
    import runlora_fx.demo as demo
    from runlora_fx.planner.device import default_profile

    calls = []
    profile = replace(default_profile("cpu"), measured=cached)
    monkeypatch.setattr(demo, "get_profile", lambda device: profile)
    monkeypatch.setattr(demo, "calibrate", lambda device: calls.append(device))
    lines = []
    cfg = DemoConfig(hidden=32, ffn=48, layers=1, heads=4, vocab=64, batch=2, seq=16, steps=1, calibrate=flag)
    run(cfg, out=lines.append)
    assert len(calls) == want and any("measuring it once" in line for line in lines) == bool(want)


def test_demo_no_calibrate_flag_reaches_the_config(monkeypatch):
    import runlora_fx.demo as demo

    seen = []
    monkeypatch.setattr(demo, "run", lambda cfg: seen.append(cfg) or {"losses_agree": True})
    assert cli.main(["demo", "--no-calibrate", "--steps", "1"]) == 0 and cli.main(["demo"]) == 0
    assert [c.calibrate for c in seen] == [False, True] and seen[0].steps == 1
