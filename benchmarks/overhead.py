"""Call-overhead benchmark: one tiny LoRA site, forward + backward, where Python dominates the arithmetic.

A model calls its planned sites hundreds of times per step; on small layers the per-call Python (state check, plan
lookup, the node's forward and backward) is what a planned site must win back. Contenders, interleaved:

* ``base``: ``F.linear`` forward + backward of the frozen base (the floor).
* ``peft``: peft's ``lora.Linear``.
* ``optimize``: the same layer after ``runlora_fx.optimize`` (the full per-call path a model runs: the state check
  of the patched forward, then the runner).
* ``runner``: ``LoraLinearRunner`` called directly (no state check).

Each timed call runs the layer `calls` times (a single call is too short for the clock); the figures are
microseconds per layer call and the ratio to peft (median of per-round ratios).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .common import DTYPES, log, markdown_table
from .harness import interleaved, ratio_stats, summarize

CONTENDERS = ("base", "peft", "optimize", "runner")


@dataclass(frozen=True)
class OverheadRow:
    i: int = 64
    o: int = 64
    n: int = 16
    rank: int = 4
    dtype: str = "float32"
    dropout: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.i}x{self.o} N={self.n} r={self.rank} {self.dtype} p={self.dropout:g}"


@dataclass
class OverheadConfig:
    rows: tuple = (OverheadRow(), OverheadRow(dropout=0.05))
    calls: int = 200
    repeats: int = 7
    warmup: int = 1


QUICK = OverheadConfig(calls=50, repeats=3)


def _contenders(row: OverheadRow, calls: int) -> dict:
    from peft import LoraConfig, get_peft_model

    import runlora_fx

    torch.manual_seed(0)
    dt = DTYPES[row.dtype]

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(row.i, row.o, bias=False)

        def forward(self, x):
            return self.proj(x)

    model = get_peft_model(Tiny(), LoraConfig(r=row.rank, lora_alpha=2 * row.rank, lora_dropout=row.dropout,
                                              target_modules=["proj"])).to(dt).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    x = torch.randn(row.n, row.i, dtype=dt, requires_grad=True)
    g = torch.randn(row.n, row.o, dtype=dt)
    peft_layer = model.base_model.model.proj
    optimized = runlora_fx.optimize(copy.deepcopy(model), example_inputs=(x,))
    sites = runlora_fx.api.optimized_sites(optimized)
    if len(sites) != 1:
        raise RuntimeError(f"expected one planned site, got {len(sites)}")
    site = sites[0]
    planned_layer = site.module
    adapters = [(a.lora_a, a.lora_b, a.lora_bias) for a in site.params.adapters]
    w = peft_layer.base_layer.weight

    def loop(f):
        def run():
            for _ in range(calls):
                f().backward(g)
        return run

    return {"base": loop(lambda: F.linear(x, w)), "peft": loop(lambda: peft_layer(x)),
            "optimize": loop(lambda: planned_layer(x)),
            "runner": loop(lambda: site.runner(x, site.params.weight, None, adapters, True))}


def run_row(row: OverheadRow, cfg: OverheadConfig) -> dict:
    fns = _contenders(row, cfg.calls)
    times = interleaved(fns, repeats=cfg.repeats, warmup=cfg.warmup)
    per_call = {k: [t / cfg.calls for t in v] for k, v in times.items()}
    return {"row": asdict(row), "name": row.name, "calls_per_timing": cfg.calls, "times_s": per_call,
            "summary": summarize(per_call),
            "ratios": {f"{c}/peft": ratio_stats(per_call, c, "peft") for c in CONTENDERS if c != "peft"}}


def markdown(rows: list[dict]) -> str:
    header = ["row"] + [f"{c} µs" for c in CONTENDERS] + [f"{c} / peft" for c in CONTENDERS if c != "peft"] + \
        ["LoRA µs over base: peft", "optimize"]
    body = []
    for r in rows:
        med = {c: r["summary"][c]["median"] * 1e6 for c in CONTENDERS}
        body.append([r["name"]] + [med[c] for c in CONTENDERS]
                    + [r["ratios"][f"{c}/peft"]["median"] for c in CONTENDERS if c != "peft"]
                    + [med["peft"] - med["base"], med["optimize"] - med["base"]])
    return markdown_table(header, body)


def run(cfg: OverheadConfig, on_row=None) -> dict:
    done = []
    for row in cfg.rows:
        res = run_row(row, cfg)
        done.append(res)
        log(f"overhead {row.name}: " + ", ".join(f"{k} {v['median']:.3f}" for k, v in res["ratios"].items()))
        if on_row:
            on_row({"config": asdict(cfg), "rows": done})
    return {"config": asdict(cfg), "rows": done}
