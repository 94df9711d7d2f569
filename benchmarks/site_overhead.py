"""Per-call cost of one small LoRA site: peft's layer, the same layer after `runlora_fx.optimize` (state check,
plan lookup, planned node), its `LoraLinearRunner` called directly, and the tensor ops peft's layer runs, called
directly ("ops": what is left when every layer's Python is taken away). CPU time (process time, min over
interleaved rounds: robust under load) and the Python function calls one call makes (deterministic, counted with
`sys.setprofile`).

``python -m benchmarks.site_overhead LABEL [N D R P]`` (defaults 8 32 4 0: a site so small that Python dominates).
To compare two versions of the package, run it alternately with each first on PYTHONPATH, from a directory
that holds neither (``python -m`` puts the current directory first on the path).
"""
from __future__ import annotations

import copy
import sys
import time

import torch
import torch.nn.functional as F

ROUNDS, REPS = 9, 300


def _cpu_us(fns: dict, reps: int = REPS, rounds: int = ROUNDS) -> dict:
    """Microseconds of CPU time per call of each fn: the min over `rounds` interleaved rounds of `reps` calls."""
    for f in fns.values():
        for _ in range(30):
            f()
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.process_time()
            for _ in range(reps):
                f()
            best[k] = min(best[k], (time.process_time() - t) / reps * 1e6)
    return best


def _calls(f) -> int:
    n = 0

    def prof(frame, event, arg):
        nonlocal n
        n += event == "call"

    sys.setprofile(prof)
    try:
        f()
    finally:
        sys.setprofile(None)
    return n


def contenders(n: int = 8, d: int = 32, r: int = 4, p: float = 0.0) -> dict:
    """{"peft", "optimize", "runner", "ops"}: zero-argument calls of one forward of the same site, on the same
    input."""
    from peft import LoraConfig, get_peft_model

    import runlora_fx

    torch.manual_seed(0)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(d, d, bias=False)

        def forward(self, x):
            return self.proj(x)

    model = get_peft_model(Tiny(), LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["proj"])).train()
    x = torch.randn(n, d, requires_grad=True)
    optimized = runlora_fx.optimize(copy.deepcopy(model), example_inputs=(x,))
    (site,) = runlora_fx.api.optimized_sites(optimized)
    peft_layer, planned_layer = model.base_model.model.proj, site.module
    weight, adapters = site.params.weight, [(a.lora_a, a.lora_b, a.lora_bias) for a in site.params.adapters]
    (a_, b_, _), scale = adapters[0], float(peft_layer.scaling["default"])
    drop = (lambda t: F.dropout(t, p, True)) if p > 0 else (lambda t: t)
    return {"peft": lambda: peft_layer(x), "optimize": lambda: planned_layer(x),
            "runner": lambda: site.runner(x, weight, None, adapters, True),
            "ops": lambda: F.linear(x, weight) + F.linear(F.linear(drop(x), a_), b_) * scale}


def main(argv: list[str]) -> str:
    label, *shape = argv or ["site"]
    n, d, r = map(int, shape[:3] or (8, 32, 4))
    p = float(shape[3]) if len(shape) > 3 else 0.0
    torch.set_num_threads(1)
    fns = contenders(n, d, r, p)

    def no_grad(f):
        def run():
            with torch.no_grad():
                f()
        return run

    def step(f):
        return lambda: f().sum().backward()

    lines = [f"{label} N={n} {d}x{d} r={r} p={p:g}:"]
    for mode, wrap in (("forward (no grad)", no_grad), ("forward+backward", step)):
        wrapped = {k: wrap(f) for k, f in fns.items()}
        us = _cpu_us(wrapped)
        lines.append(f"  {mode}: " + ", ".join(
            f"{k} {us[k]:.1f} us ({_calls(f)} py calls, {us[k] / us['peft']:.2f}x peft)" for k, f in wrapped.items()))
        lines.append(f"    peft's layer Python (peft - ops) {us['peft'] - us['ops']:.1f} us; optimize's state check "
                     f"and plan lookup (optimize - runner) {us['optimize'] - us['runner']:.1f} us; the planned "
                     f"node's own cost over the ops (runner - ops) {us['runner'] - us['ops']:.1f} us")
    return "\n".join(lines)


if __name__ == "__main__":
    print(main(sys.argv[1:]))
