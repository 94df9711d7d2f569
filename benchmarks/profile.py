"""Where the time goes, op by op, for one layer row or one model row: the "why" behind a missed figure.

    python -m benchmarks.profile layer 512 1376 2048 8 bfloat16 0.05
    python -m benchmarks.profile model 60m 8 0.05 float32
    python -m benchmarks.profile masks 1024 1376      # drawing a mask and multiplying by it, per dtype
    python -m benchmarks.profile skinny 512 1376      # LoRA's skinny backward products, plain and other form

Each contender runs `calls` times under `torch.profiler` (after a warm-up); the table lists, per contender, the
ops with the most self CPU time and their share of the contender's total, so two contenders' tables can be
read side by side (the profiler's own overhead is in every table alike).
"""
from __future__ import annotations

import json
import sys

from torch.profiler import ProfilerActivity, profile


def op_table(fn, calls: int = 5, top: int = 12) -> dict:
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    return {"total_ms_per_call": total / 1e3 / calls,
            "ops": [{"op": e.key, "calls_per_call": e.count / calls, "ms_per_call": e.self_cpu_time_total / 1e3 / calls,
                     "share": e.self_cpu_time_total / total} for e in events[:top]]}


def layer(i: int, o: int, n: int, r: int, dtype: str, p: float, calls: int = 5) -> dict:
    from .layer import Case, Row, paper_plan
    from runlora_fx.planner.device import get_profile

    case = Case(Row(i, o, n, r, dtype, p), 2.0)
    spec = case.spec()
    planned = case.runner.plan_for(spec, case.x.device)
    out = {"row": f"{i}x{o} N={n} r={r} {dtype} p={p:g}", "runlora_fx plan": planned.key,
           "paper plan": paper_plan(spec, get_profile("cpu")).key}
    for name, fn in (("base", case.fn_base()), ("peft", case.fn_peft()), ("runlora_fx", case.fn_runner()),
                     ("paper", case.fn_plan(paper_plan(spec, get_profile("cpu"))))):
        out[name] = op_table(fn, calls)
    return out


def model(name: str, rank: int, p: float, dtype: str, contenders=("peft_eager", "optimize"), calls: int = 2) -> dict:
    import copy

    from . import model as mb

    row = mb.ModelRow(name, rank, p, dtype)
    cfg = mb.ModelConfig()
    mb.configure_dynamo()
    ids = mb.batch_for(row, cfg)
    base = mb.build_peft_model(row)
    out = {"row": row.name, "tokens": list(ids.shape)}
    for c in contenders:
        m, note = mb.contender_model(c, copy.deepcopy(base), cfg.compile_scope)
        if m is None:
            out[c] = note
            continue
        out[c] = op_table(mb.train_step(m, ids), calls, top=15)
    return out


def _median_ms(fn, repeats: int) -> float:
    """Milliseconds of one call of `fn`: the median of `repeats` timed calls after one warm-up."""
    import time

    from .harness import median

    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return median(times) * 1e3


def masks(n: int, i: int, repeats: int = 20) -> dict:
    """Milliseconds (median of `repeats`) of the passes a dropout mask costs over an n x i activation: torch's
    draw and the exact kernel's (`kernels.exact_bernoulli`, the same mask; as bytes and in x's dtype, as F.dropout
    draws it), the fast generator's (as bytes and straight into the float dtype), x times a byte mask against x
    times a mask already in x's dtype (the widening copy `cost.widening_time` prices), and packing a byte mask to
    bits and back (the `bits` store; `pack_rate`, `unpack_rate`)."""
    import torch

    from runlora_fx.kernels.exact_bernoulli import bernoulli_
    from runlora_fx.kernels.masks import pack_bits, unpack_bits
    from runlora_fx.kernels.rng import fast_mask, new_seed

    ms = lambda fn: _median_ms(fn, repeats)  # noqa: E731
    seed, out = new_seed(torch.device("cpu")), {"shape": f"{n}x{i}"}
    byte = (torch.rand(n, i) > 0.05).to(torch.uint8)
    packed = pack_bits(byte)
    out["bits"] = {"pack_bits": ms(lambda: pack_bits(byte)), "unpack_bits": ms(lambda: unpack_bits(packed, (n, i)))}
    for dt in (torch.float32, torch.bfloat16):
        x = torch.randn(n, i, dtype=dt)
        byte, wide = (torch.rand(n, i) > 0.05).to(torch.uint8), (torch.rand(n, i) > 0.05).to(dt)
        out[str(dt).replace("torch.", "")] = {
            "bernoulli_ (torch)": ms(lambda: torch.empty(n, i, dtype=torch.uint8).bernoulli_(0.95)),
            "bernoulli_ (torch) in dtype": ms(lambda: torch.empty(n, i, dtype=dt).bernoulli_(0.95)),
            "exact bernoulli_ uint8": ms(lambda: bernoulli_(torch.empty(n, i, dtype=torch.uint8), 0.95)),
            "exact bernoulli_ in dtype": ms(lambda: bernoulli_(torch.empty(n, i, dtype=dt), 0.95)),
            "fast_mask uint8": ms(lambda: fast_mask(seed, (n, i), 0.05)),
            "fast_mask in dtype": ms(lambda: fast_mask(seed, (n, i), 0.05, dt)),
            "x * uint8 mask": ms(lambda: x * byte), "x * mask in dtype": ms(lambda: x * wide),
            "x * 2 (one pass)": ms(lambda: x * 2)}
    return out


def skinny(n: int, o: int, ranks=(4, 8, 16, 64), repeats: int = 20) -> dict:
    """Milliseconds (median of `repeats`) of Z = G B and dB = G^T U over N = n tokens and o features, as autograd
    runs them and in the other form `planner.orient` can choose (`device.skinny_forms`), per dtype and rank."""
    import torch

    from runlora_fx.planner.device import SKINNY_PRODUCTS, skinny_forms

    ms = lambda fn: _median_ms(fn, repeats)  # noqa: E731
    out = {"shape": f"N={n} o={o}"}
    for dt in (torch.float32, torch.bfloat16):
        g = torch.randn(n, o, dtype=dt)
        for r in ranks:
            row = {}
            for product in SKINNY_PRODUCTS:
                plain, alt = skinny_forms(product, g, torch.randn(o if product == "gb" else n, r, dtype=dt))
                row[product] = {"plain ms": round(ms(plain), 4), "other form ms": round(ms(alt), 4)}
            out[f"{str(dt).replace('torch.', '')} r={r}"] = row
    return out


def _print(result: dict) -> None:
    for k, v in result.items():
        if isinstance(v, dict) and "ops" in v:
            print(f"\n== {k}: {v['total_ms_per_call']:.1f} ms of op self time per call")
            for op in v["ops"]:
                print(f"  {op['ms_per_call']:9.2f} ms  {op['share'] * 100:5.1f}%  x{op['calls_per_call']:<5g} {op['op']}")
        else:
            print(f"{k}: {json.dumps(v) if isinstance(v, dict) else v}")


if __name__ == "__main__":
    kind, *rest = sys.argv[1:]
    if kind == "layer":
        i, o, n, r, dt, p = rest
        res = layer(int(i), int(o), int(n), int(r), dt, float(p))
    elif kind == "masks":
        res = masks(*(int(v) for v in rest[:2]))
    elif kind == "skinny":
        res = skinny(*(int(v) for v in rest[:2]))
    elif kind == "model":
        m, r, p, dt, *cs = rest
        res = model(m, int(r), float(p), dt, tuple(cs) or ("peft_eager", "optimize"))
    else:
        raise SystemExit(__doc__)
    _print(res)
    if "--json" in sys.argv:
        print(json.dumps(res))
