"""Would sharing one x between sibling LoRA sites (q/k/v, gate/up) pay in eager mode? The part of the step that
siblings change, timed both ways on the llama_60m shapes: each site's own x A_i^T, Z_i^T x and Z_i A_i against
one x [A_1; ..; A_k]^T, one [Z_1 .. Z_k]^T x and one [Z_1 .. Z_k] [A_1; ..; A_k] (with the concatenations they
need each step). Exact when p = 0 (or one mask shared), so only the time is compared.

    python -m benchmarks.siblings [--tokens 512] [--rank 8] [--rounds 9]

Prints microseconds per layer (min over alternated rounds) and what the saving is worth against one whole
training step of the 60m model (8 layers) measured by `benchmarks model`.
"""
from __future__ import annotations

import argparse
import time

import torch


def separate(x, As, Zs):
    us = [x @ a.t() for a in As]
    das = [z.t() @ x for z in Zs]
    dx = torch.zeros_like(x)
    for z, a in zip(Zs, As):
        dx.addmm_(z, a)
    return us, das, dx


def shared(x, As, Zs):
    a_all = torch.cat(As)  # the k A's as one (k r) x d weight, rebuilt every step (they train)
    u = x @ a_all.t()
    us = u.split([a.shape[0] for a in As], dim=1)
    z_all = torch.cat(Zs, dim=1)  # autograd hands the k sites' gradients separately
    da = z_all.t() @ x
    dx = torch.zeros_like(x).addmm_(z_all, a_all)
    return us, da.split([a.shape[0] for a in As]), dx


def _time(fn, *args, reps: int = 20) -> float:
    fn(*args)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(*args)
    return (time.perf_counter() - t0) / reps


def measure(tokens: int = 512, rank: int = 8, hidden: int = 512, rounds: int = 9) -> dict:
    out = {}
    for name, k in (("q/k/v", 3), ("gate/up", 2)):
        x = torch.randn(tokens, hidden)
        As = [torch.randn(rank, hidden) for _ in range(k)]
        Zs = [torch.randn(tokens, rank) for _ in range(k)]
        got, want = shared(x, As, Zs), separate(x, As, Zs)
        torch.testing.assert_close(got[2], want[2], rtol=1e-4, atol=1e-4)
        sep, sh = [], []
        for _ in range(rounds):  # alternated, so both see the same machine load
            sep.append(_time(separate, x, As, Zs))
            sh.append(_time(shared, x, As, Zs))
        out[name] = {"separate_us": min(sep) * 1e6, "shared_us": min(sh) * 1e6}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    res = measure(args.tokens, args.rank, rounds=args.rounds)
    per_layer = 0.0
    for name, r in res.items():
        saved = r["separate_us"] - r["shared_us"]
        per_layer += saved
        print(f"{name}: separate {r['separate_us']:.0f} us, shared {r['shared_us']:.0f} us, saved {saved:.0f} us")
    print(f"saved per 8-layer step: {8 * per_layer / 1e3:.2f} ms (tokens={args.tokens}, r={args.rank})")


if __name__ == "__main__":
    main()
