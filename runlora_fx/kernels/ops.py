"""The planned site as a pair of `torch.library` custom ops, so a Plan survives aot_autograd and inductor intact.

Why custom ops and not an inlined autograd.Function: aot_autograd would trace the Function's forward and
backward into its joint graph and hand the saved set to the min-cut partitioner, which recomputes or saves as it
likes. An opaque forward op whose extra outputs are exactly the Plan's saved tensors, and an opaque backward op
that consumes them, keep both the contraction order and the saved set as planned.

What crosses from forward to backward (the *layout*) is fixed when the graph is traced, from the N seen then;
the contraction order is chosen again on every call for the actual N (among programs with the same layout), so
dynamic shapes never run an order planned for another N. Sites are referred to by an integer id into a
process-local registry of `LoraLinearRunner`s (custom ops take no Python objects); a 4-bit site's runner holds
its bitsandbytes quant state, which reaches the steps through `runner.constants()`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.fx.experimental.symbolic_shapes import optimization_hint

from ..planner.device import get_profile
from ..planner.expr import build_steps, enumerate_programs
from .dense import LoraLinearRunner, input_names
from .executor import run

_SITES: list[LoraLinearRunner] = []


def register_site(runner: LoraLinearRunner) -> int:
    """Give `runner` an id that compiled graphs can carry."""
    _SITES.append(runner)
    return len(_SITES) - 1


def _unflatten(adapters: list[torch.Tensor], runner: LoraLinearRunner):
    out, it = [], iter(adapters)
    for cfg in runner.adapters:
        a, b = next(it), next(it)
        out.append((a, b, next(it) if cfg.lora_bias else None))
    return out


def _spec(site: int, n, weight, bias, adapters, grads, training):
    runner = _SITES[site]
    return runner, runner.spec_from(n, weight, bias, _unflatten(adapters, runner), training, grads)


_PLANS: dict[tuple, tuple] = {}


def _planned(site: int, n: int, weight, bias, adapters, grads, training: bool, layout: str, device):
    """(runner, plan, input names) of one op call, remembered per call signature: compiled graphs call the ops
    every step with the same few signatures, and building the SiteSpec is most of the Python an op runs. The
    device profile is part of the key, so a new calibration re-plans."""
    key = (site, n, weight.shape, weight.dtype, bias is None, tuple((t.shape, t.dtype) for t in adapters),
           tuple(grads), training, layout, get_profile(device))
    hit = _PLANS.get(key)
    if hit is None:
        runner, spec = _spec(site, n, weight, bias, adapters, grads, training)
        names = input_names(bias is not None, [a.lora_bias for a in spec.adapters])
        if len(_PLANS) >= 4096:
            _PLANS.clear()
        hit = _PLANS[key] = (runner, runner.plan_for(spec, device, _names(layout)), names)
    return hit


def _layout_program(spec, layout: tuple[str, ...]):
    """Any program with this saved layout (the layout alone fixes the saved shapes)."""
    concrete = spec.with_n(1)
    for program in enumerate_programs(concrete):
        if tuple(build_steps(concrete, program).saved) == layout:
            return program
    raise ValueError(f"no program saves exactly {layout}")


def _produced(layout: tuple[str, ...]) -> list[str]:
    """Saved tensors the forward op returns; x itself is saved from the op's inputs (outputs may not alias)."""
    return [n for n in layout if n != "x"]


def _names(layout: str) -> tuple[str, ...]:
    """Layouts travel through the ops as one comma-joined string (custom ops take no list of str)."""
    return tuple(layout.split(",")) if layout else ()


def _params(names: list[str], tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t for n, t in zip(names, tensors) if n != "x"}


@torch.library.custom_op("runlora_fx::site_forward", mutates_args=())
def site_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], adapters: list[torch.Tensor],
                 site: int, layout: str, grads: list[bool], training: bool) -> list[torch.Tensor]:
    runner, plan, names = _planned(site, x.shape[0], weight, bias, adapters, grads, training, layout, x.device)
    tensors = [x, weight] + ([bias] if bias is not None else []) + list(adapters)
    env = run(plan.lowered.forward, {**runner.constants(), **dict(zip(names, tensors))}, plan.lowered.shapes)
    return [env[plan.lowered.output]] + [env[n] for n in _produced(_names(layout))]


@site_forward.register_fake
def _(x, weight, bias, adapters, site, layout, grads, training):
    runner, spec = _spec(site, x.shape[0], weight, bias, adapters, grads, training)
    low = build_steps(spec, _layout_program(spec, _names(layout)))
    shapes = [(x.shape[0], spec.out_features)] + [low.shapes[n] for n in _produced(_names(layout))]
    dtypes = [spec.dtype] + [low.dtypes[n] for n in _produced(_names(layout))]
    return [x.new_empty(s, dtype=d) for s, d in zip(shapes, dtypes)]


@torch.library.custom_op("runlora_fx::site_backward", mutates_args=())
def site_backward(grad: torch.Tensor, saved: list[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor],
                  adapters: list[torch.Tensor], site: int, layout: str, grads: list[bool],
                  training: bool) -> list[torch.Tensor]:
    runner, plan, names = _planned(site, grad.shape[0], weight, bias, adapters, grads, training, layout, grad.device)
    env = _params(names, [None, weight] + ([bias] if bias is not None else []) + list(adapters))
    env.update(runner.constants())
    env.update(zip(_names(layout), saved))
    env["G"] = grad.contiguous()
    env = run(plan.lowered.backward, env, plan.lowered.shapes)
    return [env[plan.lowered.grads[n]] for n, g in zip(names, grads) if g]


@site_backward.register_fake
def _(grad, saved, weight, bias, adapters, site, layout, grads, training):
    runner, spec = _spec(site, grad.shape[0], weight, bias, adapters, grads, training)
    names = input_names(bias is not None, [a.lora_bias for a in spec.adapters])
    like = {"x": (grad.shape[0], spec.in_features, spec.dtype), "b": (spec.out_features, None, spec.dtype)}
    tensors = dict(zip(names, [None, weight] + ([bias] if bias is not None else []) + list(adapters)))
    out = []
    for n, g in zip(names, grads):
        if g:
            if n in like:
                rows, cols, dt = like[n]
                out.append(grad.new_empty((rows, cols) if cols else (rows,), dtype=dt))
            else:
                out.append(torch.empty_like(tensors[n]))
    return out


def _setup_context(ctx, inputs, output):
    x, weight, bias, adapters, site, layout, grads, training = inputs
    ctx.meta = (site, layout, grads, training, bias is not None, len(adapters))
    kept = ([x] if "x" in _names(layout) else []) + list(output[1:])
    ctx.save_for_backward(weight, bias, *adapters, *kept)


def _backward(ctx, grad_outputs):
    site, layout, grads, training, has_bias, n_adapters = ctx.meta
    weight, bias, *rest = ctx.saved_tensors
    adapters, saved = rest[:n_adapters], rest[n_adapters:]
    out = site_backward(grad_outputs[0], saved, weight, bias, adapters, site, layout, grads, training)
    it = iter(out)
    flags = iter(grads)
    dx = next(it) if next(flags) else None
    next(flags)  # W: frozen
    db = (next(it) if next(flags) else None) if has_bias else None
    dadapters = [next(it) if f else None for f in flags]
    return dx, None, db, dadapters, None, None, None, None


site_forward.register_autograd(_backward, setup_context=_setup_context)


def lora_site(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, adapters: list[torch.Tensor],
              site: int, training: bool) -> torch.Tensor:
    """What a rewritten graph calls for one site. Picks the saved layout from the N seen at trace time."""
    runner = _SITES[site]
    i = runner.base_shape(weight)[1]
    x2 = x.reshape(-1, i)
    unflat = _unflatten(adapters, runner)
    spec = runner.spec_for(x2, weight, bias, unflat, training)
    hint = spec.with_n(optimization_hint(spec.n)) if isinstance(spec.n, torch.SymInt) else spec
    layout = ",".join(runner.plan_for(hint, x.device).lowered.saved)
    grads = [spec.grad_x, False] + ([spec.grad_bias] if bias is not None else [])
    for a in spec.adapters:
        grads += [a.grad_a, a.grad_b] + ([a.grad_lora_bias] if a.lora_bias else [])
    y = site_forward(x2, weight, bias, list(adapters), site, layout, grads, training)[0]
    return y.view(*x.shape[:-1], spec.out_features)
