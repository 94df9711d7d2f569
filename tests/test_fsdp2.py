"""An optimized model under data parallelism: two gloo processes on CPU give the single-process gradients.
FSDP2's `fully_shard` replaces a module's parameters (sharded DTensors between calls, unsharded tensors during the
forward); the planned forward reads the module's live parameters at each call, so optimize-then-fully_shard is
planned and exact. fully_shard-then-optimize captures the unsharded parameters, which are not the module's
parameters between calls: those sites are left alone (with the reason) and the model still trains exactly.
DDP keeps the parameters and is checked the same way."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from lora_models import free_port, tiny_llama, tokens

import runlora_fx
from runlora_fx.api import optimized_sites

pytestmark = pytest.mark.slow
WORLD = 2
MODES = ["ddp", "optimize_then_fully_shard", "fully_shard_then_optimize"]


def _batch(rank):
    return tokens(2, 8, seed=10 + rank)


def _shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def _worker(rank, port, out):
    """One process: each mode on a fresh model (one process group for all three keeps the test short)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for mode in MODES:
            torch.save(_step(rank, mode), f"{out}.{mode}.{rank}")
    finally:
        dist.destroy_process_group()


def _step(rank, mode):
    model = tiny_llama(0.0, torch.float64, layers=2)
    ids = _batch(rank)
    if mode == "fully_shard_then_optimize":
        _shard(model)
    runlora_fx.optimize(model, example_kwargs={"input_ids": ids})
    if mode == "optimize_then_fully_shard":
        _shard(model)
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if mode == "ddp" else model
    planned = len(optimized_sites(model))
    reasons = {s.reason for s in model._runlora_fx.skipped}
    wrapped(input_ids=ids, labels=ids).loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            g = p.grad
            grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return planned, reasons, grads


def test_two_processes_equal_one_process(tmp_path):
    out = str(tmp_path / "grads")
    # spawn, not fork: a child forked while the parent holds OpenMP worker threads can hang in its first parallel op
    torch.multiprocessing.start_processes(_worker, args=(free_port(), out), nprocs=WORLD, start_method="spawn")
    ref = tiny_llama(0.0, torch.float64, layers=2)
    loss = sum(ref(input_ids=_batch(r), labels=_batch(r)).loss for r in range(WORLD)) / WORLD
    loss.backward()
    want = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    for mode in MODES:
        _assert_grads_match(mode, [torch.load(f"{out}.{mode}.{r}") for r in range(WORLD)], want)


def _assert_grads_match(mode, results, want):
    for planned, reasons, grads in results:
        if mode == "fully_shard_then_optimize":  # captured on the unsharded parameters: left alone, and says so
            assert planned == 0 and reasons == {"a tensor of the site is not a parameter or buffer of its module"}
        else:
            assert planned == 14 and not reasons
        assert grads.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(grads[name], want[name], rtol=1e-9, atol=1e-11, msg=f"{mode}: {name}")
