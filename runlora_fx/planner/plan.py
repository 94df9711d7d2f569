"""`Plan`: one chosen program for one site at one N, with its steps, formulas and costs. Built once, run often.

Printing a Plan gives a PathInfo-style report: a header comparing it with the stock (peft) program, then one row
per step. Printing a list of plans (`PlanTable`) gives one row per plan.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch.fx as fx

from .cost import Cost, step_flops
from .graphs import backward_graph, forward_graph
from .expr import Lowered, Program, SiteSpec


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


@dataclass(frozen=True)
class Plan:
    spec: SiteSpec
    program: Program
    lowered: Lowered
    cost: Cost
    stock: Cost  # the same site run the way peft/autograd runs it
    strategy: str = "model"

    @property
    def key(self) -> str:
        return self.program.key

    def formula(self) -> dict[str, str]:
        """Readable forward, saved set and backward, e.g. {"forward": "...", "saved": "x, mask(bits)", ...}."""
        low = self.lowered
        fwd = "; ".join(f"{s.out} = {s.formula()}" for s in low.forward)
        bwd = "; ".join(f"{s.out} = {s.formula()}" for s in low.backward)
        saved = ", ".join(n for n in low.saved if not low.signature.is_parameter(n)) or "nothing"
        return {"forward": fwd, "saved": saved, "backward": bwd}

    @cached_property
    def forward_graph(self) -> fx.GraphModule:
        """The forward as an FX GraphModule (`planner.graphs`): ``(*tensors, *constants) -> (y, *saved)``."""
        return forward_graph(self.lowered)

    @cached_property
    def backward_graph(self) -> fx.GraphModule:
        """The backward: ``(*saved, *parameters, *constants, G) -> gradient or None per tensor``."""
        return backward_graph(self.lowered)

    @property
    def speedup(self) -> float:
        """Estimated stock time / planned time."""
        return self.stock.time / self.cost.time if self.cost.time else float("inf")

    def to_dict(self) -> dict:
        s = self.spec
        return {
            "program": self.key, "n": s.n, "in_features": s.in_features, "out_features": s.out_features,
            "ranks": [a.rank for a in s.adapters], "dtype": str(s.dtype),
            "quant": s.quant.label if s.quant is not None else None, "flops": self.cost.flops,
            "stock_flops": self.stock.flops, "saved_bytes": self.cost.saved_bytes,
            "stock_saved_bytes": self.stock.saved_bytes, "est_time_s": self.cost.time,
            "stock_est_time_s": self.stock.time, **self.formula(),
        }

    def __str__(self) -> str:
        s, c, st = self.spec, self.cost, self.stock
        ranks = ",".join(str(a.rank) for a in s.adapters)
        base = f"  base=4-bit {s.quant.label}" if s.quant is not None else ""
        head = [
            f"  LoRA site:  N={s.n}  i={s.in_features}  o={s.out_features}  r={ranks}  dtype={str(s.dtype)[6:]}{base}"
            f"  dropout={','.join(f'{a.dropout:g}' for a in s.adapters)}  training={s.training}",
            f"  Program:  {self.key}   (strategy {self.strategy})",
            f"  FLOPs:  {c.flops:.4g}   stock {st.flops:.4g}   ratio {c.flops / max(st.flops, 1):.3f}",
            f"  Saved for backward:  {_mib(c.saved_bytes)}   stock {_mib(st.saved_bytes)}   ({self.formula()['saved']})",
            f"  Estimated time:  {c.time * 1e3:.3f} ms   stock {st.time * 1e3:.3f} ms   speedup {self.speedup:.3f}x",
            f"  Transient peak:  {_mib(c.peak_bytes)}   kernels: {c.kernels}",
        ]
        rows = ["", f"  {'phase':<9}{'result':<7}{'FLOPs':>12}   step", "  " + "-" * 60]
        for phase, steps in (("forward", self.lowered.forward), ("backward", self.lowered.backward)):
            for step in steps:
                rows.append(f"  {phase:<9}{step.out:<7}{step_flops(step, self.lowered.shapes):>12.4g}   {step.formula()}")
        return "\n".join(head + rows)


class PlanTable(list):
    """A list of plans that prints one row per plan (for comparing candidates)."""

    def __str__(self) -> str:
        head = f"  {'program':<34}{'FLOPs':>12}{'saved':>13}{'peak':>13}{'est ms':>10}"
        rows = [head, "  " + "-" * (len(head) - 2)]
        for p in self:
            rows.append(f"  {p.key:<34}{p.cost.flops:>12.4g}{_mib(p.cost.saved_bytes):>13}"
                        f"{_mib(p.cost.peak_bytes):>13}{p.cost.time * 1e3:>10.3f}")
        return "\n".join(rows)
