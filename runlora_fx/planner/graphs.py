"""A lowered program as two FX graphs, built from the step-op registry: what the eager node and the compiled ops run.

forward(*tensors, *constants) -> (y, *saved activations)
    tensors in `SiteSignature.names` order (x, W, b?, A_k, B_k, lb_k?), constants in `SiteSignature.constants`
    order (a 4-bit weight's quant state).
backward(*saved activations, *parameters, *constants, G) -> one gradient (or None) per tensor, in `names` order

The GraphModules' generated Python is straight-line code, one or two torch calls per step, so running a Plan
costs no interpreter loop. `Plan.forward_graph` / `Plan.backward_graph` build them once per Plan, through a
bounded cache keyed by the steps (which do not depend on N) and the few shapes the emitted code bakes in, so the
plans of one site at many N (generation) share their graphs.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.fx as fx

from .expr import Lowered, Step
from .ops import Emitter, get


_CACHE_SIZE = 512  # distinct (program, site layout) graphs kept; each is some 20-30 KiB


class _Shapes(dict):
    """The steps' shapes, remembering which ones an op's `emit` baked into the code."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        super().__init__(shapes)
        self.read: list[str] = []

    def __getitem__(self, name: str) -> tuple[int, ...]:
        self.read.append(name)
        return super().__getitem__(name)


# structural key -> (names whose shapes the code bakes in, {those shapes: GraphModule})
_GRAPHS: "OrderedDict[tuple, tuple[tuple[str, ...], dict[tuple, fx.GraphModule]]]" = OrderedDict()


def _cached(key: tuple, shapes: dict[str, tuple[int, ...]], build) -> fx.GraphModule:
    entry = _GRAPHS.get(key)
    if entry is not None:
        _GRAPHS.move_to_end(key)
        read, by_shapes = entry
        gm = by_shapes.get(tuple(shapes[n] for n in read))
        if gm is not None:
            return gm
    recording = _Shapes(shapes)
    gm = build(recording)
    read = tuple(dict.fromkeys(recording.read))
    if entry is None or entry[0] != read:
        entry = _GRAPHS[key] = (read, {})
    entry[1][tuple(shapes[n] for n in read)] = gm
    while len(_GRAPHS) > _CACHE_SIZE:
        _GRAPHS.popitem(last=False)
    return gm


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
    sig, saved = low.signature, saved_activations(low)

    def build(shapes):
        em = Emitter(fx.Graph(), shapes)
        for name in sig.names + sig.constants:
            em.env[name] = em.graph.placeholder(name)
        _emit(em, low.forward)
        em.graph.output((em.env[low.output], *[em.env[n] for n in saved]))
        return _module(em.graph, "PlanForward")

    return _cached(("forward", sig, tuple(low.forward), low.output, tuple(saved)), low.shapes, build)


def backward_graph(low: Lowered) -> fx.GraphModule:
    sig, saved = low.signature, saved_activations(low)
    grads = tuple(low.grads.get(n) for n in sig.names)

    def build(shapes):
        em = Emitter(fx.Graph(), shapes)
        for name in (*saved, *sig.parameters, *sig.constants, "G"):
            em.env[name] = em.graph.placeholder(name)
        _emit(em, low.backward)
        em.graph.output(tuple(em.env[g] if g is not None else None for g in grads))
        return _module(em.graph, "PlanBackward")

    return _cached(("backward", sig, tuple(low.backward), grads, tuple(saved)), low.shapes, build)


def steps_graph(steps: list[Step], inputs: list[str], shapes: dict[str, tuple[int, ...]]) -> fx.GraphModule:
    """Any list of steps over named inputs, returning every step's result in order (tests and debugging)."""
    em = Emitter(fx.Graph(), shapes)
    for name in inputs:
        em.env[name] = em.graph.placeholder(name)
    _emit(em, steps)
    em.graph.output(tuple(em.env[s.out] for s in steps))
    return _module(em.graph, "Steps")
