"""Pretrain a small byte-level LLaMA three ways at equal steps and rank: full-rank, LoRA, ReLoRA.

The paper's claim (Lialin et al., arXiv 2307.05695) to check: ReLoRA lands between LoRA and full-rank, much closer
to full-rank. The text is the Python standard library's own sources (available offline everywhere), split by file
into train and held-out sets; tokens are bytes. Every run sees the same batches in the same order.

    python examples/relora_pretrain.py                 # the documented run (~17 CPU-minutes; docs/RELORA.md)
    python examples/relora_pretrain.py --steps 40      # a smoke test
    python examples/relora_pretrain.py --runs relora --reset zero   # one ablation

Runs (same steps, same optimizer and peak learning rate, no tuning; norms, embeddings and the output head are
trained full-rank in every run, as in the paper):
  full    every parameter, cosine schedule with warmup.
  lora    LoRA of rank r on every attention and MLP linear, from scratch, cosine schedule.
  relora  the full-rank run's first quarter as warm start, then ReLoRA with rank r: three cycles, merge and
          restart after each, 90% magnitude pruning of the adapters' Adam state, jagged cosine schedule.
  warm+lora  (control) the same warm start, then LoRA without restarts: what the restarts themselves add.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sysconfig
import time
from pathlib import Path

import torch
from torch import nn

from runlora_fx.train import ReLoRA, jagged_cosine_schedule

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def stdlib_bytes(limit: int, held_out_every: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and held-out byte streams from the stdlib's .py files (sorted, so the split is reproducible);
    every `held_out_every`-th file goes to the held-out set, so no file is in both."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    train, held_out = bytearray(), bytearray()
    for k, path in enumerate(files):
        target = held_out if k % held_out_every == 0 else train
        if len(target) < (limit // held_out_every if target is held_out else limit):
            target += path.read_bytes() + b"\n"
    return torch.frombuffer(train, dtype=torch.uint8).long(), torch.frombuffer(held_out, dtype=torch.uint8).long()


def windows(data: torch.Tensor, starts: torch.Tensor, seq: int) -> torch.Tensor:
    return torch.stack([data[s: s + seq] for s in starts.tolist()])


def build_model(args) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32,
                         num_key_value_heads=args.hidden // 32, max_position_embeddings=args.seq,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def add_lora(model: nn.Module, args) -> nn.Module:
    """LoRA on every attention/MLP linear; everything else (embeddings, norms, head) stays trainable."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(args.seed + 1)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0,
                                             target_modules=TARGETS))
    for name, p in model.named_parameters():
        if "lora_" not in name and "base_layer" not in name:
            p.requires_grad_(True)
    return model


@torch.no_grad()
def effective_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The matrix each attention/MLP linear applies (base + s * B @ A for a LoRA layer), keyed "0.self_attn.q_proj"."""
    out = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in TARGETS or "layers." not in name:
            continue
        if hasattr(module, "base_layer"):
            weight = module.base_layer.weight.detach().clone()
            for a in module.active_adapters:
                weight += module.scaling[a] * module.lora_B[a].weight @ module.lora_A[a].weight
        else:
            weight = module.weight.detach().clone()
        out[name.split("layers.", 1)[1]] = weight
    return out


def update_rank(model: nn.Module, start: dict[str, torch.Tensor]) -> float:
    """Mean numerical rank of what training added to each adapted matrix (LoRA alone: at most r)."""
    end = effective_weights(model)
    return sum(torch.linalg.matrix_rank(end[k] - start[k]).item() for k in start) / len(start)


@torch.no_grad()
def held_out_loss(model: nn.Module, batches: list[torch.Tensor]) -> float:
    was_training = model.training
    model.eval()
    loss = sum(model(input_ids=b, labels=b).loss.item() for b in batches) / len(batches)
    model.train(was_training)
    return loss


def train(name, model, steps, batches, schedule_kwargs, eval_batches, log, args, relora_every=None,
          first_step=0, snapshot_at=None):
    """AdamW over the trainable parameters; returns the model (and a deep copy taken at `snapshot_at`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = jagged_cosine_schedule(optimizer, **schedule_kwargs)
    relora = ReLoRA(model, optimizer, merge_every=relora_every, reset=args.reset) if relora_every else None
    trainable = sum(p.numel() for p in params)
    print(f"[{name}] {trainable / 1e6:.2f}M trainable parameters, {steps} steps from step {first_step}", flush=True)
    snapshot, start, weights_before = None, time.perf_counter(), effective_weights(model)
    model.train()
    for k in range(steps):
        step = first_step + k
        if snapshot_at is not None and step == snapshot_at:
            snapshot = copy.deepcopy(model)
        batch = batches[step]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if relora is not None:
            relora.step(k + 1)  # a merge closes every cycle, the last one included
        if (step + 1) % args.eval_every == 0 or k == steps - 1:
            held = held_out_loss(model, eval_batches)
            log.append({"run": name, "step": step + 1, "train_loss": loss.item(), "held_out_loss": held})
            print(f"[{name}] step {step + 1:5d}  train {loss.item():.4f}  held-out {held:.4f}  "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)
    rank = update_rank(model, weights_before)
    print(f"[{name}] mean rank of the update to each adapted matrix: {rank:.1f}", flush=True)
    return model, snapshot, trainable, relora.merges if relora else 0, rank


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps per run")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", default="full,lora,relora,warm+lora",
                        help="which runs, comma-separated (warm+lora is the no-restart control)")
    parser.add_argument("--reset", default="magnitude", choices=["magnitude", "random", "zero"],
                        help="ReLoRA's optimizer-state reset (the paper: magnitude pruning of 90%%)")
    parser.add_argument("--json", type=Path, help="write every logged point here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train_data, held_data = stdlib_bytes(limit=8_000_000)
    g = torch.Generator().manual_seed(args.seed)
    batches = [windows(train_data, torch.randint(0, len(train_data) - args.seq, (args.batch,), generator=g),
                       args.seq) for _ in range(args.steps)]
    eval_batches = [windows(held_data, torch.randint(0, len(held_data) - args.seq, (args.batch,), generator=g),
                            args.seq) for _ in range(args.eval_batches)]
    print(f"data: {len(train_data) / 1e6:.1f}M train bytes, {len(held_data) / 1e6:.1f}M held-out bytes; "
          f"{args.steps} steps x {args.batch} x {args.seq} bytes", flush=True)

    steps, warm = args.steps, args.steps // 4
    cycle = math.ceil((steps - warm) / 3)
    restart_warmup = max(1, cycle // 50)
    full_schedule = dict(total_steps=steps, warmup_steps=max(1, steps // 30), cycle_length=steps,
                         restart_warmup_steps=0)
    relora_schedule = dict(total_steps=steps - warm, warmup_steps=restart_warmup, cycle_length=cycle,
                           restart_warmup_steps=restart_warmup)
    log, results, started = [], {}, time.perf_counter()

    runs = args.runs.split(",")
    if unknown := set(runs) - {"full", "lora", "relora", "warm+lora"}:
        parser.error(f"--runs: unknown {sorted(unknown)}")
    if "full" in runs:
        _, warm_start, trainable, _, rank = train("full", build_model(args), steps, batches, full_schedule,
                                                  eval_batches, log, args, snapshot_at=warm)
        results["full"] = (log[-1]["held_out_loss"], trainable, 0, rank)
    elif "relora" in runs or "warm+lora" in runs:  # only the warm start (the same first steps as the full run)
        warm_start, *_ = train("warm start", build_model(args), warm, batches, full_schedule, eval_batches, [], args)
    if "lora" in runs:
        _, _, trainable, _, rank = train("lora", add_lora(build_model(args), args), steps, batches, full_schedule,
                                         eval_batches, log, args)
        results["lora"] = (log[-1]["held_out_loss"], trainable, 0, rank)
    for name, every in [("relora", cycle), ("warm+lora", None)]:
        if name not in runs:
            continue
        model = add_lora(copy.deepcopy(warm_start), args)
        _, _, trainable, merges, rank = train(name, model, steps - warm, batches, relora_schedule, eval_batches,
                                              log, args, relora_every=every, first_step=warm)
        results[name] = (log[-1]["held_out_loss"], trainable, merges, rank)

    print(f"\nheld-out loss (nats/byte) after {steps} steps, rank {args.rank}, "
          f"warm start {warm} steps, ReLoRA cycle {cycle} steps; {time.perf_counter() - started:.0f}s in all")
    print(f"{'run':<10} {'held-out':>9} {'bits/byte':>9} {'trainable':>10} {'merges':>6} {'update rank':>11}")
    for name, (loss, trainable, merges, rank) in results.items():
        print(f"{name:<10} {loss:9.4f} {loss / math.log(2):9.4f} {trainable / 1e6:9.2f}M {merges:6d} {rank:11.1f}")
    if {"full", "lora", "relora"} <= results.keys():
        full, lora, relora = (results[k][0] for k in ("full", "lora", "relora"))
        print(f"ReLoRA closes {(lora - relora) / (lora - full):.0%} of the LoRA-to-full-rank gap")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "log": log,
                                         "results": results}, indent=1))


if __name__ == "__main__":
    main()
