"""`SiteSignature`: the one owner of a site's tensor order, which of them are parameters, and their grad flags.

A site's tensors travel as one flat list in a fixed order -- ``x, W, b?, A_0, B_0, lb_0?, A_1, ...`` -- through
the eager node, the compiled custom ops, the graph rewrite and the patched forward, and the planner names them
the same way in its steps. Everything that flattens, unflattens, prices or takes gradients of that list asks the
signature, so adding a site tensor (a per-rank gate, a DoRA magnitude) is one edit here.

Constants (``qs``, a 4-bit weight's bitsandbytes quant state) are not tensors of the list: the runner supplies
them at call time, after the tensors. They and every tensor except x are parameters: saving them for backward
keeps nothing alive that was not alive anyway.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any, Sequence

import torch

# (A, B, lora bias or None) of one adapter, as runners take them
AdapterTensors = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]


@dataclass(frozen=True)
class SiteSignature:
    """The layout of one site's inputs: whether it has a base bias, a lora bias per adapter, a 4-bit base."""

    bias: bool
    lora_biases: tuple[bool, ...]
    quant: bool = False

    @staticmethod
    def of(bias: bool, lora_biases: Sequence[bool], quant: bool = False) -> "SiteSignature":
        return _signature(bool(bias), tuple(bool(b) for b in lora_biases), bool(quant))

    @staticmethod
    def of_tensors(bias: Any, adapters: Sequence[Sequence[Any]], quant: bool = False) -> "SiteSignature":
        """The signature of a call: `adapters` are (A, B, lora bias or None) triples."""
        return SiteSignature.of(bias is not None, [ad[2] is not None for ad in adapters], quant)

    # -- names --------------------------------------------------------------------------------------------------
    @cached_property
    def names(self) -> tuple[str, ...]:
        """The flat order: x, W, b?, then A_k, B_k, lb_k? per adapter."""
        names = ["x", "W"] + (["b"] if self.bias else [])
        for k, lb in enumerate(self.lora_biases):
            names += [f"A{k}", f"B{k}"] + ([f"lb{k}"] if lb else [])
        return tuple(names)

    @cached_property
    def parameters(self) -> tuple[str, ...]:
        """Every tensor of the list but x, in order."""
        return self.names[1:]

    @cached_property
    def constants(self) -> tuple[str, ...]:
        """Non-tensor inputs the runner supplies after the tensors."""
        return ("qs",) if self.quant else ()

    @cached_property
    def _parameter_set(self) -> frozenset[str]:
        return frozenset(self.parameters + self.constants)

    def is_parameter(self, name: str) -> bool:
        """Whether `name` is a parameter or constant (else an activation: x, or something a step made)."""
        return name in self._parameter_set

    def adapter_names(self, k: int) -> tuple[str, ...]:
        return (f"A{k}", f"B{k}") + ((f"lb{k}",) if self.lora_biases[k] else ())

    # -- flatten / unflatten ------------------------------------------------------------------------------------
    def flatten(self, x: Any, weight: Any, bias: Any, adapters: Sequence[Sequence[Any]]) -> list:
        """x, W, b?, then each adapter's A, B, lb? (in `names` order)."""
        return [x, weight] + ([bias] if self.bias else []) + self.flatten_adapters(adapters)

    def flatten_adapters(self, adapters: Sequence[Sequence[Any]]) -> list:
        """The adapters' part of the list: A_k, B_k, lb_k? per adapter."""
        if len(adapters) != len(self.lora_biases):
            raise ValueError(f"expected {len(self.lora_biases)} adapters, got {len(adapters)}")
        flat = []
        for (a, b, lb), has_lb in zip(adapters, self.lora_biases):
            flat += [a, b] + ([lb] if has_lb else [])
        return flat

    def unflatten_adapters(self, flat: Sequence[Any]) -> list[tuple]:
        """(A, B, lb or None) per adapter from the adapters' part of the list."""
        out, it = [], iter(flat)
        for has_lb in self.lora_biases:
            a, b = next(it), next(it)
            out.append((a, b, next(it) if has_lb else None))
        return out

    # -- grad flags ---------------------------------------------------------------------------------------------
    def grad_flags(self, spec: Any) -> list[bool]:
        """Which tensors of the list get a gradient under `spec` (a planner SiteSpec), aligned with `names`."""
        flags = [spec.grad_x, False] + ([spec.grad_bias] if self.bias else [])
        for a in spec.adapters:
            flags += [a.grad_a, a.grad_b] + ([a.grad_lora_bias] if a.lora_bias else [])
        return flags

    def flags_by_name(self, grads: Sequence[bool]) -> dict[str, bool]:
        """Grad flags aligned with `names`, as a dict (names without a flag are absent)."""
        if len(grads) != len(self.names):
            raise ValueError(f"expected {len(self.names)} grad flags for {', '.join(self.names)}, got {len(grads)}")
        return dict(zip(self.names, grads))

    def tensor_flags(self, tensors: Sequence[Any]) -> list[bool]:
        """Grad flags read from the tensors of a call (None counts as no gradient), under the current grad mode."""
        on = torch.is_grad_enabled()
        return [on and t is not None and t.requires_grad for t in tensors]

    # -- shapes the planner gives the inputs --------------------------------------------------------------------
    def input_layout(self, spec: Any) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """(shape, dtype) of every input the steps read, for `spec`: the tensors, then the constants."""
        n, i, o = spec.n, spec.in_features, spec.out_features
        ad = spec.compute_dtype
        out = {"x": ((n, i), spec.dtype)}
        if spec.quant is None:
            out["W"] = ((o, i), spec.dtype)
        else:  # the packed codes; the per-block statistics (the quant state) are the constant "qs"
            out["W"] = (spec.quant.packed_shape(o, i), torch.uint8)
        if self.bias:
            out["b"] = ((o,), spec.base_dtype)
        for k, a in enumerate(spec.adapters):
            out[f"A{k}"] = ((a.rank, i), ad)
            out[f"B{k}"] = ((o, a.rank), ad)
            if a.lora_bias:
                out[f"lb{k}"] = ((o,), ad)
        if self.quant:
            out["qs"] = (spec.quant.stats_shape(o, i), spec.quant.stats_dtype)
        return out


@lru_cache(maxsize=256)  # a handful of distinct layouts per process: bias or not, lora biases, 4-bit or not
def _signature(bias: bool, lora_biases: tuple[bool, ...], quant: bool) -> SiteSignature:
    return SiteSignature(bias, lora_biases, quant)


def signature_of(spec: Any) -> SiteSignature:
    """The signature of a planner `SiteSpec`."""
    return _signature(spec.bias, tuple(a.lora_bias for a in spec.adapters), spec.quant is not None)
