"""optimize(model): same loss and gradients as plain peft, falls back whenever the layer left its planned state,
keeps parameters, and is undone exactly by restore(). explain() reports every site and every skipped layer."""
from __future__ import annotations

import copy

import pytest
import torch
from lora_models import TorchtuneLoRALinear, assert_step_matches, float64_truth, loss_and_grads, tiny_llama, tokens
from torch import nn

import runlora_fx
from runlora_fx.api import optimized_sites


def optimized(model, **kw):
    return runlora_fx.optimize(model, example_kwargs={"input_ids": tokens()}, **kw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_step_equals_peft(dtype, dropout):
    model = tiny_llama(dropout, dtype)
    ref = copy.deepcopy(model)
    optimized(model)
    assert len(optimized_sites(model)) == 7
    ids = tokens(2, 12)
    got, want = loss_and_grads(model, ids), loss_and_grads(ref, ids)
    assert_step_matches(got, want, None if dtype == torch.float64 else float64_truth(ref, ids))


def _planned_calls(model, monkeypatch):
    """Count calls that went through a planned runner."""
    calls = []
    for site in optimized_sites(model):
        runner = site.runner
        original = runner.__call__

        class Counting(type(runner)):
            def __call__(self, *a, **k):
                calls.append(1)
                return original(*a, **k)

        runner.__class__ = Counting
    return calls


def _same_logits(model, ref, ids):
    torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-10, atol=1e-10)


def test_falls_back_outside_the_planned_state(monkeypatch):
    model = tiny_llama(0.0, torch.float64)
    model.add_adapter("other", __import__("peft").LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    ref = copy.deepcopy(model)
    optimized(model)
    calls = _planned_calls(model, monkeypatch)
    ids = tokens()
    _same_logits(model, ref, ids)
    assert len(calls) == 7
    calls.clear()
    with model.disable_adapter(), ref.disable_adapter():
        _same_logits(model, ref, ids)
    assert not calls
    model.merge_adapter()
    ref.merge_adapter()
    _same_logits(model, ref, ids)
    assert not calls
    model.unmerge_adapter()
    ref.unmerge_adapter()
    _same_logits(model, ref, ids)
    assert len(calls) == 7
    calls.clear()
    model.set_adapter("other")
    ref.set_adapter("other")
    _same_logits(model, ref, ids)
    assert not calls
    model.set_adapter("default")
    ref.set_adapter("default")
    model.float()
    ref.float()
    torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert not calls  # planned for float64: a dtype change runs the original forward


def test_parameters_keep_identity_names_and_state_dict():
    model = tiny_llama(0.05)
    before = dict(model.named_parameters())
    keys = list(model.state_dict())
    optimized(model)
    after = dict(model.named_parameters())
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)
    assert list(model.state_dict()) == keys


def test_restore_is_exact_and_optimize_twice_is_harmless():
    model = tiny_llama(0.0)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    optimized(model)
    first = q.forward
    optimized(model)
    assert q.forward is first and len(optimized_sites(model)) == 7
    optimized(model, objective="memory")  # other options: re-planned
    assert q.forward is not first and len(optimized_sites(model)) == 7
    runlora_fx.restore(model)
    assert "forward" not in q.__dict__ and not hasattr(model, "_runlora_fx")
    runlora_fx.restore(model)  # no-op


def test_capture_on_first_real_call():
    model = tiny_llama(0.0, torch.float64)
    ref = copy.deepcopy(model)
    runlora_fx.optimize(model)
    assert optimized_sites(model) == []
    ids = tokens()
    got, want = loss_and_grads(model, ids), loss_and_grads(ref, ids)
    assert len(optimized_sites(model)) == 7
    assert_step_matches(got, want)


def test_generate_matches_peft():
    model = tiny_llama(0.0)
    ref = copy.deepcopy(model)
    optimized(model)
    ids = tokens(1, 5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(input_ids=ids, **kw), ref.generate(input_ids=ids, **kw))


class Wrapped(nn.Module):
    """A LoRA module inside a parent, as it would be in a real model."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.head = nn.Linear(inner.weight.shape[0], 3)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(x)))


class HandWritten(nn.Module):
    def __init__(self, i=16, o=24, r=4):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i), requires_grad=False)
        self.A = nn.Parameter(torch.randn(r, i))
        self.B = nn.Parameter(torch.randn(o, r))

    def forward(self, x):
        return x @ self.weight.T + (x @ self.A.T) @ self.B.T * 0.5


class DoesMore(HandWritten):
    def forward(self, x):
        return torch.relu(super().forward(x))


@pytest.mark.parametrize("make", [TorchtuneLoRALinear, HandWritten])
def test_other_lora_styles_equal_their_own_forward(make):
    torch.manual_seed(0)
    model = Wrapped(make()).double()
    ref = copy.deepcopy(model)
    x = torch.randn(5, 16, dtype=torch.float64)
    runlora_fx.optimize(model, (x,))
    assert [s.path for s in optimized_sites(model)] == ["inner"]
    for m in (model, ref):
        torch.manual_seed(4)
        m(x).square().sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-10, msg=n)


def test_module_that_computes_more_than_its_site_is_left_alone():
    torch.manual_seed(0)
    model = Wrapped(DoesMore())
    runlora_fx.optimize(model, (torch.randn(3, 16),))
    assert optimized_sites(model) == []
    reasons = {s.module_path: s.reason for s in model._runlora_fx.skipped}
    assert "computes more than the LoRA site" in reasons["inner"]


def test_explain_rows_and_dict():
    model = tiny_llama(0.05)
    report = runlora_fx.explain(model, example_kwargs={"input_ids": tokens(2, 16)})
    assert len(report.sites) == 7 and not report.skipped
    text = str(report)
    for proj in ("q_proj", "down_proj"):
        assert proj in text
    d = report.to_dict()
    row = d["sites"][0]
    assert row["n"] == 32 and row["in_features"] == 32 and row["ranks"] == [4]
    assert d["totals"]["saved_bytes"] <= d["totals"]["stock_saved_bytes"]
    assert not hasattr(model, "_runlora_fx")  # explain does not change the model


def test_model_without_lora_is_unchanged_and_says_so():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    x = torch.randn(2, 4)
    before = model(x)
    assert runlora_fx.optimize(model, (x,)) is model
    assert optimized_sites(model) == []
    torch.testing.assert_close(model(x), before)
    assert "no LoRA layers" in str(runlora_fx.explain(model, (x,)))


@pytest.mark.parametrize("options,match", [({"objectiv": "time"}, "objectiv"), ({"inner": "eager"}, "inner"),
                                           ({"memory_budget": -1}, "memory_budget")])
def test_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        runlora_fx.optimize(nn.Linear(2, 2), (torch.randn(1, 2),), **options)


def test_explain_on_an_optimized_model_reports_its_sites_and_keeps_it_optimized():
    model = tiny_llama(0.0)
    optimized(model)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    planned = q.forward
    report = runlora_fx.explain(model, example_kwargs={"input_ids": tokens()})
    assert len(report.sites) == 7 and not report.any_graph_break
    assert q.forward is planned  # patched again afterwards


def _agreement_models():
    torch.manual_seed(0)
    yield "peft llama", tiny_llama(0.05), {"example_kwargs": {"input_ids": tokens()}}, None
    yield "peft llama, filter_fn", tiny_llama(0.0), {"example_kwargs": {"input_ids": tokens()}}, \
        lambda module, path: "mlp" not in path
    yield "torchtune", Wrapped(TorchtuneLoRALinear()), {"example_inputs": (torch.randn(3, 16),)}, None
    yield "hand-written", Wrapped(HandWritten()), {"example_inputs": (torch.randn(3, 16),)}, None
    yield "computes more", Wrapped(DoesMore()), {"example_inputs": (torch.randn(3, 16),)}, None
    yield "whole model", HandWritten(), {"example_inputs": (torch.randn(3, 16),)}, None


@pytest.mark.parametrize("name", ["peft llama", "peft llama, filter_fn", "torchtune", "hand-written",
                                  "computes more", "whole model"])
def test_explain_and_optimize_agree_on_every_site(name):
    _, model, call, filter_fn = next(m for m in _agreement_models() if m[0] == name)
    example = call.get("example_inputs", ())
    report = runlora_fx.explain(model, example, example_kwargs=call.get("example_kwargs"), filter_fn=filter_fn)
    runlora_fx.optimize(model, example, example_kwargs=call.get("example_kwargs"), filter_fn=filter_fn)
    assert [r.module_path for r in report.sites] == [s.path for s in optimized_sites(model)]
    assert {(s.module_path, s.reason) for s in report.skipped} == \
        {(s.module_path, s.reason) for s in model._runlora_fx.skipped}


def test_optimize_accepts_a_validated_config():
    from runlora_fx.config import OptimizeConfig
    from runlora_fx.planner.search import SearchOptions

    config = OptimizeConfig(SearchOptions(objective="memory"))
    assert OptimizeConfig.from_options({"objective": "memory"}) == config
    assert config.search_options.objective == "memory"
    model = tiny_llama(0.0)
    runlora_fx.optimize(model, config, example_kwargs={"input_ids": tokens()})
    assert model._runlora_fx.config is config and len(optimized_sites(model)) == 7
    q = optimized_sites(model)[0].module.forward
    runlora_fx.optimize(model, config=config, example_kwargs={"input_ids": tokens()})  # same config: a no-op
    assert optimized_sites(model)[0].module.forward is q
    with pytest.raises(ValueError, match="either config or options"):
        runlora_fx.optimize(model, config, objective="time")
    with pytest.raises(TypeError, match="OptimizeConfig"):
        runlora_fx.optimize(model, config={"objective": "memory"})
    with pytest.raises(TypeError, match="SearchOptions"):
        OptimizeConfig({"objective": "memory"})
    with pytest.raises(ValueError, match="objective"):
        OptimizeConfig.from_options({"objective": "speed"})
