"""Price and choose programs for the compiled path, where inductor fuses the pointwise work around the matmuls.

Why a second pricing: under inductor a cast, a mask multiply, a scale or an accumulate next to a matmul is folded
into a neighbouring kernel, so it costs no memory pass of its own, while the eager path pays a pass for each
(`planner.cost`). The matmuls, row sums and random draws still cost what they cost. The joint-graph pass can
express a subset of the space: masks kept as bool or regenerated from the seed (no bit packing, no dense noise),
and merged forms only for one-adapter dense sites.
"""
from __future__ import annotations

from dataclasses import replace

from .cost import Cost, price, step_time
from .device import DeviceProfile
from .expr import STOCK, Lowered, Program, SiteSpec, Step, build_steps, canonical, enumerate_programs
from .ops import get as get_op
from .orient import orient
from .plan import Plan, PlanTable
from .search import STRATEGIES, SearchOptions


def fused(step: Step) -> bool:
    """Pointwise steps (the registry's elementwise ops, reductions excepted) that inductor folds into a neighbour."""
    return get_op(step.op).pricing == "elementwise" and step.op != "sum_rows"


def compiled_valid(spec: SiteSpec, program: Program, seed: bool = True) -> bool:
    """Whether the joint-graph pass can run `program` for `spec`; `seed`: whether masks can be regenerated from
    their seed (not under `fallback_random`, where the draw is ATen's stateful one)."""
    if program.mask not in (("bool", "seed", "none") if seed else ("bool", "none")) or spec.quant is not None:
        return False
    merged = program.forward == "merged" or program.grad_x == "merged"
    return not (merged and (len(spec.adapters) != 1 or spec.adapters[0].lora_bias))


def price_fused(low: Lowered, profile: DeviceProfile) -> Cost:
    """`cost.price` with pointwise steps fused into their neighbours: no time, bytes or kernel of their own, and a
    matmul's scale folded into its epilogue."""
    base = price(low, profile)
    steps = [s if s.op not in ("mm", "sum_rows") else replace(s, alpha=1.0)
             for s in low.forward + low.backward if not fused(s)]
    return replace(base, time=sum(step_time(s, low, profile) for s in steps), kernels=len(steps))


def compiled_stock(spec: SiteSpec) -> Program:
    """What peft's layer runs under inductor: autograd's order, the mask saved as a bool tensor (the partitioner
    keeps `rand > p`, not the scaled noise)."""
    return canonical(spec, STOCK)


def fused_candidates(spec: SiteSpec, profile: DeviceProfile, seed: bool = True) -> PlanTable:
    """Every program the joint pass can run, priced fused, fastest first."""
    stock = price_fused(build_steps(spec, compiled_stock(spec)), profile)
    plans = []
    for program in enumerate_programs(spec):
        if compiled_valid(spec, program, seed):
            low = orient(build_steps(spec, program), profile)
            plans.append(Plan(spec, program, low, price_fused(low, profile), stock))
    return PlanTable(sorted(plans, key=lambda p: (p.cost.time, p.cost.saved_bytes, p.key)))


def search_fused(spec: SiteSpec, options: SearchOptions, profile: DeviceProfile, seed: bool = True) -> Plan:
    """The compiled path's choice for `spec`, by the same strategies as the eager path's `search`."""
    chosen = STRATEGIES[options.strategy](fused_candidates(spec, profile, seed), options)
    return replace(chosen, strategy=options.strategy)
