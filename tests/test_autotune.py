"""autotune: a site's finalists are timed at its first call and the measured fastest runs; results stay peft's
(every finalist is exact), the caller's random stream is untouched, and the cost model's choice stays where
timing cannot run or shows no clear winner."""
from __future__ import annotations

import copy

import pytest
import torch
from lora_models import assert_step_matches, float64_truth, loss_and_grads, tiny_llama, tokens

import runlora_fx
from runlora_fx.api import optimized_sites
from runlora_fx.kernels import autotune
from runlora_fx.kernels.dense import AdapterConfig, LoraLinearRunner, run_plan
from runlora_fx.planner.device import default_profile
from runlora_fx.planner.expr import AdapterSpec, QuantSpec, SiteSpec
from runlora_fx.planner.search import AUTOTUNE_FINALISTS, SearchOptions, candidates, finalists, search

PROFILE = default_profile("cpu")
SPEC = SiteSpec(64, 32, 48, (AdapterSpec(4, 2.0, 0.1),))


@pytest.fixture(autouse=True)
def _fresh_choices():
    autotune._tuned.cache_clear()
    yield
    autotune._tuned.cache_clear()


@pytest.mark.parametrize("objective", ["time", "memory"])
def test_finalists_are_the_choice_then_the_fastest_estimates_within_budget(objective):
    options = SearchOptions(objective=objective, autotune=5)
    got = finalists(SPEC, options, PROFILE, 5)
    chosen = search(SPEC, options, PROFILE)
    assert got[0].key == chosen.key and len({p.key for p in got}) == len(got) == 5
    budget = chosen.stock.saved_bytes
    assert all(p.cost.saved_bytes <= budget for p in got)
    if objective == "memory":
        assert all(p.cost.saved_bytes <= chosen.cost.saved_bytes for p in got)
    rest = [p.cost.time for p in got[1:]]
    assert rest == sorted(rest)
    fitting = [p for p in candidates(SPEC, PROFILE, prune=False) if p.cost.saved_bytes <= budget
               and p.key != chosen.key and (objective == "time" or p.cost.saved_bytes <= chosen.cost.saved_bytes)]
    assert rest[-1] <= sorted(p.cost.time for p in fitting)[3]  # none faster was left out
    assert [p.key for p in finalists(SPEC, options, PROFILE, 1)] == [chosen.key]


def test_autotune_options_are_checked():
    assert SearchOptions(autotune=True).autotune == AUTOTUNE_FINALISTS
    assert SearchOptions(autotune=False).autotune == 0
    for bad in (-1, 2.5, "4"):
        with pytest.raises(ValueError, match="autotune"):
            SearchOptions(autotune=bad)
    with pytest.raises(ValueError, match="autotune"):
        runlora_fx.optimize(tiny_llama(), example_kwargs={"input_ids": tokens()}, autotune=-2)


def test_the_cost_models_choice_stays_unless_clearly_beaten():
    plans = finalists(SPEC, SearchOptions(autotune=3), PROFILE, 3)
    a, b, c = (p.key for p in plans)
    assert autotune.fastest(plans, {a: [1.0, 1.0, 1.0], b: [0.99, 0.99, 0.99], c: [2.0, 2.0, 2.0]}) is plans[0]
    assert autotune.fastest(plans, {a: [1.0, 1.0, 1.0], b: [2.0, 2.0, 2.0], c: [0.9, 5.0, 0.9]}) is plans[2]


def test_the_runner_runs_the_measured_fastest(monkeypatch):
    runner = LoraLinearRunner((AdapterConfig(2.0, 0.1),), SearchOptions(autotune=3))
    want = finalists(SPEC, runner.options, PROFILE, 3)[2].key
    timed = []

    def fake_measure(plans, spec, device, run):
        timed.append([p.key for p in plans])
        return {p.key: [0.5 if p.key == want else 1.0] * 3 for p in plans}

    monkeypatch.setattr(autotune, "measure", fake_measure)
    got = runner.plan_for(SPEC, torch.device("cpu"))
    assert got.key == want and "autotuned over 3" in got.strategy
    assert runner.plan_for(SPEC, torch.device("cpu")).key == want and len(timed) == 1  # timed once per spec
    assert LoraLinearRunner((AdapterConfig(2.0, 0.1),)).plan_for(SPEC, torch.device("cpu")).key == timed[0][0]


def test_measuring_times_every_finalist_and_leaves_the_random_stream_alone():
    plans = finalists(SPEC, SearchOptions(autotune=3), PROFILE, 3)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    times = autotune.measure(plans, SPEC, torch.device("cpu"), run_plan)
    assert torch.equal(torch.get_rng_state(), state)
    assert set(times) == {p.key for p in plans}
    assert all(len(v) >= autotune.ROUNDS[0] and min(v) > 0 for v in times.values())


def test_timing_does_not_apply_where_it_cannot_run():
    assert autotune.applies(SPEC)
    quant = SiteSpec(64, 32, 48, (AdapterSpec(4),), quant=QuantSpec())
    assert not autotune.applies(quant)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert not autotune.applies(SPEC)
    seen = []

    @torch.library.custom_op("runlora_fx_test::autotune_probe", mutates_args=())
    def probe(x: torch.Tensor) -> torch.Tensor:  # how the opaque lowering runs a site: below autograd
        seen.append(autotune.applies(SPEC))
        return x.clone()

    probe(torch.ones(1, requires_grad=True))
    assert seen == [False]
    got = autotune.plan(SPEC, SearchOptions(autotune=0), PROFILE, torch.device("cpu"), run_plan)
    assert got.key == search(SPEC, SearchOptions(), PROFILE).key and got.strategy == "model"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_an_autotuned_model_steps_like_peft(dtype, dropout):
    """peft's masks (the caller's stream), loss and every gradient, whichever finalist won."""
    model = tiny_llama(dropout, dtype)
    ref = copy.deepcopy(model)
    runlora_fx.optimize(model, example_kwargs={"input_ids": tokens()}, autotune=True)
    ids = tokens(2, 12)
    got, want = loss_and_grads(model, ids), loss_and_grads(ref, ids)
    assert_step_matches(got, want, None if dtype == torch.float64 else float64_truth(ref, ids))
    strategies = {p.strategy for site in optimized_sites(model) for p in site.runner._plans.values()}
    assert any("autotuned" in s for s in strategies), strategies
