"""`optimize(model)`, `restore(model)` and `explain(model, ...)`: the eager entry points.

`optimize` follows torchao's `quantize_` contract: it changes `model` in place and returns it; `restore` is its
exact inverse. It captures the model with dynamo (on example inputs, or on the first real call), matches the
LoRA sites (inside checkpointed regions too), and replaces the `forward` of each site's owning module by a
`PlannedForward`. Parameters are never replaced or copied, so state_dict, `save_pretrained`, optimizers and
ReLoRA merges see the same objects.

`decide` is the one rule for which matched site is planned: `optimize` applies it, `explain` prints it.

A `PlannedForward` is a plain object (the model pickles and deep-copies with it) that names the site's tensors by
their attribute path below the module and reads them at every call: a deep copy computes with its own
parameters, and a module whose parameters were swapped (FSDP2's unsharded parameters, a replaced weight) computes
with the ones it holds now. On every call it checks that the module is still in the state it was planned for
(adapters enabled, not merged, the same active adapters, scales and dropout p, the same dtypes and device, a
frozen base, a plain `forward(x)` call) and otherwise runs the original forward. A module is patched only when
its forward computes exactly the site (nothing else) and a check call on the captured input gives the original's
output.
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
from .kernels import autocast
from .kernels.dense import LoraLinearRunner
from .passes.capture import CapturedGraph
from .passes.match import ModelMatch, match_model, site_params
from .passes.eligibility import rewrite_reason, runner_for, x_readers
from .passes.site import AdapterParams, LoraParams, LoraSite, SkippedSite
from .report import Report, SiteRow

log = logging.getLogger(__name__)

_STATE = "_runlora_fx"
FilterFn = Callable[[nn.Module, str], bool]
Tensors = tuple  # (weight, bias, [(A, B, lora_bias), ...]) of one call


@dataclass(frozen=True)
class SiteNames:
    """Where a site's tensors live below its module: attribute paths ("base_layer.weight", "lora_A.default.weight")."""

    weight: str
    bias: str  # checked at every call, also when the site had no bias (one added later is not ignored)
    adapters: tuple[tuple[str, str, str], ...]  # (A, B, lora_bias) per adapter
    adapter_names: tuple[str, ...]
    scales: tuple[float, ...]
    weight_transposed: bool = False  # the weight is stored (i x o) (GPT-2 Conv1D): the node takes its (o x i) view


def _attr(module: nn.Module, path: str, optional: bool = False) -> Any:
    """The attribute at `path` below `module`; with `optional`, None when its last part is missing (a bias)."""
    *owners, last = path.split(".")
    obj: Any = module
    for part in owners:
        obj = getattr(obj, part)
    return getattr(obj, last, None) if optional else getattr(obj, last)


def _bias_path(weight_path: str) -> str:
    """Where the bias next to a weight lives ("base_layer.weight" -> "base_layer.bias")."""
    owner = weight_path.rpartition(".")[0]
    return f"{owner}.bias" if owner else "bias"


@dataclass
class PatchedSite:
    """One module whose forward was replaced, with what it was planned for."""

    path: str
    module: nn.Module
    names: SiteNames
    runner: LoraLinearRunner
    original_forward: Callable[..., Any] | None  # the instance attribute it had, if any (None: the class's)
    had_instance_forward: bool
    signature: tuple  # (class, dtype, device) per tensor slot (None for an absent bias) when planned
    peft_state: tuple | None  # (active adapters, scales) of a peft layer
    dropouts: tuple[tuple[str, float], ...]  # (path, p) of every dropout module inside the module
    planned_forward: PlannedForward | None = None  # what module.forward is while patched

    def __post_init__(self) -> None:
        n = self.names
        paths = (n.weight, n.bias, *(p for ad in n.adapters for p in ad))
        self.slots = tuple((tuple(p.split(".")[:-1]), p.rpartition(".")[2]) for p in paths)

    def flat(self) -> list | None:
        """The module's tensors now in `signature` order (weight, bias, then A, B, lora bias per adapter), read
        through the dicts nn.Module keeps them in (no `Module.__getattr__` calls: this runs at every call); a
        path that does not resolve that way is read by attribute; None when a tensor is gone."""
        module, flat = self.module, []
        for owners, last in self.slots:
            obj = module
            try:
                for part in owners:
                    obj = obj._modules[part]
                params = obj._parameters
                flat.append(params[last] if last in params else obj._buffers[last])
            except (KeyError, AttributeError):
                tensors = self._tensors_by_attribute()
                return None if tensors is None else _flatten(tensors)
        return flat

    def _tensors_by_attribute(self) -> Tensors | None:
        try:
            n = self.names
            return (_attr(self.module, n.weight), _attr(self.module, n.bias, optional=True),
                    [(_attr(self.module, a), _attr(self.module, b), _attr(self.module, lb, optional=True))
                     for a, b, lb in n.adapters])
        except AttributeError:
            return None

    def tensors(self) -> Tensors | None:
        """The module's tensors now; None when one of them is gone (an adapter deleted)."""
        flat = self.flat()
        return None if flat is None else _unflatten(flat)

    @property
    def params(self) -> LoraParams:
        """The site's tensors now (what ReLoRA merges into)."""
        tensors = self.tensors()
        if tensors is None:
            raise AttributeError(f"{self.path}: a tensor of the planned site is no longer an attribute of the module")
        weight, bias, adapters = tensors
        return LoraParams(self.path, weight, bias, [AdapterParams(name, a, b, scale, lb) for name, scale, (a, b, lb)
                                                    in zip(self.names.adapter_names, self.names.scales, adapters)],
                          self.module, weight_transposed=self.names.weight_transposed)

    def original(self) -> Callable[..., Any]:
        return self.original_forward or type(self.module).forward.__get__(self.module)

    def __getstate__(self) -> dict:
        # a copy or a pickle starts with an empty per-call plan cache (plans are re-derived on the first call)
        return {**self.__dict__, "runner": self.runner.with_adapters(self.runner.adapters)}


def _flatten(tensors: Tensors) -> list:
    weight, bias, adapters = tensors
    return [weight, bias] + [t for ad in adapters for t in ad]


def _unflatten(flat: list) -> Tensors:
    adapters = []
    for i in range(2, len(flat), 3):  # a plain loop: no comprehension frame on the per-call path
        adapters.append((flat[i], flat[i + 1], flat[i + 2]))
    return flat[0], flat[1], adapters


def _signature(tensors: Tensors) -> tuple:
    return tuple(None if t is None else (type(t), t.dtype, t.device) for t in _flatten(tensors))


class PlannedForward:
    """`module.forward` of a patched module: the planned runner on the module's live tensors when the call is
    one it was planned for, else the original forward."""

    __runlora_fx__ = True

    def __init__(self, site: PatchedSite) -> None:
        self.site = site

    def __call__(self, x, *args, **kwargs):
        site = self.site
        tensors = _planned_tensors(site, x, args, kwargs)
        if tensors is None:
            return site.original()(x, *args, **kwargs)
        weight, bias, adapters = tensors
        return autocast.call(site.runner, x, weight, bias, adapters, _training(site))


@dataclass
class OptimizedState:
    config: OptimizeConfig
    patched: list[PatchedSite] = field(default_factory=list)
    skipped: list[SkippedSite] = field(default_factory=list)
    pending_hook: _PlanOnFirstCall | None = None  # the forward pre-hook waiting for the first real call


# ----------------------------------------------------------------------------------------------- state checks


def _is_peft_layer(module: nn.Module) -> bool:
    return hasattr(module, "active_adapters") and hasattr(module, "lora_A") and hasattr(module, "merged")


def _peft_state(module: nn.Module) -> tuple | None:
    if not _is_peft_layer(module):
        return None
    active = tuple(a for a in module.active_adapters if a in module.lora_A)  # peft skips absent adapters too
    return active, tuple(float(module.scaling[a]) for a in active)


def _dropouts(module: nn.Module) -> tuple[tuple[str, float], ...]:
    return tuple((name, float(m.p)) for name, m in module.named_modules()
                 if isinstance(m, nn.modules.dropout._DropoutNd))


def _peft_state_is(module: nn.Module, state: tuple) -> bool:
    """`_peft_state(module) == state` without building it (this runs at every call)."""
    if module.disable_adapters or module.merged:
        return False
    active, scales = state
    lora_a, scaling, k = module._modules["lora_A"]._modules, module.scaling, 0
    for a in module.active_adapters:
        if a in lora_a:  # peft skips absent adapters too
            if k == len(active) or a != active[k] or float(scaling[a]) != scales[k]:
                return False
            k += 1
    return k == len(active)


def _planned_tensors(site: PatchedSite, x: Any, args: tuple, kwargs: dict) -> Tensors | None:
    """The tensors to run the planned runner on, or None when this call must run the original forward."""
    if args or kwargs or not isinstance(x, torch.Tensor):
        return None
    module = site.module
    if site.peft_state is not None and not _peft_state_is(module, site.peft_state):
        return None
    flat = site.flat()
    if flat is None:
        return None
    for t, sig in zip(flat, site.signature):  # the same classes, dtypes and device as when planned
        if t is None:
            if sig is not None:
                return None
        elif sig is None or type(t) is not sig[0] or t.dtype != sig[1] or t.device != sig[2]:
            return None
    weight = flat[0]
    if weight.requires_grad and torch.is_grad_enabled():  # the planned node keeps the base frozen
        return None
    for path, p in site.dropouts:
        dropout = module
        for part in path.split("."):
            dropout = dropout._modules.get(part)
            if dropout is None:
                return None
        live = getattr(dropout, "p", None)  # a dropout replaced by another module has none
        if live is None or float(live) != p:
            return None
    if x.device != weight.device or x.numel() == 0:
        return None
    if not x.is_contiguous() and not torch.empty_like(x, device="meta").is_contiguous() and _training(site) \
            and any(c.dropout > 0 for c in site.runner.adapters):
        return None  # dropout draws its mask in x's memory order there; the planned node draws it row-major
    if site.names.weight_transposed:
        flat[0] = weight.t()
    if not autocast.accepts(site.runner, x, flat, module):
        return None
    return _unflatten(flat)


def _training(site: PatchedSite) -> bool:
    """Dropout follows the dropout modules' mode (peft), else the owning module's."""
    module = site.module
    if site.peft_state is not None:
        dropouts = module._modules["lora_dropout"]._modules
        for a in site.peft_state[0]:
            if dropouts[a].training:
                return True
        return False
    return module.training


# ----------------------------------------------------------------------------------------------- the decision


@dataclass
class SiteDecision:
    """One matched site and what `optimize` does with it: planned when `reason` is None, else left alone."""

    path: str
    site: LoraSite
    graph: CapturedGraph  # the graph (or checkpointed subgraph) it was matched in
    readers: int  # sites of that graph reading the same x
    params: LoraParams  # its tensors at capture time
    names: SiteNames | None  # where they live below the module (None: not all of them do)
    reason: str | None


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


def _site_names(module: nn.Module, params: LoraParams) -> SiteNames | None:
    """The attribute paths of the site's tensors below `module`, or None when one is not its parameter/buffer."""
    names: dict[int, str] = {}
    for name, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), name)

    def name(t: torch.Tensor | None) -> str | None:
        return None if t is None else names.get(id(t), "")

    weight = name(params.weight)
    adapters = [(name(a.lora_a), name(a.lora_b), name(a.lora_bias)) for a in params.adapters]
    bias = name(params.bias)
    if "" in (weight, bias, *(n for ad in adapters for n in ad)):
        return None
    adapters = [(a, b, lb or _bias_path(b)) for a, b, lb in adapters]
    return SiteNames(weight, bias or _bias_path(weight), tuple(adapters), tuple(a.name for a in params.adapters),
                     tuple(float(a.scale) for a in params.adapters), params.weight_transposed)


def _reason(model: nn.Module, module: nn.Module, site: LoraSite, graph: CapturedGraph, names: SiteNames | None,
            filter_fn: FilterFn | None) -> str | None:
    if filter_fn is not None and not filter_fn(module, site.module_path):
        return "excluded by filter_fn"
    reason = rewrite_reason(site) or _module_only_computes(site, module, graph.gm.graph)
    if reason:
        return reason
    if module is model:
        return "the site is the whole model (patching its forward would hide the model)"
    if names is None:
        return "a tensor of the site is not a parameter or buffer of its module"
    return None


def decide(model: nn.Module, found: ModelMatch, filter_fn: FilterFn | None = None) -> list[SiteDecision]:
    """For every matched site (once per module, first graph first): planned, or left alone and why."""
    decisions, seen = [], set()
    for graph, result in zip(found.graphs, found.results):
        readers = x_readers(result.sites)
        for site in result.sites:
            if site.module_path in seen:
                continue
            seen.add(site.module_path)
            params = site_params(site, graph.value_of, model)
            module = params.module
            if module is None:
                decisions.append(SiteDecision(site.module_path, site, graph, readers[site.x], params, None,
                                              "its module path does not resolve in the model"))
                continue
            names = _site_names(module, params)
            reason = _reason(model, module, site, graph, names, filter_fn)
            decisions.append(SiteDecision(site.module_path, site, graph, readers[site.x], params, names, reason))
    return decisions


def _skipped(found: ModelMatch, decisions: list[SiteDecision]) -> list[SkippedSite]:
    """The layers left alone: the matcher's, then the decision's (without their graph nodes: state stays small
    and picklable)."""
    return [SkippedSite(s.module_path, s.reason) for s in found.skipped] + \
        [SkippedSite(d.path, d.reason) for d in decisions if d.reason]


# ----------------------------------------------------------------------------------------------- patching


def _patch(module: nn.Module, decision: SiteDecision, config: OptimizeConfig) -> PatchedSite:
    site, params = decision.site, decision.params
    runner = runner_for(site, config.search_options, decision.readers)
    # the runner's dropout p must not depend on the mode the model was captured in
    runner = runner.with_adapters(
        tuple(type(c)(c.scale, float(a.dropout_p), c.lora_bias) for c, a in zip(runner.adapters, site.adapters)))
    tensors = (params.weight, params.bias, [(a.lora_a, a.lora_b, a.lora_bias) for a in params.adapters])
    patched = PatchedSite(decision.path, module, decision.names, runner, module.__dict__.get("forward"),
                          "forward" in module.__dict__, _signature(tensors), _peft_state(module), _dropouts(module))
    patched.planned_forward = module.forward = PlannedForward(patched)
    return patched


def _unpatch(site: PatchedSite) -> None:
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
            with torch.random.fork_rng(devices=[]):
                ref = site.original()(*args)
            with torch.random.fork_rng(devices=[]):
                ours = module.forward(*args)
            tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(ref.dtype, 3e-2)
            if ours.shape != ref.shape or not torch.allclose(ours.float(), ref.float(), rtol=tol, atol=tol * max(1.0, ref.abs().max().item())):
                bad.append(site)
            return None
        handles.append(site.module.register_forward_hook(hook, with_kwargs=True))
    # fast dropout masks are another stream than the original's: check those sites with dropout off
    modes = {m: m.training for m in model.modules()} if _fast_masks(patched) else {}
    try:
        if modes:
            model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(*example_inputs, **example_kwargs)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return bad


def _fast_masks(patched: list[PatchedSite]) -> bool:
    return any(site.runner.options.dropout_rng == "fast" for site in patched)


def _optimize_now(model: nn.Module, state: OptimizedState, example_inputs: tuple, example_kwargs: dict,
                  filter_fn: FilterFn | None) -> None:
    found: ModelMatch = match_model(model, example_inputs, example_kwargs)
    decisions = decide(model, found, filter_fn)
    state.skipped = _skipped(found, decisions)
    for decision in decisions:
        if decision.reason is None:
            state.patched.append(_patch(decision.params.module, decision, state.config))
    for site in _check_calls(model, state.patched, example_inputs, example_kwargs):
        _unpatch(site)
        state.patched.remove(site)
        state.skipped.append(SkippedSite(site.path, "the planned forward disagreed with the original on the captured input"))
    log.info("runlora_fx.optimize: %d sites planned, %d left alone", len(state.patched), len(state.skipped))


class _PlanOnFirstCall:
    """The forward pre-hook that optimizes on the first real call. An object holding no state of its own (the
    model's `_runlora_fx` state is read at the call), so a pickled or deep-copied model plans its own copy."""

    def __init__(self, filter_fn: FilterFn | None) -> None:
        self.filter_fn = filter_fn

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        state: OptimizedState = getattr(module, _STATE)
        _remove_pre_hook(module, self)
        state.pending_hook = None
        _optimize_now(module, state, tuple(args), dict(kwargs), self.filter_fn)


def _remove_pre_hook(module: nn.Module, hook: Any) -> None:
    """Remove `hook` from the module's forward pre-hooks by identity (a handle would not survive a copy)."""
    for key, value in list(module._forward_pre_hooks.items()):
        if value is hook:
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)


def _check_example_args(example_inputs: Any, example_kwargs: Any) -> None:
    if isinstance(example_inputs, dict):
        raise TypeError("example_inputs is a dict: pass keyword arguments as example_kwargs={...}")
    if example_inputs is not None and not isinstance(example_inputs, (tuple, list)):
        raise TypeError("example_inputs must be a tuple of positional arguments (use example_kwargs for keywords)")
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise TypeError(f"example_kwargs must be a dict of keyword arguments, got {type(example_kwargs).__name__}")


def _config(config: OptimizeConfig | None, options: dict) -> OptimizeConfig:
    """The validated config: `config`, or one built from the flat options (sugar for the same thing)."""
    if config is None:
        return OptimizeConfig.from_options(options)
    if not isinstance(config, OptimizeConfig):
        raise TypeError(f"config must be an OptimizeConfig, got {type(config).__name__}")
    if options:
        raise ValueError(f"give either config or options, not both (got config and {', '.join(sorted(options))})")
    return config


def optimize(model: nn.Module, example_inputs: tuple | OptimizeConfig | None = None, *,
             config: OptimizeConfig | None = None, filter_fn: FilterFn | None = None,
             example_kwargs: dict | None = None, **options) -> nn.Module:
    """Plan every LoRA site of `model` in place and return `model`.

    example_inputs / example_kwargs: a call to capture on. If both are None, capture happens on the first real
        call (that call then runs the planned model).
    config: an `OptimizeConfig` (torchao `quantize_` style: `optimize(model, config)` works too); `options`
        (objective, memory_budget, time_slack, strategy) are sugar for one. Unknown names raise.
    filter_fn(module, path): return False to leave a site alone.
    Calling it again with the same config is a no-op; with another it re-plans.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, OptimizeConfig):
        if config is not None:
            raise TypeError("config given twice (positionally and as config=)")
        example_inputs, config = None, example_inputs
    _check_example_args(example_inputs, example_kwargs)
    if "inner" in options:
        raise ValueError("option 'inner' applies to torch.compile(backend='runlora') only, not to optimize()")
    config = _config(config, options)
    old: OptimizedState | None = getattr(model, _STATE, None)
    if old is not None:
        if old.config == config:
            return model
        restore(model)
    state = OptimizedState(config)
    setattr(model, _STATE, state)
    if example_inputs is None and example_kwargs is None:
        state.pending_hook = _PlanOnFirstCall(filter_fn)
        model.register_forward_pre_hook(state.pending_hook, with_kwargs=True)
    else:
        _optimize_now(model, state, tuple(example_inputs or ()), dict(example_kwargs or {}), filter_fn)
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo `optimize`: every patched module gets its original forward back. A no-op on a plain model."""
    state: OptimizedState | None = getattr(model, _STATE, None)
    if state is None:
        return model
    if state.pending_hook is not None:
        _remove_pre_hook(model, state.pending_hook)
    for site in state.patched:
        _unpatch(site)
    delattr(model, _STATE)
    return model


@contextlib.contextmanager
def _original_forwards(model: nn.Module):
    """Temporarily give every patched module its original forward back."""
    patched = optimized_sites(model)
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


# ----------------------------------------------------------------------------------------------- explain


def explain(model: nn.Module, example_inputs: tuple = (), *, example_kwargs: dict | None = None,
            config: OptimizeConfig | None = None, filter_fn: FilterFn | None = None, **options) -> Report:
    """What `optimize` would do, without doing it: a row per site it plans (its plan against the stock program,
    for the N of the example call) and a row per layer it leaves alone with the reason (`decide`, the same rule
    optimize applies). Does not change the model. Takes optimize's arguments; `inner` is accepted and ignored."""
    _check_example_args(example_inputs, example_kwargs)
    config = _config(config, {k: v for k, v in options.items() if k != "inner"})
    with _original_forwards(model):  # an optimized model is explained as what it optimizes
        found = match_model(model, tuple(example_inputs), dict(example_kwargs or {}))
    decisions = decide(model, found, filter_fn)
    rows = [SiteRow(d.path, _plan(d, config)) for d in decisions if d.reason is None]
    return Report(rows, _skipped(found, decisions), any_graph_break=not found.captured.fullgraph)


def _plan(decision: SiteDecision, config: OptimizeConfig):
    """The plan the site's runner chooses for the captured call."""
    site, params = decision.site, decision.params
    runner = runner_for(site, config.search_options, decision.readers)
    x = site.x.meta.get("example_value", site.x.meta.get("val"))
    adapters = [(a.lora_a, a.lora_b, a.lora_bias) for a in params.adapters]
    training = any(a.dropout_train for a in site.adapters)
    spec = runner.spec_for(x, params.weight, params.bias, adapters, training)
    return runner.plan_for(spec, params.weight.device)
