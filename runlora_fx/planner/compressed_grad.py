"""Where to compress a linear layer's weight gradient for Flora's accumulator: after forming it, or while forming it.

For ``y = x W^T + b`` with ``W`` (o x i), upstream gradient ``G`` (N x o) and input ``X`` (N x i), the accumulator
keeps ``P dW`` (o <= i) or ``P dW^T`` (o > i), with ``P`` its ``r x min(o, i)`` projection. Two programs give it:

* **full** (what the post-accumulate-grad hook does): ``dW = G^T X`` (o x i), then ``C = P dW`` (or ``P dW^T``).
* **direct**: ``C = (G P^T)^T X`` (o <= i) or ``C = (X P^T)^T G`` (o > i); the o x i gradient never exists.

Both add ``C`` into the ``r x max(o, i)`` buffer and regenerate ``P`` (the same cost in both; counted in both).
FLOPs: full ``2 N o i + 2 r o i``, direct ``2 N r (o + i)``. Time is the planner's roofline per step
(``max(FLOPs / rate(dtype, smallest dim), bytes / bandwidth) + launch overhead``), so the skinny rank-``r`` products
of the direct program are priced at the slow end of the device's rate curve: with ``r`` close to ``min(o, i)``
or very unbalanced shapes the full program can win. Both programs save the same thing for backward (``x``; ``W``
is a parameter), so the choice is by estimated time; the transient o x i gradient shows up in ``peak_bytes``.
The dX and db products are identical in both programs and are not counted here.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .ops import mm_flops, nbytes
from .device import DeviceProfile


@dataclass(frozen=True)
class GradStep:
    """One step of a weight-gradient program: its formula, FLOPs, bytes read + written and smallest matmul dim."""

    formula: str
    flops: int
    bytes_moved: int
    min_dim: int = 0  # 0: not a matmul
    draws: int = 0  # random numbers generated (regenerating P)

    def time(self, dtype: torch.dtype, profile: DeviceProfile) -> float:
        t = self.bytes_moved / profile.bandwidth
        if self.flops:
            t = max(t, self.flops / profile.rate(dtype, self.min_dim))
        if self.draws:
            t = max(t, self.draws / profile.rng_rate)
        return t + profile.launch_overhead


@dataclass(frozen=True)
class GradProgramCost:
    """Price of one program: steps, matmul FLOPs, bytes moved, bytes saved for backward, transient peak, time."""

    name: str  # "full" or "direct"
    steps: tuple[GradStep, ...]
    flops: int
    bytes_moved: int
    saved_bytes: int  # activation bytes kept from forward to backward
    peak_bytes: int  # largest transient tensor of the weight-gradient program
    time: float  # estimated seconds


@dataclass(frozen=True)
class CompressedGradPlan:
    """The choice for one (N, i, o, r, dtype) on one device profile: ``choice`` is "direct" or "full"."""

    n: int
    in_features: int
    out_features: int
    rank: int
    dtype: torch.dtype
    full: GradProgramCost
    direct: GradProgramCost

    @property
    def choice(self) -> str:
        return "direct" if self.direct.time < self.full.time else "full"

    @property
    def chosen(self) -> GradProgramCost:
        return self.direct if self.choice == "direct" else self.full

    def to_dict(self) -> dict:
        d = {"n": self.n, "in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
             "dtype": str(self.dtype), "choice": self.choice}
        for c in (self.full, self.direct):
            d[c.name] = {"flops": c.flops, "bytes_moved": c.bytes_moved, "saved_bytes": c.saved_bytes,
                         "peak_bytes": c.peak_bytes, "est_time_s": c.time}
        return d

    def __str__(self) -> str:
        head = (f"  Flora compressed weight gradient:  N={self.n}  i={self.in_features}  o={self.out_features}  "
                f"r={self.rank}  dtype={str(self.dtype).replace('torch.', '')}  ->  {self.choice}")
        rows = [head, f"  {'program':<8}{'FLOPs':>14}{'bytes moved':>14}{'saved':>12}{'peak':>12}{'est ms':>10}   steps"]
        for c in (self.full, self.direct):
            rows.append(f"  {c.name:<8}{c.flops:>14,}{c.bytes_moved:>14,}{c.saved_bytes:>12,}{c.peak_bytes:>12,}"
                        f"{c.time * 1e3:>10.4f}   " + "; ".join(s.formula for s in c.steps))
        return "\n".join(rows)


def _mm(formula: str, m: int, k: int, n: int, dtype: torch.dtype) -> GradStep:
    """An (m x k) @ (k x n) product: reads both operands, writes the result."""
    moved = nbytes((m, k), dtype) + nbytes((k, n), dtype) + nbytes((m, n), dtype)
    return GradStep(formula, mm_flops(m, k, n), moved, min(m, k, n))


def _program(name: str, steps: list[GradStep], n: int, i: int, peak: int, dtype: torch.dtype,
             profile: DeviceProfile) -> GradProgramCost:
    return GradProgramCost(name, tuple(steps), sum(s.flops for s in steps), sum(s.bytes_moved for s in steps),
                           nbytes((n, i), dtype), peak, sum(s.time(dtype, profile) for s in steps))


@functools.lru_cache(maxsize=4096)
def plan_compressed_grad(n: int, in_features: int, out_features: int, rank: int, dtype: torch.dtype,
                         profile: DeviceProfile) -> CompressedGradPlan:
    """Price "full gradient then compress" against "compressed directly" for one layer and N; pure and cached.

    >>> from runlora_fx.planner.device import default_profile
    >>> plan_compressed_grad(4096, 4096, 4096, 8, torch.float32, default_profile()).choice
    'direct'
    """
    n, i, o, r = int(n), int(in_features), int(out_features), int(rank)
    if min(n, i, o, r) < 1 or r > min(o, i):
        raise ValueError(f"need N, i, o, r >= 1 and r <= min(o, i), got N={n} i={i} o={o} r={r}")
    lo, hi = min(o, i), max(o, i)
    regen = GradStep(f"P = randn({r}x{lo})", 0, nbytes((r, lo), dtype), draws=r * lo)
    add = GradStep("buffer += C", 0, 3 * nbytes((r, hi), dtype))
    # full: dW = G^T X, then C = P dW (o <= i) or P dW^T (o > i)
    full = [_mm("dW = G^T X", o, n, i, dtype), regen,
            _mm("C = P dW" if o <= i else "C = P dW^T", r, lo, hi, dtype), add]
    # direct: T = G P^T (o <= i) or X P^T (o > i), N x r; then C = T^T X (or T^T G)
    direct = [regen, _mm("T = G P^T" if o <= i else "T = X P^T", n, lo, r, dtype),
              _mm("C = T^T X" if o <= i else "C = T^T G", r, n, hi, dtype), add]
    return CompressedGradPlan(
        n, i, o, r, dtype,
        _program("full", full, n, i, nbytes((o, i), dtype) + nbytes((r, hi), dtype), dtype, profile),
        _program("direct", direct, n, i, nbytes((n, r), dtype) + nbytes((r, hi), dtype), dtype, profile),
    )


def flops_rule(n: int, in_features: int, out_features: int, rank: int) -> tuple[int, int]:
    """Matmul FLOPs of (full, direct): ``2 N o i + 2 r o i`` and ``2 N r (o + i)``.

    >>> flops_rule(8, 6, 10, 2)
    (1200, 512)
    """
    n, i, o, r = n, in_features, out_features, rank
    return 2 * n * o * i + 2 * r * o * i, 2 * n * r * (o + i)


__all__ = ["CompressedGradPlan", "GradProgramCost", "GradStep", "flops_rule", "plan_compressed_grad"]
