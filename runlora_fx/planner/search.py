"""Search the plan space of one site: price every program, drop the dominated, pick by a named strategy.

All strategies share one signature, ``(candidates, stock, options) -> Plan``, and are chosen by name from
`STRATEGIES`, like opt_einsum's path optimizers. The space is small (tens of programs per site), so the search
is exhaustive; dominance pruning keeps the candidate table short and readable.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Literal

import torch

from .cost import price
from .device import DeviceProfile, get_profile
from .expr import DROPOUT_RNGS, SiteSpec, build_steps, enumerate_programs, stock_program
from .orient import orient
from .plan import Plan, PlanTable

Objective = Literal["time", "memory"]
# Estimated times closer than this fraction are a tie for objective="time" (the model is not that precise);
# the tie goes to the program that saves fewer bytes.
TIME_TIE = 0.03
# Saved bytes closer than this fraction are a tie for that choice (broken by time).
MEMORY_TIE = 0.05
AUTOTUNE_FINALISTS = 4  # what autotune=True times: the estimates of the space's best few lie within a few percent


@dataclass(frozen=True)
class SearchOptions:
    """How to choose among the candidates of a site.

    objective: "time" takes the fastest program within the memory budget; "memory" the one saving the fewest
        bytes among those within `time_slack` of the fastest.
    memory_budget: saved-for-backward bytes allowed, as a fraction of what the stock (peft) program saves.
        1.0 (the default) means never more than stock.
    time_slack: for objective="memory", how much slower than the fastest a lighter program may be (0.1 = 10%).
    strategy: a name from STRATEGIES.
    dropout_rng: how dropout masks are drawn: "torch" (F.dropout's stream, peft's masks bit for bit) or "fast"
        (`kernels.rng`: another stream, several times faster on a CPU; the runner puts it in the SiteSpec).
    autotune: how many finalists (the strategy's choice and the next fastest estimates within budget) a site's
        first call times on the device, running the measured fastest (`kernels.autotune`); 0, the default, runs
        the strategy's choice. ``True`` means `AUTOTUNE_FINALISTS`.
    """

    objective: Objective = "time"
    memory_budget: float = 1.0
    time_slack: float = 0.10
    strategy: str = "model"
    dropout_rng: str = "torch"
    autotune: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.autotune, bool):
            object.__setattr__(self, "autotune", AUTOTUNE_FINALISTS if self.autotune else 0)
        if not isinstance(self.autotune, int) or self.autotune < 0:
            raise ValueError(f"autotune must be True, False or a number of finalists >= 0, got {self.autotune!r}")
        if self.objective not in ("time", "memory"):
            raise ValueError(f"objective must be 'time' or 'memory', got {self.objective!r}")
        if not (isinstance(self.memory_budget, (int, float)) and self.memory_budget >= 0):
            raise ValueError(f"memory_budget must be a non-negative fraction of the stock saved bytes, got {self.memory_budget!r}")
        if not (isinstance(self.time_slack, (int, float)) and self.time_slack >= 0):
            raise ValueError(f"time_slack must be a non-negative fraction, got {self.time_slack!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; valid: {', '.join(sorted(STRATEGIES))}")
        if self.dropout_rng not in DROPOUT_RNGS:
            raise ValueError(f"dropout_rng must be one of {', '.join(DROPOUT_RNGS)}, got {self.dropout_rng!r}")


def candidates(spec: SiteSpec, profile: DeviceProfile | None = None, *, prune: bool = True) -> PlanTable:
    """Every program of the space priced for `spec`, fastest first; dominated ones dropped when `prune`."""
    profile = profile or get_profile("cpu")
    stock = price(build_steps(spec, stock_program(spec)), profile)
    plans = []
    for program in enumerate_programs(spec):
        low = orient(build_steps(spec, program), profile)
        plans.append(Plan(spec, program, low, price(low, profile), stock))
    if prune:
        plans = [p for p in plans if not any(q.cost.dominates(p.cost) for q in plans)]
    return PlanTable(sorted(plans, key=lambda p: (p.cost.time, p.cost.saved_bytes, p.key)))


def stock_plan(spec: SiteSpec, profile: DeviceProfile | None = None) -> Plan:
    """The program peft runs, as a Plan (a baseline for benchmarks and `explain`)."""
    profile = profile or get_profile("cpu")
    low = build_steps(spec, stock_program(spec))
    cost = price(low, profile)
    return Plan(spec, stock_program(spec), low, cost, cost, strategy="stock")


def _within_budget(plans: PlanTable, options: SearchOptions) -> list[Plan]:
    limit = options.memory_budget * plans[0].stock.saved_bytes
    fits = [p for p in plans if p.cost.saved_bytes <= limit]
    return fits or [min(plans, key=lambda p: (p.cost.saved_bytes, p.cost.time))]


def _by_model(plans: PlanTable, options: SearchOptions) -> Plan:
    """The cost model's choice: fastest within budget (estimates closer than TIME_TIE count as a tie, broken
    by saved bytes), or for objective="memory" the lightest within the time slack. Saved bytes closer than
    MEMORY_TIE to the lightest's are a tie too, broken by time: a program 3 % slower is not taken for 0.5 % less
    memory."""
    fits = _within_budget(plans, options)
    fastest = min(fits, key=lambda p: p.cost.time)
    slack = TIME_TIE if options.objective == "time" else options.time_slack
    near = [p for p in fits if p.cost.time <= fastest.cost.time * (1 + slack)]
    lightest = min(p.cost.saved_bytes for p in near)
    light = [p for p in near if p.cost.saved_bytes <= lightest * (1 + MEMORY_TIE)]
    return min(light, key=lambda p: (p.cost.time, p.cost.saved_bytes))


def _by_flops(plans: PlanTable, options: SearchOptions) -> Plan:
    """RunLoRA's rule: the fewest FLOPs (ties broken by saved bytes), within budget."""
    return min(_within_budget(plans, options), key=lambda p: (p.cost.flops, p.cost.saved_bytes))


def _lightest(plans: PlanTable, options: SearchOptions) -> Plan:
    """The fewest saved bytes, whatever the time."""
    return min(plans, key=lambda p: (p.cost.saved_bytes, p.cost.time))


Strategy = Callable[[PlanTable, SearchOptions], Plan]
STRATEGIES: dict[str, Strategy] = {"model": _by_model, "flops": _by_flops, "lightest": _lightest}


def _table(spec: SiteSpec, profile: DeviceProfile, layout: tuple[str, ...] | None) -> PlanTable:
    plans = candidates(spec, profile, prune=False)
    if layout is not None:
        plans = PlanTable(p for p in plans if tuple(p.lowered.saved) == layout)
        if not plans:
            raise ValueError(f"no program saves exactly {layout} for {spec}")
    return plans


def _as_chosen(plan: Plan, strategy: str) -> Plan:
    return Plan(plan.spec, plan.program, plan.lowered, plan.cost, plan.stock, strategy=strategy)


@lru_cache(maxsize=4096)
def _search_cached(spec: SiteSpec, options: SearchOptions, profile: DeviceProfile, layout: tuple[str, ...] | None) -> Plan:
    plans = _table(spec, profile, layout)
    return _as_chosen(STRATEGIES[options.strategy](plans, options), options.strategy)


def finalists(spec: SiteSpec, options: SearchOptions, profile: DeviceProfile | None = None, k: int = AUTOTUNE_FINALISTS,
              layout: tuple[str, ...] | None = None) -> list[Plan]:
    """What autotuning times: the strategy's choice first, then the programs with the fastest estimates that fit
    the memory budget, `k` in all (fewer when fewer fit). For objective="memory" only programs saving no more
    than the choice, so that timing never trades away the memory the objective asked for."""
    profile = profile or get_profile("cpu")
    chosen = search(spec, options, profile, layout)
    others = [p for p in _within_budget(_table(spec, profile, layout), options) if p.key != chosen.key
              and (options.objective == "time" or p.cost.saved_bytes <= chosen.cost.saved_bytes)]
    return [chosen] + [_as_chosen(p, options.strategy) for p in sorted(others, key=lambda p: p.cost.time)[:max(k - 1, 0)]]


def search(spec: SiteSpec, options: SearchOptions = SearchOptions(), profile: DeviceProfile | None = None,
           layout: tuple[str, ...] | None = None) -> Plan:
    """The plan `options` choose for `spec`; cached, so asking again for the same N costs a dict lookup.

    `layout` restricts the choice to programs that save exactly those tensors: a compiled graph fixes what
    crosses from forward to backward when it is traced, while the contraction order stays free per call.
    """
    return _search_cached(spec, options, profile or get_profile("cpu"), layout)


def plan(n: int, in_features: int, out_features: int, rank: int = 8, *, adapters: int = 1, scale: float = 1.0,
         dropout: float = 0.0, bias: bool = False, lora_bias: bool = False, dtype: torch.dtype = torch.float32,
         adapter_dtype: torch.dtype | None = None, grad_x: bool = True, grad_a: bool = True, grad_b: bool = True,
         training: bool = True, objective: Objective = "time", memory_budget: float = 1.0,
         strategy: str = "model", device: str = "cpu") -> Plan:
    """Plan one LoRA linear of the given shape: ``print(runlora_fx.plan(4096, 1024, 2736, rank=64))``."""
    from .expr import AdapterSpec

    ad = AdapterSpec(rank, scale, dropout, lora_bias, grad_a, grad_b)
    spec = SiteSpec(n, in_features, out_features, (ad,) * adapters, bias=bias, dtype=dtype,
                    adapter_dtype=adapter_dtype, grad_x=grad_x, training=training)
    return search(spec, SearchOptions(objective, memory_budget, strategy=strategy), get_profile(device))
