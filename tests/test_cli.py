"""The command line: explain prints a plan, demo trains both models and checks they agree."""
from __future__ import annotations

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
    cfg = DemoConfig(hidden=32, ffn=48, layers=1, heads=4, vocab=64, batch=2, seq=16, steps=3)
    result = run(cfg, out=lines.append)
    text = "\n".join(lines)
    assert result["losses_agree"] and "losses agree: yes" in text
    assert result["saved_bytes"]["runlora_fx"] < result["saved_bytes"]["peft"]  # dropout 0.05: masks as bools
    assert len(result["losses"]["peft"]) == 3 and "q_proj" in text
    # the floor: the frozen model (no LoRA) trains beside them, and the share of LoRA's cost removed is reported
    assert len(result["losses"]["frozen"]) == 3 and "share of it removed by runlora_fx" in text
    assert result["saved_bytes"]["frozen"] < result["saved_bytes"]["peft"]
