"""A lowered program as two FX graphs, built from the step-op registry: what the eager node and the compiled ops run.

forward(*tensors, *constants) -> (y, *saved activations)
    tensors in `SiteSignature.names` order (x, W, b?, A_k, B_k, lb_k?), constants in `SiteSignature.constants`
    order (a 4-bit weight's quant state).
backward(*saved activations, *parameters, *constants, G) -> one gradient (or None) per tensor, in `names` order

The GraphModules' generated Python is straight-line code, one or two torch calls per step, so running a Plan
costs no interpreter loop. `Plan.forward_graph` / `Plan.backward_graph` build them once per Plan.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .expr import Lowered, Step
from .ops import Emitter, get


def _emit(em: Emitter, steps: list[Step]) -> None:
    for s in steps:
        em.env[s.out] = get(s.op).emit(em, s, [em.env[a] for a in s.args])


def _module(graph: fx.Graph, name: str) -> fx.GraphModule:
    graph.lint()
    return fx.GraphModule(torch.nn.Module(), graph, class_name=name)


def saved_activations(low: Lowered) -> list[str]:
    """What forward hands to backward beyond the parameters: the program's saved set minus parameters."""
    return [n for n in low.saved if not low.signature.is_parameter(n)]


def forward_graph(low: Lowered) -> fx.GraphModule:
    sig = low.signature
    em = Emitter(fx.Graph(), low.shapes)
    for name in sig.names + sig.constants:
        em.env[name] = em.graph.placeholder(name)
    _emit(em, low.forward)
    em.graph.output((em.env[low.output], *[em.env[n] for n in saved_activations(low)]))
    return _module(em.graph, "PlanForward")


def backward_graph(low: Lowered) -> fx.GraphModule:
    sig = low.signature
    em = Emitter(fx.Graph(), low.shapes)
    for name in (*saved_activations(low), *sig.parameters, *sig.constants, "G"):
        em.env[name] = em.graph.placeholder(name)
    _emit(em, low.backward)
    em.graph.output(tuple(em.env[low.grads[n]] if n in low.grads else None for n in sig.names))
    return _module(em.graph, "PlanBackward")


def steps_graph(steps: list[Step], inputs: list[str], shapes: dict[str, tuple[int, ...]]) -> fx.GraphModule:
    """Any list of steps over named inputs, returning every step's result in order (tests and debugging)."""
    em = Emitter(fx.Graph(), shapes)
    for name in inputs:
        em.env[name] = em.graph.placeholder(name)
    _emit(em, steps)
    em.graph.output(tuple(em.env[s.out] for s in steps))
    return _module(em.graph, "Steps")
