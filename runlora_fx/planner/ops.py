"""The registry of step ops: each op of a Plan defined once -- formula, price, FX emission.

A `StepOp` holds everything the rest of the package needs to know about one op: how a Plan prints it
(`formula`, `expression`), what the cost model charges for it (`flops`, `kernels`, `extra_bytes`, `reads`,
`pricing`), and the FX nodes that compute it (`emit`). A Plan lowers to FX graphs through `emit`
(`planner.graphs`); the eager node and the compiled ops run those graphs' generated code, so what a Plan prints
and prices is what runs. The algebraic ops are defined here; ops with their own runtime register themselves where
that runtime lives (`kernels.masks`: dropout masks and bit packing; `kernels.bnb`: 4-bit dequantize, which
imports bitsandbytes only when it runs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.fx as fx

# "Step" and "Lowered" in annotations below are `planner.expr`'s (which imports this module, so not imported here)

Pricing = Literal["matmul", "elementwise", "throughput", "bandwidth"]


def mm_flops(m: int, k: int, n: int) -> int:
    """FLOPs of an (m x k) @ (k x n) product, counting a multiply-add as two.

    >>> mm_flops(4, 3, 2)
    48
    """
    return 2 * m * k * n


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of a dense tensor.

    >>> nbytes((3, 4), torch.bfloat16)
    24
    """
    return math.prod(shape) * dtype.itemsize


class Emitter:
    """What an op's `emit` builds with: the graph, the FX node of every name so far, and the steps' shapes."""

    def __init__(self, graph: fx.Graph, shapes: dict[str, tuple[int, ...]]):
        self.graph, self.shapes = graph, shapes
        self.env: dict[str, fx.Node] = {}

    def call(self, fn: Callable, *args: Any, **kwargs: Any) -> fx.Node:
        return self.graph.call_function(fn, args, kwargs)

    def method(self, name: str, *args: Any, **kwargs: Any) -> fx.Node:
        return self.graph.call_method(name, args, kwargs)


@dataclass(frozen=True)
class StepOp:
    """One step op. `emit(em, step, args)` returns the node computing the step from its argument nodes.

    pricing: how `cost.step_time` prices a step beyond its launches: "matmul" (roofline on the device's matmul
    rate), "elementwise" (the device's elementwise rate over the largest tensor), "throughput" (the largest
    tensor's elements at the profile rate named `rate`), "bandwidth" (bytes moved only).
    """

    name: str
    formula: Callable[["Step"], str]  # the step as algebra, e.g. ``W + 2·B0 A0`` (Plan tables)
    emit: Callable[[Emitter, "Step", list[fx.Node]], fx.Node]
    expression: Callable[["Step", list[str]], str] | None = None  # name-free tree (`expr.expressions`); None: op(args)
    flops: Callable[["Step", dict[str, tuple[int, ...]]], int] = lambda step, shapes: 0
    kernels: Callable[["Step"], int] = lambda step: 1
    extra_bytes: Callable[["Step", "Lowered"], int] = lambda step, low: 0  # beyond reading args, writing the result
    reads: bool = True  # False: the arguments give only a shape or a generator state
    pricing: Pricing = "elementwise"
    rate: str = ""  # DeviceProfile attribute (elements per second) for pricing="throughput"


OPS: dict[str, StepOp] = {}


def register(op: StepOp) -> StepOp:
    """Add `op` to the registry (once per name)."""
    if op.name in OPS and OPS[op.name] != op:
        raise ValueError(f"step op {op.name!r} is already registered")
    OPS[op.name] = op
    return op


def get(name: str) -> StepOp:
    try:
        return OPS[name]
    except KeyError:
        raise KeyError(f"no step op {name!r} registered (kernels.masks and kernels.bnb register theirs on import "
                       "of runlora_fx.kernels)") from None


# ------------------------------------------------------------------------------------------- helpers for ops


def _s(step: "Step") -> str:
    return "" if step.alpha == 1.0 else f"{step.alpha:g}·"


def _t(name: str, t: bool) -> str:
    return f"{name}^T" if t else name


def _dt(dtype: torch.dtype | None) -> str:
    return str(dtype).replace("torch.", "")


def _tr(e: str, t: bool) -> str:
    return f"tr({e})" if t else e


def _operands(em: Emitter, step: "Step", a: fx.Node, b: fx.Node) -> tuple[fx.Node, fx.Node]:
    return (em.method("t", a) if step.ta else a), (em.method("t", b) if step.tb else b)


def _scaled(em: Emitter, step: "Step", node: fx.Node) -> fx.Node:
    """Scale in place when alpha != 1 (a second pass, as `kernels` counts it)."""
    return node if step.alpha == 1.0 else em.method("mul_", node, step.alpha)


def _matmul_flops(step: "Step", shapes: dict[str, tuple[int, ...]]) -> int:
    a, b = (step.args[0], step.args[1]) if step.op != "addmm" else (step.args[1], step.args[2])
    sa, sb = shapes[a], shapes[b]
    m, k = (sa[1], sa[0]) if step.ta else sa
    n = sb[0] if (step.tb or step.op == "linear") else sb[1]
    return mm_flops(m, k, n)


def _scaled_kernels(step: "Step") -> int:
    return 1 + int(step.alpha != 1.0)


# ------------------------------------------------------------------------------------------- the algebraic ops

register(StepOp(
    "linear", formula=lambda s: f"{s.args[0]} {s.args[1]}^T" + (f" + {s.args[2]}" if len(s.args) > 2 else ""),
    emit=lambda em, s, a: em.call(torch.nn.functional.linear, a[0], a[1], a[2] if len(a) > 2 else None),
    expression=lambda s, e: f"add(mm({e[0]},tr({e[1]})),{e[2]})" if len(e) > 2 else f"mm({e[0]},tr({e[1]}))",
    flops=_matmul_flops, pricing="matmul"))


def _mm_formula(s: "Step") -> str:
    a, b = s.args
    how = {"swap": f"   [as ({_t(b, not s.tb)} {_t(a, not s.ta)})^T]", "pack": f"   [{b} packed as {b}^T]"}
    return f"{_s(s)}{_t(a, s.ta)} {_t(b, s.tb)}{how.get(s.form, '')}"


def _mm_emit(em: Emitter, s: "Step", a: list[fx.Node]) -> fx.Node:
    """op(a) @ op(b) in the step's form (`planner.orient`): the same sums in another memory order."""
    if s.form == "swap":  # (op(b)^T op(a)^T)^T
        bt, at = (a[1] if s.tb else em.method("t", a[1])), (a[0] if s.ta else em.method("t", a[0]))
        node = em.method("t", em.call(torch.mm, bt, at))
    elif s.form == "pack":  # op(b) copied into the transposed memory order, viewed back
        x, y = _operands(em, s, a[0], a[1])
        node = em.call(torch.mm, x, em.method("t", em.method("contiguous", em.method("t", y))))
    else:
        node = em.call(torch.mm, *_operands(em, s, a[0], a[1]))
    return _scaled(em, s, node)


def _packed_bytes(s: "Step", low: "Lowered") -> int:
    """A packed operand is read and written once more."""
    return 2 * nbytes(low.shapes[s.args[1]], low.dtypes[s.args[1]]) if s.form == "pack" else 0


register(StepOp(  # alpha op(a) @ op(b)
    "mm", formula=_mm_formula, emit=_mm_emit,
    expression=lambda s, e: f"mm({_tr(e[0], s.ta)},{_tr(e[1], s.tb)})",
    flops=_matmul_flops, kernels=lambda s: _scaled_kernels(s) + int(s.form == "pack"), extra_bytes=_packed_bytes,
    pricing="matmul"))

register(StepOp(  # acc + alpha op(a) @ op(b)
    "addmm", formula=lambda s: f"{s.args[0]} + {_s(s)}{_t(s.args[1], s.ta)} {_t(s.args[2], s.tb)}",
    emit=lambda em, s, a: em.call(torch.addmm, a[0], *_operands(em, s, a[1], a[2]), alpha=s.alpha),
    expression=lambda s, e: f"add({e[0]},mm({_tr(e[1], s.ta)},{_tr(e[2], s.tb)}))",
    flops=_matmul_flops, pricing="matmul"))

register(StepOp(
    "cast", formula=lambda s: f"{s.args[0]}.to({_dt(s.dtype)})",
    emit=lambda em, s, a: em.method("to", a[0], s.dtype), expression=lambda s, e: e[0]))

register(StepOp(
    "mul", formula=lambda s: f"{s.args[0]} ⊙ {s.args[1]}", emit=lambda em, s, a: em.call(torch.mul, a[0], a[1])))

register(StepOp(  # a + alpha b ⊙ c
    "addcmul", formula=lambda s: f"{s.args[0]} + {_s(s)}{s.args[1]} ⊙ {s.args[2]}",
    emit=lambda em, s, a: em.call(torch.addcmul, a[0], a[1], a[2], value=s.alpha)))

register(StepOp(
    "scale", formula=lambda s: f"{_s(s)}{s.args[0]}", emit=lambda em, s, a: em.call(torch.mul, a[0], s.alpha),
    expression=lambda s, e: e[0]))

register(StepOp(  # a + alpha b (broadcast)
    "axpy", formula=lambda s: f"{s.args[0]} + {_s(s)}{s.args[1]}",
    emit=lambda em, s, a: em.call(torch.add, a[0], a[1], alpha=s.alpha)))

register(StepOp(  # alpha * sum over N
    "sum_rows", formula=lambda s: f"{_s(s)}Σ_N {s.args[0]}",
    emit=lambda em, s, a: _scaled(em, s, em.method("sum", a[0], 0)), kernels=_scaled_kernels))
