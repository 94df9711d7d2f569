"""FloraAccumulator.attach under transformers.Trainer + DistributedDataParallel: two gloo processes on CPU.

Each process sets the environment torchrun would (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK) and builds a
``Trainer(use_cpu=True, ddp_backend="gloo")``; accelerate then initialises the process group and Trainer wraps
the model in DistributedDataParallel. The accumulator's callback must take DDP's reduction over (DDP reduces
nothing, the accumulator all-reduces the compressed buffers at each sync), and the result must be what one
process gets over the same global data.
"""
from __future__ import annotations

import os

import pytest
import torch
from lora_models import free_port

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from runlora_fx.train import Flora, FloraAccumulator  # noqa: E402

# Compress every 2-D matrix with min(shape) >= rank (these shapes are below the authors' default thresholds).
EVERY_MATRIX = dict(min_size=0, max_aspect_ratio=float("inf"))

pytestmark = pytest.mark.slow

WORLD, PER_DEVICE, ACCUM, UPDATES = 2, 2, 2, 3
N_SAMPLES = WORLD * PER_DEVICE * ACCUM * UPDATES  # 24 sequences: 3 updates, no short window
SEQ, RANK = 12, 4


class _Samples(torch.utils.data.Dataset):
    """N_SAMPLES distinct random token sequences (all the same length, so no padding and no masked labels)."""

    def __init__(self):
        gen = torch.Generator().manual_seed(123)
        self.data = torch.randint(0, 16, (N_SAMPLES, SEQ), generator=gen)

    def __len__(self):
        return N_SAMPLES

    def __getitem__(self, i):
        return {"input_ids": self.data[i].clone(), "labels": self.data[i].clone()}


class _InOrderTrainer(Trainer):
    """Sequential sampling, so the global data of each micro-batch is known on both sides.

    Under DDP, accelerate shards the batch sampler round-robin (rank r gets batches r, r + WORLD, ...), so with
    batches of PER_DEVICE in order, micro-batch k of rank 0 and of rank 1 together are samples
    [WORLD*PER_DEVICE*k, WORLD*PER_DEVICE*(k+1)): exactly micro-batch k of one process with WORLD*PER_DEVICE.
    """

    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


def _model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    return LlamaForCausalLM(config).to(torch.float64)


class _Watch(TrainerCallback):
    """At every optimizer step: is the model DDP-wrapped, and does the accumulator own its reduction?"""

    def __init__(self, trainer, acc):
        self.trainer, self.acc, self.seen = trainer, acc, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        wrapped = self.trainer.model_wrapped
        self.seen.append((
            isinstance(wrapped, torch.nn.parallel.DistributedDataParallel),
            self.acc._ddp is wrapped,
            getattr(wrapped, "require_backward_grad_sync", None),
        ))


def _train(out_dir, per_device, ddp_backend=None):
    """Train with Flora + FloraAccumulator attached; returns (params, accumulator, watch)."""
    model = _model()
    args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=per_device, gradient_accumulation_steps=ACCUM,
        num_train_epochs=1, max_grad_norm=0.0, report_to=[], use_cpu=True, ddp_backend=ddp_backend,
        save_strategy="no", logging_strategy="no", seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    opt = Flora(model.parameters(), lr=1e-2, rank=RANK, **EVERY_MATRIX, kappa=2, scale_parameter=False, seed=5)
    trainer = _InOrderTrainer(model=model, args=args, train_dataset=_Samples(), optimizers=(opt, None))
    acc = FloraAccumulator(model, rank=RANK, **EVERY_MATRIX, seed=5).attach(trainer)
    watch = _Watch(trainer, acc)
    trainer.add_callback(watch)
    trainer.train()
    params = [p.detach().clone() for p in model.parameters()]
    return params, acc, watch, model


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    params, acc, watch, model = _train(f"{out}.dir{rank}", PER_DEVICE, ddp_backend="gloo")
    w = model.model.layers[0].mlp.up_proj.weight
    report = {
        "params": params,
        "seen": watch.seen,
        "updates": acc.updates,
        "compressed": acc.compressed(w),
        "world": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
    }
    torch.save(report, f"{out}.{rank}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_trainer_ddp_with_accumulator_equals_one_process_over_the_same_data(tmp_path):
    out = str(tmp_path / "rank")
    # spawn, not fork: accelerate keeps a process-wide singleton state that an earlier single-process Trainer in
    # this pytest process may already have initialised, and a forked child would inherit it.
    torch.multiprocessing.start_processes(_worker, args=(free_port(), out), nprocs=WORLD, start_method="spawn")
    reports = [torch.load(f"{out}.{r}") for r in range(WORLD)]

    for rep in reports:
        # (a) Trainer really ran distributed, wrapped the model in DDP, and the accumulator owned the reduction
        # (DDP's own sync switched off) at every one of the UPDATES optimizer steps.
        assert rep["world"] == WORLD
        assert rep["seen"] == [(True, True, False)] * UPDATES
        assert rep["updates"] == UPDATES and rep["compressed"]

    # (b) the two processes end with bit-identical parameters.
    for a, b in zip(reports[0]["params"], reports[1]["params"]):
        assert torch.equal(a, b)

    # (c) they equal one process over the same global data (each micro-batch = both ranks' micro-batches).
    # (no ddp_backend here: with a backend but WORLD_SIZE unset, accelerate asks for a process group that is absent)
    single, acc, watch, _ = _train(tmp_path / "single", WORLD * PER_DEVICE)
    assert acc.updates == UPDATES and [s[0] for s in watch.seen] == [False] * UPDATES
    # Tolerance: the model is float64, and the only difference between the two runs is the order of the sums
    # (per-rank token sums, then gloo's average of the compressed buffers, vs one sum over all tokens): rounding
    # of order 1e-16 relative, carried through three Flora steps (factored preconditioner, RMS clip, kappa=2
    # transfer), which are smooth away from zero. 1e-10 leaves ample room for that and is still many orders of
    # magnitude below any real mistake (a missing or doubled reduction changes the gradient by a factor 2, a wrong
    # projection by O(1)).
    moved = False
    for a, ref, init in zip(reports[0]["params"], single, _model().parameters()):
        torch.testing.assert_close(a, ref, rtol=1e-10, atol=1e-12)
        moved |= not torch.equal(ref, init.detach())
    assert moved
