"""Tiny models shared by the graph-pass tests: a peft LLaMA built from a config, and comparison helpers."""
from __future__ import annotations

import copy
import socket

import torch
import torch.nn.functional as F
from torch import nn

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(dropout: float = 0.0, dtype: torch.dtype = torch.float32, layers: int = 1, seed: int = 0,
               r: int = 4, **lora_kwargs):
    """A 1-layer LLaMA (hidden 32) with peft LoRA on all seven projections and non-zero B (so every gradient is
    exercised). bf16 models keep fp32 adapters, as peft does by default."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    base = LlamaForCausalLM(cfg).to(dtype)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout,
                                            target_modules=ALL_PROJECTIONS, **lora_kwargs))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    return model


def free_port() -> int:
    """A free TCP port on loopback, for a test's torch.distributed rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tokens(batch: int = 2, seq: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


def loss_and_grads(model, ids, seed: int = 3):
    """Loss and every trainable gradient of one step, dropout drawn from `seed`."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def assert_step_matches(got, want, truth=None, factor: float = 4.0):
    """Loss and grads equal: tightly when `truth` is None (float64), else no further from the float64 truth
    than peft itself is (times `factor`, plus a few ulps)."""
    (loss, grads), (loss_ref, grads_ref) = got, want
    assert grads.keys() == grads_ref.keys() and grads
    if truth is None:
        torch.testing.assert_close(loss, loss_ref, rtol=1e-10, atol=1e-10)
        for name in grads:
            torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-9, atol=1e-10, msg=name)
        return
    loss_t, grads_t = truth
    eps = torch.finfo(loss_ref.dtype).eps

    def close(a, b, t, what):
        ours, peft = (a.double() - t.double()).abs().max().item(), (b.double() - t.double()).abs().max().item()
        assert ours <= factor * peft + 8 * eps * max(t.abs().max().item(), 1e-3), (what, ours, peft)

    close(loss, loss_ref, loss_t, "loss")
    for name in grads:
        close(grads[name], grads_ref[name], grads_t[name], name)


def float64_truth(model, ids, seed: int = 3):
    """The same step in float64 on a deep copy: the yardstick for fp32/bf16 comparisons."""
    ref = copy.deepcopy(model).double()
    return loss_and_grads(ref, ids, seed)


class TorchtuneLoRALinear(nn.Module):
    """torchtune's LoRALinear forward."""

    def __init__(self, i=16, o=24, rank=4, alpha=8, dropout=0.1):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i), requires_grad=False)
        self.bias = nn.Parameter(torch.randn(o), requires_grad=False)
        self.rank, self.alpha = rank, alpha
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.lora_a = nn.Linear(i, rank, bias=False)
        self.lora_b = nn.Linear(rank, o, bias=False)

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        lora_out = self.lora_a(self.dropout(x))
        lora_out = (self.alpha / self.rank) * self.lora_b(lora_out)
        return out + lora_out
