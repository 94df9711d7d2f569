"""The planned LoRA linear for dense bases: a custom autograd node that runs whatever Plan the search chose.

`LoraLinearRunner` holds what does not change between calls (scales, dropout, bias layout, search options) and
chooses the plan at call time from the actual N, dtypes, device, grad flags and training flag, so dynamic shapes
and generation never run a plan made for another N. Plans are cached by `planner.search`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..planner.cost import is_parameter
from ..planner.device import get_profile
from ..planner.expr import AdapterSpec, SiteSpec
from ..planner.plan import Plan
from ..planner.search import SearchOptions, search
from .executor import run


@dataclass(frozen=True)
class AdapterConfig:
    scale: float
    dropout: float = 0.0
    lora_bias: bool = False


def _input_names(plan: Plan) -> list[str]:
    names = ["x", "W"] + (["b"] if plan.spec.bias else [])
    for k, a in enumerate(plan.spec.adapters):
        names += [f"A{k}", f"B{k}"] + ([f"lb{k}"] if a.lora_bias else [])
    return names


class PlannedLoraFunction(torch.autograd.Function):
    """Forward and joint backward of one site as its Plan says; saves exactly the Plan's saved set."""

    @staticmethod
    def forward(ctx, plan: Plan, *inputs: torch.Tensor) -> torch.Tensor:
        low = plan.lowered
        names = _input_names(plan)
        env = run(low.forward, dict(zip(names, inputs)), low.shapes)
        params = [n for n in names if is_parameter(n)]
        acts = [n for n in low.saved if not is_parameter(n)]
        ctx.plan, ctx.saved_names = plan, acts + params
        ctx.save_for_backward(*[env[n] for n in acts + params])
        return env[low.output]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        plan, low = ctx.plan, ctx.plan.lowered
        env = dict(zip(ctx.saved_names, ctx.saved_tensors))
        env["G"] = grad.contiguous()
        env = run(low.backward, env, low.shapes)
        grads = [env[low.grads[n]] if n in low.grads else None for n in _input_names(plan)]
        return (None, *grads)


class LoraLinearRunner:
    """Callable for one LoRA site: ``runner(x, W, b, [(A, B, lora_bias), ...], training)``."""

    def __init__(self, adapters: tuple[AdapterConfig, ...], options: SearchOptions = SearchOptions()):
        if not adapters:
            raise ValueError("a LoRA site needs at least one adapter")
        self.adapters = tuple(adapters)
        self.options = options

    def spec_for(self, x: torch.Tensor, weight: torch.Tensor, bias, adapters, training: bool) -> SiteSpec:
        """The SiteSpec of this call; raises ValueError on inconsistent shapes or dtypes."""
        if weight.dim() != 2:
            raise ValueError(f"base weight must be 2-D (out x in), got shape {tuple(weight.shape)}")
        o, i = weight.shape
        if x.shape[-1] != i:
            raise ValueError(f"input has {x.shape[-1]} features but the base weight expects {i}")
        if x.dtype != weight.dtype:
            raise ValueError(f"input dtype {x.dtype} differs from the base weight dtype {weight.dtype}")
        if len(adapters) != len(self.adapters):
            raise ValueError(f"expected {len(self.adapters)} adapters, got {len(adapters)}")
        grad_on = torch.is_grad_enabled()
        if weight.requires_grad and grad_on:
            raise ValueError("the base weight requires grad; a planned LoRA site needs a frozen base")
        specs, adapter_dtype = [], adapters[0][0].dtype
        for k, ((a, b, lb), cfg) in enumerate(zip(adapters, self.adapters)):
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != i or b.shape[0] != o or b.shape[1] != a.shape[0]:
                raise ValueError(f"adapter {k}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit a {o}x{i} base")
            if a.dtype != adapter_dtype or b.dtype != adapter_dtype:
                raise ValueError(f"adapter {k}: every adapter tensor must share one dtype, got {a.dtype}/{b.dtype}")
            if (lb is not None) != cfg.lora_bias:
                raise ValueError(f"adapter {k}: lora bias given={lb is not None} but configured={cfg.lora_bias}")
            specs.append(AdapterSpec(a.shape[0], cfg.scale, cfg.dropout, cfg.lora_bias,
                                     grad_on and a.requires_grad, grad_on and b.requires_grad,
                                     grad_on and lb is not None and lb.requires_grad))
        return SiteSpec(x.numel() // i, i, o, tuple(specs), bias=bias is not None, dtype=weight.dtype,
                        adapter_dtype=adapter_dtype if adapter_dtype != weight.dtype else None,
                        grad_x=grad_on and x.requires_grad, grad_bias=grad_on and bias is not None and bias.requires_grad,
                        training=training)

    def plan_for(self, spec: SiteSpec, device: torch.device) -> Plan:
        return search(spec, self.options, get_profile(device))

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 adapters: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], training: bool) -> torch.Tensor:
        spec = self.spec_for(x, weight, bias, adapters, training)
        return run_plan(self.plan_for(spec, x.device), x, weight, bias, adapters)


def run_plan(plan: Plan, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             adapters: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
    """Run one given plan (tests, benchmarks and autotuning use this; models go through LoraLinearRunner)."""
    flat = [x.reshape(-1, plan.spec.in_features), weight] + ([bias] if bias is not None else [])
    for a, b, lb in adapters:
        flat += [a, b] + ([lb] if lb is not None else [])
    y = PlannedLoraFunction.apply(plan, *flat)
    return y.view(*x.shape[:-1], plan.spec.out_features)
