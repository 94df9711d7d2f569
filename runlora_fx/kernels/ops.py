"""The planned site as a pair of `torch.library` custom ops, so a Plan survives aot_autograd and inductor intact.

Why custom ops and not an inlined autograd.Function: aot_autograd would trace the Function's forward and
backward into its joint graph and hand the saved set to the min-cut partitioner, which recomputes or saves as it
likes. An opaque forward op whose extra outputs are exactly the Plan's saved tensors, and an opaque backward op
that consumes them, keep both the contraction order and the saved set as planned. Both run the Plan's generated
code (`Plan.forward_graph`, `Plan.backward_graph`), as the eager node does.

What crosses from forward to backward (the *layout*) is fixed when the graph is traced, from the N seen then;
the contraction order is chosen again on every call for the actual N (among programs with the same layout), so
dynamic shapes never run an order planned for another N. Sites are referred to by an integer id (custom ops
take no Python objects) into a registry that holds each `LoraLinearRunner` weakly: the rewritten graph owns its
runners (`SiteOwner`), so they, and a 4-bit site's bitsandbytes quant state, go when the compiled graph goes.
"""
from __future__ import annotations

import itertools
import weakref
from typing import Optional

import torch
from torch.fx.experimental.symbolic_shapes import optimization_hint

from ..planner.device import get_profile
from ..planner.expr import build_steps, enumerate_programs
from ..planner.graphs import saved_activations
from .dense import LoraLinearRunner

_SITES: "weakref.WeakValueDictionary[int, LoraLinearRunner]" = weakref.WeakValueDictionary()
_IDS = itertools.count()


def register_site(runner: LoraLinearRunner) -> int:
    """Give `runner` an id that compiled graphs can carry. The registry holds it weakly: whoever runs the graph
    must keep the runner alive (`passes.rewrite` stores it on the graph module)."""
    sid = next(_IDS)
    _SITES[sid] = runner
    return sid


def _runner(site: int) -> LoraLinearRunner:
    try:
        return _SITES[site]
    except KeyError:
        raise RuntimeError(f"LoRA site {site} is gone: its compiled graph was freed") from None


def _spec(site: int, n, weight, bias, adapters, grads, training):
    runner = _runner(site)
    unflat = runner.configured_signature(bias is not None).unflatten_adapters(adapters)
    return runner, runner.spec_from(n, weight, bias, unflat, training, grads)


def _planned(site: int, n: int, weight, bias, adapters, grads, training: bool, layout: str, device):
    """(runner, plan) of one op call, remembered per call signature in the runner: compiled graphs call the ops
    every step with the same few signatures, and building the SiteSpec is most of the Python an op runs. The
    device profile is part of the key, so a new calibration re-plans."""
    runner = _runner(site)
    key = ("op", n, weight.shape, weight.dtype, bias is None, tuple((t.shape, t.dtype) for t in adapters),
           tuple(grads), training, layout, get_profile(device))
    plan = runner.remember(key, lambda: runner.plan_for(_spec(site, n, weight, bias, adapters, grads, training)[1],
                                                        device, _names(layout)))
    return runner, plan


def _layout_program(spec, layout: tuple[str, ...]):
    """Any program with this saved layout (the layout alone fixes the saved shapes)."""
    concrete = spec.with_n(1)
    for program in enumerate_programs(concrete):
        if tuple(saved_activations(build_steps(concrete, program))) == layout:
            return program
    raise ValueError(f"no program saves exactly {layout}")


def _produced(layout: tuple[str, ...]) -> list[str]:
    """Saved tensors the forward op returns; x itself is saved from the op's inputs (outputs may not alias)."""
    return [n for n in layout if n != "x"]


def _names(layout: str) -> tuple[str, ...]:
    """Layouts travel through the ops as one comma-joined string (custom ops take no list of str)."""
    return tuple(layout.split(",")) if layout else ()


def _constants(runner: LoraLinearRunner, plan) -> tuple:
    sig = plan.lowered.signature
    if not sig.constants:
        return ()
    values = runner.constants()
    return tuple(values[n] for n in sig.constants)


@torch.library.custom_op("runlora_fx::site_forward", mutates_args=())
def site_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], adapters: list[torch.Tensor],
                 site: int, layout: str, grads: list[bool], training: bool) -> list[torch.Tensor]:
    runner, plan = _planned(site, x.shape[0], weight, bias, adapters, grads, training, layout, x.device)
    tensors = plan.lowered.signature.join(x, weight, bias, adapters)
    y, *saved = plan.forward_graph.forward(*tensors, *_constants(runner, plan))
    return [y] + [t for n, t in zip(_names(layout), saved) if n != "x"]


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
    runner, plan = _planned(site, grad.shape[0], weight, bias, adapters, grads, training, layout, grad.device)
    params = plan.lowered.signature.join(None, weight, bias, adapters)[1:]
    out = plan.backward_graph.forward(*saved, *params, *_constants(runner, plan), grad.contiguous())
    # contiguous, as the fake declares: a product in its other form (planner.orient) may hand back a transposed view
    return [g.contiguous() for g, flag in zip(out, grads) if flag]


@site_backward.register_fake
def _(grad, saved, weight, bias, adapters, site, layout, grads, training):
    runner, spec = _spec(site, grad.shape[0], weight, bias, adapters, grads, training)
    x_like = grad.new_empty((grad.shape[0], spec.in_features), dtype=spec.dtype)
    tensors = spec.signature.flatten(x_like, weight, bias, runner.configured_signature(bias is not None)
                                     .unflatten_adapters(adapters))
    return [grad.new_empty(t.shape, dtype=t.dtype) if n in ("x", "b") else torch.empty_like(t)
            for n, t, g in zip(spec.signature.names, tensors, grads) if g]


def _setup_context(ctx, inputs, output):
    x, weight, bias, adapters, site, layout, grads, training = inputs
    ctx.meta = (site, layout, grads, training, bias is not None, len(adapters))
    kept = ([x] if "x" in _names(layout) else []) + list(output[1:])
    ctx.save_for_backward(weight, bias, *adapters, *kept)


def _backward(ctx, grad_outputs):
    site, layout, grads, training, has_bias, n_adapters = ctx.meta
    weight, bias, *rest = ctx.saved_tensors
    adapters, saved = rest[:n_adapters], rest[n_adapters:]
    out = iter(site_backward(grad_outputs[0], saved, weight, bias, adapters, site, layout, grads, training))
    full = [next(out) if flag else None for flag in grads]  # one per tensor, in SiteSignature order
    dx, _, db, dadapters = _runner(site).configured_signature(has_bias).split(full)
    return dx, None, db, dadapters, None, None, None, None


site_forward.register_autograd(_backward, setup_context=_setup_context)


def lora_site(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, adapters: list[torch.Tensor],
              site: int, training: bool) -> torch.Tensor:
    """What a rewritten graph calls for one site. Picks the saved layout from the N seen at trace time."""
    runner = _runner(site)
    i = runner.base_shape(weight)[1]
    x2 = x.reshape(-1, i)
    unflat = runner.configured_signature(bias is not None).unflatten_adapters(adapters)
    spec = runner.spec_for(x2, weight, bias, unflat, training)
    hint = spec.with_n(optimization_hint(spec.n)) if isinstance(spec.n, torch.SymInt) else spec
    layout = ",".join(saved_activations(runner.plan_for(hint, x.device).lowered))
    grads = spec.signature.grad_flags(spec)
    y = site_forward(x2, weight, bias, list(adapters), site, layout, grads, training)[0]
    return y.view(*x.shape[:-1], spec.out_features)
