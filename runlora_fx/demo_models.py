"""Small models for the demo, the examples and the tests: a QLoRA LLaMA built without the hub.

`transformers` quantizes to bitsandbytes 4-bit only inside `from_pretrained`, which needs a checkpoint; these
helpers build a LLaMA from a `LlamaConfig`, swap its projections for `bitsandbytes.nn.Linear4bit` (quantized on
the spot, CPU included), and put peft LoRA on them. Needs the `hf` and `qlora` extras.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TINY_LLAMA = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=64)


def quantize_linear_4bit(linear: nn.Linear, *, quant_type: str = "nf4", compress_statistics: bool = True,
                         compute_dtype: torch.dtype = torch.float32, blocksize: int = 64) -> nn.Module:
    """`linear` as a bitsandbytes `Linear4bit` holding its weight quantized (on `linear`'s device).

    The bias (frozen) is stored in `compute_dtype`, where bitsandbytes would move it on its first call anyway.
    """
    import bitsandbytes as bnb

    device = linear.weight.device
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=compute_dtype, compress_statistics=compress_statistics, quant_type=quant_type,
                          device="meta")
    q.weight = bnb.nn.Params4bit(linear.weight.data.detach().clone(), requires_grad=False, quant_type=quant_type,
                                 compress_statistics=compress_statistics, blocksize=blocksize, module=q)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.detach().to(compute_dtype).clone(), requires_grad=False)
    return q.to(device)  # Params4bit quantizes when it is moved to a real device


def quantize_4bit_(model: nn.Module, names: tuple[str, ...] = LLAMA_PROJECTIONS, **quant_kwargs: Any) -> int:
    """Replace, in place, every `nn.Linear` whose attribute name is in `names` by its 4-bit version; returns how
    many were replaced. `quant_kwargs` go to `quantize_linear_4bit`."""
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if name in names and type(child) is nn.Linear]
    for parent, name, child in targets:
        setattr(parent, name, quantize_linear_4bit(child, **quant_kwargs))
    return len(targets)


def build_qlora_llama(config_kwargs: dict[str, Any] | None = None, *, quant_type: str = "nf4",
                      compress_statistics: bool = True, compute_dtype: torch.dtype = torch.bfloat16,
                      dtype: torch.dtype = torch.float32, peft_layer: Literal["bnb", "generic"] = "bnb",
                      r: int = 8, lora_alpha: int | None = None, lora_dropout: float = 0.05,
                      target_modules: tuple[str, ...] = LLAMA_PROJECTIONS, seed: int = 0,
                      **lora_kwargs: Any) -> nn.Module:
    """A peft QLoRA LLaMA: `LlamaForCausalLM(LlamaConfig(**config_kwargs))` in `dtype`, its `target_modules`
    quantized to bitsandbytes 4-bit, LoRA (rank `r`) on them.

    config_kwargs: LlamaConfig fields over `TINY_LLAMA` (use attention_bias/mlp_bias for biased projections).
    peft_layer: "bnb" gives peft's own `lora.bnb.Linear4bit` (what a model loaded in 4-bit gets), "generic" its
        plain `lora.Linear` around the `Linear4bit`.
    lora_kwargs: further `LoraConfig` fields (init_lora_weights, ...).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    if peft_layer not in ("bnb", "generic"):
        raise ValueError(f"peft_layer must be 'bnb' or 'generic', got {peft_layer!r}")
    torch.manual_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **(config_kwargs or {})})).to(dtype)
    quantize_4bit_(base, tuple(target_modules), quant_type=quant_type, compress_statistics=compress_statistics,
                   compute_dtype=compute_dtype)
    if peft_layer == "bnb":
        base.is_loaded_in_4bit = True  # what from_pretrained(quantization_config=...) sets; peft dispatches on it
    config = LoraConfig(r=r, lora_alpha=lora_alpha if lora_alpha is not None else 2 * r, lora_dropout=lora_dropout,
                        target_modules=list(target_modules), **lora_kwargs)
    return get_peft_model(base, config)
