"""GPT-2 `Conv1D` bases (peft `fan_in_fan_out=True`): matched as `x W + b` with W stored (i x o), and planned."""
from __future__ import annotations

import copy

import pytest
import torch

from runlora_fx.passes.match import find_lora_params, match_model
from tests.lora_models import assert_step_matches, float64_truth, loss_and_grads

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]  # attn.c_proj and mlp.c_proj: 4 LoRA layers per block


def tiny_gpt2(dropout: float = 0.0, dtype: torch.dtype = torch.float32, layers: int = 2, seed: int = 0):
    """A GPT-2 (hidden 32) with peft LoRA on every Conv1D, non-zero B so every gradient is exercised."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=layers, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0,
                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    base = GPT2LMHeadModel(cfg).to(dtype)
    base.loss_type = "ForCausalLM"  # GPT-2 names no loss type: transformers would log (a graph break) per call
    model = get_peft_model(base,
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=GPT2_TARGETS,
                                      fan_in_fan_out=True))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    return model


def ids(batch: int = 2, seq: int = 8) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(1))


def test_every_gpt2_lora_layer_is_matched_with_its_stored_layout():
    model = tiny_gpt2()
    found = match_model(model, (ids(),))
    assert not found.skipped, [(s.module_path, s.reason) for s in found.skipped]
    paths = sorted(s.module_path.split("transformer.")[1] for s in found.sites)
    assert paths == sorted(f"h.{k}.{m}" for k in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                      "mlp.c_proj"))
    assert all(s.weight_transposed for s in found.sites)
    for p in find_lora_params(model, (ids(),)):
        module = model.get_submodule(p.module_path)
        assert p.weight is module.base_layer.weight and p.weight_transposed
        assert p.linear_weight.shape == (module.base_layer.nf, module.base_layer.weight.shape[0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backend_step_on_gpt2_equals_peft(dtype):
    model = tiny_gpt2(dtype=dtype)
    want = loss_and_grads(model, ids())
    from runlora_fx import backend

    backend.last_reports.clear()
    compiled = torch.compile(copy.deepcopy(model), backend="runlora", options={"inner": "aot_eager"},
                             fullgraph=True)
    got = loss_and_grads(compiled, ids())
    assert_step_matches(got, want, None if dtype == torch.float64 else float64_truth(model, ids()))
    assert sum(r["rewritten"] for r in backend.last_reports) == 8, backend.last_reports
    assert not [s for r in backend.last_reports for s in r["skipped"]]


def test_backend_plans_gpt2_sites_under_dynamic_shapes():
    """A second sequence length makes dynamo recompile with symbolic sizes: the Conv1D flatten / unflatten is
    still recognised there (compared symbolically, without guards) and every site planned. Before, all 8 were
    skipped as 'not added to a base linear' in the dynamic graph."""
    from runlora_fx import backend

    model = tiny_gpt2(dtype=torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model), backend="runlora", options={"inner": "aot_eager"})
    loss_and_grads(compiled, ids(seq=8))
    backend.last_reports.clear()
    got = loss_and_grads(compiled, ids(seq=11))
    assert backend.last_reports and sum(r["rewritten"] for r in backend.last_reports) == 8, backend.last_reports
    assert_step_matches(got, loss_and_grads(model, ids(seq=11)), float64_truth(model, ids(seq=11)))


class HandConv1DLoRA(torch.nn.Module):
    """A hand-written LoRA layer over transformers' Conv1D (no peft, so no fan_in_fan_out flag to read)."""

    def __init__(self, i: int = 12, o: int = 10, r: int = 3):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.base = Conv1D(o, i)
        self.base.requires_grad_(False)
        self.lora_a = torch.nn.Linear(i, r, bias=False)
        self.lora_b = torch.nn.Linear(r, o, bias=False)
        torch.nn.init.normal_(self.lora_b.weight)

    def forward(self, x):
        return self.base(x) + 2.0 * self.lora_b(self.lora_a(x))


def test_relora_merges_a_matched_conv1d_site_in_its_stored_layout():
    from runlora_fx.train.relora import merge_and_reinit

    torch.manual_seed(0)
    model = HandConv1DLoRA().double()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    y0 = model(x)
    (site,) = merge_and_reinit(model, example_inputs=(x,))
    assert site.weight_transposed and site.weight is model.base.weight
    torch.testing.assert_close(model(x), y0, rtol=1e-12, atol=1e-12)  # the function is unchanged by the merge
    assert not model.lora_b.weight.any()


@pytest.mark.parametrize("dtype,dropout", [(torch.float64, 0.0), (torch.float64, 0.1), (torch.float32, 0.1)])
def test_optimize_plans_every_gpt2_lora_layer_and_equals_peft(dtype, dropout, monkeypatch):
    import runlora_fx
    from runlora_fx.api import optimized_sites

    model = tiny_gpt2(dropout=dropout, dtype=dtype)
    ref = copy.deepcopy(model)
    runlora_fx.optimize(model, example_kwargs={"input_ids": ids()})
    assert len(optimized_sites(model)) == 8
    from runlora_fx.kernels.dense import LoraLinearRunner

    planned, call = [], LoraLinearRunner.__call__  # count the planned runs: peft's own forward does not call them
    monkeypatch.setattr(LoraLinearRunner, "__call__", lambda self, *a: planned.append(1) or call(self, *a))
    got = loss_and_grads(model, ids())
    assert len(planned) == 8
    want = loss_and_grads(ref, ids())
    assert_step_matches(got, want, None if dtype == torch.float64 else float64_truth(ref, ids()))


def test_joint_lowering_leaves_conv1d_sites_to_inductor_with_a_reason():
    from runlora_fx import backend

    model = tiny_gpt2(layers=1)
    backend.last_reports.clear()
    compiled = torch.compile(copy.deepcopy(model), backend="runlora",
                             options={"inner": "aot_eager", "lowering": "joint"})
    got, want = loss_and_grads(compiled, ids()), loss_and_grads(model, ids())
    assert_step_matches(got, want, float64_truth(model, ids()))
    reasons = [s.reason for r in backend.last_reports for s in r["skipped"]]
    assert len(reasons) == 4 and all("Conv1D" in r for r in reasons)
