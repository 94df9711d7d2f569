"""The planned LoRA linear for dense bases: a custom autograd node that runs whatever Plan the search chose.

`LoraLinearRunner` holds what does not change between calls (scales, dropout, bias layout, search options) and
chooses the plan at call time from the actual N, dtypes, device, grad flags and training flag, so dynamic shapes
and generation never run a plan made for another N. Plans are cached by `planner.search`.

A few small hooks (`base_shape`, `base_dtype`, `quant_spec`, `constants`, `check_base`, `accepts`) are all that
`kernels.qlora.QLoraLinearRunner` overrides to run the same node over a bitsandbytes 4-bit base.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from . import autotune
from ..planner.device import get_profile
from ..planner.expr import AdapterSpec, QuantSpec, SiteSpec
from ..planner.plan import Plan
from ..planner.search import SearchOptions
from ..planner.signature import SiteSignature


_CALL_CACHE_SIZE = 256  # distinct call signatures remembered per runner (generation with growing N makes many)


@dataclass(frozen=True)
class AdapterConfig:
    scale: float
    dropout: float = 0.0
    lora_bias: bool = False


class PlannedLoraFunction(torch.autograd.Function):
    """Forward and joint backward of one site as its Plan says; saves exactly the Plan's saved set.

    Both run the Plan's generated straight-line code (`Plan.forward_graph`, `Plan.backward_graph`). `inputs` are
    the site's tensors in `SiteSignature` order; `constants` the values of `signature.constants` (a 4-bit
    weight's quant state), which stay alive anyway.
    """

    @staticmethod
    def forward(ctx, plan: Plan, constants: tuple, *inputs: torch.Tensor) -> torch.Tensor:
        out = plan.forward_graph.forward(*inputs, *constants)
        ctx.plan, ctx.constants = plan, constants
        ctx.save_for_backward(*out[1:], *inputs[1:])  # the saved activations, then the parameters
        return out[0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (None, None, *ctx.plan.backward_graph.forward(*ctx.saved_tensors, *ctx.constants, grad.contiguous()))


class LoraLinearRunner:
    """Callable for one LoRA site: ``runner(x, W, b, [(A, B, lora_bias), ...], training)``."""

    def __init__(self, adapters: tuple[AdapterConfig, ...], options: SearchOptions = SearchOptions(), x_readers: int = 1):
        if not adapters:
            raise ValueError("a LoRA site needs at least one adapter")
        self.adapters = tuple(adapters)
        self.options = options
        self.x_readers = x_readers  # sites reading the same x (see SiteSpec.x_readers)
        self._plans: dict[tuple, Any] = {}  # see remember

    # -- hooks: what a dense base looks like (kernels.qlora overrides these for a 4-bit base) -----------------
    def base_shape(self, weight: torch.Tensor) -> tuple[int, int]:
        """(out_features, in_features) of the base weight."""
        return tuple(weight.shape)  # type: ignore[return-value]

    def base_dtype(self, weight: torch.Tensor) -> torch.dtype:
        """The site's input and result dtype."""
        return weight.dtype

    def quant_spec(self) -> QuantSpec | None:
        """The 4-bit format of the base weight; None for a dense base."""
        return None

    def constants(self) -> dict[str, Any]:
        """Non-tensor inputs of the steps (a 4-bit weight's quant state), read at call time."""
        return {}

    def check_base(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """ValueError when x, the base weight and bias do not fit together."""
        if weight.dim() != 2:
            raise ValueError(f"base weight must be 2-D (out x in), got shape {tuple(weight.shape)}")
        if x.shape[-1] != weight.shape[1]:
            raise ValueError(f"input has {x.shape[-1]} features but the base weight expects {weight.shape[1]}")
        if x.dtype != weight.dtype:
            raise ValueError(f"input dtype {x.dtype} differs from the base weight dtype {weight.dtype}")

    def accepts(self, x: torch.Tensor, weight: torch.Tensor, module: torch.nn.Module | None = None) -> bool:
        """Whether a call with input `x` is one this runner was planned for (a cheap per-call check; the owning
        `module` lets a 4-bit runner defer to bitsandbytes' own inference kernel)."""
        return x.dtype == weight.dtype and x.dim() >= 1 and x.shape[-1] == weight.shape[1]

    def with_adapters(self, adapters: tuple[AdapterConfig, ...]) -> "LoraLinearRunner":
        """The same runner for other adapter configs."""
        other = copy.copy(self)
        other.adapters = tuple(adapters)
        other._plans = {}
        return other

    # -- planning ---------------------------------------------------------------------------------------------
    def spec_for(self, x: torch.Tensor, weight: torch.Tensor, bias, adapters, training: bool) -> SiteSpec:
        """The SiteSpec of this call, grad flags read from the tensors; ValueError on bad shapes or dtypes."""
        self.check_base(x, weight, bias)
        if weight.requires_grad and torch.is_grad_enabled():
            raise ValueError("the base weight requires grad; a planned LoRA site needs a frozen base")
        sig = self.signature(bias, adapters)
        flags = sig.tensor_flags(sig.flatten(x, weight, bias, adapters))
        return self.spec_from(x.numel() // self.base_shape(weight)[1], weight, bias, adapters, training, flags)

    def signature(self, bias, adapters) -> SiteSignature:
        """The signature of a call with this bias and these (A, B, lora bias) adapters."""
        return SiteSignature.of_tensors(bias, adapters, self.quant_spec() is not None)

    def configured_signature(self, bias: bool) -> SiteSignature:
        """The signature this runner's adapter configs imply (for unflattening a flat adapter list)."""
        return SiteSignature.of(bias, [c.lora_bias for c in self.adapters], self.quant_spec() is not None)

    def spec_from(self, n, weight: torch.Tensor, bias, adapters, training: bool, grads: list[bool]) -> SiteSpec:
        """The SiteSpec for N rows with explicit grad flags, aligned with the call's `SiteSignature.names`."""
        o, i = self.base_shape(weight)
        dtype = self.base_dtype(weight)
        if len(adapters) != len(self.adapters):
            raise ValueError(f"expected {len(self.adapters)} adapters, got {len(adapters)}")
        flags = self.signature(bias, adapters).flags_by_name(grads)
        specs, adapter_dtype = [], adapters[0][0].dtype
        for k, ((a, b, lb), cfg) in enumerate(zip(adapters, self.adapters)):
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != i or b.shape[0] != o or b.shape[1] != a.shape[0]:
                raise ValueError(f"adapter {k}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit a {o}x{i} base")
            if a.dtype != adapter_dtype or b.dtype != adapter_dtype:
                raise ValueError(f"adapter {k}: every adapter tensor must share one dtype, got {a.dtype}/{b.dtype}")
            if (lb is not None) != cfg.lora_bias:
                raise ValueError(f"adapter {k}: lora bias given={lb is not None} but configured={cfg.lora_bias}")
            specs.append(AdapterSpec(a.shape[0], cfg.scale, cfg.dropout, cfg.lora_bias,
                                     flags[f"A{k}"], flags[f"B{k}"], flags.get(f"lb{k}", False)))
        return SiteSpec(n, i, o, tuple(specs), bias=bias is not None, dtype=dtype,
                        adapter_dtype=adapter_dtype if adapter_dtype != dtype else None,
                        grad_x=flags["x"], grad_bias=flags.get("b", False), training=training, quant=self.quant_spec(),
                        x_readers=self.x_readers, dropout_rng=self.options.dropout_rng)

    def plan_for(self, spec: SiteSpec, device: torch.device, layout: tuple[str, ...] | None = None) -> Plan:
        """The plan for this call; with `layout`, only programs saving exactly those tensors are considered.
        With `options.autotune`, the finalists are timed on `device` first (`kernels.autotune`)."""
        return autotune.plan(spec, self.options, get_profile(device), device, run_plan, layout)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 adapters: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], training: bool) -> torch.Tensor:
        return run_plan(self._plan_of_call(x, weight, bias, adapters, training), x, weight, bias, adapters,
                        self.constants())

    def _plan_of_call(self, x, weight, bias, adapters, training: bool) -> Plan:
        """`plan_for(spec_for(...))`, remembered per call signature: a model calls each site with the same few
        shapes, and building the SiteSpec costs more than a peft layer's own Python. The device profile is part
        of the key, so a new calibration re-plans."""
        on = torch.is_grad_enabled()
        key = [x.shape, x.dtype, x.device, on, on and x.requires_grad, training, weight.shape, weight.dtype,
               weight.requires_grad, get_profile(x.device)]
        key += (None, None, None) if bias is None else (bias.shape, bias.dtype, bias.requires_grad)
        for ad in adapters:  # plain loops: no generator frames on this per-call path
            for t in ad:
                key += (None, None, None) if t is None else (t.shape, t.dtype, t.requires_grad)
        key = tuple(key)
        return self.remember(key, lambda: self.plan_for(self.spec_for(x, weight, bias, adapters, training), x.device))

    def remember(self, key: tuple, make) -> Any:
        """`make()`, remembered under `key` in this runner's bounded cache of call signatures."""
        hit = self._plans.get(key)
        if hit is None:
            if len(self._plans) >= _CALL_CACHE_SIZE:
                self._plans.clear()
            hit = self._plans[key] = make()
        return hit


def run_plan(plan: Plan, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             adapters: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
             constants: dict[str, Any] | None = None) -> torch.Tensor:
    """Run one given plan (tests, benchmarks and autotuning use this; models go through LoraLinearRunner).
    A 4-bit base passes its quant state as ``constants={"qs": state}``."""
    sig = plan.lowered.signature
    values = tuple(constants[n] for n in sig.constants) if sig.constants else ()
    inputs = sig.flatten(x.reshape(-1, plan.spec.in_features), weight, bias, adapters)
    if torch.is_grad_enabled():
        y = PlannedLoraFunction.apply(plan, values, *inputs)
    else:  # no graph is recorded (evaluation, generation): the forward code alone, without autograd's node
        y = plan.forward_graph.forward(*inputs, *values)[0]
    return y.view(*x.shape[:-1], plan.spec.out_features)
