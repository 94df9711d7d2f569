"""`runlora-fx`: explain | calibrate | demo | bench."""
from __future__ import annotations

import argparse
import sys

import torch


def _explain(args) -> int:
    from .planner.device import get_profile
    from .planner.search import candidates, plan

    chosen = plan(args.n, args.in_features, args.out_features, args.rank, dropout=args.dropout,
                  dtype=getattr(torch, args.dtype), objective=args.objective, memory_budget=args.memory_budget)
    print(chosen)
    if args.candidates:
        print("\nCandidates not dominated on (time, saved bytes, peak):")
        print(candidates(chosen.spec, get_profile("cpu")))
    return 0


def _calibrate(args) -> int:
    from .planner.device import calibrate

    profile = calibrate(args.device, seconds=args.seconds)
    print(profile.to_json())
    return 0


def _demo(args) -> int:
    from .demo import DemoConfig, run

    cfg = DemoConfig(**{k: v for k, v in vars(args).items() if k in DemoConfig.__dataclass_fields__ and v is not None})
    result = run(cfg)
    return 0 if result["losses_agree"] else 1


def _bench(args, rest: list[str]) -> int:
    try:
        import benchmarks
    except ImportError:
        print("the benchmark suite lives in the source checkout's benchmarks/ folder: run from the repository root",
              file=sys.stderr)
        return 2
    return benchmarks.main(rest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="runlora-fx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    ex = sub.add_parser("explain", help="the plan for one LoRA linear shape")
    ex.add_argument("n", type=int, help="tokens in the batch (rows of x)")
    ex.add_argument("in_features", type=int)
    ex.add_argument("out_features", type=int)
    ex.add_argument("--rank", type=int, default=8)
    ex.add_argument("--dropout", type=float, default=0.0)
    ex.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    ex.add_argument("--objective", default="time", choices=["time", "memory"])
    ex.add_argument("--memory-budget", type=float, default=1.0)
    ex.add_argument("--candidates", action="store_true", help="also print every non-dominated candidate")

    ca = sub.add_parser("calibrate", help="measure this device's profile for the cost model and cache it")
    ca.add_argument("--device", default="cpu")
    ca.add_argument("--seconds", type=float, default=6.0)

    de = sub.add_parser("demo", help="train a small LLaMA with peft LoRA, plain and optimized, side by side")
    for name, kind in (("hidden", int), ("ffn", int), ("layers", int), ("vocab", int), ("batch", int),
                       ("seq", int), ("rank", int), ("dropout", float), ("steps", int)):
        de.add_argument(f"--{name}", type=kind)
    de.add_argument("--dtype", choices=["float32", "bfloat16"])
    de.add_argument("--qlora", action="store_true", default=None, help="4-bit nf4 bases (bitsandbytes), peft's bnb layer")
    de.add_argument("--no-calibrate", dest="calibrate", action="store_false", default=None,
                    help="plan with the default device profile when no calibration is cached (no 6 s measurement)")

    sub.add_parser("bench", help="the benchmark suite (python -m benchmarks --help)", add_help=False)

    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        return _bench(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return {"explain": _explain, "calibrate": _calibrate, "demo": _demo}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
