"""The fast dropout generator (``dropout_rng="fast"``): four mask elements per random 64-bit word.

Why: torch's CPU dropout draws one `bernoulli_` value per element from mt19937, serially; on the LLaMA 60m step
that is a quarter of peft's time. Here each mask is drawn from a private generator seeded by one value taken from
the global generator: the words come from `random_` on int64 (whole 64-bit words), each read as four 16-bit
integers, and an element is kept when its integer is at or above a threshold. Measured on one thread here over
1.4 M elements: 2.4 ms against 9 ms for torch's `bernoulli_` (`benchmarks/results` has no separate suite for it;
the cost model's `fast_rng_rate` is calibrated per device). Where `kernels.exact_bernoulli` builds, torch's own
stream is drawn faster still (1.2-1.4 ms, `python -m benchmarks.profile masks 1024 1376`), so this generator pays
only on devices without it.

What it guarantees:

* keep probability ``1 - p_eff`` with ``p_eff = round(p * 2^16) / 2^16`` (within 2^-17 of p); the plan scales
  by ``1 / (1 - p_eff)``, the probability actually used, so the expectation is exact;
* one draw from the global generator per mask, so ``torch.manual_seed`` makes a run repeat exactly, and every
  site and step gets its own seed. Seeds are 32-bit (torch seeds its mt19937 from 32 bits), so among 10^5 masks
  (1800 steps of 56 sites) about one pair shares a seed, and so a mask: no correlation a training run can see;
* the same seed gives the same mask: backward regenerates it from an 8-byte seed instead of saving the mask or
  the 5 KB mt19937 state.

It is not peft's stream: ``dropout_rng="torch"`` (the default) keeps peft's masks bit for bit. Its step ops
(``rng_seed``, ``fast_mask``) register in `planner.ops` on import.
"""
from __future__ import annotations

import math

import torch

from ..planner.expr import FAST_MASK_LEVELS, effective_p  # noqa: F401 (effective_p: re-exported for callers)
from ..planner.ops import StepOp, register

SEED_BYTES = 8  # what the "seed" mask store saves per mask when fast


def new_seed(device: torch.device) -> torch.Tensor:
    """A 0-d int64 seed on `device`, drawn from torch's global CPU generator (one value per mask)."""
    return torch.empty((), dtype=torch.int64).random_(0, 1 << 32).to(device)


def fast_mask(seed: torch.Tensor, shape: tuple[int, ...], p: float, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """The {0, 1} keep mask of `shape` for `seed`, on the seed's device, in `dtype`: 1 with probability
    1 - effective_p(p). A floating `dtype` is written by the comparison itself (no widening pass), for a mask that
    only multiplies."""
    n, device = math.prod(shape), seed.device
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    words = torch.empty(-(-n // 4), dtype=torch.int64, device=device).random_(-(1 << 63), None, generator=gen)
    threshold = round(p * FAST_MASK_LEVELS) - FAST_MASK_LEVELS // 2  # int16 values are uniform over [-2^15, 2^15)
    values = words.view(torch.int16)[:n]
    if dtype == torch.uint8:
        return (values >= threshold).view(torch.uint8).view(shape)
    return torch.ge(values, threshold, out=torch.empty(n, dtype=dtype, device=device)).view(shape)


def new_seed_like(x: torch.Tensor) -> torch.Tensor:
    return new_seed(x.device)


register(StepOp(  # a fast mask's seed, from the global generator (one value per mask)
    "rng_seed", formula=lambda s: f"seed for the mask of {s.args[0]}",
    emit=lambda em, s, a: em.call(new_seed_like, a[0]), reads=False, pricing="bandwidth"))

register(StepOp(  # the {0, 1} mask of a seed in `dtype`
    "fast_mask", formula=lambda s: f"fast_mask(1-{s.p:g}) from {s.args[0]}",
    emit=lambda em, s, a: em.call(fast_mask, a[0], em.shapes[s.out], s.p, s.dtype),
    reads=False, pricing="throughput", rate="fast_rng_rate"))
