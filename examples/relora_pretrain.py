"""Pretrain a small byte-level LLaMA four ways at an equal step budget: full rank, LoRA, a LoRA control and ReLoRA.

The paper's claim (Lialin et al., arXiv 2307.05695, for 250M-1.3B parameters): ReLoRA lands between LoRA and full
rank, much closer to full rank. The text is the Python standard library's own sources (available offline
everywhere), split by file into train and held-out sets, or a local corpus (--text); tokens are bytes. Every run
of a seed sees the same batches in the same order, and every run is scored on the same held-out windows.

    python examples/relora_pretrain.py --threads 1          # the documented run (docs/RELORA.md)
    python examples/relora_pretrain.py --steps 80 --warm 20 --lrs 1e-3 --seeds 0   # a smoke test
    python examples/relora_pretrain.py --device cuda --text corpus.txt --hidden 1024 --layers 16 ...  # at scale

Runs, each at every learning rate in --lrs and every seed in --seeds (norms, embeddings and the output head are
trained full rank in every run, as in the paper):
  full       every parameter, --steps steps, cosine schedule with warmup.
  lora       LoRA of rank r on every attention and MLP linear, from scratch, the same schedule.
  warm+lora  (control) the full run's first --warm steps as a warm start (counted in the budget), then LoRA
             without restarts for the remaining steps, cosine schedule with a fresh warmup.
  relora     the same warm start, then ReLoRA: --cycles cycles, a merge and restart after each, 90% magnitude
             pruning of the adapters' optimizer state, jagged cosine schedule re-warmed over --restart-warmup steps.
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
from runlora_fx.train.relora import default_restart_warmup

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RUNS = ("full", "lora", "warm+lora", "relora")


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
    return torch.frombuffer(train, dtype=torch.uint8), torch.frombuffer(held_out, dtype=torch.uint8)


def file_bytes(path: Path, limit: int, held_out_every: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and held-out byte streams from one local file (any text corpus, for a larger run): blocks of 1 MiB
    (fewer bytes for a file under 100 MiB, so that there are 100 blocks), every `held_out_every`-th held out."""
    raw = path.read_bytes()[: limit + limit // held_out_every]
    block = max(1, min(1 << 20, len(raw) // 100))
    blocks = [raw[k: k + block] for k in range(0, len(raw), block)]
    train = b"".join(b for k, b in enumerate(blocks) if k % held_out_every)
    held_out = b"".join(b for k, b in enumerate(blocks) if not k % held_out_every)
    return (torch.frombuffer(bytearray(train), dtype=torch.uint8),
            torch.frombuffer(bytearray(held_out), dtype=torch.uint8))


def windows(data: torch.Tensor, n: int, args, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - args.seq, (n,), generator=generator)
    return torch.stack([data[s: s + args.seq] for s in starts.tolist()]).long().to(args.device)


def build_model(args, seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32,
                         num_key_value_heads=args.hidden // 32, max_position_embeddings=args.seq,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(args.device)


def add_lora(model: nn.Module, args, seed: int) -> nn.Module:
    """LoRA on every attention/MLP linear; everything else (embeddings, norms, head) stays trainable."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed + 1)
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
    return sum(torch.linalg.matrix_rank((end[k] - start[k]).float()).item() for k in start) / len(start)


@torch.no_grad()
def held_out_loss(model: nn.Module, batches: list[torch.Tensor]) -> float:
    was_training = model.training
    model.eval()
    loss = sum(model(input_ids=b, labels=b).loss.item() for b in batches) / len(batches)
    model.train(was_training)
    return loss


def train(run: str, model: nn.Module, first_step: int, last_step: int, schedule_kwargs: dict, data: dict, log: list,
          args, lr: float, seed: int, merge_every: int | None = None, snapshot_at: int | None = None):
    """AdamW over the trainable parameters from global step `first_step` to `last_step`. Returns the final held-out
    loss (on the large final set), the number of trainable parameters, the merges, the update rank and a deep
    copy of the model taken at global step `snapshot_at`."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = jagged_cosine_schedule(optimizer, **schedule_kwargs)
    relora = ReLoRA(model, optimizer, merge_every=merge_every, reset=args.reset, scheduler=schedule,
                    generator=torch.Generator().manual_seed(seed)) if merge_every else None
    trainable = sum(p.numel() for p in params)
    tag = f"{run} lr={lr:g} seed={seed}"
    print(f"[{tag}] {trainable / 1e6:.2f}M trainable parameters, steps {first_step}..{last_step}", flush=True)
    snapshot, started, weights_before = None, time.perf_counter(), effective_weights(model)
    model.train()
    for step in range(first_step, last_step):
        if step == snapshot_at:
            snapshot = copy.deepcopy(model)
        batch = data["train"][step]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if relora is not None:
            relora.step(step + 1 - first_step)  # steps the schedule; a merge closes every cycle, the last included
        else:
            schedule.step()
        if (step + 1) % args.eval_every == 0:
            held = held_out_loss(model, data["eval"])
            log.append({"run": run, "lr": lr, "seed": seed, "step": step + 1, "train_loss": loss.item(),
                        "held_out_loss": held})
            print(f"[{tag}] step {step + 1:5d}  train {loss.item():.4f}  held-out {held:.4f}  "
                  f"({time.perf_counter() - started:.0f}s)", flush=True)
    final = held_out_loss(model, data["final"])
    rank = update_rank(model, weights_before)
    print(f"[{tag}] final held-out {final:.4f}; mean rank of the update to each adapted matrix {rank:.1f}", flush=True)
    return final, trainable, relora.merges if relora else 0, rank, snapshot


def plot(log: list, args, merges: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = sorted({r["lr"] for r in log})
    fig, axes = plt.subplots(1, len(lrs), figsize=(6 * len(lrs), 4.5), sharey=True, squeeze=False)
    for ax, lr in zip(axes[0], lrs):
        for run in RUNS:
            points = [r for r in log if r["run"] == run and r["lr"] == lr]
            if not points:
                continue
            if run in ("warm+lora", "relora"):  # they start from the full run's model at the end of the warm start
                points += [r for r in log if (r["run"], r["lr"], r["step"]) == ("full", lr, args.warm)]
            steps = sorted({r["step"] for r in points})
            per_step = [[r["held_out_loss"] for r in points if r["step"] == s] for s in steps]
            line, = ax.plot(steps, [sum(v) / len(v) for v in per_step], label=run)
            ax.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step], alpha=0.2,
                            color=line.get_color())
        for m in merges:
            ax.axvline(m, color="gray", lw=0.6, ls="--")
        ax.axvline(args.warm, color="black", lw=0.8, ls=":")
        ax.set_title(f"lr {lr:g} (mean of seeds {args.seeds}; band: min to max)")
        ax.set_xlabel("step (warm start included)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out loss (nats/byte)")
    axes[0][0].legend()
    top = max(r["held_out_loss"] for r in log if r["step"] >= args.warm)
    axes[0][0].set_ylim(min(r["held_out_loss"] for r in log) - 0.05, top + 0.05)
    fig.suptitle(f"byte-level LLaMA, hidden {args.hidden}, {args.layers} layers, rank {args.rank}; "
                 f"dashed: ReLoRA merges, dotted: end of the warm start", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps per run, warm start included")
    parser.add_argument("--warm", type=int, default=200, help="full-rank warm start of warm+lora and relora")
    parser.add_argument("--cycles", type=int, default=3, help="ReLoRA cycles after the warm start")
    parser.add_argument("--restart-warmup", type=int, default=None,
                        help="lr re-warmup after each merge (default: the library's, max(20, cycle/10))")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lrs", default="1e-3,2e-3", help="peak learning rates, comma-separated")
    parser.add_argument("--seeds", default="0,1", help="seeds (init, LoRA init, batch order), comma-separated")
    parser.add_argument("--eval-batches", type=int, default=8, help="held-out batches for the curves")
    parser.add_argument("--final-eval-batches", type=int, default=64, help="held-out batches for the final loss")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--data-bytes", type=int, default=8_000_000, help="train bytes to read (held out: 1/10)")
    parser.add_argument("--text", type=Path, help="a local corpus file instead of the stdlib sources")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--runs", default=",".join(RUNS), help="which runs, comma-separated")
    parser.add_argument("--reset", default="magnitude", choices=["magnitude", "random", "zero"],
                        help="ReLoRA's optimizer-state reset (the paper: magnitude pruning of 90%%)")
    parser.add_argument("--json", type=Path, help="write every logged point and the results here")
    parser.add_argument("--plot", type=Path, help="write the held-out curves here (PNG)")
    parser.add_argument("--report", type=Path, help="train nothing: print the tables (and --plot) of a --json "
                        "file written with the same settings")
    args = parser.parse_args()
    if args.report:
        report(*load(args.report), args)
        return
    runs = args.runs.split(",")
    if unknown := set(runs) - set(RUNS):
        parser.error(f"--runs: unknown {sorted(unknown)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device")
    if not (0 < args.warm < args.steps) or (args.steps - args.warm) % args.cycles:
        parser.error("--warm must be in (0, --steps) and --steps - --warm a multiple of --cycles")
    torch.set_num_threads(args.threads)
    lrs, seeds = [float(x) for x in args.lrs.split(",")], [int(x) for x in args.seeds.split(",")]

    train_data, held_data = (file_bytes(args.text, args.data_bytes) if args.text
                             else stdlib_bytes(limit=args.data_bytes))
    g = torch.Generator().manual_seed(12345)  # the same held-out windows for every run and seed
    data = {"eval": [windows(held_data, args.batch, args, g) for _ in range(args.eval_batches)],
            "final": [windows(held_data, args.batch, args, g) for _ in range(args.final_eval_batches)]}
    print(f"data: {len(train_data) / 1e6:.1f}M train bytes, {len(held_data) / 1e6:.1f}M held-out bytes; "
          f"{args.steps} steps x {args.batch} x {args.seq} bytes; device {args.device}", flush=True)

    cycle = (args.steps - args.warm) // args.cycles
    full_schedule = dict(total_steps=args.steps, warmup_steps=max(1, args.steps // 30), cycle_length=args.steps,
                         restart_warmup_steps=0)
    restart_warmup = default_restart_warmup(cycle) if args.restart_warmup is None else args.restart_warmup
    relora_schedule = dict(total_steps=args.steps - args.warm, warmup_steps=restart_warmup, cycle_length=cycle,
                           restart_warmup_steps=restart_warmup)
    control_schedule = dict(relora_schedule, cycle_length=args.steps - args.warm, restart_warmup_steps=0)
    merges = [args.warm + cycle * k for k in range(1, args.cycles)]
    log, results, started = [], {}, time.perf_counter()

    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        data["train"] = [windows(train_data, args.batch, args, g) for _ in range(args.steps)]
        for lr in lrs:
            # The warm start is the full run's first --warm steps (without the full run: just those steps).
            warm_model = build_model(args, seed)
            if "full" in runs:
                *res, warm_start = train("full", warm_model, 0, args.steps, full_schedule, data, log, args, lr, seed,
                                         snapshot_at=args.warm)
                results[("full", lr, seed)] = res
            elif {"relora", "warm+lora"} & set(runs):
                train("warm start", warm_model, 0, args.warm, full_schedule, data, [], args, lr, seed)
                warm_start = warm_model
            if "lora" in runs:
                *res, _ = train("lora", add_lora(build_model(args, seed), args, seed), 0, args.steps, full_schedule,
                                data, log, args, lr, seed)
                results[("lora", lr, seed)] = res
            for run, schedule, every in [("warm+lora", control_schedule, None), ("relora", relora_schedule, cycle)]:
                if run in runs:
                    model = add_lora(copy.deepcopy(warm_start), args, seed)
                    *res, _ = train(run, model, args.warm, args.steps, schedule, data, log, args, lr, seed,
                                    merge_every=every)
                    results[(run, lr, seed)] = res
            if args.json:  # after every configuration, so that a cut-short run keeps what it did
                _write_json(args, log, results)

    print(f"\n{time.perf_counter() - started:.0f}s wall, {time.process_time() / 60:.1f} CPU-minutes in all")
    if args.json:
        _write_json(args, log, results)
    report(log, results, args)


def report(log: list, results: dict, args) -> None:
    """The final table (mean over seeds, +- half the range, each seed), the curves at the merges, and the plot."""
    lrs, seeds = sorted({k[1] for k in results}), sorted({k[2] for k in results})
    cycle = (args.steps - args.warm) // args.cycles
    merges = [args.warm + cycle * k for k in range(1, args.cycles)]
    restart_warmup = default_restart_warmup(cycle) if args.restart_warmup is None else args.restart_warmup
    print(f"held-out loss (nats/byte) at step {args.steps} on {args.final_eval_batches} x {args.batch} x {args.seq}"
          f" held-out bytes; warm start {args.warm}, {args.cycles} ReLoRA cycles of {cycle}, restart warmup "
          f"{restart_warmup}")
    print(f"{'lr':>6} {'run':<10} {'mean':>7} {'+-':>6}  per seed{'':<12} {'trainable':>9} {'merges':>6} "
          f"{'update rank':>11}")
    for lr in lrs:
        for run in RUNS:
            rows = [results[(run, lr, s)] for s in seeds if (run, lr, s) in results]
            if rows:
                losses = [r[0] for r in rows]
                mean, spread = sum(losses) / len(losses), (max(losses) - min(losses)) / 2
                print(f"{lr:6g} {run:<10} {mean:7.4f} {spread:6.4f}  {' / '.join(f'{x:.4f}' for x in losses):<20} "
                      f"{rows[0][1] / 1e6:8.2f}M {rows[0][2]:6d} {rows[0][3]:11.1f}")
    marks = sorted({m + d for m in merges for d in (0, args.eval_every)} | {args.steps})
    print(f"\nheld-out loss along the way ({args.eval_batches} batches, mean over seeds), at the merges "
          f"{merges} and {args.eval_every} steps after:")
    print(f"{'lr':>6} {'run':<10} " + " ".join(f"{m:>6d}" for m in marks))
    for lr in lrs:
        for run in RUNS:
            row = []
            for m in marks:
                values = [r["held_out_loss"] for r in log if (r["run"], r["lr"], r["step"]) == (run, lr, m)]
                row.append(f"{sum(values) / len(values):6.3f}" if values else f"{'':>6}")
            print(f"{lr:6g} {run:<10} " + " ".join(row))
    if args.plot:
        plot(log, args, merges, args.plot)
        print(f"plot: {args.plot}")


def load(path: Path) -> tuple[list, dict]:
    saved = json.loads(path.read_text())
    results = {(r["run"], r["lr"], r["seed"]): (r["held_out_loss"], r["trainable"], r["merges"], r["update_rank"])
               for r in saved["results"]}
    return saved["log"], results


def _write_json(args, log, results) -> None:
    rows = [{"run": run, "lr": lr, "seed": seed, "held_out_loss": r[0], "trainable": r[1], "merges": r[2],
             "update_rank": r[3]} for (run, lr, seed), r in results.items()]
    args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": rows,
                                     "log": log}, indent=1))


if __name__ == "__main__":
    main()
