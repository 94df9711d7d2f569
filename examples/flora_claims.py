"""Flora's two claims on a task where they can show: compressed momentum, and compressed gradient accumulation.

The task (a teacher-student regression, chosen so that both preconditions of the momentum claim hold, and checked
here): a student MLP of ``--layers`` square ``d x d`` linears (tanh between, no bias) learns a teacher of the same
shape whose weights are drawn independently, from small noisy batches (``y = teacher(x) + noise``, ``x ~ N(0, I)``).
The weight change the student needs is a full-rank random matrix per layer, so LoRA on the frozen student init
must trail full-rank training; the gradients are noisy, so Adafactor's momentum (an average of the normalized
updates) should beat no momentum. The script checks both before it reports anything else:

* ``full momentum beats no momentum``: at each one's best lr, the mean over seeds of the test loss of Adafactor
  ``beta1=0.9`` is at least ``--margin`` (relative) below Adafactor ``beta1=None``'s;
* ``LoRA trails full rank``: LoRA at every rank run is at least ``--margin`` above full momentum (best lr each).

Methods (all Adafactor with absolute lr, ``scale_parameter=False``, 5% linear warmup then constant):
``adafactor`` (full momentum), ``no-momentum`` (``beta1=None``), ``flora(tau, kappa)`` (momentum compressed to
``tau`` rows, runlora_fx.train.Flora), ``lora(r)`` (the matrices frozen at init, ``B A`` trained with
``alpha = 2 r``), at ``r = tau`` (equal rank, the paper's criterion) and at the rank whose optimizer state is
closest to Flora's at ``tau`` (equal memory). Every method runs at every lr of ``--lrs`` and every seed; the lr is
chosen per method on the seed-mean validation loss; the test loss there is reported as mean and spread
(half the max - min over seeds). Losses are mean-squared errors on fixed held-out samples (noise-free targets).

Accumulation (``--accumulation``): each batch split into ``--micro-batches`` micro-batches, accumulated by
``FloraAccumulator(rank)`` for each of ``--acc-ranks`` or plainly, with the same optimizer (Adafactor, full momentum), the same
samples, lrs (``--acc-lrs``) and seeds. The
accumulator's buffer bytes are measured after every micro-batch and compared with ``sum(rank * max(m, n)) *
element_size`` over the compressed matrices (plain accumulation: ``sum(m * n) * element_size``).

    OMP_NUM_THREADS=1 .venv/bin/python examples/flora_claims.py --accumulation --json runs.json  # docs/FLORA.md
    OMP_NUM_THREADS=1 .venv/bin/python examples/flora_claims.py --steps 50 --lrs 1e-2 --seeds 0 --accumulation --acc-lrs 1e-2  # smoke
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
from torch import nn
from transformers.optimization import Adafactor

from runlora_fx.train import Flora, FloraAccumulator


class LoRALinear(nn.Module):
    """A frozen ``d x d`` weight plus ``(alpha / r) B A``, A kaiming-uniform, B zero (peft's init)."""

    def __init__(self, weight: torch.Tensor, rank: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone(), requires_grad=False)
        self.lora_A = nn.Parameter(torch.empty(rank, weight.shape[1]))
        self.lora_B = nn.Parameter(torch.zeros(weight.shape[0], rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = 2.0  # alpha = 2 r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + self.scale * (x @ self.lora_A.T) @ self.lora_B.T


def mlp(weights: list[torch.Tensor], lora_rank: int | None = None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, w in enumerate(weights):
        if lora_rank is None:
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
            with torch.no_grad():
                lin.weight.copy_(w)
            layers.append(lin)
        else:
            layers.append(LoRALinear(w, lora_rank))
        if i < len(weights) - 1:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def random_weights(d: int, layers: int, gen: torch.Generator, gain: float) -> list[torch.Tensor]:
    return [torch.randn(d, d, generator=gen) * (gain / math.sqrt(d)) for _ in range(layers)]


class Task:
    """The teacher, the student's init, and the held-out sets of one seed."""

    def __init__(self, args, seed: int) -> None:
        gen = torch.Generator().manual_seed(1000 + seed)
        self.args, self.seed = args, seed
        self.teacher = mlp(random_weights(args.d, args.layers, gen, args.gain)).requires_grad_(False)
        # Inputs N(0, Q diag(s^2) Q^T): condition number args.cond in a random basis, which Adafactor's
        # row/column preconditioner cannot undo.
        q, _ = torch.linalg.qr(torch.randn(args.d, args.d, generator=gen))
        s = torch.logspace(0, -0.5 * math.log10(args.cond), args.d)
        self.mix = (q * s) @ q.T
        self.init = random_weights(args.d, args.layers, gen, args.gain)
        self.val = self.sample(args.eval_samples, gen, noise=False)
        self.test = self.sample(args.eval_samples, gen, noise=False)

    @torch.no_grad()
    def sample(self, n: int, gen: torch.Generator, noise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, self.args.d, generator=gen) @ self.mix
        y = self.teacher(x)
        if noise:
            y = y + self.args.noise * torch.randn(y.shape, generator=gen)
        return x, y

    def batches(self, count: int, size: int):
        """The same stream of noisy training batches for every method of this seed."""
        gen = torch.Generator().manual_seed(2000 + self.seed)
        for _ in range(count):
            yield self.sample(size, gen)


def loss_fn(model: nn.Module, xy: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = xy
    return (model(x) - y).pow(2).mean()


@torch.no_grad()
def eval_loss(model: nn.Module, xy) -> float:
    return loss_fn(model, xy).item()


def lora_state_numel(d: int, rank: int) -> int:
    """Adafactor with momentum on A (r x d) and B (d x r): momentum 2 r d, factored second moment 2 (r + d)."""
    return 2 * rank * d + 2 * (rank + d)


def flora_state_numel(d: int, rank: int) -> int:
    return rank * d + 2 * d


def matched_lora_rank(d: int, tau: int) -> int:
    return min(range(1, tau + 1), key=lambda r: abs(lora_state_numel(d, r) - flora_state_numel(d, tau)))


def make_optimizer(method: str, params, lr: float, tau: int | None, kappa: int | None, seed: int):
    common = dict(lr=lr, scale_parameter=False, relative_step=False)
    if method == "flora":
        return Flora(params, rank=tau, kappa=kappa, beta1=0.9, seed=seed, **common)
    beta1 = None if method == "no-momentum" else 0.9
    return Adafactor(params, beta1=beta1, warmup_init=False, **common)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0)


def train(task: Task, method: str, lr: float, tau: int | None = None, kappa: int | None = None,
          lora_rank: int | None = None, micro_batches: int = 1, acc_rank: int | None = None) -> dict:
    args = task.args
    torch.manual_seed(task.seed)  # LoRA's A init
    model = mlp(task.init, lora_rank)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(method, params, lr, tau, kappa, task.seed)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    acc = FloraAccumulator(model, rank=acc_rank, accumulation_steps=micro_batches, seed=task.seed) if acc_rank else None
    measured, formula = 0, 0
    if acc is not None:
        formula = sum(acc_rank * max(p.shape) * p.element_size() for p in params if acc.compressed(p))
    elif micro_batches > 1:
        formula = sum(p.numel() * p.element_size() for p in params)
    # The same samples in every run of a seed: with accumulation, each batch is split into micro-batches.
    start, stream = time.time(), task.batches(args.steps, args.batch)
    diverged = False
    for _ in range(args.steps):
        x, y = next(stream)
        for xm, ym in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
            loss = loss_fn(model, (xm, ym))
            (loss / micro_batches).backward()
            if acc is not None:
                measured = max(measured, acc.buffer_bytes())
            elif micro_batches > 1:
                measured = max(measured, sum(p.grad.numel() * p.grad.element_size() for p in params))
        if not math.isfinite(loss.item()):
            diverged = True
            break
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    if acc is not None:
        acc.remove()
    nan = float("nan")
    return {
        "method": method, "lr": lr, "tau": tau, "kappa": kappa, "lora_rank": lora_rank, "seed": task.seed,
        "micro_batches": micro_batches, "acc_rank": acc_rank,
        "val": nan if diverged else eval_loss(model, task.val), "test": nan if diverged else eval_loss(model, task.test),
        "state_bytes": state_bytes(opt), "accum_bytes": measured, "accum_formula_bytes": formula,
        "seconds": time.time() - start,
    }


def _finite(v: float) -> float:
    return v if math.isfinite(v) else math.inf


def summarize(runs: list[dict], key) -> dict:
    """Per method (``key(run)``): the lr with the lowest seed-mean validation loss, and the test losses there."""
    by: dict = {}
    seen = set()
    for r in runs:  # a run repeated (same method, lr, seed: deterministic, so the same result) counts once
        if (key(r), r["lr"], r["seed"]) not in seen:
            seen.add((key(r), r["lr"], r["seed"]))
            by.setdefault(key(r), {}).setdefault(r["lr"], []).append(r)
    out = {}
    for name, lrs in by.items():
        lr = min(lrs, key=lambda lr: _finite(sum(r["val"] for r in lrs[lr]) / len(lrs[lr])))
        tests = [r["test"] for r in lrs[lr]]
        out[name] = {"lr": lr, "test_mean": sum(tests) / len(tests), "test_spread": (max(tests) - min(tests)) / 2,
                     "tests": tests, "val_mean": sum(r["val"] for r in lrs[lr]) / len(tests),
                     "state_bytes": lrs[lr][0]["state_bytes"], "grid": {
                         lr2: sum(r["test"] for r in rs) / len(rs) for lr2, rs in sorted(lrs.items())}}
    return out


def name_of(r: dict) -> str:
    if r["method"] == "flora":
        return f"flora(tau={r['tau']},kappa={r['kappa']})"
    if r["method"] == "lora":
        return f"lora(r={r['lora_rank']})"
    if r["micro_batches"] > 1:
        return f"accumulate x{r['micro_batches']} " + (f"flora(tau={r['acc_rank']})" if r["acc_rank"] else "plain")
    return r["method"]


METHODS = ("adafactor", "no-momentum", "lora", "flora", "lora-matched")


def print_report(runs: list[dict], margin: float) -> dict:
    """Preconditions, each method at its lr (seed mean and spread of test), and the accumulation runs."""
    report: dict = {}
    momentum = [r for r in runs if r["micro_batches"] == 1]
    if momentum:
        best = summarize(momentum, name_of)
        report["momentum"] = best
        if "adafactor" in best:
            full, checks = best["adafactor"]["test_mean"], {}
            if "no-momentum" in best:
                checks["full momentum beats no momentum"] = best["no-momentum"]["test_mean"] >= full * (1 + margin)
            for name in sorted(n for n in best if n.startswith("lora(")):
                checks[f"{name} trails full rank"] = best[name]["test_mean"] >= full * (1 + margin)
            print(f"preconditions (margin {margin:.0%}): "
                  + "; ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in checks.items()), flush=True)
            report["preconditions"] = checks
        print(f"\n{'method':<34}{'lr':>8}{'test mean':>11}{'spread':>9}{'state B':>11}   seed-mean test at each lr")
        for name, b in best.items():
            grid = "  ".join(f"{lr:g}:{v:.4f}" for lr, v in b["grid"].items())
            print(f"{name:<34}{b['lr']:>8g}{b['test_mean']:>11.4f}{b['test_spread']:>9.4f}{b['state_bytes']:>11,}   "
                  f"{grid}")
    acc = list({(name_of(r), r["lr"], r["seed"]): r for r in runs if r["micro_batches"] > 1}.values())
    if acc:
        print("\naccumulation (Adafactor, full momentum; the same samples, split into micro-batches)")
        for r in sorted(acc, key=lambda r: (r["lr"], r["seed"], r["acc_rank"] or 0)):
            print(f"  {name_of(r):<34} seed {r['seed']} lr {r['lr']:<7g} val {r['val']:.4f} test {r['test']:.4f}  "
                  f"peak accumulator {r['accum_bytes']:,} B (formula {r['accum_formula_bytes']:,} B)")
        report["accumulation"] = acc
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--gain", type=float, default=1.5, help="teacher and init weights: N(0, gain^2 / d)")
    parser.add_argument("--noise", type=float, default=0.1, help="label noise std")
    parser.add_argument("--cond", type=float, default=1000.0, help="condition number of the input covariance")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--eval-samples", type=int, default=4096)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2])
    parser.add_argument("--taus", type=int, nargs="+", default=None, help="default: d/4 and d/2")
    parser.add_argument("--kappas", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS,
                        help="lora: at rank tau; lora-matched: at Flora's state memory (none: only --accumulation)")
    parser.add_argument("--margin", type=float, default=0.05, help="relative margin of the preconditions")
    parser.add_argument("--accumulation", action="store_true", help="also run the accumulation comparison")
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--acc-ranks", type=int, nargs="+", default=[32], help="FloraAccumulator ranks")
    parser.add_argument("--acc-lrs", type=float, nargs="+", default=[3e-3, 1e-2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="write the runs here (rewritten after every run)")
    parser.add_argument("--report", nargs="+", default=None, metavar="JSON",
                        help="train nothing: print the report of the runs in these files together")
    args = parser.parse_args()
    if args.report:
        runs = [r for path in args.report for r in json.load(open(path))["runs"]]
        print_report(runs, args.margin)
        return
    torch.set_num_threads(args.threads)
    taus = args.taus or [args.d // 4, args.d // 2]
    tasks = {s: Task(args, s) for s in args.seeds}
    start, runs = time.time(), []

    def record(r: dict) -> None:
        runs.append(r)
        print(f"  {name_of(r):<34} seed {r['seed']} lr {r['lr']:<7g} val {r['val']:.4f} test {r['test']:.4f} "
              f"state {r['state_bytes']:>9,} B ({r['seconds']:.0f} s)", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "runs": runs}, f, indent=2)

    print(f"task: d={args.d} layers={args.layers} gain={args.gain} noise={args.noise} cond={args.cond:g} "
          f"batch={args.batch} steps={args.steps}; taus={taus} kappas={args.kappas} lrs={args.lrs} "
          f"seeds={args.seeds}", flush=True)
    # The preconditions' methods first, so that the check can be read before the rest has run.
    plan = {"adafactor": [("adafactor", {})], "no-momentum": [("no-momentum", {})],
            "lora": [("lora", {"lora_rank": t}) for t in taus],
            "flora": [("flora", {"tau": t, "kappa": k}) for t in taus for k in args.kappas],
            "lora-matched": [("lora", {"lora_rank": r}) for r in sorted({matched_lora_rank(args.d, t) for t in taus})
                             if not ("lora" in args.methods and r in taus)]}
    for method in METHODS:
        if method not in args.methods:
            continue
        for m, kw in plan[method]:
            for s in args.seeds:
                for lr in args.lrs:
                    record(train(tasks[s], m, lr, **kw))
        if method == "lora":
            print_report(runs, args.margin)
    if args.accumulation:
        for s in args.seeds:
            for lr in args.acc_lrs:
                for rank in (None, *args.acc_ranks):
                    record(train(tasks[s], "adafactor", lr, micro_batches=args.micro_batches, acc_rank=rank))
    print()
    print_report(runs, args.margin)
    print(f"(wall time {time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
