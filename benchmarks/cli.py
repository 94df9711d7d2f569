"""Command line of the benchmark suite (`python -m benchmarks --help`)."""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

SUITES = ("layer", "model", "memory", "planner", "overhead", "all")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("suite", choices=SUITES, help="which benchmark to run ('all' runs layer, planner, model, memory, overhead)")
    p.add_argument("--quick", action="store_true", help="reduced grids (the whole 'all' in a few minutes): a smoke "
                   "run of every code path, not figures to quote")
    p.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per row (default 5, quick 3)")
    p.add_argument("--max-call-s", type=float, default=None,
                   help="layer: trim rows whose peft call the cost model estimates slower than this (default 0.05 s at the nominal rates of layer.NOMINAL_RATE)")
    p.add_argument("--models", default=None, help="model/memory: comma-separated subset of 60m,130m")
    p.add_argument("--dtypes", default=None, help="comma-separated subset of float32,bfloat16")
    p.add_argument("--ranks", default=None, help="model: comma-separated subset of the LoRA ranks (8,128)")
    p.add_argument("--dropouts", default=None, help="model: comma-separated subset of the dropout p (0,0.05)")
    p.add_argument("--no-map", action="store_true", help="planner: skip the (N, r) map sweep")
    p.add_argument("--model-budget-min", type=float, default=None,
                   help="model: stop starting new rows after this many minutes (rows left are listed as not run)")
    p.add_argument("--contenders", default=None,
                   help="model: comma-separated subset of the contenders (default: all but runlora_fast; "
                   "see benchmarks/model.py)")
    p.add_argument("--compile-scope", choices=("layers", "model"), default=None,
                   help="model/memory: compile each decoder layer (default) or the whole model")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import torch

    import runlora_fx

    from . import common

    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or common.RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    common.log(f"{command}: calibrating the device profile (threads={torch.get_num_threads()})")
    profile = runlora_fx.calibrate()
    head = {"command": command, "quick": args.quick, "environment": common.environment(),
            "device_profile": asdict(profile)}
    suites = ["layer", "planner", "model", "memory", "overhead"] if args.suite == "all" else [args.suite]
    layer_result = None
    for suite in suites:
        t0 = time.perf_counter()
        if suite == "layer":
            layer_result = run_layer(args, out, head, profile)
        elif suite == "planner":
            run_planner(args, out, head, profile, layer_result)
        elif suite == "model":
            run_model(args, out, head)
        elif suite == "memory":
            run_memory(args, out, head)
        elif suite == "overhead":
            run_overhead(args, out, head)
        common.log(f"{suite} done in {time.perf_counter() - t0:.0f} s")
    return 0


def _writer(out: Path, suite: str, head: dict, quick: bool, md_fn):
    from . import common

    json_path, md_path = common.suite_paths(out, suite, quick)

    def write(result: dict, final: bool = False) -> dict:
        payload = {**head, "suite": suite, "complete": final, "loadavg_now": common.loadavg(),
                   "written": time.strftime("%Y-%m-%d %H:%M:%S"), **result}
        common.write_json(json_path, payload)
        md_path.write_text(_md_header(payload) + md_fn(payload) + "\n")
        return payload

    return write


def _md_header(payload: dict) -> str:
    import json

    env = payload["environment"]
    agg = payload.get("aggregate")
    lines = [f"# {payload['suite']} benchmark{' (quick)' if payload['quick'] else ''}", "",
             f"`{payload['command']}` — {env['started']}, torch {env['torch']}, {env['threads']} threads, "
             f"OMP_WAIT_POLICY={env['omp_wait_policy']}, {env['cpu']}, load average at start {env['loadavg_start']}, "
             f"commit {env.get('commit')}{' (dirty tree)' if env.get('worktree_dirty') else ''}"
             f"{'' if payload['complete'] else ' — PARTIAL (still running or interrupted)'}", ""]
    if agg:
        lines += ["```json", json.dumps(agg, indent=1, default=str), "```", ""]
    return "\n".join(lines)


def run_layer(args, out: Path, head: dict, profile) -> dict:
    from . import layer, plots

    cfg = layer.QUICK if args.quick else layer.LayerConfig()
    if args.repeats:
        cfg = replace(cfg, repeats=args.repeats)
    if args.max_call_s:
        cfg = replace(cfg, max_call_s=args.max_call_s)
    if args.dtypes:
        cfg = replace(cfg, dtypes=tuple(args.dtypes.split(",")))
    write = _writer(out, "layer", head, args.quick, lambda p: layer.markdown(p["rows"]) + _trimmed_md(p))
    result = layer.run(cfg, profile, on_row=write)
    payload = write(result, final=True)
    plots.layer_ratios(payload, out / f"layer{'_quick' if args.quick else ''}_ratios.png")
    return payload


def _trimmed_md(payload: dict) -> str:
    t = payload.get("trimmed") or []
    if not t:
        return ""
    lines = ["", "", f"Trimmed rows ({len(t)}): estimated peft call above the cap, see the JSON for each."]
    return "\n".join(lines)


def run_planner(args, out: Path, head: dict, profile, layer_result) -> dict:
    import json

    from . import common, planner, plots

    if layer_result is None:
        path, _ = common.suite_paths(out, "layer", args.quick)
        if path.exists():
            layer_result = json.loads(path.read_text())
            common.log(f"planner: analysing {path} ({len(layer_result.get('rows', []))} rows)")
        else:
            common.log(f"planner: no {path}; running the layer suite first")
            layer_result = run_layer(args, out, head, profile)
    analysis = planner.analyze(layer_result)
    result = {"layer_source": {"command": layer_result.get("command"), "written": layer_result.get("written")},
              "aggregate": analysis.get("aggregate", {}), "rows": analysis.get("rows", [])}
    write = _writer(out, "planner", head, args.quick, lambda p: planner.markdown(p) + _map_md(p))
    if not args.no_map:
        cfg = planner.QUICK_MAP if args.quick else planner.MapConfig()
        result["map"] = planner.map_sweep(cfg, profile)
        plots.planner_map(result["map"], out / f"planner{'_quick' if args.quick else ''}_map.png")
    return write(result, final=True)


def _map_md(payload: dict) -> str:
    m = payload.get("map")
    if not m:
        return ""
    from .common import markdown_table

    rows = [[c["n"], c["rank"], c["predicted_winner"], c["measured_winner"], c["predicted_winner_measured_over_best"]]
            for c in m["cells"]]
    return (f"\n\n## Map: fastest family over (N, r), {m['config']['i']}x{m['config']['o']} {m['config']['dtype']}\n\n"
            f"predicted = measured in {m['agree']}/{m['cells_total']} cells; predicted family within 5% of the "
            f"measured best in {m['within_5pct']}/{m['cells_total']}\n\n"
            + markdown_table(["N", "r", "predicted", "measured", "predicted's time / best"], rows))


def _model_cfg(args):
    from . import model

    cfg = model.QUICK if args.quick else model.ModelConfig()
    if args.repeats:
        cfg = replace(cfg, repeats=args.repeats)
    if args.models:
        cfg = replace(cfg, models=tuple(args.models.split(",")))
    if args.dtypes:
        cfg = replace(cfg, dtypes=tuple(args.dtypes.split(",")))
    if args.ranks:
        cfg = replace(cfg, ranks=tuple(int(r) for r in args.ranks.split(",")))
    if args.dropouts:
        cfg = replace(cfg, dropouts=tuple(float(p) for p in args.dropouts.split(",")))
    if args.compile_scope:
        cfg = replace(cfg, compile_scope=args.compile_scope)
    if args.contenders:
        unknown = set(args.contenders.split(",")) - set(model.ALL_CONTENDERS)
        if unknown:
            raise SystemExit(f"unknown contender(s) {', '.join(sorted(unknown))}; valid: {', '.join(model.ALL_CONTENDERS)}")
        cfg = replace(cfg, contenders=tuple(args.contenders.split(",")))
    return cfg


def run_model(args, out: Path, head: dict) -> dict:
    from . import model, plots

    write = _writer(out, "model", head, args.quick, lambda p: model.markdown(p["rows"]))
    budget = args.model_budget_min * 60 if args.model_budget_min else None
    result = model.run(_model_cfg(args), on_row=write, budget_s=budget)
    payload = write(result, final=True)
    plots.model_speedups(payload, out / f"model{'_quick' if args.quick else ''}_speedup.png")
    return payload


def run_overhead(args, out: Path, head: dict) -> dict:
    from . import overhead

    cfg = overhead.QUICK if args.quick else overhead.OverheadConfig()
    if args.repeats:
        cfg = replace(cfg, repeats=args.repeats)
    write = _writer(out, "overhead", head, args.quick, lambda p: overhead.markdown(p["rows"]))
    return write(overhead.run(cfg, on_row=write), final=True)


def run_memory(args, out: Path, head: dict) -> dict:
    import torch

    from . import memory

    from .model import LORA_CONTENDERS

    cfg = replace(_model_cfg(args), contenders=LORA_CONTENDERS)  # the floors and fast masks: see the model suite
    if args.quick:
        cfg = replace(cfg, contenders=("peft_eager", "runlora"))  # a process and a compile each: keep quick quick
    if not args.quick and not args.models:
        # one process (and compile) per contender and row: the 60m fp32 rows carry the figure; the saved bytes
        # of every model row are also in the model suite's results (counted in-process there)
        cfg = replace(cfg, models=("60m",), dtypes=tuple(args.dtypes.split(",")) if args.dtypes else ("float32",))
    write = _writer(out, "memory", head, args.quick, lambda p: memory.markdown(p["rows"]))
    result = memory.run(cfg, torch.get_num_threads(), on_row=write)
    result["config"] = asdict(cfg)
    return write(result, final=True)
