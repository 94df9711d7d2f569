"""Under torch.autocast the planned node runs the Plan in autocast's dtype, as F.linear would (peft's layer runs
every linear of the site in that dtype), instead of falling back to the original forward."""
from __future__ import annotations

import copy

import pytest
import torch

import runlora_fx
from lora_models import assert_step_matches, float64_truth, tiny_llama, tokens
from runlora_fx.api import optimized_sites
from test_optimize import _planned_calls


def _step_under_autocast(model, ids, device_type="cpu", dtype=torch.bfloat16, seed=3):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast(device_type, dtype=dtype):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return (out.loss.detach(), grads), out.logits.dtype


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_cpu_bf16_autocast_runs_the_plan_and_matches_peft(dropout, monkeypatch):
    model = tiny_llama(dropout, torch.float32)
    ref = copy.deepcopy(model)
    ids = tokens(2, 12)
    runlora_fx.optimize(model, example_kwargs={"input_ids": tokens()})
    assert len(optimized_sites(model)) == 7
    calls = _planned_calls(model, monkeypatch)
    got, got_dtype = _step_under_autocast(model, ids)
    assert len(calls) == 7  # every site ran its plan (forward once each)
    want, want_dtype = _step_under_autocast(ref, ids)
    assert got_dtype == want_dtype
    # output and every gradient no further from the float64 truth than peft under autocast itself (stock tolerance)
    assert_step_matches(got, want, float64_truth(ref, ids))
    plans = {site.runner._plans[k].spec.dtype for site in optimized_sites(model) for k in site.runner._plans}
    assert torch.bfloat16 in plans  # planned for autocast's dtype, not the parameters'


def test_autocast_leaves_float64_sites_to_the_original_forward(monkeypatch):
    model = tiny_llama(0.0, torch.float64)
    ref = copy.deepcopy(model)
    runlora_fx.optimize(model, example_kwargs={"input_ids": tokens()})
    calls = _planned_calls(model, monkeypatch)
    ids = tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, want = model(input_ids=ids).logits, ref(input_ids=ids).logits
    assert not calls  # autocast does not cast float64, and neither does the planned forward
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_runs_the_plan_and_matches_peft(dtype, monkeypatch):
    model = tiny_llama(0.05, torch.float32).cuda()
    ref = copy.deepcopy(model)
    ids = tokens(2, 12).cuda()
    runlora_fx.optimize(model, example_kwargs={"input_ids": ids})
    calls = _planned_calls(model, monkeypatch)
    got, _ = _step_under_autocast(model, ids, "cuda", dtype)
    want, _ = _step_under_autocast(ref, ids, "cuda", dtype)
    assert calls
    assert_step_matches(got, want, float64_truth(ref, ids))
