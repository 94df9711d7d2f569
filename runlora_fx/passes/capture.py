"""Capture a model's forward as dynamo FX graphs, with the real tensors behind every placeholder.

Why dynamo and not `torch.fx.symbolic_trace`: peft's LoRA layers branch on Python state in their forward
(active adapters, merged, disabled), which symbolic tracing cannot follow; dynamo evaluates that Python and
records only the tensor ops, so a whole peft LLaMA arrives as one graph. Parameters are lifted to placeholders
(`inline_inbuilt_nn_modules`), and the backend receives their real objects, in placeholder order, as
`example_inputs`: that list is what lets the matcher report `requires_grad` and lets `find_lora_params` hand
back the very `nn.Parameter` objects of a site.

Capture runs the model once, for real, through a recording backend: first with `fullgraph=True`; if dynamo
cannot trace the whole forward, again with graph breaks allowed, and then every graph it produced is returned
(`Captured.fullgraph` tells which happened and `fullgraph_error` why). What is compiled is a small function that
calls the model and detaches its outputs, with dynamo told to skip logging calls: neither changes a node the
matcher reads, and together they keep whole graphs where a user's setup would break them for nothing (HF's
gradient checkpointing makes the embedding output `requires_grad_()` through a hook, which dynamo refuses to
return from a graph, and warns through `logger.warning_once`). A graph break there would cost more than a graph:
a checkpointed layer whose region is not traced whole runs under `torch._disable_dynamo` and is not seen at all.

Checkpointed regions (`torch.utils.checkpoint`, HF's gradient checkpointing) reach dynamo's graph as a
higher-order op applied to a subgraph; `Captured.all_graphs()` lists those subgraphs too, each with the real
values of the placeholders its operands come from.

What capture leaves behind (the hygiene contract):

* The model is not compiled afterwards: only the calling function is compiled, and an already compiled
  `OptimizedModule` is unwrapped to its original module first.
* Dynamo's per-code caches: the recording compile runs as its own isolated compile region
  (`isolate_recompiles=True` where torch has it), so it never counts against the user's recompile limits and no
  other `torch.compile` call looks its entries up. Afterwards every code object that had no compiled entry
  before the capture (all of them, for a model nobody compiled yet) is reset with `reset_code`; a code object
  that the user had already compiled keeps the user's entries and also keeps our isolated, never-used entry
  (resetting it would throw away the user's work). Dynamo's automatic-dynamic-shape memory (`pgo` code state)
  is restored to what it was, so the shapes seen by the capture do not make a later compile dynamic.
  Nothing global is reset: `torch._dynamo.reset()` would also drop compiled code that is not ours.
* The RNG: the forward runs inside `torch.random.fork_rng` (CPU and the devices of the model's tensors), so the
  dropout masks drawn by the capture do not shift the user's random stream. Set `preserve_rng=False` to let it.
* Buffers that the forward mutates in place (BatchNorm running stats, a kv cache object) do change, exactly as
  after one eager call. LoRA language models in train mode have none.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import types
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_map_only

log = logging.getLogger(__name__)

__all__ = ["Captured", "CapturedGraph", "capture", "placeholder_value"]


@dataclass
class CapturedGraph:
    """One dynamo graph and the real values of its placeholders, in placeholder order."""

    gm: fx.GraphModule
    example_inputs: list[Any]
    _index: dict[fx.Node, int] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def placeholders(self) -> list[fx.Node]:
        return [n for n in self.gm.graph.nodes if n.op == "placeholder"]

    def value_of(self, node: fx.Node) -> Any:
        """The real object behind `node`: a placeholder's example input, or a `get_attr` target of the graph."""
        if self._index is None:
            self._index = {n: i for i, n in enumerate(self.placeholders)}
        return _value_of(self.gm, self.example_inputs, node, self._index)

    def subgraphs(self) -> list[CapturedGraph]:
        """The subgraphs that this graph's higher-order ops apply to their operands (checkpointed regions,
        `wrap`), nested ones included. A subgraph's placeholders are the op's operands in order; each gets the
        operand's real value when the operand is a placeholder or attribute here, else None (computed here)."""
        found: list[CapturedGraph] = []
        for node in self.gm.graph.nodes:
            if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator):
                continue
            body = node.args[0] if node.args else None
            if not isinstance(body, fx.Node) or body.op != "get_attr":
                continue
            gm, operands = self.value_of(body), node.args[1:]
            if not isinstance(gm, fx.GraphModule) or \
                    sum(n.op == "placeholder" for n in gm.graph.nodes) != len(operands):
                continue
            sub = _with_weight_views(self, gm, operands)
            found += [sub, *sub.subgraphs()]
        return found

    def _operand_value(self, operand: Any) -> Any:
        if isinstance(operand, fx.Node):
            return self.value_of(operand) if operand.op in ("placeholder", "get_attr") else None
        return operand


def _is_view_of_input(node: Any) -> bool:
    """`W.T`, `W.t()`, `W.transpose(...)`, `W.permute(...)` of a placeholder or attribute, with constant args."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node) or \
            node.args[0].op not in ("placeholder", "get_attr") or node.kwargs:
        return False
    if node.op == "call_function" and node.target is getattr:
        return node.args[1:] in (("T",), ("mT",))
    if node.op == "call_method":
        return node.target in ("t", "transpose", "permute") and not any(isinstance(a, fx.Node) for a in node.args[1:])
    return node.op == "call_function" and node.target in (torch.t, torch.transpose, torch.permute) and \
        not any(isinstance(a, fx.Node) for a in node.args[1:])


def _with_weight_views(outer: CapturedGraph, body: fx.GraphModule, operands: tuple) -> CapturedGraph:
    """The subgraph with its placeholders' real values. Dynamo hoists a parameter's transpose (`W.T`) out of a
    checkpointed region and passes the view in; on a copy of the body, such a placeholder becomes a placeholder
    for the parameter itself plus the view inside, so the matcher sees `x @ W.T` of a real weight as it would
    without the checkpoint. The copy is for matching: the outer graph still passes the view."""
    if not any(_is_view_of_input(a) for a in operands):
        return CapturedGraph(body, [outer._operand_value(a) for a in operands])
    body = copy.deepcopy(body)
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    values, views = [], []
    for ph, operand in zip(placeholders, operands):
        if not _is_view_of_input(operand):
            values.append(outer._operand_value(operand))
            continue
        src = operand.args[0]
        with body.graph.inserting_before(ph):
            base = body.graph.placeholder(f"{ph.name}_base")
        base.meta.update(src.meta)
        values.append(outer.value_of(src))
        views.append((ph, base, operand))
    anchor = [n for n in body.graph.nodes if n.op == "placeholder"][-1]
    for ph, base, operand in views:
        with body.graph.inserting_after(anchor):
            view = body.graph.create_node(operand.op, operand.target, (base, *operand.args[1:]), {})
        view.meta.update(ph.meta)
        ph.replace_all_uses_with(view)
        body.graph.erase_node(ph)
        anchor = view
    body.recompile()
    return CapturedGraph(body, values)


@dataclass
class Captured:
    """What `capture` recorded: one graph when dynamo traced the whole forward, several after graph breaks."""

    graphs: list[CapturedGraph]
    fullgraph: bool  # True when the forward was traced as one graph (fullgraph=True succeeded)
    fullgraph_error: str | None = None  # why fullgraph=True failed (the first graph break), when it did
    outputs: Any = None  # the forward's outputs, only with capture(..., keep_outputs=True)

    def __iter__(self) -> Iterator[CapturedGraph]:
        return iter(self.graphs)

    def __len__(self) -> int:
        return len(self.graphs)

    def all_graphs(self) -> list[CapturedGraph]:
        """Every captured graph followed by its subgraphs (`CapturedGraph.subgraphs`)."""
        return [h for g in self.graphs for h in (g, *g.subgraphs())]

    def graph_of(self, node: fx.Node) -> CapturedGraph:
        """The captured graph (or subgraph) that owns `node`."""
        for g in self.all_graphs():
            if node.graph is g.gm.graph:
                return g
        raise ValueError(f"node {node.name!r} belongs to none of the {len(self.graphs)} captured graphs")

    def value_of(self, node: fx.Node) -> Any:
        """The real tensor (or other object) behind a placeholder or get_attr node of any captured graph."""
        return self.graph_of(node).value_of(node)


def placeholder_value(gm: fx.GraphModule, example_inputs: list[Any] | tuple[Any, ...], node: fx.Node) -> Any:
    """The real object behind `node` in a graph a backend received as `(gm, example_inputs)`.

    Placeholders map to `example_inputs` by position (dynamo passes them in placeholder order); a `get_attr`
    node maps to the attribute of `gm` it names. Anything else has no single real value: ValueError.
    """
    if node.graph is not gm.graph:
        raise ValueError(f"node {node.name!r} is not a node of this graph")
    index = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    return _value_of(gm, list(example_inputs), node, index)


def _value_of(gm: fx.GraphModule, example_inputs: list[Any], node: fx.Node, index: dict[fx.Node, int]) -> Any:
    if node.op == "placeholder":
        i = index[node]
        if i >= len(example_inputs):
            raise ValueError(f"placeholder {node.name!r} is input {i} but only {len(example_inputs)} example "
                             "inputs were given")
        return example_inputs[i]
    if node.op == "get_attr":
        obj: Any = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        return obj
    raise ValueError(f"node {node.name!r} ({node.op}) is computed by the graph; only placeholder and get_attr "
                     "nodes have a real value")


def capture(model: nn.Module, example_inputs: tuple[Any, ...] | list[Any] = (),
            example_kwargs: dict[str, Any] | None = None, *, allow_graph_breaks: bool = True,
            preserve_rng: bool = True, keep_outputs: bool = False) -> Captured:
    """Run `model(*example_inputs, **example_kwargs)` once under dynamo and return the FX graphs it traced.

    Tries `fullgraph=True` first; with `allow_graph_breaks` (default) a forward that dynamo cannot trace whole is
    captured again with graph breaks and all resulting graphs are returned. Shapes are static (`dynamic=False`):
    the graphs describe these example inputs. See the module docstring for what is (not) left behind.
    """
    model = _check_args(model, example_inputs, example_kwargs)
    kwargs = dict(example_kwargs or {})
    first_error: str | None = None
    for fullgraph in (True, False):
        recorded: list[CapturedGraph] = []
        try:
            outputs = _run_recorded(model, tuple(example_inputs), kwargs, fullgraph, recorded, preserve_rng)
        except Exception as err:  # noqa: BLE001 - any failure of the fullgraph attempt means: retry with breaks
            if not fullgraph or not allow_graph_breaks:
                raise
            first_error = f"{type(err).__name__}: {err}".strip()
            log.debug("runlora_fx.capture: fullgraph=True failed, retrying with graph breaks: %s", first_error)
            continue
        log.debug("runlora_fx.capture: %d graph(s), fullgraph=%s", len(recorded), fullgraph)
        return Captured(recorded, fullgraph, first_error, outputs if keep_outputs else None)
    raise AssertionError("unreachable")  # pragma: no cover


def _check_args(model: Any, example_inputs: Any, example_kwargs: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor) or not isinstance(example_inputs, (tuple, list)):
        raise TypeError("example_inputs: expected a tuple or list of positional arguments, got "
                        f"{type(example_inputs).__name__}" + (" (wrap a single tensor as (x,))"
                                                              if isinstance(example_inputs, torch.Tensor) else ""))
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise TypeError(f"example_kwargs: expected a dict or None, got {type(example_kwargs).__name__}")
    if not example_inputs and not example_kwargs:
        raise ValueError("example_inputs/example_kwargs: give the inputs of one forward call to capture")
    orig = getattr(model, "_orig_mod", None)  # an OptimizedModule: capture what it wraps
    return orig if isinstance(orig, nn.Module) else model


def _run_recorded(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], fullgraph: bool,
                  recorded: list[CapturedGraph], preserve_rng: bool) -> Any:
    def record(gm: fx.GraphModule, example_inputs: list[Any]) -> Any:
        _drop_output_detaches(gm)
        recorded.append(CapturedGraph(gm, list(example_inputs)))
        return gm.forward

    compile_kwargs: dict[str, Any] = {"backend": record, "fullgraph": fullgraph, "dynamic": False}
    if "isolate_recompiles" in inspect.signature(torch.compile).parameters:
        compile_kwargs["isolate_recompiles"] = True
    no_logging = torch._dynamo.config.patch(ignore_logging_functions=_logger_methods()) \
        if hasattr(torch._dynamo.config, "ignore_logging_functions") else contextlib.nullcontext()
    with _dynamo_sandbox(), _rng_guard(model, args, kwargs, preserve_rng), no_logging:
        return torch.compile(_call_detached, **compile_kwargs)(model, args, kwargs)


def _call_detached(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The model's outputs, detached: a graph may then end in a tensor that a hook made `requires_grad_()`."""
    return tree_map_only(torch.Tensor, torch.Tensor.detach, model(*args, **kwargs))


def _drop_output_detaches(gm: fx.GraphModule) -> None:
    """Take `_call_detached`'s detach nodes out of the graph again: the graph then ends where the model does."""
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    detaches = [n for n in output.all_input_nodes if n.op == "call_method" and n.target == "detach"
                or n.op == "call_function" and n.target is torch.Tensor.detach]
    for node in detaches:
        node.replace_all_uses_with(node.args[0])
        if not node.users:
            gm.graph.erase_node(node)
    if detaches:
        gm.recompile()


def _logger_methods() -> set[Any]:
    """`logging.Logger`'s emitting methods, with those libraries add to it (transformers' `warning_once`)."""
    names = ("debug", "info", "warning", "warn", "error", "exception", "critical", "log", "warning_once",
             "warning_advice", "info_once")
    return {getattr(logging.Logger, n) for n in names if hasattr(logging.Logger, n)}


# ----------------------------------------------------------------------------------------------- hygiene


def _seen_codes() -> list[types.CodeType]:
    from torch._dynamo import convert_frame

    codes = []
    for tracker in (convert_frame.input_codes, convert_frame.output_codes):
        for ref in list(tracker.seen):
            code = ref()
            if code is not None:
                codes.append(code)
    return codes


def _entry_count(code: types.CodeType) -> int:
    from torch._dynamo import eval_frame

    count = getattr(eval_frame, "_get_total_cache_entry_count", None)
    if count is not None:
        return int(count(code))
    return len(eval_frame._debug_get_cache_entry_list(code))


@contextlib.contextmanager
def _dynamo_sandbox() -> Iterator[None]:
    """Undo what one recording compile leaves in dynamo's per-code caches and shape memory (module docstring)."""
    from torch._dynamo.eval_frame import reset_code

    had_entries = {id(code): weakref.ref(code) for code in _seen_codes() if _entry_count(code) > 0}
    pgo = _pgo_module()
    saved_state = copy.deepcopy(getattr(pgo, "_CODE_STATE", None)) if pgo is not None else None
    try:
        yield
    finally:
        for code in _seen_codes():
            ref = had_entries.get(id(code))
            if ref is None or ref() is not code:
                reset_code(code)
        if pgo is not None and hasattr(pgo, "_CODE_STATE"):
            pgo._CODE_STATE = saved_state


def _pgo_module() -> Any:
    try:
        from torch._dynamo import pgo
    except ImportError:  # older torch: no automatic-dynamic memory to restore
        return None
    return pgo


@contextlib.contextmanager
def _rng_guard(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    devices = {t.device for t in _tensors(model, args, kwargs) if t.device.type not in ("cpu", "meta")}
    accel = sorted({d.index or 0 for d in devices if d.type == "cuda"})
    with torch.random.fork_rng(devices=accel, enabled=True):
        yield


def _tensors(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[torch.Tensor]:
    yield from model.parameters()
    yield from model.buffers()
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value
