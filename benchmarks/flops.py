"""How far an exact rewrite can go on a model row: the training step's matmul FLOPs with LoRA and without.

``python -m benchmarks.flops [--models 60m] [--ranks 8,128]``

A planned program computes the same gradients, so it can remove LoRA's extra passes, slow kernels and Python, but
only the FLOPs that a cheaper contraction order drops. `torch.utils.flop_counter.FlopCounterMode` counts the
FLOPs of one training step (forward and backward; the optimizer runs no matmul) of the peft model and of the
frozen model (the floor); the planner's space gives the fewest FLOPs any program of each site needs. If LoRA's FLOPs ran at the
floor's own FLOP rate and nothing else cost anything, the step would cost `1 + (peft FLOPs / frozen FLOPs - 1)`
of the floor: that "FLOP floor" and the measured peft / frozen ratio (benchmarks.model) bound the share of
LoRA's cost any exact program can remove on that row to about `(measured - FLOP floor) / (measured - 1)`.
"""
from __future__ import annotations

import argparse
import copy
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from . import model as mb


def step_flops(model, ids: torch.Tensor) -> int:
    """Matmul FLOPs of one forward and backward of `model` on `ids`."""
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    for p in model.parameters():
        p.grad = None
    return counter.get_total_flops()


def fewest_flops_saved(peft, n: int) -> int:
    """FLOPs the cheapest program of each LoRA site (`planner.candidates`, any saved set) needs fewer than
    autograd's order, summed over the model's sites, for N = n tokens."""
    from peft.tuners.lora import Linear as LoraLinear

    from runlora_fx.planner.expr import AdapterSpec, SiteSpec
    from runlora_fx.planner.search import candidates, stock_plan

    saved = 0
    for mod in peft.modules():
        if isinstance(mod, LoraLinear):
            base = mod.get_base_layer()
            a = AdapterSpec(mod.r["default"], float(mod.scaling["default"]), float(getattr(mod.lora_dropout["default"], "p", 0.0)))
            spec = SiteSpec(n, base.in_features, base.out_features, (a,))
            saved += stock_plan(spec).cost.flops - min(p.cost.flops for p in candidates(spec, prune=False))
    return saved


def row_flops(row: mb.ModelRow, cfg: mb.ModelConfig) -> dict:
    ids = mb.batch_for(row, cfg)
    peft = mb.build_peft_model(row)
    frozen = mb.frozen_model(copy.deepcopy(peft))
    f_peft, f_frozen = step_flops(peft, ids), step_flops(frozen, ids)
    f_best = f_peft - fewest_flops_saved(peft, ids.numel())
    return {"row": row.name, "tokens": list(ids.shape), "peft_gflop": f_peft / 1e9, "frozen_gflop": f_frozen / 1e9,
            "fewest_gflop": f_best / 1e9, "flop_floor": f_peft / f_frozen, "fewest_flop_floor": f_best / f_frozen}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="60m")
    ap.add_argument("--ranks", default="8,128")
    args = ap.parse_args(argv)
    cfg = mb.ModelConfig()
    for m in args.models.split(","):
        for r in (int(v) for v in args.ranks.split(",")):
            res = row_flops(mb.ModelRow(m, r, 0.0, "float32"), cfg)
            print(f"{res['row']}: peft {res['peft_gflop']:.1f} GFLOP, frozen {res['frozen_gflop']:.1f} GFLOP, "
                  f"fewest any program needs {res['fewest_gflop']:.1f} GFLOP; FLOP floor {res['flop_floor']:.3f}x "
                  f"the frozen step in autograd's order, {res['fewest_flop_floor']:.3f}x in the cheapest order")
            print(json.dumps(res))


if __name__ == "__main__":
    main()
