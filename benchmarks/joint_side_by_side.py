"""Side by side: peft + inductor against torch.compile(backend="runlora") (joint and opaque lowerings), one
training step (forward, backward, AdamW) of a 2-layer model of the llama_60m shape, 4 x 256 tokens.

    OMP_NUM_THREADS=1 python -m benchmarks.joint_side_by_side --rounds 7

Contenders run interleaved, round after round; the figure is the median over rounds of each round's
peft / contender time ratio (> 1: the contender is faster). Speed figures need an unshared machine.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.model import MODELS, ModelRow, build_peft_model, train_step

MODELS.setdefault("60m-2l", dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=2, num_attention_heads=8))
ROWS = (ModelRow("60m-2l", 64, 0.05, "float32"), ModelRow("60m-2l", 8, 0.0, "bfloat16"))


def contenders():
    from runlora_fx.backend import runlora_backend

    return {
        "peft+inductor": lambda m: torch.compile(m, backend="inductor"),
        "runlora joint": lambda m: torch.compile(m, backend=runlora_backend, options={"lowering": "joint"}),
        "runlora opaque": lambda m: torch.compile(m, backend=runlora_backend, options={"lowering": "opaque"}),
    }


def run_row(row: ModelRow, rounds: int, steps: int, names: list[str]) -> dict:
    ids = torch.randint(0, 4096, (4, 256), generator=torch.Generator().manual_seed(0))
    steps_of, compile_s = {}, {}
    for name in names:
        torch._dynamo.reset()
        model = contenders()[name](build_peft_model(row))
        step = train_step(model, ids)
        t0 = time.perf_counter()
        step()
        compile_s[name] = time.perf_counter() - t0
        step()
        steps_of[name] = (step, model)
    times = {n: [] for n in names}
    for _ in range(rounds):
        for name in names:
            step = steps_of[name][0]
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            times[name].append((time.perf_counter() - t0) / steps)
    base = names[0]
    ratios = {n: statistics.median(b / t for b, t in zip(times[base], times[n])) for n in names[1:]}
    return {"row": row.name, "median_s": {n: statistics.median(v) for n, v in times.items()},
            "speedup_vs_" + base: ratios, "first_step_s": compile_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--contenders", nargs="+", default=list(contenders()))
    args = ap.parse_args()
    torch.set_num_threads(1)
    for row in ROWS:
        print(run_row(row, args.rounds, args.steps, args.contenders), flush=True)


if __name__ == "__main__":
    main()
