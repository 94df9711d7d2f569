"""Plain records that the matcher produces and every later stage reads.

A graph-level `LoraSite` names FX nodes; a parameter-level `LoraParams` names the real tensors behind them (what
ReLoRA merges and what `optimize` patches). Both are plain data: no behaviour lives here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx


@dataclass
class AdapterSite:
    """One adapter of a site: y += scale * (dropout(cast(x)) @ A^T @ B^T + lora_bias)."""

    name: str  # adapter name ("default" for peft), or the module attribute it came from
    lora_a: fx.Node  # node producing A (r x i)
    lora_b: fx.Node  # node producing B (o x r)
    scale: float
    dropout_p: float = 0.0  # 0.0 when there is no dropout node
    dropout_train: bool = False  # the `training` flag of the dropout call
    lora_bias: fx.Node | None = None  # bias of B (peft lora_bias=True); scaled with the adapter
    input_cast: torch.dtype | None = None  # dtype x is cast to before the adapter (peft's fp32-adapter cast)
    nodes: list[fx.Node] = field(default_factory=list)  # the adapter's own nodes (dropout, cast, linears, mul)
    # Added by passes.match (all optional, defaults keep older constructors valid):
    delta_cast: torch.dtype | None = None  # dtype the adapter's result is cast to before the add, if it is
    a_requires_grad: bool | None = None  # None: not knowable from the example inputs / node meta
    b_requires_grad: bool | None = None
    lora_bias_requires_grad: bool | None = None


@dataclass
class LoraSite:
    """A frozen linear plus its adapters, found in an FX graph, that can be replaced by one planned node."""

    module_path: str  # owning module, e.g. "model.layers.0.self_attn.q_proj"
    x: fx.Node  # input activation (N... x i)
    weight: fx.Node  # base weight (o x i), or (i x o) when `weight_transposed`
    bias: fx.Node | None
    adapters: list[AdapterSite]
    output: fx.Node  # the node whose value the site computes (after any final cast)
    output_cast: torch.dtype | None = None  # peft casts the sum back to the base result dtype
    base_node: fx.Node | None = None  # the base linear call
    nodes: list[fx.Node] = field(default_factory=list)  # every node that the rewrite replaces
    quant_state: Any = None  # bitsandbytes 4-bit state when the base is Linear4bit (None: dense, or not reachable)
    quant_compute_dtype: torch.dtype | None = None  # set iff the base is a 4-bit call: the dtype it computes in
    # Added by passes.match (all optional): gradient flags the planner needs, None when not knowable.
    x_requires_grad: bool | None = None  # from x's node meta example value
    weight_requires_grad: bool | None = None  # a trainable base weight still matches; this flags it
    bias_requires_grad: bool | None = None
    weight_transposed: bool = False  # the base weight is stored (i x o): GPT-2 Conv1D, peft fan_in_fan_out


@dataclass
class SkippedSite:
    """A linear that looked like a LoRA layer but was left alone, and why (explain() prints the reason)."""

    module_path: str
    reason: str
    nodes: list[fx.Node] = field(default_factory=list)  # the nodes the failed attempt looked at (left untouched)


@dataclass
class AdapterParams:
    name: str
    lora_a: torch.nn.Parameter
    lora_b: torch.nn.Parameter
    scale: float
    lora_bias: torch.nn.Parameter | None = None


@dataclass
class LoraParams:
    """The real tensors of one LoRA site: what ReLoRA merges into and what a patched module reads."""

    module_path: str
    weight: torch.Tensor  # a Parameter, or a bitsandbytes Params4bit for a 4-bit base
    bias: torch.Tensor | None
    adapters: list[AdapterParams]
    module: torch.nn.Module | None = None  # the owning module, when known
    weight_transposed: bool = False  # `weight` is stored (i x o) (GPT-2 Conv1D); the site computes x weight + b

    @property
    def linear_weight(self) -> torch.Tensor:
        """The base weight as (o x i), the layout `F.linear` and the planned node take (a view, never a copy)."""
        return self.weight.t() if self.weight_transposed else self.weight
