"""The per-call read of a patched module's tensors (`PatchedSite.flat`) walks nn.Module's own dicts instead of
attribute lookups: it must stay live (a replaced submodule or parameter is used), copy-correct (a deep copy or a
pickle reads its own tensors) and fall back to attribute reads (then to the original forward) for anything else."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch

import runlora_fx
import runlora_fx.api as api

peft = pytest.importorskip("peft")


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 12, bias=False)

    def forward(self, x):
        return self.proj(x)


def _pair(dropout=0.1):
    torch.manual_seed(0)
    model = peft.get_peft_model(Tiny(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                        target_modules=["proj"])).double().train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    ref = copy.deepcopy(model)
    return runlora_fx.optimize(model, example_inputs=(torch.randn(3, 16, dtype=torch.float64),)), ref


def _layer(m):
    return m.base_model.model.proj


def _run(model, x):
    """Output and every gradient of one step, from the same RNG state; and which path the layer took."""
    paths = []
    site = api.optimized_sites(model)[0] if api.optimized_sites(model) else None
    if site is not None:
        paths.append(api._planned_tensors(site, x, (), {}) is not None)
    torch.manual_seed(1)
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.square().sum().backward()
    return [y, x.grad] + [p.grad for p in model.parameters() if p.grad is not None], paths


def _assert_step_matches(model, ref, planned):
    x = torch.randn(5, 16, dtype=torch.float64)
    (got, paths), (want, _) = _run(model, x), _run(ref, x)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert paths == [planned]


def test_flat_reads_the_same_tensors_as_attribute_reads():
    model, _ = _pair()
    site = api.optimized_sites(model)[0]
    assert [id(t) for t in site.flat()] == [id(t) for t in api._flatten(site._tensors_by_attribute())]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_reads_its_own_tensors(how):
    model, ref = _pair()
    twin = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    site = api.optimized_sites(twin)[0]
    own = {id(p) for p in twin.parameters()}
    assert all(id(t) in own for t in site.flat() if t is not None)
    _assert_step_matches(twin, ref, planned=True)


def test_a_replaced_adapter_submodule_is_used():
    model, ref = _pair()
    for m in (model, ref):
        torch.manual_seed(3)
        new = torch.nn.Linear(4, 12, bias=False).double()
        _layer(m).lora_B["default"] = new
    _assert_step_matches(model, ref, planned=True)


def test_a_weight_that_is_no_longer_a_parameter_runs_the_original_forward():
    model, ref = _pair()
    for m in (model, ref):
        base = _layer(m).base_layer
        w = base.weight.detach() * 2
        del base.weight
        base.weight = w  # a plain attribute: read by attribute, and not the Parameter the site was planned for
    assert api.optimized_sites(model)[0].flat()[0] is _layer(model).base_layer.weight
    _assert_step_matches(model, ref, planned=False)


def test_a_dropout_replaced_by_identity_runs_the_original_forward():
    model, ref = _pair()
    for m in (model, ref):
        _layer(m).lora_dropout["default"] = torch.nn.Identity()
    _assert_step_matches(model, ref, planned=False)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_a_call_that_records_no_graph_runs_the_plan_without_an_autograd_node(mode, monkeypatch):
    """Evaluation and generation skip autograd.Function's per-call cost; the output is the planned one."""
    from runlora_fx.kernels.dense import PlannedLoraFunction

    model, ref = _pair(dropout=0.0)
    x = torch.randn(5, 16, dtype=torch.float64)
    applied = []
    original = PlannedLoraFunction.forward
    monkeypatch.setattr(PlannedLoraFunction, "forward", staticmethod(lambda *a: applied.append(1) or original(*a)))
    with mode():
        y, want = model(x), ref(x)
    assert applied == [] and y.grad_fn is None
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    model(x.requires_grad_(True)).sum().backward()  # a training call still builds the node
    assert applied == [1]
