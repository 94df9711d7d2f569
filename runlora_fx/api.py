"""`optimize(model)`, `restore(model)` and `explain(model, ...)`: the eager entry points.

`optimize` follows torchao's `quantize_` contract: it changes `model` in place and returns it; `restore` is its
exact inverse. It captures the model with dynamo (on example inputs, or on the first real call), matches the
LoRA sites, and replaces the `forward` of each site's owning module by a planned forward. Parameters are never
replaced or copied, so state_dict, `save_pretrained`, optimizers and ReLoRA merges see the same objects.

The planned forward checks on every call that the module is still in the state it was planned for (adapters
enabled, not merged, the same active adapters and scales, the same dtypes and device, a plain `forward(x)` call)
and otherwise runs the original forward. A module is patched only when its forward computes exactly the site
(nothing else) and a check call on the captured input gives the original's output.

Plain trainable `nn.Linear` layers outside LoRA sites get a forward that, while a `FloraAccumulator` compresses
their weight (checked per call), runs `kernels.flora_linear`: the weight gradient is produced compressed.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from .config import OptimizeConfig
from .kernels.dense import LoraLinearRunner
from .kernels.flora_linear import FloraLinearRunner, is_plain_linear
from .passes.match import ModelMatch, match_model, site_params
from .passes.eligibility import rewrite_reason, runner_for, x_readers
from .passes.site import LoraParams, LoraSite, SkippedSite
from .planner.signature import SiteSignature
from .report import Report, SiteRow

log = logging.getLogger(__name__)

_STATE = "_runlora_fx"
FilterFn = Callable[[nn.Module, str], bool]


@dataclass
class PatchedSite:
    """One module whose forward was replaced, with what it was planned for."""

    path: str
    module: nn.Module
    params: LoraParams
    runner: LoraLinearRunner
    original_forward: Callable[..., Any] | None  # the instance attribute it had, if any (None: the class's)
    had_instance_forward: bool
    dtypes: tuple[torch.dtype, ...]
    device: torch.device
    peft_state: tuple | None  # (active adapters, scales) of a peft layer
    planned_forward: Callable[..., Any] | None = None  # what module.forward is while patched


@dataclass
class PatchedFloraLinear:
    """A plain trainable `nn.Linear` whose forward was replaced by the Flora compressed-gradient runner (same
    patch fields as `PatchedSite`, so `_unpatch` and `_original_forwards` handle both)."""

    path: str
    module: nn.Module
    runner: FloraLinearRunner
    original_forward: Callable[..., Any] | None
    had_instance_forward: bool
    planned_forward: Callable[..., Any] | None = None


@dataclass
class OptimizedState:
    config: OptimizeConfig
    patched: list[PatchedSite] = field(default_factory=list)
    flora: list[PatchedFloraLinear] = field(default_factory=list)  # plain linears for FloraAccumulator
    skipped: list[SkippedSite] = field(default_factory=list)
    pending_hook: Any = None  # the forward pre-hook waiting for the first real call


# ----------------------------------------------------------------------------------------------- state checks


def _is_peft_layer(module: nn.Module) -> bool:
    return hasattr(module, "active_adapters") and hasattr(module, "lora_A") and hasattr(module, "merged")


def _peft_state(module: nn.Module) -> tuple | None:
    if not _is_peft_layer(module):
        return None
    active = tuple(a for a in module.active_adapters if a in module.lora_A)  # peft skips absent adapters too
    return active, tuple(float(module.scaling[a]) for a in active)


def _tensors(p: LoraParams) -> list[torch.Tensor]:
    adapters = [(a.lora_a, a.lora_b, a.lora_bias) for a in p.adapters]
    return SiteSignature.of_tensors(p.bias, adapters).flatten(None, p.weight, p.bias, adapters)[1:]


def _in_planned_state(site: PatchedSite, x: Any, args: tuple, kwargs: dict) -> bool:
    """Whether the planned forward computes what the original would, for this call."""
    if args or kwargs or not isinstance(x, torch.Tensor):
        return False
    module = site.module
    if _is_peft_layer(module) and (module.disable_adapters or module.merged or _peft_state(module) != site.peft_state):
        return False
    tensors = _tensors(site.params)
    if tuple(t.dtype for t in tensors) != site.dtypes or any(t.device != site.device for t in tensors):
        return False
    return x.device == site.device and site.runner.accepts(x, site.params.weight, module) \
        and not torch.is_autocast_enabled(x.device.type)


def _training(site: PatchedSite) -> bool:
    """Dropout follows the dropout modules' mode (peft), else the owning module's."""
    module = site.module
    if _is_peft_layer(module):
        return any(module.lora_dropout[a].training for a in site.peft_state[0])
    return module.training


def _planned_forward(site: PatchedSite) -> Callable[..., Any]:
    original = site.original_forward or type(site.module).forward.__get__(site.module)
    adapters = [(a.lora_a, a.lora_b, a.lora_bias) for a in site.params.adapters]

    def forward(x, *args, **kwargs):
        if not _in_planned_state(site, x, args, kwargs):
            return original(x, *args, **kwargs)
        return site.runner(x, site.params.weight, site.params.bias, adapters, _training(site))

    forward.__runlora_fx__ = True
    return forward


# ----------------------------------------------------------------------------------------------- patching


def _module_only_computes(site: LoraSite, module: nn.Module, graph: fx.Graph) -> str | None:
    """None if every node traced inside `module` that reads an activation belongs to the site."""
    key = str(id(module))
    site_nodes = set(site.nodes)
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module") or node in site_nodes:
            continue
        stack = node.meta.get("nn_module_stack") or {}
        if not any(str(k).split("@", 1)[0] == key for k in stack):
            continue
        if any(isinstance(a, fx.Node) and a.op not in ("placeholder", "get_attr") for a in node.all_input_nodes):
            return f"its forward computes more than the LoRA site ({node.format_node()})"
    return None


def _patch(path: str, module: nn.Module, site: LoraSite, params: LoraParams, config: OptimizeConfig,
           readers: int) -> PatchedSite:
    tensors = _tensors(params)
    patched = PatchedSite(
        path, module, params, runner_for(site, config.search_options, readers),
        module.__dict__.get("forward"), "forward" in module.__dict__,
        tuple(t.dtype for t in tensors), params.weight.device, _peft_state(module))
    # the runner's dropout p must not depend on the mode the model was captured in
    patched.runner = patched.runner.with_adapters(
        tuple(type(c)(c.scale, float(a.dropout_p), c.lora_bias) for c, a in zip(patched.runner.adapters, site.adapters)))
    patched.planned_forward = module.forward = _planned_forward(patched)
    return patched


def _flora_forward(site: PatchedFloraLinear) -> Callable[..., Any]:
    original = site.original_forward or type(site.module).forward.__get__(site.module)

    def forward(x, *args, **kwargs):
        if args or kwargs:
            return original(x, *args, **kwargs)
        return site.runner(site.module, x, original)

    forward.__runlora_fx__ = True
    return forward


def _patch_flora_linears(model: nn.Module, state: OptimizedState, filter_fn: FilterFn | None) -> None:
    """Patch every plain `nn.Linear` with a trainable weight that is not inside a LoRA layer's module (planned,
    or matched and left alone; a skipped product without an owning module, path "", excludes nothing).

    Whether a call uses the compressed-gradient node is decided per call (an accumulator compresses the weight
    right now, training, grad enabled, and cheaper by the plan), so the accumulator may be created after this.
    The node computes exactly `nn.Linear`'s function, so patching a linear the LoRA pass did not claim is safe.
    """
    lora_paths = [s.path for s in state.patched] + [s.module_path for s in state.skipped if s.module_path]

    def in_lora_site(path: str) -> bool:
        return any(path == p or path.startswith(p + ".") for p in lora_paths)

    for path, module in model.named_modules():
        if not is_plain_linear(module) or not module.weight.requires_grad or "forward" in module.__dict__:
            continue
        if in_lora_site(path) or (filter_fn is not None and not filter_fn(module, path)):
            continue
        site = PatchedFloraLinear(path, module, FloraLinearRunner(), None, False)
        site.planned_forward = module.forward = _flora_forward(site)
        state.flora.append(site)


def _unpatch(site: PatchedSite | PatchedFloraLinear) -> None:
    if site.had_instance_forward:
        site.module.forward = site.original_forward
    else:
        site.module.__dict__.pop("forward", None)


def _check_calls(model: nn.Module, patched: list[PatchedSite], example_inputs, example_kwargs) -> list[PatchedSite]:
    """Run the model once; at each patched module compare the planned output with the original's on the same
    input and RNG state. Modules that disagree are unpatched (returned)."""
    bad: list[PatchedSite] = []
    handles = []
    for site in patched:
        def hook(module, args, kwargs, output, site=site):
            if not args or kwargs or not isinstance(output, torch.Tensor):
                return None
            original = site.original_forward or type(module).forward.__get__(module)
            with torch.random.fork_rng(devices=[]):
                ref = original(*args)
            with torch.random.fork_rng(devices=[]):
                ours = module.forward(*args)
            tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(ref.dtype, 3e-2)
            if ours.shape != ref.shape or not torch.allclose(ours.float(), ref.float(), rtol=tol, atol=tol * max(1.0, ref.abs().max().item())):
                bad.append(site)
            return None
        handles.append(site.module.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(*example_inputs, **example_kwargs)
    finally:
        for h in handles:
            h.remove()
    return bad


def _optimize_now(model: nn.Module, state: OptimizedState, example_inputs: tuple, example_kwargs: dict,
                  filter_fn: FilterFn | None) -> None:
    found: ModelMatch = match_model(model, example_inputs, example_kwargs)
    state.skipped = list(found.skipped)
    seen: set[str] = set()
    for graph, result in zip(found.captured.graphs, found.results):
        for site in result.sites:
            if site.module_path in seen:
                continue
            seen.add(site.module_path)
            module = model.get_submodule(site.module_path)
            if filter_fn is not None and not filter_fn(module, site.module_path):
                state.skipped.append(SkippedSite(site.module_path, "excluded by filter_fn"))
                continue
            reason = rewrite_reason(site) or _module_only_computes(site, module, graph.gm.graph)
            if module is model:
                reason = reason or "the site is the whole model (patching its forward would hide the model)"
            if reason:
                state.skipped.append(SkippedSite(site.module_path, reason))
                continue
            params = site_params(site, graph.value_of, model)
            readers = x_readers(result.sites)[site.x]
            state.patched.append(_patch(site.module_path, module, site, params, state.config, readers))
    for site in _check_calls(model, state.patched, example_inputs, example_kwargs):
        _unpatch(site)
        state.patched.remove(site)
        state.skipped.append(SkippedSite(site.path, "the planned forward disagreed with the original on the captured input"))
    _patch_flora_linears(model, state, filter_fn)
    log.info("runlora_fx.optimize: %d sites planned, %d left alone, %d plain linears ready for Flora", len(state.patched),
             len(state.skipped), len(state.flora))


def optimize(model: nn.Module, example_inputs: tuple | None = None, *, example_kwargs: dict | None = None,
             filter_fn: FilterFn | None = None, **options) -> nn.Module:
    """Plan every LoRA site of `model` in place and return `model`.

    example_inputs / example_kwargs: a call to capture on. If both are None, capture happens on the first real
        call (that call then runs the planned model).
    filter_fn(module, path): return False to leave a site (or a plain linear, see below) alone.
    Plain trainable `nn.Linear` layers outside LoRA sites are patched too: while a `FloraAccumulator` compresses
    their weight, a planned backward produces the compressed gradient directly (see docs/FLORA.md);
    `flora_linears(model)` lists them.
    options: see `OptimizeConfig` (objective, memory_budget, time_slack, strategy); unknown names raise.
    Calling it again with the same options is a no-op; with other options it re-plans.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize expects a torch.nn.Module, got {type(model).__name__}")
    if example_inputs is not None and not isinstance(example_inputs, (tuple, list)):
        raise TypeError("example_inputs must be a tuple of positional arguments (use example_kwargs for keywords)")
    config = OptimizeConfig.from_options(options)
    if "inner" in options:
        raise ValueError("option 'inner' applies to torch.compile(backend='runlora') only, not to optimize()")
    old: OptimizedState | None = getattr(model, _STATE, None)
    if old is not None:
        if old.config == config:
            return model
        restore(model)
    state = OptimizedState(config)
    setattr(model, _STATE, state)
    if example_inputs is None and example_kwargs is None:
        def first_call(module, args, kwargs):
            state.pending_hook.remove()
            state.pending_hook = None
            _optimize_now(module, state, tuple(args), dict(kwargs), filter_fn)
        state.pending_hook = model.register_forward_pre_hook(first_call, with_kwargs=True)
    else:
        _optimize_now(model, state, tuple(example_inputs or ()), dict(example_kwargs or {}), filter_fn)
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo `optimize`: every patched module gets its original forward back. A no-op on a plain model."""
    state: OptimizedState | None = getattr(model, _STATE, None)
    if state is None:
        return model
    if state.pending_hook is not None:
        state.pending_hook.remove()
    for site in state.patched + state.flora:
        _unpatch(site)
    delattr(model, _STATE)
    return model


@contextlib.contextmanager
def _original_forwards(model: nn.Module):
    """Temporarily give every patched module its original forward back."""
    patched = optimized_sites(model) + flora_linears(model)
    for site in patched:
        _unpatch(site)
    try:
        yield
    finally:
        for site in patched:
            site.module.forward = site.planned_forward


def optimized_sites(model: nn.Module) -> list[PatchedSite]:
    """The sites `optimize` patched on `model` (empty if none)."""
    state = getattr(model, _STATE, None)
    return list(state.patched) if state is not None else []


def flora_linears(model: nn.Module) -> list[PatchedFloraLinear]:
    """The plain linears `optimize` patched for Flora's compressed gradients (each has `.runner.last_plan`)."""
    state = getattr(model, _STATE, None)
    return list(state.flora) if state is not None else []


# ----------------------------------------------------------------------------------------------- explain


def explain(model: nn.Module, example_inputs: tuple = (), *, example_kwargs: dict | None = None, **options) -> Report:
    """A row per LoRA site (its plan against the stock program, for the N of the example call) and a row per
    layer left alone with the reason. Does not change the model."""
    config = OptimizeConfig.from_options({k: v for k, v in options.items() if k != "inner"})
    with _original_forwards(model):  # an optimized model is explained as what it optimizes
        found = match_model(model, tuple(example_inputs), dict(example_kwargs or {}))
    rows, skipped, seen = [], list(found.skipped), set()
    for graph, result in zip(found.captured.graphs, found.results):
        for site in result.sites:
            if site.module_path in seen:
                continue
            seen.add(site.module_path)
            reason = rewrite_reason(site)
            if reason:
                skipped.append(SkippedSite(site.module_path, reason))
                continue
            params = site_params(site, graph.value_of, model)
            runner = runner_for(site, config.search_options, x_readers(result.sites)[site.x])
            x = site.x.meta.get("example_value", site.x.meta.get("val"))
            adapters = [(a.lora_a, a.lora_b, a.lora_bias) for a in params.adapters]
            training = any(a.dropout_train for a in site.adapters)
            spec = runner.spec_for(x, params.weight, params.bias, adapters, training)
            rows.append(SiteRow(site.module_path, runner.plan_for(spec, params.weight.device)))
    return Report(rows, skipped, any_graph_break=not found.captured.fullgraph)
