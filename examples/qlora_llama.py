"""QLoRA with runlora_fx: a tiny LLaMA quantized to bitsandbytes 4-bit (no hub), planned and trained a few steps.

    .venv/bin/python examples/qlora_llama.py [--quant-type fp4] [--no-double-quant] [--compute-dtype float32]

Prints what `explain` chose for every 4-bit site (the program key ends in `+wd` when a plan keeps the
dequantized weight for backward), then checks that one optimized training step gives peft's loss and gradients.
"""
from __future__ import annotations

import argparse
import copy

import torch

import runlora_fx
from runlora_fx.demo_models import build_qlora_llama


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4")
    parser.add_argument("--no-double-quant", action="store_true", help="plain fp32 absmax (compress_statistics=False)")
    parser.add_argument("--compute-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--peft-layer", choices=("bnb", "generic"), default="bnb")
    parser.add_argument("--memory-budget", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)

    model = build_qlora_llama(dict(num_hidden_layers=2), quant_type=args.quant_type,
                              compress_statistics=not args.no_double_quant,
                              compute_dtype=getattr(torch, args.compute_dtype), peft_layer=args.peft_layer,
                              init_lora_weights=False)
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(0))
    batch = dict(input_ids=ids, labels=ids)
    print(runlora_fx.explain(model, (), example_kwargs=batch, memory_budget=args.memory_budget))

    runlora_fx.optimize(model, (), example_kwargs=batch, memory_budget=args.memory_budget)
    for name, m in (("runlora_fx", model), ("peft", reference)):
        torch.manual_seed(1)
        m.zero_grad(set_to_none=True)
        loss = m(**batch).loss
        loss.backward()
        print(f"{name:>10}: loss {loss.item():.6f}")
    worst = max((p.grad - q.grad).abs().max().item() for p, q in
                zip(model.parameters(), reference.parameters()) if p.requires_grad)
    print(f"largest LoRA gradient difference against peft: {worst:.2e}")

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(args.steps):
        opt.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        print(f"step {step}: loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
