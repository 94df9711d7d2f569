"""`Report`: what `explain` returns. Prints as a table (a row per site, a row per layer left alone), converts to
a dict for tools."""
from __future__ import annotations

from dataclasses import dataclass, field

from .passes.site import SkippedSite
from .planner.plan import Plan


@dataclass(frozen=True)
class SiteRow:
    module_path: str
    plan: Plan

    def to_dict(self) -> dict:
        return {"module": self.module_path, **self.plan.to_dict()}


def _dtype_label(spec) -> str:
    """The base's format: its dtype, or the 4-bit quant type for a QLoRA base."""
    return spec.quant.label if spec.quant is not None else str(spec.dtype).replace("torch.", "")


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


@dataclass
class Report:
    sites: list[SiteRow] = field(default_factory=list)
    skipped: list[SkippedSite] = field(default_factory=list)
    any_graph_break: bool = False

    def to_dict(self) -> dict:
        return {
            "sites": [r.to_dict() for r in self.sites],
            "skipped": [{"module": s.module_path, "reason": s.reason} for s in self.skipped],
            "graph_break": self.any_graph_break,
            "totals": self.totals(),
        }

    def totals(self) -> dict:
        plans = [r.plan for r in self.sites]
        return {
            "sites": len(plans),
            "flops": sum(p.cost.flops for p in plans), "stock_flops": sum(p.stock.flops for p in plans),
            "saved_bytes": sum(p.cost.saved_bytes for p in plans),
            "stock_saved_bytes": sum(p.stock.saved_bytes for p in plans),
            "est_time_s": sum(p.cost.time for p in plans), "stock_est_time_s": sum(p.stock.time for p in plans),
        }

    def __str__(self) -> str:
        if not self.sites and not self.skipped:
            return "runlora_fx: no LoRA layers found in this model; nothing to optimize."
        w = max([len(r.module_path) for r in self.sites] + [6]) + 2
        head = (f"  {'module':<{w}}{'N':>6}{'i':>6}{'o':>6}{'r':>5} {'dtype':<18}{'program':<32}"
                f"{'GFLOP':>8}{'stock':>8}{'saved MiB':>10}{'stock':>8}{'est ms':>8}{'stock':>8}")
        lines = [head, "  " + "-" * (len(head) - 2)]
        for row in self.sites:
            p, s = row.plan, row.plan.spec
            lines.append(
                f"  {row.module_path:<{w}}{s.n:>6}{s.in_features:>6}{s.out_features:>6}"
                f"{','.join(str(a.rank) for a in s.adapters):>5} {_dtype_label(s):<18}{p.key:<32}"
                f"{p.cost.flops / 1e9:>8.3f}{p.stock.flops / 1e9:>8.3f}{_mib(p.cost.saved_bytes):>10}"
                f"{_mib(p.stock.saved_bytes):>8}{p.cost.time * 1e3:>8.2f}{p.stock.time * 1e3:>8.2f}")
        t = self.totals()
        if self.sites:
            lines.append(f"  total: {t['sites']} sites; saved for backward {_mib(t['saved_bytes'])} MiB vs stock "
                         f"{_mib(t['stock_saved_bytes'])} MiB; estimated {t['est_time_s'] * 1e3:.2f} ms vs "
                         f"{t['stock_est_time_s'] * 1e3:.2f} ms")
        for s in self.skipped:
            lines.append(f"  skipped {s.module_path or '<root>'}: {s.reason}")
        if self.any_graph_break:
            lines.append("  note: dynamo could not capture the model as one graph; sites were matched per graph")
        return "\n".join(lines)
