"""ReLoRA (Lialin et al., arXiv 2307.05695): high-rank training out of low-rank updates.

Every `merge_every` steps each adapter is folded into its base weight (`W += s * B @ A`) and restarted (A
re-drawn, B zero), most of the adapters' optimizer state is pruned, and the learning rate re-warms from zero.
Each cycle adds one rank-r update to W, so the sum of the cycles reaches a rank that one adapter cannot.

Right after a merge B = 0, so A's gradient is exactly 0. Pruning Adam's two moments on their own leaves entries
with m != 0 and v = 0, which Adam then steps by lr * m / eps: a re-drawn A went from its kaiming bound to hundreds
within 5 steps at the full lr. So the driver zeroes a re-drawn A's state (the history of a matrix that no longer
exists) and prunes B's as the paper does, then zeroes B's first moment wherever its second moment is gone: every
post-merge step stays an ordinary optimizer step, whatever the restart warmup.

Everything here works on the real tensors of a site (`LoraParams`), in place: parameters keep their identity, so
optimizers, `optimize()`-patched modules and compiled graphs keep working after a merge without recompiling.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from runlora_fx.passes.site import AdapterParams, LoraParams

__all__ = [
    "RESET_MODES",
    "ReLoRA",
    "ReLoRACallback",
    "default_restart_warmup",
    "find_peft_lora_params",
    "jagged_cosine_schedule",
    "merge_and_reinit",
    "reset_optimizer_state",
]

RESET_MODES = ("magnitude", "random", "zero")
# The paper prunes 90% of each moment by magnitude; random pruning needs 99.9% to be as stable.
DEFAULT_RESET_RATIO = {"magnitude": 0.9, "random": 0.999, "zero": 1.0}


# ----------------------------------------------------------------------------------------------- discovery


def find_peft_lora_params(model: nn.Module) -> list[LoraParams]:
    """The active adapters of every peft LoRA linear in `model`, as `LoraParams`.

    A walk over modules, used when no graph matcher is asked for. It refuses (ValueError, all problems listed at
    once) the layers whose merge would not be `W += s * B @ A`: merged or disabled adapters, DoRA and other peft
    variants, embedding and conv LoRA.
    """
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return []
    sites, problems = [], []
    for path, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if module.merged:
            problems.append(f"{path}: adapters {module.merged_adapters} are merged; call unmerge_adapter() first")
            continue
        if module.disable_adapters:
            problems.append(f"{path}: adapters are disabled, so merging them would change the model's output")
            continue
        base = module.get_base_layer()
        adapters = []
        for name in module.active_adapters:
            if name in module.lora_embedding_A:
                problems.append(f"{path}: adapter {name!r} is an embedding LoRA (not supported)")
            elif name in module.lora_variant or module.use_dora.get(name, False):
                kind = type(module.lora_variant.get(name)).__name__
                problems.append(f"{path}: adapter {name!r} is a peft variant ({kind}), not a plain low-rank sum")
            elif name in module.lora_A:
                lora_a, lora_b = module.lora_A[name], module.lora_B[name]
                if not (isinstance(lora_a, nn.Linear) and isinstance(lora_b, nn.Linear)):
                    problems.append(f"{path}: adapter {name!r} uses {type(lora_a).__name__} (only linear LoRA)")
                    continue
                adapters.append(AdapterParams(name, lora_a.weight, lora_b.weight, float(module.scaling[name]),
                                              lora_b.bias))
        if adapters:
            sites.append(LoraParams(path, base.weight, getattr(base, "bias", None), adapters, module))
    if problems:
        raise ValueError("model: cannot merge these LoRA layers:\n  " + "\n  ".join(problems))
    return sites


def _optimized_params(model: nn.Module) -> list[LoraParams]:
    """The sites `optimize()` patched: their planned forward no longer shows the LoRA structure to a capture."""
    try:
        from runlora_fx.api import optimized_sites
    except ImportError:
        return []
    return [site.params for site in optimized_sites(getattr(model, "_orig_mod", model))]


def _discover(model: nn.Module, example_inputs: Any) -> list[LoraParams]:
    patched = _optimized_params(model)
    if example_inputs is None:
        return _unique(patched + find_peft_lora_params(model))
    try:
        from runlora_fx.passes.match import find_lora_params
    except ImportError as err:
        raise ImportError("example_inputs: finding LoRA sites in a graph needs "
                          "runlora_fx.passes.match.find_lora_params, which could not be imported") from err
    return _unique(patched + list(find_lora_params(model, example_inputs)))


# ----------------------------------------------------------------------------------------------- merging


def _is_4bit(weight: torch.Tensor) -> bool:
    return getattr(weight, "quant_state", None) is not None and type(weight).__name__ == "Params4bit"


def _out_in_shape(site: LoraParams) -> tuple[int, ...]:
    """The (out, in) shape of the base weight as the adapters see it."""
    shape = tuple(site.weight.quant_state.shape) if _is_4bit(site.weight) else tuple(site.weight.shape)
    return shape[::-1] if _fan_in_fan_out(site) else shape


def _fan_in_fan_out(site: LoraParams) -> bool:
    """GPT-2 style Conv1D weights are stored (in, out): peft says so with this flag, the matcher on the site."""
    return site.weight_transposed or bool(getattr(site.module, "fan_in_fan_out", False))


def _check_site(site: LoraParams, owners: dict[int, set[int]]) -> None:
    where = f"sites: {site.module_path or '<site>'}"
    weight = site.weight
    if not (_is_4bit(weight) or (torch.is_tensor(weight) and weight.is_floating_point() and weight.dim() == 2)):
        raise ValueError(f"{where}: base weight of type {type(weight).__name__} / {getattr(weight, 'dtype', None)} "
                         "is neither a dense floating-point matrix nor a bitsandbytes 4-bit Params4bit")
    if len(owners.get(id(weight), ())) > 1:
        raise ValueError(f"{where}: base weight is tied to another module; merging would change that module too")
    out_f, in_f = _out_in_shape(site)
    for ad in site.adapters:
        a, b = ad.lora_a, ad.lora_b
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
            raise ValueError(f"{where}: adapter {ad.name!r} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                             f"which do not fit a base weight of (out, in) = ({out_f}, {in_f})")
        if ad.lora_bias is not None and tuple(ad.lora_bias.shape) != (out_f,):
            raise ValueError(f"{where}: adapter {ad.name!r} has a LoRA bias of shape {tuple(ad.lora_bias.shape)}")
        if not math.isfinite(ad.scale):
            raise ValueError(f"{where}: adapter {ad.name!r} has scale {ad.scale}")


def _delta(site: LoraParams, dtype: torch.dtype) -> torch.Tensor:
    """sum_k s_k * B_k @ A_k in `dtype`, laid out like the stored base weight."""
    delta = sum(ad.scale * (ad.lora_b.detach().to(dtype) @ ad.lora_a.detach().to(dtype)) for ad in site.adapters)
    return delta.T if _fan_in_fan_out(site) else delta


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The widest dtype among the operands, and never below fp32 (one rounding to the base dtype at the end)."""
    dtype = functools.reduce(torch.promote_types, dtypes)
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _merge_dense_(weight: torch.Tensor, delta: torch.Tensor) -> None:
    if delta.dtype == weight.dtype:
        weight.add_(delta)
    else:
        weight.copy_(weight.to(delta.dtype) + delta)


def _copy_quant_state_(old: Any, new: Any) -> None:
    """Write `new` into `old` field by field, tensors in place, so whoever holds `old` sees the merged weight.

    `dtype` (what dequantization returns) stays the original one: the merge quantizes from fp32.
    """
    for name, value in vars(new).items():
        current = getattr(old, name, None)
        if name == "dtype":
            continue
        if torch.is_tensor(value) and torch.is_tensor(current) and current.shape == value.shape \
                and current.dtype == value.dtype:
            current.copy_(value)
        elif type(value).__name__ == "QuantState" and type(current).__name__ == "QuantState":
            _copy_quant_state_(current, value)
        else:
            setattr(old, name, value)


def _merge_4bit_(weight: torch.Tensor, delta: torch.Tensor) -> None:
    """Dequantize, add in fp32, re-quantize with the same quant type, block size and statistics compression."""
    import bitsandbytes.functional as bnbf

    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes repacks CPU weights for its AVX512-bf16 inference kernel; undo that first. It restores the
        # same QuantState object in place; the next eval forward packs again.
        weight.data, state = bnbf._convert_weight_packed_for_cpu_inverse(weight.data, state)
        if state.absmax.dim() == 2:  # bitsandbytes 0.50 leaves a non-nested absmax in its packed (in/bs, out) layout
            state.absmax = state.absmax.T.reshape(-1).float()
        weight.quant_state = state
    merged = bnbf.dequantize_4bit(weight.data, state).float() + delta.float()
    packed, new_state = bnbf.quantize_4bit(merged, blocksize=state.blocksize, compress_statistics=state.nested,
                                           quant_type=state.quant_type,
                                           quant_storage=getattr(weight, "quant_storage", weight.dtype))
    weight.data.copy_(packed)
    _copy_quant_state_(state, new_state)


def _param_owners(model: nn.Module | None) -> dict[int, set[int]]:
    if model is None:
        return {}
    owners: dict[int, set[int]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(module))
    return owners


@torch.no_grad()
def merge_and_reinit(model: nn.Module | None, sites: Sequence[LoraParams] | None = None,
                     example_inputs: Any = None, *, generator: torch.Generator | None = None) -> list[LoraParams]:
    """Fold every adapter into its base weight and restart it; return the sites merged.

    For each adapter: `W += scale * B @ A` (and `bias += scale * lora_bias`), then A is re-drawn the way peft
    draws it (kaiming-uniform, a = sqrt(5)) and B is zeroed. Only B is zeroed: with both A and B at zero every
    adapter gradient is zero and the next cycle would learn nothing. The model's function is unchanged up to one
    rounding of W to its dtype (for a 4-bit base, one re-quantization of the merged weight).

    Sites come from `sites` if given, else from the graph matcher on `example_inputs`, else from peft's modules.
    All sites are checked before any is touched, so a ValueError leaves the model as it was. A LoRA bias whose
    base layer has no bias is kept as it is (it then trains like a plain bias) and a warning says so.
    Parameters (and a 4-bit weight's Params4bit and QuantState objects) keep their identity.
    """
    if sites is None:
        if model is None:
            raise ValueError("model: needed when sites is not given")
        sites = _discover(model, example_inputs)
    sites = _unique(sites)
    owners = _param_owners(model)
    for site in sites:
        _check_site(site, owners)
    for site in sites:
        if not site.adapters:
            continue
        weight = site.weight
        base_dtype = torch.float32 if _is_4bit(weight) else weight.dtype
        delta = _delta(site, _compute_dtype(base_dtype, *(t.dtype for ad in site.adapters
                                                          for t in (ad.lora_a, ad.lora_b))))
        if _is_4bit(weight):
            if delta.any():  # a re-quantization is not free (statistics compression drifts): skip a zero update
                _merge_4bit_(weight, delta)
        else:
            _merge_dense_(weight, delta)
        for ad in site.adapters:
            if ad.lora_bias is not None:
                if site.bias is not None:
                    _merge_dense_(site.bias, ad.scale * ad.lora_bias.to(_compute_dtype(site.bias.dtype,
                                                                                        ad.lora_bias.dtype)))
                    ad.lora_bias.zero_()
                else:
                    warnings.warn(f"{site.module_path}: the base layer has no bias, so the LoRA bias of adapter "
                                  f"{ad.name!r} is kept as it is (not folded, not reset)", stacklevel=2)
            nn.init.kaiming_uniform_(ad.lora_a, a=math.sqrt(5), generator=generator)
            ad.lora_b.zero_()
    return list(sites)


def _unique(sites: Iterable[LoraParams]) -> list[LoraParams]:
    """One record per base weight, each adapter once. A module called twice shows up twice in a graph, and a site
    can be found by two discoveries; its update must still be added once."""
    by_weight: dict[int, LoraParams] = {}
    for site in sites:
        first = by_weight.get(id(site.weight))
        if first is None:
            by_weight[id(site.weight)] = dataclasses.replace(site, adapters=list(site.adapters))
            continue
        known = {id(ad.lora_a) for ad in first.adapters}
        first.adapters += [ad for ad in site.adapters if id(ad.lora_a) not in known]
        first.bias = first.bias if first.bias is not None else site.bias
        first.module = first.module if first.module is not None else site.module
    return list(by_weight.values())


# ----------------------------------------------------------------------------------------------- optimizer


def _prune_(state: torch.Tensor, mode: str, ratio: float, generator: torch.Generator | None) -> None:
    n = state.numel()
    k = round(ratio * n)
    if k == 0:
        return
    if k >= n or mode == "zero":
        state.zero_()
        return
    if mode == "magnitude":
        magnitude = state.detach().abs()
        if magnitude.dtype in (torch.float16, torch.bfloat16):  # kthvalue wants a wider type on some devices
            magnitude = magnitude.float()
        threshold = magnitude.flatten().kthvalue(k).values  # same dtype as magnitude: the k-th entry stays in
        state.masked_fill_(magnitude <= threshold, 0)
    else:
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.randperm(n, generator=generator)[:k]] = True
        state.masked_fill_(mask.view(state.shape).to(state.device), 0)


def _state_tensors(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every floating-point, non-scalar state tensor of `params` (not step counters, other scalars or integer
    state); ValueError if a tensor is not in the optimizer."""
    known = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = sum(id(p) not in known for p in params)
    if missing:
        raise ValueError(f"params: {missing} of {len(params)} tensors are not in the optimizer's param_groups")
    return [value for p in params for key, value in optimizer.state.get(p, {}).items()
            if key != "step" and torch.is_tensor(value) and value.is_floating_point() and value.dim() > 0]


@torch.no_grad()
def reset_optimizer_state(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor],
                          mode: str = "magnitude", ratio: float | None = None, *,
                          generator: torch.Generator | None = None, pair_moments: bool = False) -> int:
    """Prune the optimizer state of `params` in place; return how many state tensors were pruned.

    Every floating-point state tensor of each parameter is pruned on its own (Adam's two moments, factored
    row/column statistics, compressed momenta): `magnitude` zeroes the round(ratio * numel) entries of smallest
    |value| (ties at the threshold go too), `random` zeroes that many entries drawn at random, `zero` zeroes all.
    Scalars are left alone, and so are step counters (the bias corrections of Adam keep counting). Default ratio:
    0.9 for magnitude and 0.999 for random, as in the paper.

    `pair_moments=True` then also zeroes Adam's first moment (`exp_avg`) wherever its denominator (`exp_avg_sq`,
    and `max_exp_avg_sq` with amsgrad) is zero. Pruned on their own, the two moments leave entries with m != 0
    and v = 0, and Adam steps those by about lr * m / (sqrt((1 - beta2) g^2) + eps): unbounded as g -> 0.
    """
    if mode not in RESET_MODES:
        raise ValueError(f"mode: must be one of {RESET_MODES}, got {mode!r}")
    if ratio is None:
        ratio = DEFAULT_RESET_RATIO[mode]
    if not (isinstance(ratio, (int, float)) and 0.0 <= ratio <= 1.0):
        raise ValueError(f"ratio: must be a number in [0, 1], got {ratio!r}")
    if mode == "zero" and ratio != 1.0:
        raise ValueError(f"ratio: mode='zero' zeroes the whole state; leave ratio unset (got {ratio!r})")
    params = list(params)
    tensors = _state_tensors(optimizer, params)
    for value in tensors:
        _prune_(value, mode, float(ratio), generator)
    if pair_moments:
        for p in params:
            _pair_moments_(optimizer.state.get(p, {}))
    return len(tensors)


def _pair_moments_(state: dict) -> None:
    """Zero Adam's first moment where no second moment is left to divide it by."""
    m = state.get("exp_avg")
    denominators = [state[k] for k in ("exp_avg_sq", "max_exp_avg_sq")
                    if torch.is_tensor(m) and torch.is_tensor(state.get(k)) and state[k].shape == m.shape]
    if denominators:
        m.masked_fill_(functools.reduce(torch.logical_and, [v == 0 for v in denominators]), 0)


# ----------------------------------------------------------------------------------------------- schedule


def _cosine(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    if step < warmup_steps:
        return step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _rewarmed(step: int, multiplier: Any, cycle_length: int, restart_warmup_steps: int) -> float:
    """`multiplier(step)`, dropped to 0 at every multiple of `cycle_length` and ramped back over the warmup."""
    value = multiplier(step)
    since_restart = step % cycle_length
    if step >= cycle_length and since_restart < restart_warmup_steps:
        value *= since_restart / restart_warmup_steps
    return value


def default_restart_warmup(cycle_length: int) -> int:
    """The restart warmup used when none is given: 10% of the cycle and at least 20 steps (never above the cycle).

    The authors re-warm over 100 steps for cycles of 1000-5000 (the paper: 50-100). A 4-step re-warmup was too
    short: the pruned state's first steps at nearly the full lr raised the loss after every restart.
    """
    return min(cycle_length, max(20, math.ceil(cycle_length / 10)))


def jagged_cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                           cycle_length: int, restart_warmup_steps: int | None = None,
                           min_lr_ratio: float = 0.1) -> LambdaLR:
    """Cosine decay with a linear warmup, dropped to zero and re-warmed at every restart (the paper's schedule).

    The multiplier rises linearly to 1 over `warmup_steps`, then follows a cosine from 1 to `min_lr_ratio` at
    `total_steps`; at every multiple of `cycle_length` it falls to 0 and climbs back to the cosine over
    `restart_warmup_steps` (default: `default_restart_warmup(cycle_length)`), so the fresh adapters and pruned
    optimizer state start with small steps. Set `cycle_length` to ReLoRA's `merge_every`.
    """
    def check(name: str, value: Any, low: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: must be an int >= {low}, got {value!r}")

    check("total_steps", total_steps, 1)
    check("warmup_steps", warmup_steps, 0)
    check("cycle_length", cycle_length, 1)
    if restart_warmup_steps is None:
        restart_warmup_steps = default_restart_warmup(cycle_length)
    check("restart_warmup_steps", restart_warmup_steps, 0)
    if warmup_steps >= total_steps:
        raise ValueError(f"warmup_steps: must be below total_steps={total_steps}, got {warmup_steps}")
    if warmup_steps > cycle_length:
        raise ValueError(f"warmup_steps: must not exceed cycle_length={cycle_length}, got {warmup_steps}")
    if restart_warmup_steps > cycle_length:
        raise ValueError(f"restart_warmup_steps: must not exceed cycle_length={cycle_length}, "
                         f"got {restart_warmup_steps}")
    if not (isinstance(min_lr_ratio, (int, float)) and 0.0 <= min_lr_ratio <= 1.0):
        raise ValueError(f"min_lr_ratio: must be a number in [0, 1], got {min_lr_ratio!r}")
    cosine = functools.partial(_cosine, total_steps=total_steps, warmup_steps=warmup_steps,
                               min_lr_ratio=float(min_lr_ratio))
    schedule = LambdaLR(optimizer, functools.partial(_rewarmed, multiplier=cosine, cycle_length=cycle_length,
                                                     restart_warmup_steps=restart_warmup_steps))
    schedule.relora_restarts = (cycle_length, restart_warmup_steps)  # so that ReLoRACallback leaves it as it is
    return schedule


# ----------------------------------------------------------------------------------------------- driver


class ReLoRA:
    """Merge, restart and prune every `merge_every` optimizer steps; call `.step(global_step)` after each step.

    `global_step` counts the optimizer steps done so far (HF Trainer's `state.global_step`); a merge happens
    when it is a positive multiple of `merge_every`, at most once per step value. `reset` is the optimizer-state
    pruning mode for B (None keeps all state), `reset_ratio` its ratio (paper defaults when None); with a reset,
    a re-drawn A's state is zeroed and B keeps no first moment without a second one (module docstring). Only the
    adapters' state is touched: parameters trained full-rank (norms, embeddings) keep theirs. If `scheduler` is given,
    `.step()` also steps it, so a hand-written loop calls just `optimizer.step(); relora.step(step)`.

    Sites: `sites` if given, else the graph matcher on `example_inputs` (both fixed once), else the peft layers
    found again at every merge (so adapter changes between merges are seen).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, merge_every: int,
                 reset: str | None = "magnitude", reset_ratio: float | None = None, scheduler: Any = None, *,
                 sites: Sequence[LoraParams] | None = None, example_inputs: Any = None,
                 generator: torch.Generator | None = None) -> None:
        if isinstance(merge_every, bool) or not isinstance(merge_every, int) or merge_every < 1:
            raise ValueError(f"merge_every: must be an int >= 1, got {merge_every!r}")
        if reset is not None and reset not in RESET_MODES:
            raise ValueError(f"reset: must be None or one of {RESET_MODES}, got {reset!r}")
        if reset is not None:  # validate the ratio now rather than at the first merge
            reset_optimizer_state(optimizer, [], reset, reset_ratio)
        if scheduler is not None and not callable(getattr(scheduler, "step", None)):
            raise ValueError(f"scheduler: must have a step() method, got {type(scheduler).__name__}")
        self.model, self.optimizer, self.merge_every = model, optimizer, merge_every
        self.reset, self.reset_ratio, self.scheduler, self.generator = reset, reset_ratio, scheduler, generator
        self.sites = list(sites) if sites is not None else (
            _discover(model, example_inputs) if example_inputs is not None else None)
        found = self.sites if self.sites is not None else _discover(model, None)  # fail now, not at a merge
        if not found:
            raise ValueError("model: no LoRA layer found to merge (peft layers are found by themselves; pass "
                             "sites=, or example_inputs= for the graph matcher)")
        self.merges = 0
        self._last_merge_step: int | None = None

    def step(self, global_step: int) -> list[LoraParams]:
        """Step the scheduler (if any); merge and restart when `global_step` closes a cycle. Returns the merge."""
        if self.scheduler is not None:
            self.scheduler.step()
        if global_step <= 0 or global_step % self.merge_every or global_step == self._last_merge_step:
            return []
        merged = merge_and_reinit(self.model, sites=self.sites, generator=self.generator)
        if self.reset is not None:
            # The restarted tensors that the optimizer has (a kept LoRA bias goes on training, so its state stays).
            known = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
            redrawn = [ad.lora_a for site in merged for ad in site.adapters if id(ad.lora_a) in known]
            from_zero = [t for site in merged for ad in site.adapters
                         for t in (ad.lora_b, ad.lora_bias if site.bias is not None else None)
                         if t is not None and id(t) in known]
            # A re-drawn A is a new matrix: no history of the old one may move it (module docstring).
            reset_optimizer_state(self.optimizer, redrawn, "zero")
            reset_optimizer_state(self.optimizer, from_zero, self.reset, self.reset_ratio, generator=self.generator,
                                  pair_moments=True)
        self.merges += 1
        self._last_merge_step = global_step
        return merged


@functools.cache
def _callback_class() -> type:
    from transformers import TrainerCallback

    class ReLoRACallback(TrainerCallback):
        """ReLoRA inside a transformers `Trainer`: merges after every `merge_every`-th optimizer step.

        Uses the Trainer's own model and optimizer (built on the first step). The Trainer steps its own scheduler.
        A `jagged_cosine_schedule` (pass `optimizers=(optimizer, schedule)`, `cycle_length=merge_every`) is used
        as it is. Any other `LambdaLR` (the Trainer's own linear or cosine schedules are) gets the restarts added
        at the start of training: the lr drops to 0 after each merge and climbs back over
        `restart_warmup_steps` (default `default_restart_warmup(merge_every)`). Other arguments as in `ReLoRA`.
        """

        def __init__(self, merge_every: int, reset: str | None = "magnitude", reset_ratio: float | None = None,
                     *, restart_warmup_steps: int | None = None, sites: Sequence[LoraParams] | None = None,
                     example_inputs: Any = None, generator: torch.Generator | None = None) -> None:
            if isinstance(merge_every, bool) or not isinstance(merge_every, int) or merge_every < 1:
                raise ValueError(f"merge_every: must be an int >= 1, got {merge_every!r}")
            if restart_warmup_steps is None:
                restart_warmup_steps = default_restart_warmup(merge_every)
            if isinstance(restart_warmup_steps, bool) or not isinstance(restart_warmup_steps, int) \
                    or not 0 <= restart_warmup_steps <= merge_every:
                raise ValueError(f"restart_warmup_steps: must be an int in [0, merge_every={merge_every}], "
                                 f"got {restart_warmup_steps!r}")
            self.restart_warmup_steps = restart_warmup_steps
            self._kwargs = dict(merge_every=merge_every, reset=reset, reset_ratio=reset_ratio, sites=sites,
                                example_inputs=example_inputs, generator=generator)
            self.relora: ReLoRA | None = None

        def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
            schedule = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps it
            every = self._kwargs["merge_every"]
            restarts = getattr(schedule, "relora_restarts", None)
            if restarts is not None:
                if restarts[0] != every:
                    warnings.warn(f"lr_scheduler: its cycle_length {restarts[0]} is not merge_every={every}, so "
                                  "its restarts do not follow the merges", stacklevel=2)
            elif isinstance(schedule, LambdaLR):
                schedule.lr_lambdas = [functools.partial(_rewarmed, multiplier=f, cycle_length=every,
                                                         restart_warmup_steps=self.restart_warmup_steps)
                                       for f in schedule.lr_lambdas]
                schedule.relora_restarts = (every, self.restart_warmup_steps)
            elif schedule is not None:
                warnings.warn(f"lr_scheduler: a {type(schedule).__name__} is not a LambdaLR, so the lr is not "
                              "re-warmed after merges; pass a jagged_cosine_schedule", stacklevel=2)
            return control

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            if self.relora is None:
                self.relora = ReLoRA(model, optimizer, **self._kwargs)
            self.relora.step(state.global_step)
            return control

    return ReLoRACallback


def __getattr__(name: str) -> Any:
    # ReLoRACallback subclasses transformers' TrainerCallback; build it on first use so that importing this
    # module does not import transformers.
    if name == "ReLoRACallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
