"""Flora (Hao, Cao, Mou, arXiv 2402.03293): random-projection compression of momentum and of accumulated gradients.

LoRA trains ``W0 + B A`` and, with A fixed and random, its update to W is the gradient projected onto A's row space.
Flora keeps that projection but drops the adapter: the optimizer stores the momentum of each large matrix as
``C = P M`` (``rank x max(m, n)``), with ``P`` a Gaussian ``rank x min(m, n)`` matrix scaled ``1/sqrt(rank)`` so
that ``E[P^T P] = I``. P is never stored: it is regenerated on demand from a dedicated ``torch.Generator``
seeded with :func:`projection_seed` of (seed, stream, parameter index, resample count), and resampling it (every
``kappa`` steps for the momentum, every update for accumulated gradients) makes the sum of updates high-rank
although each stored state is rank ``rank``. Which matrices are compressed follows the authors (:func:`compressible`:
smaller side >= 128, sides within 4x), so embeddings and output heads keep full state.

* :class:`Flora` is Adafactor (transformers' semantics: factored second moment with ``beta2_t = 1 - t^decay_rate``,
  RMS update clipping, lr scaled by the parameter RMS, optional relative step) with compressed momentum.
* :class:`FloraAccumulator` keeps gradient accumulation over micro-batches compressed and decompresses into
  ``.grad`` at the end of the backward that syncs; it works in a plain loop, under ``transformers.Trainer``
  (:meth:`FloraAccumulator.attach`) and under ``DistributedDataParallel`` (it reduces the compressed buffers).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..kernels import flora_linear
from ..kernels.flora_linear import PlannedLinear, compress, decompress, is_plain_linear, plan_linear

__all__ = ["Flora", "FloraAccumulator", "compressible", "projection_seed", "random_projection", "compress",
           "decompress"]

_MASK64 = (1 << 64) - 1
_MOMENTUM_STREAM = 0  # seeds for the optimizer's momentum projections
_GRADIENT_STREAM = 1  # seeds for the accumulator's projections, independent of the momentum ones


# ---------------------------------------------------------------------------------------------------------------
# Projections: pure functions of (seed, stream, index, count).
# ---------------------------------------------------------------------------------------------------------------


def _splitmix64(x: int) -> int:
    """One round of SplitMix64: a bijective, well-mixing map on 64-bit integers."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def projection_seed(seed: int, stream: int, index: int, count: int) -> int:
    """Generator seed for parameter ``index``'s ``count``-th projection, so that nearby inputs give unrelated seeds.

    >>> projection_seed(0, 0, 1, 2) == projection_seed(0, 0, 1, 2)
    True
    >>> len({projection_seed(0, 0, i, c) for i in range(30) for c in range(30)})
    900
    """
    h = 0
    for v in (seed, stream, index, count):
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h >> 1  # 63 bits: a valid manual_seed on every backend


def random_projection(rank: int, dim: int, seed: int, device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """The ``rank x dim`` Gaussian projection scaled ``1/sqrt(rank)``, regenerated bit-identically from ``seed``.

    Drawn in float32 on ``device`` (its own Generator, so the global RNG is untouched) and then cast, so every
    working dtype sees the same matrix up to rounding.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    p = torch.randn(rank, dim, generator=gen, device=device, dtype=torch.float32)
    return p.div_(math.sqrt(rank)).to(dtype)


# The authors' rule: no embedding-like matrices (sides differing by more than 4x; PyTorch and JAX code) and a
# smaller side of at least 128 (JAX code, ``min_dim_size_to_factor``), so embeddings and heads keep full state.
MIN_SIZE = 128
MAX_ASPECT_RATIO = 4.0


def compressible(p: Tensor, rank: int, min_size: int = MIN_SIZE, max_aspect_ratio: float = MAX_ASPECT_RATIO) -> bool:
    """Whether ``p`` is compressed: 2-D, smaller side at least ``rank`` and ``min_size``, and longer side at most
    ``max_aspect_ratio`` times the smaller (``min_size=0, max_aspect_ratio=math.inf``: every 2-D ``p`` with
    ``min(shape) >= rank``)."""
    if p.dim() != 2:
        return False
    small, large = min(p.shape), max(p.shape)
    return small >= max(rank, min_size) and large <= max_aspect_ratio * small


# ---------------------------------------------------------------------------------------------------------------
# Argument checks: ValueError naming the argument.
# ---------------------------------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_real(name: str, value: Any, ok: Callable[[float], bool], what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not ok(float(value)):
        raise ValueError(f"{name} must be {what}, got {value!r}")


def _check_thresholds(min_size, max_aspect_ratio):
    _check_int("min_size", min_size, 0)
    _check_real("max_aspect_ratio", max_aspect_ratio, lambda v: v >= 1.0, ">= 1 (math.inf: no limit)")


def _check_options(lr, rank, kappa, beta1, decay_rate, clip_threshold, eps, weight_decay, relative_step, seed):
    if relative_step:
        if lr is not None:
            raise ValueError(f"lr must be None when relative_step=True (the step size is 1/sqrt(t)), got {lr!r}")
    else:
        _check_real("lr", lr, lambda v: v > 0, "a positive number (or use relative_step=True)")
    _check_int("rank", rank, 1)
    _check_int("kappa", kappa, 1)
    if beta1 is not None:
        _check_real("beta1", beta1, lambda v: 0.0 <= v < 1.0, "None or in [0, 1)")
    _check_real("decay_rate", decay_rate, lambda v: v <= 0.0, "<= 0")
    _check_real("clip_threshold", clip_threshold, lambda v: v > 0, "> 0")
    if not (isinstance(eps, (tuple, list)) and len(eps) == 2):
        raise ValueError(f"eps must be a pair (eps1, eps2), got {eps!r}")
    for i, e in enumerate(eps):
        _check_real(f"eps[{i}]", e, lambda v: v >= 0, ">= 0")
    _check_real("weight_decay", weight_decay, lambda v: v >= 0, ">= 0")
    _check_int("seed", seed, 0)


# ---------------------------------------------------------------------------------------------------------------
# The optimizer.
# ---------------------------------------------------------------------------------------------------------------


def _rms(t: Tensor) -> Tensor:
    return t.norm(2) / (t.numel() ** 0.5)


def _clip_rms_(t: Tensor, threshold: float | Tensor) -> Tensor:
    """Scale ``t`` in place so that its RMS is at most ``threshold`` (Adafactor's update clipping)."""
    return t.div_((_rms(t) / threshold).clamp_(min=1.0))


class Flora(Optimizer):
    """Adafactor whose momentum is stored as a random projection for every :func:`compressible` parameter.

    With compression this follows the authors' code (BorealisAI/flora-opt, ``flora_step_``): with ``u`` the
    preconditioned gradient ``grad / sqrt(v_hat)`` (*not* clipped, not lr-scaled), the step is
    ``lr * clip((1 - beta1) u + beta1 P^T C, clip_threshold)``: the fresh update enters at full rank, only the
    history goes through the projection, and the one RMS clip comes after the momentum (``P^T P`` is about
    ``min(m, n) / rank`` times a projector, so the decompressed history can be several times too large). Then,
    every ``kappa`` steps, the momentum moves to a fresh projection, ``C <- P_new P_old^T C``, and finally
    ``C <- beta1 C + (1 - beta1) P u`` with the (new) projection. Without compression this is exactly
    transformers' Adafactor with ``beta1`` (momentum of the clipped, lr-scaled update).

    Optimizer state of a compressed ``m x n`` matrix: ``rank * max(m, n) + m + n`` numbers (see :meth:`state_bytes`).
    Which matrices are compressed follows the authors (``min_size``, ``max_aspect_ratio``, per param group too).
    ``beta1=None`` keeps no momentum at all. The seed mixes ``(seed, parameter index, resample count)``; the
    parameter index is the parameter's position across ``param_groups`` at construction.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float | None,
        rank: int,
        kappa: int = 1000,
        beta1: float | None = 0.9,
        decay_rate: float = -0.8,
        clip_threshold: float = 1.0,
        eps: tuple[float, float] = (1e-30, 1e-3),
        weight_decay: float = 0.0,
        relative_step: bool = False,
        scale_parameter: bool = True,
        factorize_second_moment: bool = True,
        seed: int = 0,
        min_size: int = MIN_SIZE,
        max_aspect_ratio: float = MAX_ASPECT_RATIO,
    ) -> None:
        _check_options(lr, rank, kappa, beta1, decay_rate, clip_threshold, eps, weight_decay, relative_step, seed)
        _check_thresholds(min_size, max_aspect_ratio)
        defaults = dict(
            lr=lr, rank=rank, kappa=kappa, beta1=beta1, decay_rate=decay_rate, clip_threshold=clip_threshold,
            eps=tuple(eps), weight_decay=weight_decay, relative_step=relative_step,
            scale_parameter=scale_parameter, factorize_second_moment=factorize_second_moment,
            min_size=min_size, max_aspect_ratio=max_aspect_ratio,
        )
        self.seed = int(seed)
        self._index: dict[Tensor, int] = {}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        _check_options(g["lr"], g["rank"], g["kappa"], g["beta1"], g["decay_rate"], g["clip_threshold"], g["eps"],
                       g["weight_decay"], g["relative_step"], self.seed)
        _check_thresholds(g["min_size"], g["max_aspect_ratio"])
        for p in g["params"]:
            self._index.setdefault(p, len(self._index))

    # -- public inspection ----------------------------------------------------------------------------------

    def projection(self, p: Tensor) -> Tensor:
        """The projection currently compressing ``p``'s momentum (regenerated, identical on every call)."""
        state = self.state.get(p, {})
        if "exp_avg_proj" not in state:
            raise ValueError("this parameter's momentum is not compressed (or it has not been stepped yet)")
        return self._projection(p, state)

    def momentum(self, p: Tensor) -> Tensor | None:
        """``p``'s first moment as a full matrix: decompressed if stored compressed, None without momentum."""
        state = self.state.get(p, {})
        if "exp_avg_proj" in state:
            return decompress(self.projection(p), state["exp_avg_proj"], p.shape)
        return state.get("exp_avg")

    def state_bytes(self) -> int:
        """Bytes held in optimizer-state tensors (projections are regenerated, so they cost nothing)."""
        return sum(
            t.numel() * t.element_size() for s in self.state.values() for t in s.values() if isinstance(t, Tensor)
        )

    # -- the step ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._step_param(p, group)
        return loss

    def _step_param(self, p: Tensor, group: dict) -> None:
        """One Adafactor step for ``p``; low-precision parameters are updated through an fp32 copy."""
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError("Flora does not support sparse gradients (use dense gradients, e.g. sparse=False)")
        if grad.dtype in (torch.float16, torch.bfloat16):
            grad = grad.float()
        p32 = p.float() if p.dtype in (torch.float16, torch.bfloat16) else p
        state = self.state[p]
        if not state:
            self._init_state(p, grad, group, state)
        state["step"] += 1
        lr = self._lr(group, state["step"], _rms(p32))

        update = self._precondition(grad, state, group)
        if "exp_avg_proj" in state:
            # The authors' order: momentum of the raw preconditioned gradient, one clip after it, then lr.
            update = _clip_rms_(self._compressed_momentum(p, update, state, group), group["clip_threshold"])
            update.mul_(lr)
        else:
            # transformers' Adafactor: clip, lr, then momentum of the lr-scaled update.
            update = _clip_rms_(update, group["clip_threshold"]).mul_(lr)
            if group["beta1"] is not None:
                update = state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
        if group["weight_decay"] != 0:
            p32.add_(p32, alpha=-group["weight_decay"] * lr)
        p32.add_(-update)
        if p32 is not p:
            p.copy_(p32)

    def _init_state(self, p: Tensor, grad: Tensor, group: dict, state: dict) -> None:
        state["step"] = 0
        if group["beta1"] is not None:
            if compressible(grad, group["rank"], group["min_size"], group["max_aspect_ratio"]):
                state["resamples"] = 0
                state["exp_avg_proj"] = grad.new_zeros(group["rank"], max(grad.shape))
            else:
                state["exp_avg"] = torch.zeros_like(grad)
        if self._factored(grad, group):
            state["exp_avg_sq_row"] = grad.new_zeros(grad.shape[:-1])
            state["exp_avg_sq_col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])
        else:
            state["exp_avg_sq"] = torch.zeros_like(grad)

    @staticmethod
    def _factored(grad: Tensor, group: dict) -> bool:
        return grad.dim() >= 2 and group["factorize_second_moment"]

    @staticmethod
    def _lr(group: dict, step: int, param_rms: Tensor) -> float | Tensor:
        """Adafactor's step size: relative (min(1e-2, 1/sqrt(t))) or given, times max(eps2, RMS(p)) if asked."""
        lr = min(1e-2, 1.0 / math.sqrt(step)) if group["relative_step"] else group["lr"]
        return max(group["eps"][1], param_rms) * lr if group["scale_parameter"] else lr

    def _precondition(self, grad: Tensor, state: dict, group: dict) -> Tensor:
        """Update the second moment and return ``grad / sqrt(v_hat)`` (factored: rank-1 estimate of v)."""
        beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
        sq = grad**2 + group["eps"][0]
        if not self._factored(grad, group):
            v = state["exp_avg_sq"].mul_(beta2t).add_(sq, alpha=1.0 - beta2t)
            return v.rsqrt().mul_(grad)
        row = state["exp_avg_sq_row"].mul_(beta2t).add_(sq.mean(dim=-1), alpha=1.0 - beta2t)
        col = state["exp_avg_sq_col"].mul_(beta2t).add_(sq.mean(dim=-2), alpha=1.0 - beta2t)
        r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
        return torch.mul(r_factor, col.unsqueeze(-2).rsqrt()).mul_(grad)

    def _compressed_momentum(self, p: Tensor, update: Tensor, state: dict, group: dict) -> Tensor:
        """``(1 - b1) u + b1 P^T C`` (to be clipped); then transfer if due, then ``C <- b1 C + (1 - b1) P u``."""
        b1 = group["beta1"]
        c = state["exp_avg_proj"]
        proj = self._projection(p, state)
        applied = decompress(proj, c, update.shape).mul_(b1).add_(update, alpha=1 - b1)
        if state["step"] % group["kappa"] == 0:
            proj = self._transfer(p, state, proj)
        c.mul_(b1).add_(compress(proj, update), alpha=1 - b1)
        return applied

    def _transfer(self, p: Tensor, state: dict, old: Tensor) -> Tensor:
        """Move the compressed momentum to the next projection, ``C <- P_new (P_old^T C)``; return ``P_new``."""
        state["resamples"] += 1
        c = state["exp_avg_proj"]
        new = self._projection(p, state)
        c.copy_(new @ (old.T @ c))
        return new

    def _projection(self, p: Tensor, state: dict) -> Tensor:
        """``p``'s current momentum projection, shaped and typed after its compressed state."""
        c = state["exp_avg_proj"]
        seed = projection_seed(self.seed, _MOMENTUM_STREAM, self._index[p], state["resamples"])
        return random_projection(c.shape[0], min(p.shape), seed, p.device, c.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Compressed gradient accumulation.
# ---------------------------------------------------------------------------------------------------------------


def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


class FloraAccumulator:
    """Accumulate gradients over micro-batches as ``sum_k P G_k`` (``rank x max(m, n)``) instead of ``sum_k G_k``.

    A post-accumulate-grad hook on every :func:`compressible` parameter adds ``P G`` to its buffer and
    frees ``.grad``; at the end of the backward that syncs, every buffer is decompressed into ``.grad = P^T C``,
    so clipping, logging and any optimizer see an ordinary gradient. The projection is resampled every update
    (seeded by ``(seed, parameter index, update count)``, so all processes agree without communicating). Other
    parameters accumulate in ``.grad`` as usual.

    Which backward syncs: the ``accumulation_steps``-th since the last sync, or whatever ``sync()`` returns at the
    end of a backward. :meth:`attach` sets ``sync`` for a ``transformers.Trainer``. One ``backward()`` per
    micro-batch is assumed.

    ``planned_backward=True`` (or a ``filter(module, path) -> bool``) also gives every plain ``nn.Linear`` whose
    weight is compressed a forward whose backward produces ``P G`` without forming ``G`` (``kernels.flora_linear``;
    equal to the hook path up to rounding); :meth:`remove` takes it off. Off by default: each such linear is a
    graph break under ``torch.compile``.

    DistributedDataParallel: pass the DDP-wrapped model (or attach to a Trainer that wraps one). DDP's own
    gradient reduction is switched off while the accumulator is active (``require_backward_grad_sync = False``,
    restored by :meth:`remove`) and, at the sync, the compressed buffers and the uncompressed gradients are
    averaged over processes instead: ``rank * max(m, n)`` numbers travel per matrix instead of ``m * n``.
    """

    def __init__(
        self,
        model: nn.Module,
        rank: int,
        accumulation_steps: int = 1,
        seed: int = 0,
        sync: Callable[[], bool] | None = None,
        min_size: int = MIN_SIZE,
        max_aspect_ratio: float = MAX_ASPECT_RATIO,
        planned_backward: bool | Callable[[nn.Module, str], bool] = False,
    ) -> None:
        _check_int("rank", rank, 1)
        _check_int("accumulation_steps", accumulation_steps, 1)
        _check_int("seed", seed, 0)
        _check_thresholds(min_size, max_aspect_ratio)
        if sync is not None and not callable(sync):
            raise ValueError(f"sync must be a zero-argument callable or None, got {sync!r}")
        if not (isinstance(planned_backward, bool) or callable(planned_backward)):
            raise ValueError(f"planned_backward must be a bool or a callable (module, path) -> bool, got "
                             f"{planned_backward!r}")
        self.rank, self.accumulation_steps, self.seed, self.sync = rank, accumulation_steps, seed, sync
        self.min_size, self.max_aspect_ratio = min_size, max_aspect_ratio
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model has no parameter with requires_grad=True")
        self._index = {p: i for i, p in enumerate(self.params)}
        self.updates = 0  # syncs so far; also the projection counter
        self.micro_batches = 0  # backward passes since the last sync
        self._buffers: dict[Tensor, Tensor] = {}
        self._queued = False
        self._ddp: nn.Module | None = None
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]
        for p in self.params:
            if self.compressed(p):
                flora_linear.register(p, self)
        self.planned: list[PlannedLinear] = self._plan_linears(model, planned_backward) if planned_backward else []
        if _is_ddp(model):
            self._own_ddp(model)

    # -- public ---------------------------------------------------------------------------------------------

    def compressed(self, p: Tensor) -> bool:
        """Whether ``p``'s accumulated gradient is kept compressed."""
        return compressible(p, self.rank, self.min_size, self.max_aspect_ratio)

    def projection(self, p: Tensor, update: int | None = None) -> Tensor:
        """The projection for ``p`` in accumulation window ``update`` (default: the current one)."""
        if not self.compressed(p):
            raise ValueError("this parameter's gradient is not compressed")
        update = self.updates if update is None else update
        seed = projection_seed(self.seed, _GRADIENT_STREAM, self._index[p], update)
        return random_projection(self.rank, min(p.shape), seed, p.device, p.dtype)

    @property
    def active(self) -> bool:
        """True until :meth:`remove`."""
        return bool(self._handles)

    def add_compressed(self, p: Tensor, c: Tensor) -> None:
        """Add an already compressed gradient ``c`` of ``p`` (``P G`` with ``P = projection(p)``, ``rank x
        max(m, n)``, ``p``'s dtype) to the window's buffer, exactly as the hook does after compressing ``p.grad``.

        Call it during a backward pass (it queues the end-of-backward callback that counts the micro-batch and
        syncs). The graph pass uses it to hand over ``P G`` computed without ever forming ``G``.
        """
        if not self.compressed(p) or p not in self._index:
            raise ValueError("p is not a parameter whose gradient this accumulator compresses")
        if tuple(c.shape) != (self.rank, max(p.shape)):
            raise ValueError(f"c must be {self.rank} x {max(p.shape)}, got {tuple(c.shape)}")
        self._queue_end_of_backward()
        with torch.no_grad():
            if p in self._buffers:
                self._buffers[p].add_(c)
            else:
                self._buffers[p] = c

    def buffer_bytes(self) -> int:
        """Bytes currently held in compressed buffers."""
        return sum(c.numel() * c.element_size() for c in self._buffers.values())

    def attach(self, trainer: Any) -> FloraAccumulator:
        """Follow a ``transformers.Trainer``: sync when its accelerator syncs, and own its DDP wrapper if any.

        Trainer computes the sync flag before each micro-batch (including a short last window of an epoch), so
        the accumulator reads ``trainer.accelerator.sync_gradients``; a callback takes over DDP's reduction once
        Trainer has wrapped the model.
        """
        from transformers import TrainerCallback

        acc = self

        class _FloraCallback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                if _is_ddp(trainer.model_wrapped) and acc._ddp is None:
                    acc._own_ddp(trainer.model_wrapped)

        self.sync = lambda: bool(trainer.accelerator.sync_gradients)
        trainer.add_callback(_FloraCallback())
        return self

    def remove(self) -> None:
        """Remove the hooks and planned linears, give gradient reduction back to DDP, drop any pending buffers."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p in self.params:
            flora_linear.unregister(p, self)
        for linear in self.planned:
            linear.remove()
        self.planned.clear()
        self._buffers.clear()
        if self._ddp is not None:
            self._ddp.require_backward_grad_sync = True
            self._ddp = None

    def __enter__(self) -> FloraAccumulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- hooks --------------------------------------------------------------------------------------------

    def _plan_linears(self, model: nn.Module, choose: bool | Callable[[nn.Module, str], bool]) -> list[PlannedLinear]:
        """The plain linears (with their class's forward) whose weight this accumulator compresses, planned."""
        ids = {id(p) for p in self.params if self.compressed(p)}
        return [plan_linear(path, module) for path, module in model.named_modules()
                if is_plain_linear(module) and id(module.weight) in ids and "forward" not in module.__dict__
                and (choose is True or choose(module, path))]

    def _own_ddp(self, ddp: nn.Module) -> None:
        self._ddp = ddp
        ddp.require_backward_grad_sync = False

    def _queue_end_of_backward(self) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _hook(self, p: Tensor) -> None:
        """Runs once per backward per parameter, after ``p.grad`` has been accumulated."""
        self._queue_end_of_backward()
        if not self.compressed(p) or p.grad is None:
            return
        with torch.no_grad():
            c = compress(self.projection(p), p.grad)
        self.add_compressed(p, c)
        p.grad = None

    def _end_of_backward(self) -> None:
        self._queued = False
        self.micro_batches += 1
        syncs = self.sync() if self.sync is not None else self.micro_batches % self.accumulation_steps == 0
        if syncs:
            self._sync()

    @torch.no_grad()
    def _sync(self) -> None:
        """Average across processes if distributed, write ``.grad = P^T C`` and start a new window."""
        if self._distributed():
            self._all_reduce()
        for p, c in self._buffers.items():
            p.grad = decompress(self.projection(p), c, p.shape).contiguous()
        self._buffers.clear()
        self.updates += 1
        self.micro_batches = 0

    def _distributed(self) -> bool:
        dist = torch.distributed
        return self._ddp is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _all_reduce(self) -> None:
        """One averaging all-reduce per dtype over every buffer and uncompressed grad, in parameter order.

        Every process must pass the same tensors, so a parameter without a gradient here contributes zeros.
        """
        dist = torch.distributed
        tensors = []
        for p in self.params:
            if self.compressed(p):
                if p not in self._buffers:
                    self._buffers[p] = p.new_zeros(self.rank, max(p.shape))
                tensors.append(self._buffers[p])
            else:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                tensors.append(p.grad)
        world = dist.get_world_size()
        for dtype in sorted({t.dtype for t in tensors}, key=str):
            group = [t for t in tensors if t.dtype == dtype]
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.all_reduce(flat)
            flat.div_(world)
            for t, v in zip(group, flat.split([t.numel() for t in group])):
                t.copy_(v.view_as(t))
