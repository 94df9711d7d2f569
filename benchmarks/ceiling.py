"""How much of LoRA's cost the best program of the plan space removes, measured site by site: the ceiling of a row.

``python -m benchmarks.ceiling [--models 60m] [--ranks 8,128] [--dropouts 0,0.05] [--tokens 512] [--repeats 9]``

`benchmarks.flops` bounds a row by FLOPs; this measures it. For each distinct LoRA site shape of the model (the
60m LLaMA has three: 512 -> 512 four times a layer, 512 -> 1376 twice, 1376 -> 512 once), with the row's tokens,
rank and dropout, it times one forward and backward of: the frozen linear alone (`x W^T`, backward dX only: what
the frozen model runs there), peft's layer, `optimize`'s pick, and every program of the space (`candidates`,
unpruned, any saved set). Every candidate runs first (a short round), then the fastest few, peft, the pick and
the frozen linear again, interleaved, and the best of those is the oracle (also the best of those saving no
more than peft, the planner's default budget). `optimize(model, autotune=True)`'s choice runs beside them. LoRA's cost at a site is a
contender's time minus the frozen linear's; summed over the model's sites (times the layer count) it is LoRA's
cost of the step as the layers see it. Then

    ceiling = 1 - oracle's LoRA cost / peft's LoRA cost

is the share of LoRA's cost that the fastest exact program of the space removes, each site run alone; the
pick's share beside it says how close the planner gets. The model step (`benchmarks.model`) adds what no site
program changes (AdamW on the adapters, cache effects between layers), so the model rows' shares sit near, not
on, these.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter

from .common import loadavg
from .harness import interleaved, median
from .layer import Case, Row

SHORTLIST = 5


def site_shapes(model_name: str) -> Counter:
    """{(in, out): number of LoRA sites of that shape in the model}, from the benchmark's peft model."""
    from peft.tuners.lora import Linear as LoraLinear

    from . import model as mb

    peft = mb.build_peft_model(mb.ModelRow(model_name, 8, 0.0, "float32"))
    return Counter((m.get_base_layer().in_features, m.get_base_layer().out_features)
                   for m in peft.modules() if isinstance(m, LoraLinear))


def measure_site(i: int, o: int, n: int, r: int, p: float, repeats: int) -> dict:
    """Median seconds of one forward and backward at one site shape: frozen linear, peft, the pick, the oracle."""
    from runlora_fx.kernels.dense import LoraLinearRunner
    from runlora_fx.planner.device import get_profile
    from runlora_fx.planner.search import SearchOptions, candidates

    case = Case(Row(i, o, n, r, "float32", p), 2.0)
    spec = case.spec()
    profile = get_profile(case.x.device)
    pick = case.runner.plan_for(spec, case.x.device)
    table = {plan.key: plan for plan in candidates(spec, profile, prune=False)}
    first = interleaved({k: case.fn_plan(plan) for k, plan in table.items()}, repeats=3, warmup=1)
    ranked = sorted(first, key=lambda k: median(first[k]))
    budget = pick.stock.saved_bytes  # what peft's layer saves: the planner's default budget
    fitting = [k for k in ranked if table[k].cost.saved_bytes <= budget]
    shortlist = list(dict.fromkeys(ranked[:SHORTLIST] + fitting[:SHORTLIST]))
    tuned_runner = LoraLinearRunner(case.runner.adapters, SearchOptions(autotune=True))
    tuned = tuned_runner.plan_for(spec, case.x.device)  # timed now, before the rounds below
    fns = {"frozen": case.fn_base(), "peft": case.fn_peft(), "pick": case.fn_runner(),
           "tuned": case.fn_runner(tuned_runner)}
    fns.update({f"plan:{k}": case.fn_plan(table[k]) for k in shortlist})
    times = interleaved(fns, repeats=repeats, warmup=1)
    med = {k: median(v) for k, v in times.items()}
    oracle = min(shortlist, key=lambda k: med[f"plan:{k}"])
    fit = min((k for k in shortlist if k in fitting), key=lambda k: med[f"plan:{k}"])
    return {"shape": [i, o], "frozen_s": med["frozen"], "peft_s": med["peft"], "pick_s": med["pick"],
            "tuned_s": med["tuned"], "tuned": tuned.key,
            "oracle_s": med[f"plan:{oracle}"], "fit_s": med[f"plan:{fit}"], "pick": pick.key, "oracle": oracle,
            "fit": fit, "candidates": len(table)}


def row_ceiling(model_name: str, n: int, r: int, p: float, repeats: int) -> dict:
    sites, shapes = [], site_shapes(model_name)
    cost = Counter()
    for (i, o), count in sorted(shapes.items()):
        s = measure_site(i, o, n, r, p, repeats)
        s["count"] = count
        sites.append(s)
        for who in ("peft", "pick", "tuned", "oracle", "fit"):
            cost[who] += count * (s[f"{who}_s"] - s["frozen_s"])
    return {"row": f"{model_name} r={r} p={p:g} N={n} float32", "sites": sites,
            "lora_cost_ms": {k: v * 1e3 for k, v in cost.items()},
            "ceiling_share": 1 - cost["oracle"] / cost["peft"], "fit_share": 1 - cost["fit"] / cost["peft"],
            "pick_share": 1 - cost["pick"] / cost["peft"], "tuned_share": 1 - cost["tuned"] / cost["peft"],
            "loadavg": loadavg()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="60m")
    ap.add_argument("--ranks", default="8,128")
    ap.add_argument("--dropouts", default="0,0.05")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args(argv)
    for m in args.models.split(","):
        for r in (int(v) for v in args.ranks.split(",")):
            for p in (float(v) for v in args.dropouts.split(",")):
                res = row_ceiling(m, args.tokens, r, p, args.repeats)
                c = res["lora_cost_ms"]
                print(f"{res['row']}: LoRA's cost over the frozen linears, summed over the sites: peft "
                      f"{c['peft']:.1f} ms, pick {c['pick']:.1f} ms, autotuned {c['tuned']:.1f} ms, best program saving no more than peft {c['fit']:.1f} ms, "
                      f"best program {c['oracle']:.1f} ms; share removed: pick {res['pick_share']:.2f}, autotuned {res['tuned_share']:.2f}, best within "
                      f"peft's saved bytes {res['fit_share']:.2f}, best of the space {res['ceiling_share']:.2f}")
                print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
