"""FloraAccumulator + Flora under DistributedDataParallel: two gloo processes equal one process on the same data."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from lora_models import free_port
from torch import nn

from runlora_fx.train import Flora, FloraAccumulator

# Compress every 2-D matrix with min(shape) >= rank (these shapes are below the authors' default thresholds).
EVERY_MATRIX = dict(min_size=0, max_aspect_ratio=float("inf"))

pytestmark = pytest.mark.slow

WORLD, MICRO, UPDATES, RANK = 2, 2, 3, 3  # micro-batches per process per update; projection rank


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4)).to(torch.float64)


def _micro_batch(update, index):
    gen = torch.Generator().manual_seed(100 * update + index)
    return torch.randn(5, 6, generator=gen, dtype=torch.float64), torch.randn(5, 4, generator=gen, dtype=torch.float64)


def _train(model, params, micro_batches_of, micro_per_update, acc_model):
    """UPDATES updates of Flora on compressed accumulated grads; returns the parameters."""
    acc = FloraAccumulator(acc_model, rank=RANK, **EVERY_MATRIX, accumulation_steps=micro_per_update, seed=7)
    opt = Flora(params, lr=1e-2, rank=RANK, **EVERY_MATRIX, kappa=2, seed=7)
    for u in range(UPDATES):
        for x, y in micro_batches_of(u):
            (nn.functional.mse_loss(model(x), y) / micro_per_update).backward()
        assert acc.micro_batches == 0 and all(p.grad is not None for p in params)
        opt.step()
        opt.zero_grad()
    acc.remove()
    return [p.detach().clone() for p in params]


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        ddp = nn.parallel.DistributedDataParallel(_model())
        params = list(ddp.parameters())

        def mine(u):
            return [_micro_batch(u, rank * MICRO + j) for j in range(MICRO)]

        result = _train(ddp, params, mine, MICRO, ddp)
        assert ddp.require_backward_grad_sync  # handed back by remove()
        torch.save(result, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_equals_one_process_over_the_union(tmp_path):
    out = str(tmp_path / "params")
    # spawn, not fork: a child forked while the parent holds OpenMP worker threads can hang in its first parallel op
    torch.multiprocessing.start_processes(_worker, args=(free_port(), out), nprocs=WORLD, start_method="spawn")
    per_rank = [torch.load(f"{out}.{r}") for r in range(WORLD)]

    model = _model()
    params = list(model.parameters())
    single = _train(model, params, lambda u: [_micro_batch(u, i) for i in range(WORLD * MICRO)], WORLD * MICRO, model)

    for a, b, ref in zip(*per_rank, single):
        assert torch.equal(a, b)  # the processes agree bit for bit
        torch.testing.assert_close(a, ref, rtol=1e-10, atol=1e-12)
    assert any(not torch.equal(p, q) for p, q in zip(single, _model().parameters()))  # training moved them
