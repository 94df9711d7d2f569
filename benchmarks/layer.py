"""Layer benchmark: one LoRA linear, forward + backward, every contender side by side.

Contenders, timed interleaved in one run per row:

* ``base``: the frozen base linear alone (forward and dX): the floor, no LoRA layer can be faster.
* ``peft``: peft's `lora.Linear` (its own forward, autograd's backward).
* ``paper``: the RunLoRA paper's rule (FLOPs argmin over its forward1-4 / backward1-8, `paper_rule.py`).
* ``runlora_fx``: `LoraLinearRunner` as a model runs it: plan chosen at call time by the cost model.
* ``oracle``: every candidate of the plan space timed, the fastest taken (within the same memory budget as the
  planner: never more saved bytes than peft's layer).

The oracle is found in two stages so that 36 candidates stay affordable: stage 1 times every candidate
(interleaved, `stage1_repeats` calls each, then the `refine` fastest again); stage 2 puts the `oracle_k` best
within budget into the main interleaved run beside the other contenders, and the oracle is the fastest of them
there. Stage-1 times of all candidates are kept in the results: they are what the cost model is checked against.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from runlora_fx.kernels.dense import AdapterConfig, LoraLinearRunner, run_plan
from runlora_fx.planner.cost import price
from runlora_fx.planner.expr import AdapterSpec, SiteSpec, build_steps, stock_program
from runlora_fx.planner.plan import Plan
from runlora_fx.planner.device import default_profile
from runlora_fx.planner.search import candidates, stock_plan

from . import paper_rule
from .common import DTYPES, SavedBytes, log, loadavg
from .harness import geomean, interleaved, median, ratio_stats, summarize

# (in, out, what it is in the paper's LLaMA configs)
SHAPES = [
    (512, 1376, "60m mlp"), (768, 2048, "130m mlp"), (1024, 2736, "350m mlp"), (2048, 5461, "1.3b mlp"),
    (512, 512, "60m attn"), (768, 768, "130m attn"), (1024, 1024, "350m attn"), (2048, 2048, "1.3b attn"),
]
RANKS = (8, 64, 128, 256)
NS = (512, 2048, 8192)
DROPOUTS = (0.0, 0.05)
CONTENDERS = ("base", "peft", "paper", "runlora_fx", "oracle")
_PROFILE = default_profile("cpu")  # only FLOPs are read from it
RATIOS = [("runlora_fx", "peft"), ("runlora_fx", "oracle"), ("runlora_fx", "base"), ("peft", "base"),
          ("paper", "peft"), ("oracle", "peft"), ("runlora_fx", "paper")]


@dataclass(frozen=True)
class Row:
    i: int
    o: int
    n: int
    rank: int
    dtype: str
    dropout: float
    label: str = ""

    @property
    def name(self) -> str:
        return f"{self.i}x{self.o} N={self.n} r={self.rank} {self.dtype} p={self.dropout:g}"


@dataclass
class LayerConfig:
    shapes: list = field(default_factory=lambda: list(SHAPES))
    ranks: tuple = RANKS
    ns: tuple = NS
    dtypes: tuple = ("float32", "bfloat16")
    dropouts: tuple = DROPOUTS
    repeats: int = 7
    warmup: int = 1
    stage1_repeats: int = 1
    refine: int = 6
    refine_repeats: int = 2
    oracle_k: int = 2
    max_call_s: float = 0.05  # rows whose peft call is estimated (`nominal_call_s`) slower than this are trimmed
    scale_alpha: float = 2.0  # lora_alpha = scale_alpha * r (scale 2, a common choice)


QUICK = LayerConfig(shapes=[(512, 1376, "60m mlp")], ranks=(8,), ns=(512,), dtypes=("float32", "bfloat16"),
                    dropouts=(0.0, 0.05), repeats=3, refine=4, refine_repeats=1, max_call_s=0.1)


def spec_of(row: Row) -> SiteSpec:
    return SiteSpec(row.n, row.i, row.o, (AdapterSpec(row.rank, 2.0, row.dropout),), dtype=DTYPES[row.dtype])


# Rates used only to decide which rows are too long to run: roughly what this 2-core CPU sustains on large
# matmuls (AVX-512 fp32, AMX bf16). Fixed numbers, so that the trimmed set does not move with a noisy calibration.
NOMINAL_RATE = {"float32": 50e9, "bfloat16": 200e9}


def nominal_call_s(row: Row) -> float:
    """Seconds one peft forward+backward of `row` would take at the nominal rate (FLOPs of the stock program).

    >>> round(nominal_call_s(Row(512, 1376, 2048, 8, "float32", 0.0)), 3)
    0.119
    """
    spec = spec_of(row)
    return price(build_steps(spec, stock_program(spec)), _PROFILE).flops / NOMINAL_RATE[row.dtype]


def grid(cfg: LayerConfig) -> tuple[list[Row], list[dict]]:
    """Rows to run and rows trimmed (with the estimate that trimmed them)."""
    rows, trimmed = [], []
    for (i, o, label), r, n, dt, p in itertools.product(cfg.shapes, cfg.ranks, cfg.ns, cfg.dtypes, cfg.dropouts):
        row = Row(i, o, n, r, dt, p, label)
        est = nominal_call_s(row)
        if est > cfg.max_call_s:
            trimmed.append({**asdict(row), "est_peft_call_s": est,
                            "reason": f"peft call estimated {est:.2f} s > {cfg.max_call_s} s (x{_calls(cfg)} calls per row)"})
        else:
            rows.append(row)
    return rows, trimmed


def _calls(cfg: LayerConfig) -> int:
    return 36 * cfg.stage1_repeats + cfg.refine * cfg.refine_repeats + (4 + cfg.oracle_k) * (cfg.repeats + cfg.warmup)


class Case:
    """The tensors of one row: a peft layer and the very same W, A, B for every other contender."""

    def __init__(self, row: Row, scale_alpha: float, seed: int = 0):
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        dt = DTYPES[row.dtype]

        class One(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = torch.nn.Linear(row.i, row.o, bias=False)

        model = get_peft_model(One(), LoraConfig(r=row.rank, lora_alpha=int(scale_alpha * row.rank),
                                                 lora_dropout=row.dropout, target_modules=["proj"]))
        model.to(dt).train()
        self.layer = model.base_model.model.proj
        self.W = self.layer.base_layer.weight
        self.A = self.layer.lora_A["default"].weight
        self.B = self.layer.lora_B["default"].weight
        with torch.no_grad():
            self.B.normal_(0, 0.02)  # peft starts B at zero; random values are what training sees later
        self.scale = float(self.layer.scaling["default"])
        self.x = torch.randn(row.n, row.i, dtype=dt, requires_grad=True)
        self.g = torch.randn(row.n, row.o, dtype=dt)
        self.runner = LoraLinearRunner((AdapterConfig(self.scale, row.dropout),))
        self.adapters = [(self.A, self.B, None)]
        self.params = [self.W, self.A, self.B]

    def spec(self) -> SiteSpec:
        return self.runner.spec_for(self.x, self.W, None, self.adapters, True)

    def _clear(self) -> None:
        self.x.grad = self.A.grad = self.B.grad = None

    def fn_base(self):
        def f():
            self._clear()
            F.linear(self.x, self.W).backward(self.g)
        return f

    def fn_peft(self):
        def f():
            self._clear()
            self.layer(self.x).backward(self.g)
        return f

    def fn_runner(self, runner: LoraLinearRunner | None = None):
        """One step through `runner` (by default the row's own, planned with the default options)."""
        runner = runner or self.runner

        def f():
            self._clear()
            runner(self.x, self.W, None, self.adapters, True).backward(self.g)
        return f

    def fn_plan(self, plan: Plan):
        def f():
            self._clear()
            run_plan(plan, self.x, self.W, None, self.adapters).backward(self.g)
        return f

    def saved(self, forward) -> dict:
        """Exact bytes `forward` keeps for backward (parameters excluded), counted with saved_tensors_hooks."""
        counter = SavedBytes(self.params)
        self._clear()
        with counter.hooks():
            y = forward()
        y.backward(self.g)
        return counter.to_dict()

    def forward_only(self, kind: str, plan: Plan | None = None):
        if kind == "peft":
            return lambda: self.layer(self.x)
        if kind == "runlora_fx":
            return lambda: self.runner(self.x, self.W, None, self.adapters, True)
        if kind == "base":
            return lambda: F.linear(self.x, self.W)
        return lambda: run_plan(plan, self.x, self.W, None, self.adapters)


def paper_plan(spec: SiteSpec, profile) -> Plan:
    prog = paper_rule.program(spec)
    low = build_steps(spec, prog)
    stock = stock_plan(spec, profile).cost
    return Plan(spec, prog, low, price(low, profile), stock, strategy="paper-flops")


def run_row(row: Row, cfg: LayerConfig, profile) -> dict:
    t_start = time.perf_counter()
    case = Case(row, cfg.scale_alpha)
    spec = case.spec()
    planned = case.runner.plan_for(spec, case.x.device)
    paper = paper_plan(spec, profile)
    table = candidates(spec, profile, prune=False)
    budget = planned.stock.saved_bytes  # the planner's default budget: never more than peft's layer saves
    by_key = {p.key: p for p in table}

    # Warm every code path once (allocator, first-touch pages).
    for f in (case.fn_base(), case.fn_peft(), case.fn_runner()):
        f()

    # Stage 1: every candidate, interleaved; then the fastest few again.
    stage1 = interleaved({p.key: case.fn_plan(p) for p in table}, repeats=cfg.stage1_repeats, warmup=0)
    order = sorted(stage1, key=lambda k: median(stage1[k]))
    if cfg.refine and cfg.refine_repeats:
        again = interleaved({k: case.fn_plan(by_key[k]) for k in order[:cfg.refine]}, repeats=cfg.refine_repeats,
                            warmup=0)
        for k, ts in again.items():
            stage1[k] = stage1[k] + ts
    order = sorted(stage1, key=lambda k: median(stage1[k]))
    fits = [k for k in order if by_key[k].cost.saved_bytes <= budget] or order
    oracle_keys = fits[:cfg.oracle_k]

    # Stage 2: the contenders and the oracle's finalists, interleaved round by round.
    fns = {"base": case.fn_base(), "peft": case.fn_peft(), "paper": case.fn_plan(paper),
           "runlora_fx": case.fn_runner()}
    for k in oracle_keys:
        fns[f"oracle:{k}"] = case.fn_plan(by_key[k])
    times = interleaved(fns, repeats=cfg.repeats, warmup=cfg.warmup)
    best = min(oracle_keys, key=lambda k: median(times[f"oracle:{k}"]))
    times["oracle"] = times[f"oracle:{best}"]

    saved = {"peft": case.saved(case.forward_only("peft")), "runlora_fx": case.saved(case.forward_only("runlora_fx")),
             "paper": case.saved(case.forward_only("paper", paper)),
             "oracle": case.saved(case.forward_only("oracle", by_key[best])),
             "base": case.saved(case.forward_only("base"))}

    return {
        "row": asdict(row), "name": row.name, "scale": case.scale,
        "times_s": {k: v for k, v in times.items()},
        "summary": summarize({k: times[k] for k in CONTENDERS}),
        "ratios": {f"{a}/{b}": ratio_stats(times, a, b) for a, b in RATIOS},
        "plans": {"runlora_fx": planned.key, "paper": paper.key, "paper_names": paper_rule.names(spec),
                  "oracle": best, "oracle_finalists": oracle_keys, "stock": stock_program(spec).key},
        "predicted_s": {"runlora_fx": planned.cost.time, "peft_stock": planned.stock.time, "paper": paper.cost.time,
                        "oracle": by_key[best].cost.time},
        "saved_for_backward": saved,
        "predicted_saved_bytes": {"runlora_fx": planned.cost.saved_bytes, "peft_stock": planned.stock.saved_bytes,
                                  "paper": paper.cost.saved_bytes, "oracle": by_key[best].cost.saved_bytes},
        "candidates": [{"key": p.key, "est_s": p.cost.time, "flops": p.cost.flops, "saved_bytes": p.cost.saved_bytes,
                        "kernels": p.cost.kernels, "within_budget": p.cost.saved_bytes <= budget,
                        "stage1_s": stage1[p.key]} for p in table],
        "budget_bytes": budget, "loadavg": loadavg(), "wall_s": time.perf_counter() - t_start,
    }


def aggregate(rows: list[dict]) -> dict:
    """The figures the issue asks for, from the rows."""
    if not rows:
        return {}
    rp = [r["ratios"]["runlora_fx/peft"]["median"] for r in rows]
    ro = [r["ratios"]["runlora_fx/oracle"]["median"] for r in rows]
    worst = max(rows, key=lambda r: r["ratios"]["runlora_fx/peft"]["median"])
    out = {
        "rows": len(rows),
        "runlora_fx/peft": {"geomean": geomean(rp), "max": max(rp), "min": min(rp),
                            "rows_at_or_below_1": sum(x <= 1.0 for x in rp), "worst_row": worst["name"]},
        "paper/peft": {"geomean": geomean([r["ratios"]["paper/peft"]["median"] for r in rows])},
        "oracle/peft": {"geomean": geomean([r["ratios"]["oracle/peft"]["median"] for r in rows])},
        "peft/base": {"geomean": geomean([r["ratios"]["peft/base"]["median"] for r in rows])},
        "runlora_fx/base": {"geomean": geomean([r["ratios"]["runlora_fx/base"]["median"] for r in rows])},
        "runlora_fx/oracle": {"geomean": geomean(ro), "within_5pct": sum(x <= 1.05 for x in ro),
                              "fraction_within_5pct": sum(x <= 1.05 for x in ro) / len(ro)},
    }
    for key in ("dtype", "dropout"):
        for val in sorted({r["row"][key] for r in rows}, key=str):
            sub = [r for r in rows if r["row"][key] == val]
            out[f"runlora_fx/peft geomean {key}={val}"] = geomean([r["ratios"]["runlora_fx/peft"]["median"] for r in sub])
    return out


def group_table(rows: list[dict]) -> str:
    """Geometric means of the per-row ratios by dtype and dropout, by N and dropout, and over all rows (the
    table docs/BENCHMARKS.md quotes)."""
    from .common import markdown_table

    groups: dict[str, list[dict]] = {}
    for r in rows:
        row = r["row"]
        for key in (f"{row['dtype']}, p = {row['dropout']:g}", f"N = {row['n']}, p = {row['dropout']:g}"):
            groups.setdefault(key, []).append(r)
    med = lambda r, k: r["ratios"][k]["median"]  # noqa: E731
    body = []
    for key, rs in sorted(groups.items()) + [("all", rows)]:
        body.append([key, len(rs)] + [geomean([med(r, k) for r in rs]) for k in
                                       ("runlora_fx/peft", "paper/peft", "oracle/peft", "runlora_fx/oracle")]
                    + [sum(med(r, "runlora_fx/peft") <= 1.0 for r in rs)])
    return markdown_table(["group", "rows", "runlora_fx / peft", "paper rule / peft", "oracle / peft",
                           "runlora_fx / oracle", "rows with runlora_fx <= peft"], body)


def markdown(rows: list[dict]) -> str:
    from .common import markdown_table

    header = ["shape", "N", "r", "dtype", "p", "base ms", "peft ms", "paper ms", "runlora_fx ms", "oracle ms",
              "rlfx/peft", "rlfx/oracle", "paper/peft", "runlora_fx plan", "oracle plan", "saved KiB peft/rlfx"]
    body = []
    for r in rows:
        row, med = r["row"], {k: v["median"] * 1e3 for k, v in r["summary"].items()}
        sv = r["saved_for_backward"]
        body.append([f"{row['i']}x{row['o']}", row["n"], row["rank"], row["dtype"], row["dropout"], med["base"],
                     med["peft"], med["paper"], med["runlora_fx"], med["oracle"],
                     r["ratios"]["runlora_fx/peft"]["median"], r["ratios"]["runlora_fx/oracle"]["median"],
                     r["ratios"]["paper/peft"]["median"], r["plans"]["runlora_fx"], r["plans"]["oracle"],
                     f"{sv['peft']['bytes'] / 1024:.0f}/{sv['runlora_fx']['bytes'] / 1024:.0f}"])
    return markdown_table(header, body) + "\n\n" + group_table(rows) if rows else markdown_table(header, body)


def run(cfg: LayerConfig, profile, on_row=None) -> dict:
    rows, trimmed = grid(cfg)
    log(f"layer: {len(rows)} rows to run, {len(trimmed)} trimmed (estimated peft call > {cfg.max_call_s} s)")
    done = []
    for idx, row in enumerate(rows):
        t0 = time.perf_counter()
        res = run_row(row, cfg, profile)
        done.append(res)
        log(f"layer {idx + 1}/{len(rows)} {row.name}: rlfx/peft {res['ratios']['runlora_fx/peft']['median']:.3f} "
            f"rlfx/oracle {res['ratios']['runlora_fx/oracle']['median']:.3f} plan {res['plans']['runlora_fx']} "
            f"oracle {res['plans']['oracle']} ({time.perf_counter() - t0:.1f} s)")
        if on_row:
            on_row({"config": asdict(cfg), "rows": done, "trimmed": trimmed, "aggregate": aggregate(done)})
    return {"config": asdict(cfg), "rows": done, "trimmed": trimmed, "aggregate": aggregate(done)}


def estimate_wall(cfg: LayerConfig) -> float:
    """Rough seconds the grid would take at the nominal rates (for choosing the trim)."""
    rows, _ = grid(cfg)
    return sum(nominal_call_s(r) * _calls(cfg) for r in rows)

