"""Planner benchmark: where the planner's pick lands against the oracle, and why it misses when it does.

Two parts:

* ``analyze(layer_results)``: for every layer row, the planner's pick against the oracle (stage 2, timed side by
  side), the pick's measured rank among all candidates (stage 1), the rank correlation between predicted and
  measured times over the whole candidate table, the ratio measured / predicted, and, for every choice of the
  algebra (forward order, dX order, dA order, dB order, what is kept), whether the cost model and the
  measurement prefer the same option. These are the cost model's errors, named.
* ``map_sweep``: a map like the RunLoRA paper's Figure 2 for one fixed i x o: over (N, r), which program family
  wins, predicted against measured. A family is the contraction order (forward and joint backward); its
  representative is the family's member the cost model prices fastest within the memory budget.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass

from runlora_fx.planner.search import candidates

from .common import log, markdown_table
from .harness import interleaved, median

CHOICES = {  # how to read each choice off a program key "forward/grad_a.grad_b.grad_x/saved"
    "forward": lambda k: k.split("/")[0],
    "grad_x": lambda k: k.split("/")[1].split(".")[2],
    "grad_a": lambda k: k.split("/")[1].split(".")[0],
    "grad_b": lambda k: k.split("/")[1].split(".")[1],
    "keep_u": lambda k: "u" in k.split("/")[2].split("+"),
    "mask": lambda k: next((m for m in ("bool", "bits", "seed", "dense") if m in k.split("/")[2].split("+")), "none"),
}


def family(key: str) -> str:
    """The contraction order of a program key, without what it saves.

    >>> family("merged/zx.gu.merged/u+xd")
    'merged/zx.gu.merged'
    """
    return "/".join(key.split("/")[:2])


def spearman(xs: list[float], ys: list[float]) -> float:
    """Rank correlation (ties get their average rank).

    >>> round(spearman([1, 2, 3], [10, 20, 30]), 9), round(spearman([1, 2, 3], [3, 2, 1]), 9)
    (1.0, -1.0)
    """
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx) ** 0.5
    vy = sum((b - my) ** 2 for b in ry) ** 0.5
    return cov / (vx * vy) if vx and vy else float("nan")


def analyze_row(r: dict) -> dict:
    cands = r["candidates"]
    meas = {c["key"]: median(c["stage1_s"]) for c in cands}
    pred = {c["key"]: c["est_s"] for c in cands}
    fits = [c["key"] for c in cands if c["within_budget"]] or list(meas)
    pick, oracle = r["plans"]["runlora_fx"], r["plans"]["oracle"]
    by_meas = sorted(fits, key=meas.get)
    prefs = {}
    for name, read in CHOICES.items():
        options = sorted({read(k) for k in fits}, key=str)
        if len(options) < 2:
            continue
        best_pred = {o: min(pred[k] for k in fits if read(k) == o) for o in options}
        best_meas = {o: min(meas[k] for k in fits if read(k) == o) for o in options}
        p_choice, m_choice = min(best_pred, key=best_pred.get), min(best_meas, key=best_meas.get)
        prefs[name] = {"predicted": str(p_choice), "measured": str(m_choice), "agree": p_choice == m_choice,
                       "predicted_s": {str(o): best_pred[o] for o in options},
                       "measured_s": {str(o): best_meas[o] for o in options}}
    return {
        "name": r["name"], "row": r["row"], "pick": pick, "oracle": oracle,
        "pick_vs_oracle": r["ratios"]["runlora_fx/oracle"]["median"],
        "pick_rank_stage1": by_meas.index(pick) + 1 if pick in by_meas else None, "candidates": len(fits),
        "stage1_best": by_meas[0], "pick_vs_stage1_best": meas.get(pick, float("nan")) / meas[by_meas[0]],
        "spearman_pred_vs_meas": spearman([pred[k] for k in fits], [meas[k] for k in fits]),
        "measured_over_predicted_pick": meas.get(pick, float("nan")) / pred[pick] if pick in pred else None,
        "peft_measured_over_predicted": r["summary"]["peft"]["median"] / r["predicted_s"]["peft_stock"],
        "choices": prefs,
    }


def analyze(layer: dict) -> dict:
    rows = [analyze_row(r) for r in layer.get("rows", [])]
    if not rows:
        return {"rows": []}
    within = [a for a in rows if a["pick_vs_oracle"] <= 1.05]
    agg = {"rows": len(rows), "within_5pct": len(within), "fraction_within_5pct": len(within) / len(rows),
           "misses": [{"name": a["name"], "pick": a["pick"], "oracle": a["oracle"], "pick_vs_oracle": a["pick_vs_oracle"]}
                      for a in rows if a["pick_vs_oracle"] > 1.05]}
    same = [a["pick_vs_oracle"] for a in rows if a["pick"] == a["oracle"]]
    if same:  # the planner ran the oracle's very program: what is left is measurement noise (and runner overhead)
        agg["noise floor: pick == oracle program"] = {
            "rows": len(same), "median": median(same), "min": min(same), "max": max(same),
            "within_5pct": sum(x <= 1.05 for x in same)}
    for name in CHOICES:
        rel = [a for a in rows if name in a["choices"]]
        if rel:
            dis = [a for a in rel if not a["choices"][name]["agree"]]
            agg[f"choice {name}: disagreements"] = {
                "rows": len(rel), "disagree": len(dis),
                "patterns": _patterns([(a["choices"][name]["predicted"], a["choices"][name]["measured"]) for a in dis])}
    for dt in sorted({a["row"]["dtype"] for a in rows}):
        sub = [a for a in rows if a["row"]["dtype"] == dt]
        agg[f"peft measured/predicted {dt}"] = median([a["peft_measured_over_predicted"] for a in sub])
        agg[f"spearman median {dt}"] = median([a["spearman_pred_vs_meas"] for a in sub])
    return {"rows": rows, "aggregate": agg}


def _patterns(pairs):
    out: dict[str, int] = {}
    for p, m in pairs:
        out[f"predicted {p}, measured {m}"] = out.get(f"predicted {p}, measured {m}", 0) + 1
    return out


def markdown(analysis: dict) -> str:
    header = ["row", "planner pick", "oracle", "pick/oracle", "pick rank (stage 1)", "spearman", "disagreeing choices"]
    body = []
    for a in analysis.get("rows", []):
        dis = ", ".join(f"{k}: pred {v['predicted']} / meas {v['measured']}" for k, v in a["choices"].items()
                        if not v["agree"])
        body.append([a["name"], a["pick"], a["oracle"], a["pick_vs_oracle"],
                     f"{a['pick_rank_stage1']}/{a['candidates']}", a["spearman_pred_vs_meas"], dis])
    return markdown_table(header, body)


# -------------------------------------------------------------------------------------------------------------
# The Figure-2 map.


@dataclass
class MapConfig:
    i: int = 512
    o: int = 1376
    ns: tuple = (256, 1024, 4096)
    ranks: tuple = (8, 64, 256)
    dtype: str = "float32"
    dropout: float = 0.0
    repeats: int = 3


QUICK_MAP = MapConfig(ns=(256, 1024), ranks=(8,), repeats=2)


def map_cell(cfg: MapConfig, n: int, r: int, profile) -> dict:
    from .layer import Case, Row

    row = Row(cfg.i, cfg.o, n, r, cfg.dtype, cfg.dropout)
    case = Case(row, 2.0)
    spec = case.spec()
    table = candidates(spec, profile, prune=False)
    budget = table[0].stock.saved_bytes
    reps = {}
    for p in sorted((p for p in table if p.cost.saved_bytes <= budget), key=lambda p: p.cost.time):
        reps.setdefault(family(p.key), p)
    case.fn_plan(next(iter(reps.values())))()  # warm
    times = interleaved({f: case.fn_plan(p) for f, p in reps.items()}, repeats=cfg.repeats, warmup=0)
    meas = {f: median(t) for f, t in times.items()}
    pred = {f: p.cost.time for f, p in reps.items()}
    return {"n": n, "rank": r, "predicted_winner": min(pred, key=pred.get), "measured_winner": min(meas, key=meas.get),
            "predicted_s": pred, "measured_s": meas,
            "predicted_winner_measured_over_best": meas[min(pred, key=pred.get)] / min(meas.values())}


def map_sweep(cfg: MapConfig, profile) -> dict:
    cells = []
    t0 = time.perf_counter()
    for n, r in itertools.product(cfg.ns, cfg.ranks):
        cells.append(map_cell(cfg, n, r, profile))
        c = cells[-1]
        log(f"map N={n} r={r}: predicted {c['predicted_winner']}, measured {c['measured_winner']} "
            f"(predicted one is {c['predicted_winner_measured_over_best']:.3f}x the best)")
    agree = sum(c["predicted_winner"] == c["measured_winner"] for c in cells)
    near = sum(c["predicted_winner_measured_over_best"] <= 1.05 for c in cells)
    return {"config": asdict(cfg), "cells": cells, "agree": agree, "within_5pct": near, "cells_total": len(cells),
            "wall_s": time.perf_counter() - t0}

