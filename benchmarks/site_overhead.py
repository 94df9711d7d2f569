"""Per-call cost of one small planned site through `LoraLinearRunner`: CPU time (process time, min of 9 rounds)
and the Python / C function calls one call makes (deterministic, counted with `sys.setprofile`).

``python -m benchmarks.site_overhead LABEL [N D R]`` (defaults 8 32 4: a site so small that Python dominates).
To compare two versions of the package, run it alternately with each first on PYTHONPATH, from a directory
that holds neither (``python -m`` puts the current directory first on the path).
"""
from __future__ import annotations

import sys
import time

import torch

from runlora_fx.kernels.dense import AdapterConfig, LoraLinearRunner


def _cpu_us(f, reps: int = 400) -> float:
    for _ in range(50):
        f()
    best = float("inf")
    for _ in range(9):
        t = time.process_time()
        for _ in range(reps):
            f()
        best = min(best, (time.process_time() - t) / reps * 1e6)
    return best


def _calls(f) -> tuple[int, int]:
    n = {"call": 0, "c_call": 0}

    def prof(frame, event, arg):
        if event in n:
            n[event] += 1

    sys.setprofile(prof)
    try:
        f()
    finally:
        sys.setprofile(None)
    return n["call"], n["c_call"]


def main(argv: list[str]) -> str:
    label, (n, d, r) = argv[0], map(int, argv[1:4] or (8, 32, 4))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    runner = LoraLinearRunner((AdapterConfig(2.0),))
    x, w = torch.randn(n, d, requires_grad=True), torch.randn(d, d)
    adapters = [(torch.randn(r, d, requires_grad=True), torch.randn(d, r, requires_grad=True), None)]

    def forward():
        with torch.no_grad():
            runner(x, w, None, adapters, True)

    def step():
        runner(x, w, None, adapters, True).sum().backward()

    return (f"{label} N={n} {d}x{d} r={r}: forward (no grad) {_cpu_us(forward):.1f} us, {_calls(forward)[0]} py calls; "
            f"forward+backward {_cpu_us(step):.1f} us, {_calls(step)[0]} py calls")


if __name__ == "__main__":
    print(main(sys.argv[1:]))
