"""Measured choice among a site's finalists: ``optimize(model, autotune=True)``.

Why: the cost model ranks the best few programs of a site within a few percent of each other, and on a real
device its errors are that large too. Measured site by site on the 60m LLaMA's shapes here, the fastest program
that saves no more than peft removed 0.01-0.19 more of LoRA's cost than the cost model's pick
(`python -m benchmarks.ceiling`, four runs in benchmarks/results). So at a site's first call with a new spec, the finalists (`planner.search.
finalists`: the cost model's choice and the next fastest estimates within the memory budget) run forward and
backward on random tensors of the spec's shapes, interleaved, and the fastest runs from then on. The choice is
remembered per (spec, options, device profile), so the sites of a model that share a shape are timed once.

Every finalist computes the same sums, so results agree to rounding whichever wins, but which one wins can
differ between runs and machines (that is the price of measuring). Timing never touches the caller's random
stream (`torch.random.fork_rng`), so the masks of a seeded run stay peft's. A 4-bit base, a symbolic N (under
torch.compile), an active dispatch mode or a call below autograd (the compiled path's custom ops) keeps the cost
model's choice: autotuning is for eager sites (`optimize`).
"""
from __future__ import annotations

import time
from functools import lru_cache
from typing import Callable

import torch

from ..planner.device import DeviceProfile
from ..planner.expr import SiteSpec
from ..planner.plan import Plan
from ..planner.search import SearchOptions, finalists, search

TIE = 0.02  # the cost model's choice stays unless a finalist measures this much faster (noise is not a reason)
BUDGET_S = 0.5  # timing budget per spec, after one warm-up round
ROUNDS = (3, 9)  # fewest and most timed rounds


def applies(spec: SiteSpec) -> bool:
    """Whether a site can be timed now: a dense base, a concrete N, no compile or dispatch mode in the way, and
    autograd live (inside a custom op, as the opaque lowering runs a site, it is not: backward cannot be timed)."""
    return (spec.quant is None and type(spec.n) is int and spec.n > 0 and not torch.compiler.is_compiling()
            and not torch._C._len_torch_dispatch_stack()
            and not torch._C._dispatch_tls_is_dispatch_key_excluded(torch._C.DispatchKey.AutogradFunctionality))


Run = Callable[..., torch.Tensor]  # run(plan, x, weight, bias, adapters): the node that runs a Plan (kernels.dense)


def plan(spec: SiteSpec, options: SearchOptions, profile: DeviceProfile, device: torch.device, run: Run,
         layout: tuple[str, ...] | None = None) -> Plan:
    """The measured fastest of the finalists, each run by `run`, when `options.autotune` asks for it and
    `applies`; else `search`."""
    if options.autotune < 2 or not applies(spec):
        return search(spec, options, profile, layout)
    return _tuned(spec, options, profile, torch.device(device), run, layout)


@lru_cache(maxsize=1024)
def _tuned(spec: SiteSpec, options: SearchOptions, profile: DeviceProfile, device: torch.device, run: Run,
           layout: tuple[str, ...] | None) -> Plan:
    plans = finalists(spec, options, profile, options.autotune, layout)
    if len(plans) == 1:
        return plans[0]
    times = measure(plans, spec, device, run)
    chosen = fastest(plans, times)
    return Plan(chosen.spec, chosen.program, chosen.lowered, chosen.cost, chosen.stock,
                strategy=f"{options.strategy}, autotuned over {len(plans)}")


def fastest(plans: list[Plan], times: dict[str, list[float]]) -> Plan:
    """The finalist with the smallest median time; the first (the cost model's choice) unless beaten by `TIE`."""
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    best = min(plans, key=lambda p: med[p.key])
    return plans[0] if med[plans[0].key] <= med[best.key] * (1 + TIE) else best


def measure(plans: list[Plan], spec: SiteSpec, device: torch.device, run: Run) -> dict[str, list[float]]:
    """Seconds of one forward and backward per finalist, per round (rounds interleave the finalists)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {p.key: [] for p in plans}
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.enable_grad():  # the inputs and masks drawn here are ours
        x, weight, bias, adapters, grad = _inputs(spec, device)
        needs_grad = any(t is not None and t.requires_grad for t in (x, bias, *(t for ad in adapters for t in ad)))

        def call(p: Plan) -> None:
            y = run(p, x, weight, bias, adapters)
            if needs_grad:
                y.backward(grad)

        start = time.perf_counter()
        for p in plans:  # warm-up round: first-touch pages, allocator, generated code
            call(p)
        sync()
        per_round = time.perf_counter() - start
        rounds = max(ROUNDS[0], min(ROUNDS[1], int(BUDGET_S / max(per_round, 1e-9))))
        for _ in range(rounds):
            for p in plans:
                t0 = time.perf_counter()
                call(p)
                sync()
                times[p.key].append(time.perf_counter() - t0)
    return times


def _inputs(spec: SiteSpec, device: torch.device):
    """Random tensors of the spec's shapes, dtypes and grad flags, and an upstream gradient."""
    def randn(*shape, dtype=spec.dtype, grad=False, scale=1.0):
        return (torch.randn(*shape, dtype=dtype, device=device) * scale).requires_grad_(grad)

    n, i, o = spec.n, spec.in_features, spec.out_features
    x = randn(n, i, grad=spec.grad_x)
    weight = randn(o, i, scale=i ** -0.5)
    bias = randn(o, grad=spec.grad_bias) if spec.bias else None
    adapters = [(randn(a.rank, i, dtype=spec.compute_dtype, grad=a.grad_a, scale=i ** -0.5),
                 randn(o, a.rank, dtype=spec.compute_dtype, grad=a.grad_b, scale=0.02),
                 randn(o, dtype=spec.compute_dtype, grad=a.grad_lora_bias) if a.lora_bias else None)
                for a in spec.adapters]
    return x, weight, bias, adapters, randn(n, o)
