"""What a user does to an optimized model besides training it: pickle / torch.save it, deepcopy it (DPO
reference models, EMA, model soups), call explain with the wrong argument, make the first call for inference.
Each copy must compute with its own parameters and stay planned; nothing may share state with the original."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from lora_models import assert_step_matches, loss_and_grads, tiny_llama, tokens

import runlora_fx
from runlora_fx.api import optimized_sites


def _optimized(dropout=0.0, dtype=torch.float64, first_call=False):
    model = tiny_llama(dropout, dtype)
    ref = copy.deepcopy(model)
    if first_call:
        runlora_fx.optimize(model)
    else:
        runlora_fx.optimize(model, example_kwargs={"input_ids": tokens()})
    return model, ref


def _planned(model) -> int:
    return sum(1 for s in optimized_sites(model) if s.module.forward is s.planned_forward)


@pytest.mark.parametrize("when", ["before_first_call", "after_first_call", "with_example"])
def test_torch_save_and_load_trains_like_peft(when):
    model, ref = _optimized(0.05, first_call=when != "with_example")
    if when == "after_first_call":
        loss_and_grads(model, tokens())
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    ids = tokens(2, 12)
    assert_step_matches(loss_and_grads(loaded, ids), loss_and_grads(ref, ids))
    assert _planned(loaded) == 7
    assert all(s.module is loaded.get_submodule(s.path) for s in optimized_sites(loaded))
    pickle.loads(pickle.dumps(model))  # plain pickle too


@pytest.mark.parametrize("first_call", [False, True])
def test_deepcopy_computes_with_its_own_parameters(first_call):
    model, ref = _optimized(0.05, first_call=first_call)
    ids = tokens()
    if first_call:
        loss_and_grads(model, ids)
    twin = copy.deepcopy(model)
    with torch.no_grad():  # the copy drifts from the original, as after a few steps of its own
        for name, p in twin.named_parameters():
            if "lora_B" in name:
                p.add_(0.25)
    ref_twin = copy.deepcopy(ref)
    with torch.no_grad():
        for name, p in ref_twin.named_parameters():
            if "lora_B" in name:
                p.add_(0.25)
    model.zero_grad(set_to_none=True)
    assert_step_matches(loss_and_grads(twin, ids), loss_and_grads(ref_twin, ids))
    assert all(p.grad is None for p in model.parameters()), "the copy wrote gradients into the original"
    assert_step_matches(loss_and_grads(model, ids), loss_and_grads(ref, ids))
    assert _planned(twin) == 7 and _planned(model) == 7


def test_deepcopy_before_the_first_call_has_its_own_state():
    model, ref = _optimized(0.0, first_call=True)
    twin = copy.deepcopy(model)
    ids = tokens()
    assert_step_matches(loss_and_grads(model, ids), loss_and_grads(ref, ids))
    assert_step_matches(loss_and_grads(twin, ids), loss_and_grads(ref, ids))
    assert _planned(model) == 7 and _planned(twin) == 7
    assert not {id(s.module) for s in optimized_sites(model)} & {id(s.module) for s in optimized_sites(twin)}


def test_restore_after_pickle_and_deepcopy():
    model, _ = _optimized()
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        runlora_fx.restore(other)
        assert not hasattr(other, "_runlora_fx")
        assert all("forward" not in m.__dict__ for m in other.modules())
    assert _planned(model) == 7


def test_explain_names_example_kwargs_when_a_dict_is_passed_positionally():
    model = tiny_llama()
    with pytest.raises(TypeError, match="example_kwargs"):
        runlora_fx.explain(model, {"input_ids": tokens()})
    with pytest.raises(TypeError, match="example_kwargs"):
        runlora_fx.optimize(model, {"input_ids": tokens()})


def _seeded(model, ids):
    torch.manual_seed(11)
    return model(input_ids=ids).logits


@pytest.mark.parametrize("how", ["inference_mode_first_call", "inference_tensor_example", "inference_tensor_call"])
def test_first_call_for_inference_then_training(how):
    model, ref = _optimized(0.05, first_call=True)
    with torch.inference_mode():
        inf_ids = tokens()
    if how == "inference_mode_first_call":
        with torch.inference_mode():
            got = _seeded(model, inf_ids)
            torch.testing.assert_close(got, _seeded(ref, inf_ids), rtol=1e-10, atol=1e-10)
    elif how == "inference_tensor_example":
        runlora_fx.restore(model)
        runlora_fx.optimize(model, example_kwargs={"input_ids": inf_ids})
    else:
        assert_step_matches(loss_and_grads(model, inf_ids), loss_and_grads(ref, inf_ids))
    assert _planned(model) == 7
    ids = tokens(2, 12)
    assert_step_matches(loss_and_grads(model, ids), loss_and_grads(ref, ids))
