"""Flora vs Adafactor (full momentum) vs LoRA at the same optimizer-state memory, on byte-level language modelling.

A small LLaMA (from ``LlamaConfig``, random init, no downloads) learns the bytes of the Python standard library's
top-level ``*.py`` files. Files are split by name: every 10th (i % 10 == 0) is the test set the results report,
another 10th (i % 10 == 5) is a validation set used only to pick each method's learning rate, the rest is
trained on. All methods share the model init, the data order, the optimizer family (Adafactor, beta1=0.9,
absolute lr, warmup then constant) and train the embeddings, lm_head and norms the same way (full Adafactor);
they differ only on the 28 matrices of the decoder blocks:

* ``adafactor``: full momentum (transformers' Adafactor),
* ``adafactor-no-momentum``: ``beta1=None`` on the block matrices: no first-moment state there at all,
* ``flora``: momentum compressed to ``rank`` rows (runlora_fx.train.Flora), one run per ``--kappas`` value,
* ``lora``: the block matrices frozen, peft LoRA adapters of rank ``--lora-rank`` trained instead; by default the
  rank whose optimizer state is closest to Flora's.

Every method is run at every learning rate of ``--lrs`` (the same grid for all); the summary reports, per method,
the lr with the lowest validation loss and the test loss there, and the whole grid is printed too.

``--finetune``: every run starts from one pretrained base instead of the random init. The base is the same model
trained by full-momentum Adafactor (``--pretrain-lr``, ``--pretrain-steps``) on the top-level train split above,
saved once to ``--cache`` (default: a file in the temp directory named by its settings) and reused by later runs.
The methods then train on a different set of files, the stdlib's subpackage modules ``<stdlib>/<pkg>/*.py`` (none
of them in the pretraining data; the test suite, site-packages and the generated ``encodings`` and ``pydoc_data``
are left out), split by file the same way (``finetune_files``).

    .venv/bin/python examples/flora_compare.py --jobs 2 --threads 1   # the docs' table: 15 runs, ~20-30 min
    .venv/bin/python examples/flora_compare.py --steps 30 --lrs 1e-3 --kappas 10   # smoke test
    .venv/bin/python examples/flora_compare.py --finetune --kappas 50 1000 --jobs 2 --threads 1

Results and their reading: docs/FLORA.md. This task fails both preconditions of the momentum claim (LoRA at matched
memory beats full momentum; momentum barely helps): examples/flora_claims.py tests the claims on one that meets them.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import multiprocessing
import os
import sysconfig
import tempfile
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.optimization import Adafactor

from runlora_fx.train import Flora

BLOCK_MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# Subpackages left out of the fine-tuning data: the test suite, third-party code, and two directories of generated
# files (near-identical codec tables; one 757 kB module of documentation text).
FINETUNE_EXCLUDE = ("test", "site-packages", "encodings", "pydoc_data")


def finetune_files() -> list[str]:
    """The stdlib's subpackage modules ``<stdlib>/<pkg>/*.py`` (one level deep), minus ``FINETUNE_EXCLUDE``."""
    stdlib = sysconfig.get_paths()["stdlib"]
    return [p for p in glob.glob(os.path.join(stdlib, "*", "*.py"))
            if os.path.basename(os.path.dirname(p)) not in FINETUNE_EXCLUDE]


def load_bytes(every: int = 10, files: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train, validation and test byte streams, split by file (default: the stdlib's top-level modules).

    Sorted by path, file ``i`` is test if ``i % every == 0``, validation if ``i % every == every // 2``, else train
    (offline, deterministic per Python version).
    """
    if files is None:
        files = glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))
    train, val, test = bytearray(), bytearray(), bytearray()
    for i, path in enumerate(sorted(files)):
        with open(path, "rb") as f:
            (test if i % every == 0 else val if i % every == every // 2 else train).extend(f.read())
    return tuple(torch.frombuffer(b, dtype=torch.uint8).long() for b in (train, val, test))


def batches(data: torch.Tensor, steps: int, batch: int, seq: int, seed: int) -> list[torch.Tensor]:
    """The same random windows for every method."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - seq, (steps, batch), generator=gen)
    return [torch.stack([data[s : s + seq] for s in row.tolist()]) for row in starts]


def build_model(seed: int, seq: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=seq, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def is_block_matrix(name: str) -> bool:
    return any(f".{m}." in name for m in BLOCK_MATRICES)


def adafactor_state_numel(params: list[torch.Tensor]) -> int:
    """Adafactor with momentum: numel (momentum) + factored second moment (m + n) or numel for 1-D."""
    return sum(p.numel() + (sum(p.shape) if p.dim() == 2 else p.numel()) for p in params)


def flora_state_numel(params: list[torch.Tensor], rank: int) -> int:
    return sum(rank * max(p.shape) + sum(p.shape) for p in params)


def lora_model(model: LlamaForCausalLM, rank: int) -> torch.nn.Module:
    """LoRA on the block matrices; embeddings, lm_head and norms stay trainable like in the other methods."""
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(BLOCK_MATRICES))
    peft_model = get_peft_model(model, config)
    for name, p in peft_model.named_parameters():
        if "lora_" not in name and not is_block_matrix(name):
            p.requires_grad_(True)
    return peft_model


def matched_lora_rank(model: LlamaForCausalLM, flora_rank: int) -> int:
    """The LoRA rank whose Adafactor state on the adapters is closest to Flora's on the block matrices."""
    mats = [p for n, p in model.named_parameters() if is_block_matrix(n)]
    target = flora_state_numel(mats, flora_rank)

    def lora_numel(r: int) -> int:
        return sum(adafactor_state_numel([p.new_empty(r, p.shape[1]), p.new_empty(p.shape[0], r)]) for p in mats)

    return min(range(1, 4 * flora_rank + 1), key=lambda r: abs(lora_numel(r) - target))


def make_optimizer(method: str, model: torch.nn.Module, args, kappa: int | None, lr: float):
    """Adafactor everywhere; Flora compresses the block matrices' momentum only (the other group never compresses)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    common = dict(lr=lr, beta1=0.9, scale_parameter=False, relative_step=False)
    if method == "adafactor-no-momentum":
        blocks = [p for n, p in named if is_block_matrix(n)]
        others = [p for n, p in named if not is_block_matrix(n)]
        return Adafactor([{"params": blocks, "beta1": None}, {"params": others}], warmup_init=False, **common)
    if method != "flora":
        return Adafactor([p for _, p in named], warmup_init=False, **common)
    blocks = [p for n, p in named if is_block_matrix(n)]
    others = [p for n, p in named if not is_block_matrix(n)]
    return Flora([{"params": blocks}, {"params": others, "rank": 1 << 30}], rank=args.rank, kappa=kappa,
                 seed=args.seed, **common)


def state_bytes(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> int:
    """Measured bytes of the optimizer-state tensors of ``params`` (0-d bookkeeping tensors excluded)."""
    ids = {id(p) for p in params}
    return sum(
        t.numel() * t.element_size()
        for p, s in opt.state.items() if id(p) in ids
        for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0
    )


@torch.no_grad()
def eval_loss(model: torch.nn.Module, eval_batches: list[torch.Tensor]) -> float:
    model.eval()
    losses = [model(input_ids=b, labels=b).loss.item() for b in eval_batches]
    model.train()
    return sum(losses) / len(losses)


def initial_model(args) -> LlamaForCausalLM:
    """The random init, or with ``args.init`` set the pretrained base saved there."""
    model = build_model(args.seed, args.seq)
    if getattr(args, "init", None):
        model.load_state_dict(torch.load(args.init, weights_only=True))
    return model


def run(method: str, args, lr: float, kappa: int | None, data: dict, keep_model: bool = False) -> dict:
    torch.set_num_threads(args.threads)
    model = initial_model(args)
    if method == "lora":
        model = lora_model(model, args.lora_rank)
    opt = make_optimizer(method, model, args, kappa, lr)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    start, train_losses = time.time(), []
    for b in batches(data["train"], args.steps, args.batch, args.seq, args.seed + 1):
        loss = model(input_ids=b, labels=b).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        train_losses.append(loss.item())
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    varying = [p for n, p in trained if is_block_matrix(n) or "lora_" in n]
    common = [p for n, p in trained if not (is_block_matrix(n) or "lora_" in n)]
    last = max(1, args.steps // 10)
    return ({"model": model} if keep_model else {}) | {
        "method": method if kappa is None else f"flora(kappa={kappa})",
        "lr": lr,
        "val_loss": eval_loss(model, data["val_batches"]),
        "test_loss": eval_loss(model, data["test_batches"]),
        "train_loss_last10pct": sum(train_losses[-last:]) / last,
        "state_bytes_blocks": state_bytes(opt, varying),
        "state_bytes_common": state_bytes(opt, common),
        "trainable_params": sum(p.numel() for _, p in trained),
        "seconds": time.time() - start,
    }


_DATA: dict = {}


def _init_worker(args) -> None:
    """Load the data once per process (the same bytes and windows in every process)."""
    torch.set_num_threads(args.threads)
    train, val, test = load_bytes(files=finetune_files() if args.finetune else None)
    _DATA.update(
        train=train,
        val_batches=batches(val, args.eval_batches, args.batch, args.seq, args.seed + 3),
        test_batches=batches(test, args.eval_batches, args.batch, args.seq, args.seed + 2),
        sizes=(train.numel(), val.numel(), test.numel()),
    )


def _run_job(job) -> dict:
    args, method, lr, kappa = job
    return run(method, args, lr, kappa, _DATA)


def pretrain(args) -> str:
    """Train the base for ``--finetune`` once (full-momentum Adafactor on the top-level train split); its path."""
    path = args.cache or os.path.join(
        tempfile.gettempdir(), f"flora_compare_base_steps{args.pretrain_steps}_lr{args.pretrain_lr:g}"
        f"_seed{args.seed}_batch{args.batch}_seq{args.seq}.pt")
    if os.path.exists(path):
        print(f"pretrained base: reusing {path}", flush=True)
        return path
    train, val, test = load_bytes()
    pre_args = argparse.Namespace(**{**vars(args), "steps": args.pretrain_steps, "init": None})
    data = {"train": train, "val_batches": batches(val, args.eval_batches, args.batch, args.seq, args.seed + 3),
            "test_batches": batches(test, args.eval_batches, args.batch, args.seq, args.seed + 2)}
    r = run("adafactor", pre_args, args.pretrain_lr, None, data, keep_model=True)
    torch.save(r["model"].state_dict(), path + ".tmp")
    os.replace(path + ".tmp", path)
    print(f"pretrained base: {args.pretrain_steps} steps of full-momentum Adafactor at lr {args.pretrain_lr:g} on "
          f"the top-level files: validation {r['val_loss']:.4f} test {r['test_loss']:.4f} there, train (last 10%) "
          f"{r['train_loss_last10pct']:.4f} ({r['seconds']:.0f} s); saved to {path}", flush=True)
    return path


def _key(loss: float) -> float:
    return loss if math.isfinite(loss) else math.inf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-3, 3e-4],
                        help="learning-rate grid, the same for every method")
    parser.add_argument("--rank", type=int, default=8, help="Flora projection rank")
    parser.add_argument("--kappas", "--kappa", type=int, nargs="+", default=[10, 50],
                        help="Flora resampling intervals (one Flora method per value)")
    parser.add_argument("--lora-rank", type=int, default=None, help="default: matched to Flora's state")
    methods = ["adafactor", "adafactor-no-momentum", "flora", "lora"]
    parser.add_argument("--methods", nargs="+", default=methods, choices=methods)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-batches", type=int, default=8, help="validation and test batches each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--finetune", action="store_true",
                        help="start every run from a pretrained base and train on the subpackage modules")
    parser.add_argument("--pretrain-steps", type=int, default=400, help="--finetune: steps of the base")
    parser.add_argument("--pretrain-lr", type=float, default=1e-3, help="--finetune: lr of the base")
    parser.add_argument("--cache", default=None, help="--finetune: where the base is saved / reused")
    args = parser.parse_args()
    args.init = None
    if args.lora_rank is None:
        args.lora_rank = matched_lora_rank(build_model(args.seed, args.seq), args.rank)

    plan = [("adafactor", None)] + [("flora", kappa) for kappa in args.kappas]
    plan += [("lora", None), ("adafactor-no-momentum", None)]
    plan = [(m, k) for m, k in plan if m in args.methods]
    # Runs are independent and deterministic (each seeds its own model, data and projections), so the order only
    # decides what is done first: the grid in the order given, lr by lr.
    jobs = [(args, m, lr, k) for lr in args.lrs for m, k in plan]
    start = time.time()
    base_losses = None
    if args.finetune:
        args.init = pretrain(args)
    _init_worker(args)
    if args.finetune:
        base = initial_model(args)
        base_losses = (eval_loss(base, _DATA["val_batches"]), eval_loss(base, _DATA["test_batches"]))
        print(f"pretrained base on the fine-tuning data, before fine-tuning: validation {base_losses[0]:.4f} "
              f"test {base_losses[1]:.4f}", flush=True)
    n_train, n_val, n_test = _DATA["sizes"]
    print(f"train {n_train} bytes, validation {n_val}, test {n_test}; steps={args.steps} batch={args.batch} "
          f"seq={args.seq} lrs={args.lrs} flora rank={args.rank} kappas={args.kappas} lora rank={args.lora_rank}; "
          f"{len(jobs)} runs, {args.jobs} at a time x {args.threads} threads", flush=True)
    results = []

    def done(r: dict) -> None:
        results.append(r)
        print(f"  done {r['method']} lr={r['lr']:g}: val {r['val_loss']:.4f} test {r['test_loss']:.4f} "
              f"({r['seconds']:.0f} s)", flush=True)
        if args.json:  # rewritten after every run, so an interrupted grid keeps what finished
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "results": results}, f, indent=2)

    if args.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(args.jobs, _init_worker, (args,)) as pool:
            for r in pool.imap_unordered(_run_job, jobs):
                done(r)
    else:
        for job in jobs:
            done(_run_job(job))
    names = [m if k is None else f"flora(kappa={k})" for m, k in plan]
    results.sort(key=lambda r: (names.index(r["method"]), r["lr"]))

    header = f"{'method':<24}{'lr':>8}{'val':>9}{'test':>9}{'train':>8}{'state blocks':>14}{'state other':>13}"
    print(f"\nwhole grid\n{header}{'trainable':>11}{'s':>6}")
    for r in results:
        print(f"{r['method']:<24}{r['lr']:>8g}{r['val_loss']:>9.4f}{r['test_loss']:>9.4f}"
              f"{r['train_loss_last10pct']:>8.4f}{r['state_bytes_blocks']:>14,}{r['state_bytes_common']:>13,}"
              f"{r['trainable_params']:>11,}{r['seconds']:>6.0f}")
    best = {}
    for r in results:
        if r["method"] not in best or _key(r["val_loss"]) < _key(best[r["method"]]["val_loss"]):
            best[r["method"]] = r
    print(f"\nbest lr per method (by validation loss); test loss at that lr\n{header}")
    for name in names:
        r = best[name]
        print(f"{r['method']:<24}{r['lr']:>8g}{r['val_loss']:>9.4f}{r['test_loss']:>9.4f}"
              f"{r['train_loss_last10pct']:>8.4f}{r['state_bytes_blocks']:>14,}{r['state_bytes_common']:>13,}")
    initial = (f"pretrained base: validation {base_losses[0]:.4f} test {base_losses[1]:.4f}" if base_losses
               else f"initial loss ln 256 = {math.log(256):.4f}")
    print(f"({initial}; wall time {time.time() - start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "base_losses": base_losses,
                       "best": {k: v["lr"] for k, v in best.items()}}, f, indent=2)


if __name__ == "__main__":
    main()
