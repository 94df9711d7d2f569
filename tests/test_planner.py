"""The plan space contains RunLoRA's programs, its FLOPs are exact, and selection obeys budget and objective."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import runlora_fx
from runlora_fx.planner import device as device_mod
from runlora_fx.planner.cost import price
from runlora_fx.planner.device import DeviceProfile, calibrate, default_profile, get_profile
from runlora_fx.planner.expr import AdapterSpec, SiteSpec, build_steps, enumerate_programs, expressions, stock_program
from runlora_fx.planner.search import MEMORY_TIE, STRATEGIES, TIME_TIE, SearchOptions, candidates, search

PROFILE = default_profile("cpu")

# RunLoRA's programs (shared/reference/runlora-paper.md), written as expression trees over x, W, A, B, G.
PAPER_FORWARD = {
    "forward1": ("add(mm(x,tr(W)),mm(mm(x,tr(A)),tr(B)))", lambda N, i, o, r: 2*N*i*o + 2*N*i*r + 2*N*r*o),
    "forward2": ("mm(x,tr(add(W,mm(B,A))))", lambda N, i, o, r: 2*i*o*r + 2*N*i*o),
}
SPLIT_DX = "add(mm(G,W),mm(mm(G,B),A))"
MERGED_DX = "mm(G,add(W,mm(B,A)))"
PAPER_BACKWARD = {
    "backward1": ({"dA": "mm(tr(mm(G,B)),x)", "dB": "mm(tr(G),mm(x,tr(A)))", "dx": SPLIT_DX},
                  lambda N, i, o, r: 2*N*i*o + 4*N*r*o + 6*N*i*r),
    "backward2": ({"dA": "mm(tr(mm(G,B)),x)", "dB": "mm(mm(tr(G),x),tr(A))", "dx": SPLIT_DX},
                  lambda N, i, o, r: 4*N*i*o + 4*N*i*r + 2*N*r*o + 2*i*r*o),
    "backward3": ({"dA": "mm(tr(B),mm(tr(G),x))", "dB": "mm(mm(tr(G),x),tr(A))", "dx": SPLIT_DX},
                  lambda N, i, o, r: 4*N*i*o + 2*N*r*(i + o) + 4*i*r*o),
    "backward4": ({"dA": "mm(tr(B),mm(tr(G),x))", "dB": "mm(mm(tr(G),x),tr(A))", "dx": MERGED_DX},
                  lambda N, i, o, r: 4*N*i*o + 6*i*r*o),
    "backward5": ({"dA": "mm(tr(mm(G,B)),x)", "dB": "mm(tr(G),mm(x,tr(A)))", "dx": MERGED_DX},
                  lambda N, i, o, r: 2*N*i*o + 4*N*r*(i + o) + 2*i*r*o),
}


def _single(e: str) -> str:
    return e.replace("A0", "A").replace("B0", "B")


@settings(max_examples=15, deadline=None)
@given(N=st.integers(1, 64), i=st.integers(1, 48), o=st.integers(1, 48), r=st.integers(1, 64))
def test_every_paper_program_is_in_the_space_with_its_closed_form_flops(N, i, o, r):
    spec = SiteSpec(N, i, o, (AdapterSpec(r),))
    lowered = {p: build_steps(spec, p) for p in enumerate_programs(spec)}
    exprs = {p: {_single(k): _single(v) for k, v in expressions(low).items()} for p, low in lowered.items()}
    for fname, (fexpr, fflops) in PAPER_FORWARD.items():
        for bname, (bexprs, bflops) in PAPER_BACKWARD.items():
            members = [p for p, e in exprs.items() if e["y"] == fexpr and all(e[k] == v for k, v in bexprs.items())]
            assert members, f"{fname}+{bname} missing from the space"
            # the paper keeps only x: its program is the member that recomputes x A^T and the merged weight
            (paper,) = [p for p in members if not p.keep_u and not p.keep_merged]
            cost = price(lowered[paper], PROFILE)
            assert cost.forward_flops == fflops(N, i, o, r), (fname, bname)
            assert cost.backward_flops == bflops(N, i, o, r), (fname, bname)


def test_space_has_no_duplicates_and_respects_validity():
    spec = SiteSpec(32, 16, 24, (AdapterSpec(4, dropout=0.1), AdapterSpec(8, dropout=0.1)))
    programs = list(enumerate_programs(spec))
    assert len(programs) == len(set(programs)) > 10
    assert all(p.forward == "chain" and p.grad_x == "split" for p in programs)  # dropout forbids merging
    no_drop = SiteSpec(32, 16, 24, (AdapterSpec(4),))
    assert {p.forward for p in enumerate_programs(no_drop)} == {"chain", "merged"}
    cast = SiteSpec(32, 16, 24, (AdapterSpec(4),), dtype=torch.bfloat16, adapter_dtype=torch.float32)
    assert {p.forward for p in enumerate_programs(cast)} == {"chain"}  # peft's cast separates the paths


def test_lora_fa_and_frozen_input_save_no_x():
    """Frozen A: dB needs only x A^T, so the best program keeps N x r instead of N x i."""
    spec = SiteSpec(1024, 512, 512, (AdapterSpec(8, grad_a=False),), grad_x=True)
    best = search(spec, profile=PROFILE)
    assert best.cost.saved_bytes == 1024 * 8 * 4
    nothing = SiteSpec(64, 32, 32, (AdapterSpec(4, grad_a=False, grad_b=False),), grad_x=False)
    assert search(nothing, profile=PROFILE).cost.saved_bytes == 0


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_default_budget_never_exceeds_stock(dropout):
    for n in (16, 512, 4096):
        spec = SiteSpec(n, 512, 1376, (AdapterSpec(8, dropout=dropout),))
        chosen = search(spec, profile=PROFILE)
        assert chosen.cost.saved_bytes <= chosen.stock.saved_bytes
        fits = [p for p in candidates(spec, PROFILE, prune=False) if p.cost.saved_bytes <= p.stock.saved_bytes]
        fastest = min(p.cost.time for p in fits)
        near = [p for p in fits if p.cost.time <= fastest * (1 + TIME_TIE)]
        assert chosen.cost.time <= fastest * (1 + TIME_TIE)  # the fastest, up to the model's tie margin,
        lightest = min(p.cost.saved_bytes for p in near)  # which goes to the lightest,
        light = [p for p in near if p.cost.saved_bytes <= lightest * (1 + MEMORY_TIE)]  # up to its own tie margin,
        assert chosen.cost.time == min(p.cost.time for p in light)  # which goes to the faster


def test_a_near_tie_in_time_goes_to_a_program_that_saves_clearly_less():
    """Within the time tie the lighter program wins only when it is lighter by more than MEMORY_TIE."""
    from types import SimpleNamespace as P

    stock = P(saved_bytes=1000)
    fast, bit_lighter, much_lighter = (P(key=k, stock=stock, cost=P(time=t, saved_bytes=b)) for k, t, b in
                                       (("fast", 1.000, 1000), ("bit", 1.028, 995), ("much", 1.029, 800)))
    choose = STRATEGIES["model"]
    assert choose([fast, bit_lighter], SearchOptions()) is fast
    assert choose([fast, bit_lighter, much_lighter], SearchOptions()) is much_lighter
    assert 995 > 1000 * (1 - MEMORY_TIE) and 1.028 < 1 + TIME_TIE


def test_dropout_plan_saves_far_less_than_stock():
    spec = SiteSpec(2048, 512, 1376, (AdapterSpec(8, dropout=0.05),))
    chosen = search(spec, profile=PROFILE)
    assert chosen.cost.saved_bytes <= 0.7 * chosen.stock.saved_bytes


def test_memory_objective_is_lightest_within_slack():
    spec = SiteSpec(2048, 512, 1376, (AdapterSpec(64, dropout=0.05),))
    fast = search(spec, SearchOptions("time"), PROFILE)
    light = search(spec, SearchOptions("memory", time_slack=0.5), PROFILE)
    assert light.cost.saved_bytes <= fast.cost.saved_bytes
    assert light.cost.time <= fast.cost.time * 1.5
    tight = search(spec, SearchOptions(memory_budget=0.0), PROFILE)
    assert tight.cost.saved_bytes == min(p.cost.saved_bytes for p in candidates(spec, PROFILE, prune=False))


def test_pruned_candidates_are_not_dominated():
    spec = SiteSpec(4096, 768, 2048, (AdapterSpec(128),))
    table = candidates(spec, PROFILE)
    full = candidates(spec, PROFILE, prune=False)
    assert 0 < len(table) < len(full)
    assert not any(q.cost.dominates(p.cost) for p in table for q in full)


def test_flops_strategy_is_flops_argmin():
    spec = SiteSpec(4096, 768, 2048, (AdapterSpec(8),))
    chosen = search(spec, SearchOptions(strategy="flops"), PROFILE)
    fits = [p for p in candidates(spec, PROFILE, prune=False) if p.cost.saved_bytes <= p.stock.saved_bytes]
    assert chosen.cost.flops == min(p.cost.flops for p in fits)


@pytest.mark.parametrize("kwargs,match", [
    (dict(objective="speed"), "objective"), (dict(memory_budget=-1), "memory_budget"),
    (dict(strategy="greedy"), "greedy.*valid: flops, lightest, model"), (dict(time_slack=-0.1), "time_slack"),
])
def test_bad_search_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SearchOptions(**kwargs)


def test_plan_prints_like_pathinfo_and_converts_to_dict():
    p = runlora_fx.plan(2048, 512, 1376, rank=8, dropout=0.05)
    text = str(p)
    assert "FLOPs:" in text and "Saved for backward:" in text and "stock" in text
    assert text.count("\n  forward ") + text.count("\n  backward ") == len(p.lowered.forward) + len(p.lowered.backward)
    d = p.to_dict()
    assert d["saved_bytes"] == p.cost.saved_bytes and d["stock_saved_bytes"] == p.stock.saved_bytes
    table = str(candidates(p.spec, PROFILE))
    assert p.key.split("/")[0] in table


def test_stock_program_is_peft_order():
    spec = SiteSpec(8, 4, 4, (AdapterSpec(2, dropout=0.1),))
    e = expressions(build_steps(spec, stock_program(spec)))
    assert _single(e["dA0"]).startswith("mm(tr(mm(G,B)),")


def test_profile_rate_interpolates_and_roundtrips(tmp_path, monkeypatch):
    p = DeviceProfile("cpu", {"float32": [(8, 1e9), (512, 64e9)]}, 1e10, 1e-6)
    assert p.rate(torch.float32, 8) == pytest.approx(1e9) and p.rate(torch.float32, 512) == pytest.approx(64e9)
    assert 1e9 < p.rate(torch.float32, 100) < 64e9
    assert DeviceProfile.from_json(p.to_json()).matmul_rate == p.matmul_rate


def test_calibrate_caches_per_device(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNLORA_FX_CACHE", str(tmp_path))
    monkeypatch.setattr(device_mod, "_loaded", {})
    assert not get_profile("cpu").measured  # no cache yet: documented defaults
    prof = calibrate("cpu", dtypes=(torch.float32,), seconds=0.5)
    files = list(tmp_path.glob("profile-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["measured"] is True
    assert prof.bandwidth > 0 and prof.launch_overhead > 0
    rates = [r for _, r in prof.matmul_rate["float32"]]
    assert all(r > 0 for r in rates)
    monkeypatch.setattr(device_mod, "_loaded", {})
    assert get_profile("cpu").measured  # read back from the cache dir


def test_shared_input_counts_as_a_share_of_saved_bytes():
    """q/k/v read one x: a program keeping x pays a third of it per site, so keeping x beats keeping x_d."""
    alone = SiteSpec(512, 256, 256, (AdapterSpec(8, dropout=0.1),))
    shared = SiteSpec(512, 256, 256, (AdapterSpec(8, dropout=0.1),), x_readers=3)
    keeps_x = [p for p in enumerate_programs(alone) if not p.keep_xd and not p.keep_u and p.mask == "bool"][0]
    x_bytes = 512 * 256 * 4
    a = price(build_steps(alone, keeps_x), PROFILE).saved_bytes
    s = price(build_steps(shared, keeps_x), PROFILE).saved_bytes
    assert a - s == x_bytes - -(-x_bytes // 3)  # the share is rounded up
    lightest = search(shared, SearchOptions(objective="memory", time_slack=1.0), PROFILE)
    assert "x" in lightest.lowered.saved
