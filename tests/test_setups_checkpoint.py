"""Gradient checkpointing, as most LoRA recipes switch it on: HF's `gradient_checkpointing_enable` (reentrant and
not) and `torch.utils.checkpoint` in a hand-written model. The checkpointed regions reach the matcher as a
higher-order op with a subgraph; the planned node runs again in the recompute and must draw the same dropout mask
there (torch's checkpoint restores the RNG state), so loss and gradients equal peft's under the same setup."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.utils.checkpoint
from lora_models import assert_step_matches, float64_truth, loss_and_grads, tiny_llama, tokens
from torch import nn

import runlora_fx
from runlora_fx.api import optimized_sites


def _checkpointed(reentrant: bool, dropout: float = 0.05, dtype=torch.float64):
    model = tiny_llama(dropout, dtype, layers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers renames it activation_checkpointing_enable
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.config.use_cache = False
    return model


@pytest.mark.parametrize("reentrant", [False, True])
def test_explain_sees_every_checkpointed_site(reentrant):
    report = runlora_fx.explain(_checkpointed(reentrant), example_kwargs={"input_ids": tokens()})
    assert len(report.sites) == 14 and not report.skipped, str(report)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_step_equals_peft(reentrant, dtype):
    model = _checkpointed(reentrant, dtype=dtype)
    ref = copy.deepcopy(model)
    runlora_fx.optimize(model)  # captured on the first real call, in train mode
    ids = tokens(2, 12)
    got, want = loss_and_grads(model, ids), loss_and_grads(ref, ids)
    assert len(optimized_sites(model)) == 14, model._runlora_fx.skipped
    assert_step_matches(got, want, None if dtype == torch.float64 else float64_truth(ref, ids))
    # a second step: the recompute of a cached plan still draws the forward's masks
    assert_step_matches(loss_and_grads(model, ids, seed=7), loss_and_grads(ref, ids, seed=7),
                        None if dtype == torch.float64 else float64_truth(ref, ids, seed=7))


class _Block(nn.Module):
    def __init__(self, d=16, r=4):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d) / 4, requires_grad=False)
        self.A = nn.Parameter(torch.randn(r, d))
        self.B = nn.Parameter(torch.randn(d, r))

    def forward(self, x):
        h = torch.nn.functional.dropout(x, 0.1, self.training)
        return x @ self.weight.T + (h @ self.A.T) @ self.B.T * 0.5


class _Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False))
        return x


def test_hand_written_checkpoint_regions_are_planned_and_exact():
    torch.manual_seed(0)
    model = _Checkpointed().double()
    ref = copy.deepcopy(model)
    x = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
    runlora_fx.optimize(model, (x,))
    assert sorted(s.path for s in optimized_sites(model)) == ["blocks.0", "blocks.1"]
    grads = []
    for m in (model, ref):
        torch.manual_seed(5)
        m(x).square().sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in m.parameters() if p.requires_grad])
        x.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
