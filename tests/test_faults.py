"""The fault suite: every change a user can make to an optimized model between calls, and inputs at the edges.
Each scenario gives peft's result (through the planned node, or by falling back to peft's own forward) or the
same error peft raises; never a silent wrong result. `path` records which of the two ran, so a scenario that
quietly stops being planned (or starts being planned when it must not) fails too. docs/RELIABILITY.md lists the
scenarios with what each gets."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from lora_models import tiny_llama, tokens

import runlora_fx
import runlora_fx.api as api

PLANNED, ORIGINAL, ERROR = "planned", "peft's forward", "peft's error"


@dataclass(frozen=True)
class Scenario:
    name: str
    gets: str  # PLANNED, ORIGINAL or ERROR
    change: Callable = lambda m: None  # applied to the optimized model and to the plain peft copy alike
    x: Callable | None = None  # a layer-level input (q_proj of layer 0) instead of a model step
    context: Callable | None = None  # a context manager to run the call under, given the model


def _q(m):
    return m.base_model.model.model.layers[0].self_attn.q_proj


def _add(name="other", r=2, dropout=0.0):
    from peft import LoraConfig
    return lambda m: m.add_adapter(name, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout,
                                                    target_modules=["q_proj", "v_proj"]))


def _then(*fs):
    def run(m):
        for f in fs:
            f(m)
    return run


def _set(name):
    return lambda m: m.base_model.set_adapter(name)


def _replace_weight(path, scale):
    def run(m):
        owner, attr = path(m)
        old = getattr(owner, attr)
        setattr(owner, attr, torch.nn.Parameter(old.detach() * scale, requires_grad=old.requires_grad))
    return run


def _no_grad_edit(f):
    def run(m):
        with torch.no_grad():
            f(m)
    return run


def _x(*shape, make=None):
    def build():
        torch.manual_seed(2)
        x = torch.randn(*shape, dtype=torch.float64)
        return make(x) if make is not None else x
    return build


SCENARIOS = [
    Scenario("no change", PLANNED),
    Scenario("set_adapter to another adapter", ORIGINAL, _then(_add(), _set("other"))),
    Scenario("set_adapter away and back", PLANNED, _then(_add(), _set("other"), _set("default"))),
    Scenario("add an adapter that is not active", PLANNED, _add()),
    Scenario("two active adapters", ORIGINAL, _then(_add(), _set(["default", "other"]))),
    Scenario("delete an inactive adapter", PLANNED, _then(_add(), lambda m: m.delete_adapter("other"))),
    Scenario("delete the adapter and add one of another rank under its name", PLANNED,
             _then(_add(), _set("other"), lambda m: m.delete_adapter("default"), _add("default", r=6, dropout=0.1),
                   _set("default"))),
    Scenario("merge_adapter", ORIGINAL, lambda m: m.merge_adapter()),
    Scenario("merge then unmerge", PLANNED, _then(lambda m: m.merge_adapter(), lambda m: m.unmerge_adapter())),
    Scenario("inside disable_adapter()", ORIGINAL, context=lambda m: m.disable_adapter()),
    Scenario("lora_A frozen (requires_grad False)", PLANNED,
             lambda m: [p.requires_grad_(False) for n, p in m.named_parameters() if "lora_A" in n]),
    Scenario("every adapter frozen", PLANNED, lambda m: [p.requires_grad_(False) for p in m.parameters()]),
    Scenario("base weights made trainable", ORIGINAL,
             lambda m: [p.requires_grad_(True) for n, p in m.named_parameters() if "base_layer" in n]),
    Scenario(".to(float32)", ORIGINAL, lambda m: m.to(torch.float32)),
    Scenario(".to(bfloat16)", ORIGINAL, lambda m: m.to(torch.bfloat16)),
    Scenario("eval()", PLANNED, lambda m: m.eval()),
    Scenario("eval() then train()", PLANNED, lambda m: m.eval().train()),
    Scenario("lora_dropout p changed", ORIGINAL,
             lambda m: [setattr(d, "p", 0.3) for n, d in m.named_modules() if n.endswith("lora_dropout.default")]),
    Scenario("base weight replaced by a new Parameter", PLANNED,
             _replace_weight(lambda m: (_q(m).base_layer, "weight"), 1.5)),
    Scenario("lora_B replaced by a new Parameter", PLANNED,
             _replace_weight(lambda m: (_q(m).lora_B["default"], "weight"), -2.0)),
    Scenario("base weight edited in place", PLANNED, _no_grad_edit(lambda m: _q(m).base_layer.weight.mul_(0.5))),
    Scenario("lora_A edited in place", PLANNED, _no_grad_edit(lambda m: _q(m).lora_A["default"].weight.add_(1.0))),
    Scenario("base bias added to a layer planned without one", ORIGINAL,
             lambda m: setattr(_q(m).base_layer, "bias", torch.nn.Parameter(torch.ones(32, dtype=torch.float64),
                                                                             requires_grad=False))),
    Scenario("adapter scale changed (set_scale)", ORIGINAL, lambda m: _q(m).set_scale("default", 3.0)),
    Scenario("called under no_grad", PLANNED, context=lambda m: torch.no_grad()),
    Scenario("called under inference_mode", PLANNED, context=lambda m: torch.inference_mode()),
    Scenario("called under CPU autocast", ORIGINAL, context=lambda m: torch.autocast("cpu", dtype=torch.bfloat16)),
    Scenario("zero-size batch", ORIGINAL, x=_x(0, 32)),
    Scenario("3-D input", PLANNED, x=_x(2, 5, 32)),
    Scenario("non-contiguous (transposed) input, dropout on", ORIGINAL, x=_x(32, 7, make=lambda t: t.T)),
    Scenario("non-contiguous (transposed) input, eval", PLANNED, lambda m: m.eval(), x=_x(32, 7, make=lambda t: t.T)),
    Scenario("strided input (every other row and feature)", PLANNED, x=_x(14, 64, make=lambda t: t[::2, ::2])),
    Scenario("expanded (stride 0) input", PLANNED, x=_x(1, 32, make=lambda t: t.expand(6, 32))),
    Scenario("NaN in the input", PLANNED, x=_x(6, 32, make=lambda t: t.index_fill(0, torch.tensor([1]), float("nan")))),
    Scenario("inf in the input", PLANNED, x=_x(6, 32, make=lambda t: t.index_fill(1, torch.tensor([3]), float("inf")))),
    Scenario("very large N (2**17 rows)", PLANNED, x=_x(2 ** 17, 32)),
    Scenario("input of another dtype (float32)", ERROR, x=_x(6, 32, make=lambda t: t.float())),
    Scenario("input with the wrong feature count", ERROR, x=_x(6, 31)),
]


def test_the_suite_has_30_or_more_scenarios():
    assert len(SCENARIOS) >= 30 and len({s.name for s in SCENARIOS}) == len(SCENARIOS)


@pytest.fixture(scope="module")
def optimized_pair():
    model = tiny_llama(0.1, torch.float64)
    ref = copy.deepcopy(model)
    runlora_fx.optimize(model, example_kwargs={"input_ids": tokens()})
    assert len(api.optimized_sites(model)) == 7
    return model, ref


def _run(model, scenario):
    """The call's outputs and every gradient it produced (a layer call or a model step)."""
    ctx = scenario.context(model) if scenario.context else torch.enable_grad()
    with ctx:
        if scenario.x is None:
            if not torch.is_grad_enabled():
                torch.manual_seed(3)
                return [model(input_ids=tokens(2, 12), labels=tokens(2, 12)).loss]
            model.zero_grad(set_to_none=True)
            torch.manual_seed(3)
            loss = model(input_ids=tokens(2, 12), labels=tokens(2, 12)).loss
            if loss.requires_grad:
                loss.backward()
            return [loss.float(), *[p.grad for _, p in sorted(model.named_parameters()) if p.grad is not None]]
        x = scenario.x().requires_grad_(True) if scenario.x().is_leaf else scenario.x()
        torch.manual_seed(3)
        y = _q(model)(x)
        if y.numel() and y.requires_grad:
            y.nan_to_num(0.0, 0.0, 0.0).square().sum().backward()
        return [y, *([x.grad] if x.grad is not None else [])] + \
            [p.grad for p in _q(model).parameters() if p.grad is not None]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario(optimized_pair, scenario, monkeypatch):
    model, ref = (copy.deepcopy(m) for m in optimized_pair)
    paths = []
    planned_tensors = api._planned_tensors

    def counting(site, *args):  # which path layer 0's q_proj took, at every call
        tensors = planned_tensors(site, *args)
        if site.module is _q(model):
            paths.append(tensors is not None)
        return tensors

    monkeypatch.setattr(api, "_planned_tensors", counting)
    for m in (model, ref):
        torch.manual_seed(0)  # new adapters start equal
        scenario.change(m)
    if scenario.gets == ERROR:
        with pytest.raises(Exception) as want:
            _run(ref, scenario)
        with pytest.raises(type(want.value)):
            _run(model, scenario)
        assert not any(paths)
        return
    got, want = _run(model, scenario), _run(ref, scenario)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        if a.device.type == "meta":
            assert a.shape == b.shape
            continue
        tol = 1e-9 if a.dtype == torch.float64 else 2e-2
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True)
    assert paths, "no patched module was called"
    assert any(paths) == (scenario.gets == PLANNED), paths


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_cuda_and_back(optimized_pair):
    model, ref = (copy.deepcopy(m) for m in optimized_pair)
    model.cuda()
    ref.cuda()
    ids = tokens().cuda()
    torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    model.cpu()
    assert api._planned_tensors(api.optimized_sites(model)[0], torch.randn(2, 32, dtype=torch.float64), (), {})


def test_to_meta_runs_the_original_forward(optimized_pair):
    model = copy.deepcopy(optimized_pair[0]).to("meta")
    out = model(input_ids=tokens().to("meta")).logits
    assert out.device.type == "meta" and out.shape == (2, 10, 64)
