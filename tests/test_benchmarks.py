"""The benchmark harness, tested without timing anything: order of calls, arithmetic, result structure."""
from __future__ import annotations

import itertools
import json

import pytest
import torch

from benchmarks import harness, paper_rule, planner
from benchmarks.common import SavedBytes, markdown_table, write_json
from runlora_fx.planner.cost import price
from runlora_fx.planner.device import default_profile
from runlora_fx.planner.expr import AdapterSpec, SiteSpec, build_steps, enumerate_programs


def fake_clock(step: float = 1.0):
    ticks = itertools.count()
    return lambda: next(ticks) * step


def test_interleaved_order_warmup_first_then_rounds():
    calls = []
    contenders = {name: (lambda n=name: calls.append(n)) for name in ("A", "B", "C")}
    trace: list[str] = []
    times = harness.interleaved(contenders, repeats=3, warmup=2, clock=fake_clock(), trace=trace)
    assert trace == ["A", "B", "C"] * 5  # 2 warm-up rounds, then 3 timed rounds, never A A A B B B
    assert calls == trace
    assert {k: len(v) for k, v in times.items()} == {"A": 3, "B": 3, "C": 3}
    assert all(t == 1.0 for ts in times.values() for t in ts)  # each timed call spans exactly one tick


def test_interleaved_times_each_call_with_sync():
    synced = []
    times = harness.interleaved({"A": lambda: None}, repeats=2, warmup=0, clock=fake_clock(0.5),
                                sync=lambda: synced.append(1))
    assert times == {"A": [0.5, 0.5]}
    assert len(synced) == 4  # before and after each timed call


def test_interleaved_rejects_bad_counts():
    with pytest.raises(ValueError):
        harness.interleaved({"A": lambda: None}, repeats=0)


def test_median_quantile_geomean():
    assert harness.median([5.0, 1.0, 3.0]) == 3.0
    assert harness.median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert harness.quantile([1, 2, 3, 4], 0.5) == 2.5
    assert harness.quantile([10.0], 0.25) == 10.0
    assert harness.geomean([0.25, 4.0]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        harness.median([])


def test_ratios_are_taken_round_by_round():
    times = {"a": [1.0, 4.0, 9.0], "b": [2.0, 2.0, 3.0]}
    assert harness.pairwise_ratios(times, "a", "b") == [0.5, 2.0, 3.0]
    stats = harness.ratio_stats(times, "a", "b")
    assert stats["median"] == 2.0  # median of per-round ratios ...
    assert stats["of_medians"] == pytest.approx(4.0 / 2.0)  # ... reported beside the ratio of medians
    assert stats["q1"] == 1.25 and stats["q3"] == 2.5 and stats["rounds"] == 3
    with pytest.raises(ValueError):
        harness.pairwise_ratios({"a": [1.0], "b": [1.0, 2.0]}, "a", "b")


def test_summarize():
    s = harness.summarize({"a": [3.0, 1.0, 2.0, 4.0]})["a"]
    assert s == {"median": 2.5, "q1": 1.75, "q3": 3.25, "min": 1.0, "n": 4}


def test_markdown_table_and_json(tmp_path):
    text = markdown_table(["x", "y"], [[1, 0.5], ["a", None]])
    assert text.splitlines() == ["| x | y |", "|---|---|", "| 1 | 0.5 |", "| a |  |"]
    write_json(tmp_path / "r.json", {"dtype": torch.bfloat16, "t": (1, 2)})
    assert json.loads((tmp_path / "r.json").read_text()) == {"dtype": "bfloat16", "t": [1, 2]}


@pytest.mark.parametrize("n,i,o,r", [(7, 11, 13, 3), (4096, 512, 1376, 8), (64, 1024, 2736, 128)])
def test_paper_flops_match_the_reference_list_and_the_cost_model(n, i, o, r):
    # the closed forms from the paper's list (docs in /work/shared/reference/runlora-paper.md)
    ref = {"backward1": 2*n*i*o + 4*n*r*o + 6*n*i*r, "backward2": 4*n*i*o + 4*n*i*r + 2*n*r*o + 2*i*r*o,
           "backward3": 4*n*i*o + 2*n*r*(i + o) + 4*i*r*o, "backward4": 4*n*i*o + 6*i*r*o,
           "backward5": 2*n*i*o + 4*n*r*(i + o) + 2*i*r*o}
    for name, flops in ref.items():
        assert paper_rule.backward_flops(name, n, i, o, r) == flops
    # and every paper program, lowered into this project's algebra, has the paper's FLOPs
    spec = SiteSpec(n, i, o, (AdapterSpec(r),))
    for f, b in itertools.product(paper_rule.FORWARDS, paper_rule.BACKWARDS):
        cost = price(build_steps(spec, paper_rule._program(f, b)), default_profile())
        assert cost.forward_flops == paper_rule.forward_flops(f, n, i, o, r)
        assert cost.backward_flops == paper_rule.backward_flops(b, n, i, o, r)


def test_paper_rule_respects_dropout():
    drop = SiteSpec(8192, 1024, 2736, (AdapterSpec(8, dropout=0.05),))
    assert paper_rule.choose(drop)[0] == "forward1"  # merged forms are not equivalent with dropout
    assert paper_rule.program(drop).grad_x == "split"
    assert paper_rule.program(drop).mask == "dense"
    plain = SiteSpec(8192, 1024, 2736, (AdapterSpec(8),))
    assert paper_rule.names(plain) == "forward2+backward5"
    assert paper_rule.program(plain).forward == "merged" and not paper_rule.program(plain).keep_u


def test_saved_bytes_counts_each_storage_once_and_skips_parameters():
    w = torch.nn.Parameter(torch.randn(4, 4))
    x = torch.randn(3, 4, requires_grad=True)
    counter = SavedBytes([w])
    with counter.hooks():
        y = (x @ w).sin() * x.sum()  # x saved by mm, the mm result saved by sin, x.sum() saved by mul
    y.sum().backward()
    assert counter.count >= 3
    assert counter.bytes == 3 * 4 * 4 + 3 * 4 * 4 + 3 * 4 * 4 + 4  # x, x@w, sin(x@w), the scalar; w excluded


@pytest.fixture(scope="module")
def tiny_layer_result():
    from benchmarks import layer

    cfg = layer.LayerConfig(repeats=2, warmup=1, refine=2, refine_repeats=1, oracle_k=2)
    row = layer.Row(16, 24, 8, 2, "float32", 0.05, "tiny")
    return layer.run_row(row, cfg, default_profile())


def test_layer_row_structure(tiny_layer_result):
    from benchmarks import layer

    r = tiny_layer_result
    assert set(layer.CONTENDERS) <= set(r["times_s"])
    assert all(len(r["times_s"][c]) == 2 for c in layer.CONTENDERS)
    for a, b in layer.RATIOS:
        stats = r["ratios"][f"{a}/{b}"]
        assert stats["median"] == harness.median(harness.pairwise_ratios(r["times_s"], a, b))
    assert r["plans"]["oracle"] in r["plans"]["oracle_finalists"]
    assert len(r["candidates"]) == len(list(enumerate_programs(layer.spec_of(layer.Row(**r["row"])))))
    assert all(len(c["stage1_s"]) >= 1 for c in r["candidates"])
    # saved bytes counted with hooks equal what the cost model predicts for the planned and paper programs
    for who in ("runlora_fx", "paper", "oracle"):
        assert r["saved_for_backward"][who]["bytes"] == r["predicted_saved_bytes"][who]
    json.dumps(r)  # serialisable as is
    agg = layer.aggregate([r])
    assert agg["rows"] == 1 and "geomean" in agg["runlora_fx/peft"]
    rows_table, groups_table = layer.markdown([r]).split("\n\n")
    assert rows_table.count("\n") == 2  # header, rule, one row
    groups = {line.split(" | ")[0].strip("| "): line for line in groups_table.splitlines()[2:]}
    assert set(groups) == {"float32, p = 0.05", "N = 8, p = 0.05", "all"}
    ratio = r["ratios"]["runlora_fx/peft"]["median"]
    assert all(f"| 1 | {ratio:.3g} |" in line for line in groups.values())  # one row: its geomean is its ratio


def test_planner_analysis_of_a_row(tiny_layer_result):
    a = planner.analyze({"rows": [tiny_layer_result]})
    row = a["rows"][0]
    assert row["pick"] == tiny_layer_result["plans"]["runlora_fx"]
    assert 1 <= row["pick_rank_stage1"] <= row["candidates"]
    assert -1.0 <= row["spearman_pred_vs_meas"] <= 1.0
    assert a["aggregate"]["rows"] == 1
    assert planner.family("chain/zx.gu.split/u+xd+bits") == "chain/zx.gu.split"
    assert planner.markdown(a).startswith("| row |")


def test_model_rows_priority_and_cli_parser():
    from benchmarks import cli, model

    rows = model.ModelConfig().rows()
    assert len(rows) == 16
    assert (rows[0].model, rows[0].rank, rows[0].dropout, rows[0].dtype) == ("60m", 8, 0.05, "float32")
    assert len({r.name for r in rows}) == 16
    args = cli.parser().parse_args(["layer", "--quick", "--threads", "1"])
    assert args.suite == "layer" and args.quick and args.threads == 1
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["nonsense"])


def test_doctests_of_the_pure_helpers():
    import doctest

    from benchmarks import common, layer

    for mod in (harness, paper_rule, planner, common, layer):
        result = doctest.testmod(mod)
        assert result.failed == 0, f"{mod.__name__}: {result.failed} doctest(s) failed"


def test_share_of_lora_cost_removed_is_taken_round_by_round():
    times = {"opt": [1.5, 1.2, 2.0, 3.0], "peft": [2.0, 2.0, 2.0, 2.0], "frozen": [1.0, 1.0, 1.0, 2.5]}
    # round 4: peft is not slower than the floor, so it has no LoRA cost to share and is dropped
    assert harness.shares_removed(times, "opt", "peft", "frozen") == [0.5, pytest.approx(0.8), 0.0]
    stats = harness.share_stats(times, "opt", "peft", "frozen")
    assert stats["median"] == 0.5 and stats["rounds"] == 3
    assert stats["of_medians"] == pytest.approx((2.0 - 1.75) / (2.0 - 1.0))
    assert harness.share_stats({"a": [1.0], "b": [1.0], "c": [1.0]}, "a", "b", "c")["median"] is None
    with pytest.raises(ValueError):
        harness.shares_removed({"a": [1.0], "b": [1.0, 2.0], "c": [1.0, 1.0]}, "a", "b", "c")


def test_model_shares_pair_each_path_with_its_own_stock_and_floor():
    from benchmarks import model

    for contender, stock, floor in model.SHARES:
        compiled = contender.startswith("runlora")
        assert stock == ("peft_inductor" if compiled else "peft_eager")
        assert floor == ("frozen_inductor" if compiled else "frozen_eager")
        assert {contender, stock, floor} <= set(model.ALL_CONTENDERS)
    fake = {"row": {"model": "60m", "rank": 8, "dropout": 0.05, "dtype": "float32"}, "tokens": [1, 8],
            "summary": {c: {"median": 1.0} for c in model.CONTENDERS}, "saved_for_backward": {},
            "speedups": {"peft_eager/frozen_eager": {"median": 1.8}},
            "shares_removed": {"optimize": {"median": 0.25}}}
    table = model.markdown([fake])
    assert "| 60m | 8 | 0.05 | float32 | 1.8 |  | 0.25 |" in table
    assert model.aggregate([fake])["share removed optimize"] == {"min": 0.25, "max": 0.25, "rows": 1}


def test_frozen_model_has_no_lora_and_trains_only_the_norms():
    from benchmarks import model
    from lora_models import tiny_llama, tokens

    frozen = model.frozen_model(tiny_llama(dropout=0.05))
    names = [n for n, _ in frozen.named_parameters()]
    assert names and not any("lora" in n for n in names)
    trainable = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert trainable and all("norm" in n for n in trainable)
    ids = tokens()
    frozen(input_ids=ids, labels=ids).loss.backward()
    first_norm = "model.layers.0.input_layernorm.weight"  # the earliest norm: its grad needs every layer's dX
    assert dict(frozen.named_parameters())[first_norm].grad is not None


def test_overhead_row_structure():
    from benchmarks import overhead

    cfg = overhead.OverheadConfig(calls=2, repeats=2, warmup=0)
    r = overhead.run_row(overhead.OverheadRow(16, 8, 4, 2, "float32", 0.05), cfg)
    assert set(r["times_s"]) == set(overhead.CONTENDERS) and all(len(v) == 2 for v in r["times_s"].values())
    assert r["ratios"]["optimize/peft"]["median"] == harness.median(
        harness.pairwise_ratios(r["times_s"], "optimize", "peft"))
    assert overhead.markdown([r]).count("\n") == 2
    json.dumps(r)
