"""The price of a lowered program: FLOPs, bytes moved, bytes saved for backward, transient peak, kernels, time.

Everything is a small pure function of the steps and their shapes, so the numbers a Plan prints are exactly the
numbers the search compared. What one step costs is its op's definition in the registry (`planner.ops`): FLOPs,
kernels, extra bytes, and how its time is bounded. Time is a roofline per step: max(FLOPs / rate, bytes /
bandwidth) + launch overhead (a skinny product in its faster form, `planner.orient`, at the rate its calibrated
gain gives); dequantizing a 4-bit weight is bounded by the device's dequantize rate (values per
second) instead of a FLOP rate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx
import torch

from .device import DeviceProfile
from .expr import Lowered, Step
from .ops import OPS, get as get_op, nbytes
from .orient import speedup

# the ops the matmul roofline prices
MATMUL_OPS = tuple(name for name, op in OPS.items() if op.pricing == "matmul")


@dataclass(frozen=True)
class Cost:
    flops: int  # matmul FLOPs, forward + backward
    bytes_moved: int  # read + written by every step
    saved_bytes: int  # activation bytes kept from forward to backward
    peak_bytes: int  # largest transient working set (excluding inputs and parameters)
    kernels: int
    time: float  # estimated seconds, forward + backward
    forward_flops: int = 0
    backward_flops: int = 0

    def dominates(self, other: "Cost") -> bool:
        """No worse on time, saved bytes and peak, and better on one of them."""
        mine, theirs = (self.time, self.saved_bytes, self.peak_bytes), (other.time, other.saved_bytes, other.peak_bytes)
        return all(a <= b for a, b in zip(mine, theirs)) and mine != theirs


def step_flops(step: Step, shapes: dict[str, tuple[int, ...]]) -> int:
    return get_op(step.op).flops(step, shapes)


def step_bytes(step: Step, low: Lowered) -> int:
    """Bytes read and written by one step (drawing a mask reads nothing but writes the mask)."""
    op = get_op(step.op)
    reads = sum(nbytes(low.shapes[a], low.dtypes[a]) for a in step.args) if op.reads else 0
    return reads + nbytes(low.shapes[step.out], low.dtypes[step.out]) + op.extra_bytes(step, low)


def step_kernels(step: Step) -> int:
    return get_op(step.op).kernels(step)


def step_time(step: Step, low: Lowered, profile: DeviceProfile) -> float:
    """Roofline seconds of one step as its op's `pricing` says, plus its launches."""
    op = get_op(step.op)
    moved = step_bytes(step, low)
    t = moved / profile.bandwidth
    if op.pricing == "throughput":  # elements of the largest tensor touched (a mask packed to bits: its input)
        numel = max(math.prod(low.shapes[n]) for n in (*step.args, step.out))
        t = max(t, numel / getattr(profile, op.rate))
    elif op.pricing == "matmul":
        flops = op.flops(step, low.shapes)
        if flops:
            dtype = low.dtypes[step.args[0] if step.op != "addmm" else step.args[1]]
            dims = [d for name in step.args[:3] for d in low.shapes[name] if len(low.shapes[name]) == 2]
            t = max(t, flops / profile.rate(dtype, min(dims)) / speedup(step, low, profile))
    elif op.pricing == "elementwise":
        # elementwise passes are compute bound on CPUs: priced at the output dtype's rate (a uint8/bool mask at
        # float32's) over the largest tensor the step touches
        out_dtype = low.dtypes[step.out]
        rate_dtype = out_dtype if out_dtype.is_floating_point else torch.float32
        numel = max(math.prod(low.shapes[n]) for n in (*step.args, step.out))
        t = profile.elementwise_time(numel, rate_dtype, moved) + widening_time(step, low, profile)
    return t + op.kernels(step) * profile.launch_overhead


def widening_time(step: Step, low: Lowered, profile: DeviceProfile) -> float:
    """A byte mask multiplying a float tensor is first widened to the float dtype (TensorIterator's copy, the
    `copy_` of a profile): one more pass over the mask. On one thread here x * uint8 mask took about twice
    x * float mask, fp32 and bf16 (`python -m benchmarks.profile masks 1024 1376`)."""
    out = low.dtypes[step.out]
    if step.op not in ("mul", "addcmul") or not out.is_floating_point:
        return 0.0
    t = 0.0
    for a in step.args:
        if not low.dtypes[a].is_floating_point:
            numel = math.prod(low.shapes[a])
            t += profile.elementwise_time(numel, out, numel * (low.dtypes[a].itemsize + out.itemsize))
    return t


def dataflow(low: Lowered) -> nx.DiGraph:
    """Tensors as nodes ("f:x", "b:Z0": forward and backward have separate namespaces, linked through the saved
    set), an edge from each argument of a step to its result. Raises if the program reads what nothing made."""
    g = nx.DiGraph()
    made = {"f": set(low.shapes) - {s.out for s in low.forward + low.backward} - {"G"}, "b": {"G"}}
    made["b"] |= set(low.saved) | {n for n in made["f"]}  # inputs and parameters reach backward too
    for phase, steps in (("f", low.forward), ("b", low.backward)):
        for s in steps:
            for a in s.args:
                if phase == "b" and a in made["b"] and not g.has_node(f"b:{a}"):
                    src = f"f:{a}"
                elif a in made[phase] or g.has_node(f"{phase}:{a}"):
                    src = f"{phase}:{a}"
                else:
                    raise ValueError(f"step {s.out} = {s.formula()} reads {a!r}, which nothing computed or saved")
                g.add_edge(src, f"{phase}:{s.out}")
            g.add_node(f"{phase}:{s.out}")
    return g


def _peak(steps: list[Step], low: Lowered, live_from_start: list[str], keep: set[str]) -> int:
    """Largest sum of live intermediate bytes while running `steps` in order; `keep` outlives its last use."""
    last_use = {}
    for idx, s in enumerate(steps):
        for a in s.args:
            last_use[a] = idx
    live = {n: nbytes(low.shapes[n], low.dtypes[n]) for n in live_from_start}
    peak = sum(live.values())
    for idx, s in enumerate(steps):
        live[s.out] = nbytes(low.shapes[s.out], low.dtypes[s.out])
        peak = max(peak, sum(live.values()))
        for a in s.args:
            if last_use.get(a) == idx and a in live and a not in keep:
                del live[a]
    return peak


def saved_bytes(low: Lowered) -> int:
    """Activation bytes kept for backward; the input x counts as a 1/x_readers share when sibling sites (which
    read the same x and may keep it too) share the one tensor."""
    total, x_readers = 0, low.x_readers
    for n in low.saved:
        if not low.signature.is_parameter(n):
            b = nbytes(low.shapes[n], low.dtypes[n])
            total += -(-b // x_readers) if n == "x" else b
    return total


def price(low: Lowered, profile: DeviceProfile) -> Cost:
    """Every cost of one lowered program on one device profile."""
    dataflow(low)
    steps = low.forward + low.backward
    fwd_flops = sum(step_flops(s, low.shapes) for s in low.forward)
    bwd_flops = sum(step_flops(s, low.shapes) for s in low.backward)
    saved_acts = [n for n in low.saved if not low.signature.is_parameter(n)]
    return Cost(
        flops=fwd_flops + bwd_flops,
        bytes_moved=sum(step_bytes(s, low) for s in steps),
        saved_bytes=saved_bytes(low),
        peak_bytes=max(_peak(low.forward, low, [], set(low.saved) | {low.output}),
                       _peak(low.backward, low, saved_acts, set(low.grads.values()))),
        kernels=sum(step_kernels(s) for s in steps),
        time=sum(step_time(s, low, profile) for s in steps),
        forward_flops=fwd_flops,
        backward_flops=bwd_flops,
    )
