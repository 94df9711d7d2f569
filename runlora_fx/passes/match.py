"""Find LoRA layers in dynamo FX graphs by their structure, and say why a LoRA-looking layer was left alone.

Why structural: peft, torchtune, loralib and hand-written layers compute the same thing with different nodes
(`linear` vs `x @ W.T`, a dropout or not, fp32 casts or not, the scale left or right of the product, `+` or
`+=`, one adapter or several). One rigid pattern per variant would multiply with every optional node. Instead
the matcher starts at every linear-like node (the base), follows its users to an `add`, and walks the other
operand *backwards* through a short list of recognised steps:

    add ◀─ [cast] ◀─ [scale]* ◀─ linear(·, B, lora_bias?) ◀─ [scale]* ◀─ linear(·, A)
        ◀─ [scale | cast | dropout]* ◀─ x

where `x` must be the base's own input. Every step is a small recogniser below; `linear` is any of
`F.linear(h, W, b)` or `h @ T` with `T` a transpose of a 2-D weight (`.T`, `.mT`, `.t()`, `transpose`,
`permute(1, 0)`), `scale` is a multiplication or division by a Python number, `cast` a dtype-only `.to()`.
Several adapters chain their adds; one dtype cast may close the site (peft's `result.to(result_dtype)`).

A match attempt returns a `LoraSite` or a falsy `FailedMatch` (like inductor's pattern matcher) whose message is
built only when asked: that message is what `explain()` prints for a skipped layer. A failure is *reported*
(becomes a `SkippedSite`) only when the evidence says "this is a LoRA layer": a rank-r product (`B` of shape
(o, r) with r < min(i, o)) was found on the other side of the add. Plain linears, residual adds and MLPs fail
silently. Rank-r products that no site consumed (DoRA's graph pieces, an adapter that is not added to its base)
are reported too. With a `model`, peft layers whose adapter is a LoRA *variant* (DoRA, KaSA, MiCA, ...: any
entry of `LoraLayer.lora_variant`) are reported instead of matched, whatever their graph looks like: their
forward is variant code that `optimize()` must not replace.
"""
from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from runlora_fx.passes.capture import Captured, CapturedGraph, capture
from runlora_fx.passes.quant import Linear4bitCall, linear4bit, unsupported_base_reason
from runlora_fx.passes.site import AdapterParams, AdapterSite, LoraParams, LoraSite, SkippedSite

__all__ = ["FailedMatch", "MatchResult", "ModelMatch", "find_lora_params", "match_model", "match_site",
           "match_sites", "normalise_source", "site_params"]


# ----------------------------------------------------------------------------------------------- results


class FailedMatch:
    """A falsy match result. The message is formatted only when `str()` is called; node arguments are shown
    as `name (op)`. `report` says whether the attempt had found enough of a LoRA layer to tell the user."""

    __slots__ = ("format_string", "args", "report", "nodes")

    def __init__(self, format_string: str, *args: Any, report: bool = False,
                 nodes: Iterable[fx.Node] = ()) -> None:
        self.format_string = format_string
        self.args = args
        self.report = report
        self.nodes = list(nodes)

    def __bool__(self) -> bool:
        return False

    def __str__(self) -> str:
        return self.format_string.format(*(_describe(a) if isinstance(a, fx.Node) else a for a in self.args))

    def __repr__(self) -> str:
        return f"FailedMatch({str(self)!r}, report={self.report})"

    def reported(self, nodes: Iterable[fx.Node] = ()) -> FailedMatch:
        """The same failure, marked as worth reporting, remembering the nodes it looked at."""
        self.report = True
        self.nodes.extend(nodes)
        return self


@dataclass
class MatchResult:
    """The sites found in one graph and the LoRA-looking layers left alone (with their reasons)."""

    sites: list[LoraSite] = field(default_factory=list)
    skipped: list[SkippedSite] = field(default_factory=list)
    gm: fx.GraphModule | None = None


@dataclass
class ModelMatch:
    """`match_model`'s answer: what was captured and, per graph (`captured.all_graphs()`: the captured graphs and
    the subgraphs of their checkpointed regions), what was matched; `graphs[i]` is the graph of `results[i]`."""

    captured: Captured
    results: list[MatchResult]
    graphs: list[CapturedGraph] = field(default_factory=list)

    @property
    def sites(self) -> list[LoraSite]:
        return [s for r in self.results for s in r.sites]

    @property
    def skipped(self) -> list[SkippedSite]:
        """Skipped layers of all graphs; one row per (module, reason) (a layer split by graph breaks shows up
        in several graphs)."""
        rows: dict[tuple[str, str], SkippedSite] = {}
        for r in self.results:
            for s in r.skipped:
                rows.setdefault((s.module_path, s.reason), s)
        return list(rows.values())


# ----------------------------------------------------------------------------------------------- node helpers


def _describe(node: fx.Node) -> str:
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", repr(target))
    return f"{node.name} ({node.op} {name})" if node.op not in ("placeholder", "get_attr") else node.name


def _meta_value(node: Any) -> Any:
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value")
    return node.meta.get("val") if value is None else value


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    value = _meta_value(node)
    if isinstance(value, torch.Tensor):
        # int() of a SymInt would add a guard and specialize a dynamic graph: symbolic sizes are just unknown
        return tuple(value.shape) if all(type(d) is int for d in value.shape) else None
    return None


def _dims(node: fx.Node) -> tuple | None:
    """The shape of `node`'s value with each symbolic size as its expanded sympy expression: sizes compared
    structurally, so a dynamic graph is neither guarded nor specialised."""
    value = _meta_value(node)
    if not isinstance(value, torch.Tensor):
        return None
    return tuple(d if type(d) is int else sympy.expand(d.node.expr) for d in value.shape)


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument `index`/`name` of a call (positional, else keyword, else `default`); index counts `self`."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_call(node: Any, functions: tuple[Callable[..., Any], ...] = (), methods: tuple[str, ...] = ()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return any(node.target is f for f in functions)
    return node.op == "call_method" and node.target in methods


# ----------------------------------------------------------------------------------------------- recognisers


@dataclass
class _Linear:
    """A linear-like node normalised to y = input @ weight^T + bias."""

    node: fx.Node
    input: fx.Node
    weight: fx.Node | None  # the (o x i) weight node; None when the right operand is not a transposed weight
    bias: fx.Node | None
    view: fx.Node | None = None  # the transpose node of a matmul form (weight.T, ...)
    raw: fx.Node | None = None  # the right operand when it is not a transpose: x @ M
    quant: Linear4bitCall | None = None  # a bitsandbytes 4-bit base (then `node` is the end of its call)
    weight_transposed: bool = False  # `weight` is stored (i x o): a GPT-2 Conv1D base, addmm(b, x, W)
    extra: tuple[fx.Node, ...] = ()  # further nodes of the base call (Conv1D's flattening view and addmm)


_LINEAR_FUNCS = (F.linear, torch._C._nn.linear)
_MATMUL_FUNCS = (operator.matmul, torch.matmul, torch.mm)
_MATMUL_METHODS = ("matmul", "mm", "__matmul__")


def _linear(node: Any) -> _Linear | None:
    """`linear(x, W, b)` or `x @ W.T` (any transpose spelling), else None."""
    if _is_call(node, _LINEAR_FUNCS):
        x, weight, bias = _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
        if isinstance(x, fx.Node) and isinstance(weight, fx.Node) and (bias is None or isinstance(bias, fx.Node)):
            return _Linear(node, x, weight, bias)
        return None
    if _is_call(node, _MATMUL_FUNCS, _MATMUL_METHODS):
        x, rhs = _arg(node, 0, "input"), _arg(node, 1, "other")
        if not isinstance(x, fx.Node) or not isinstance(rhs, fx.Node):
            return None
        weight = _transposed(rhs)
        if weight is not None:
            return _Linear(node, x, weight, None, view=rhs)
        if len(_shape(rhs) or ()) == 2:
            return _Linear(node, x, None, None, raw=rhs)
    return None


def _base_linear(node: Any) -> _Linear | None:
    """A linear that can be a site's base: any `_linear`, a GPT-2 `Conv1D` call, or a bitsandbytes 4-bit call
    (passes.quant); the last two are never an adapter's A or B."""
    found = _linear(node)
    if found is not None:
        return found
    found = _conv1d(node)
    if found is not None:
        return found
    q = linear4bit(node)
    return None if q is None else _Linear(q.output, q.input, q.weight, q.bias, quant=q)


_VIEW_METHODS = ("view", "reshape")


def _conv1d(node: Any) -> _Linear | None:
    """transformers' `Conv1D` (GPT-2; peft's `fan_in_fan_out=True` layers): `addmm(b, x.view(-1, i), W)` with W
    stored (i x o), viewed back to x's leading dims. Normalised to `linear(x, W^T, b)`, the result being the
    outer view."""
    if not _is_call(node, (torch.addmm,)) or len(node.args) != 3 or node.kwargs:
        return None
    bias, flat, weight = node.args
    if not all(isinstance(a, fx.Node) for a in (bias, flat, weight)) or len(node.users) != 1:
        return None
    if not _is_call(flat, (torch.reshape,), _VIEW_METHODS) or not isinstance(flat.args[0], fx.Node):
        return None
    x, out = flat.args[0], next(iter(node.users))
    if not _is_call(out, (torch.reshape,), _VIEW_METHODS):
        return None
    x_shape, w_shape, out_shape, b_shape = _dims(x), _shape(weight), _dims(out), _shape(bias)
    if not x_shape or not w_shape or len(w_shape) != 2 or b_shape != (w_shape[1],):
        return None
    if _dims(flat) != (sympy.expand(math.prod(x_shape[:-1])), x_shape[-1]) or out_shape != x_shape[:-1] + (w_shape[1],):
        return None  # exactly the flatten / unflatten of the leading dims: nothing else is folded in
    extra = (flat, node) if set(flat.users) == {node} else (node,)
    return _Linear(out, x, weight, bias, weight_transposed=True, extra=extra)


def _transposed(node: fx.Node) -> fx.Node | None:
    """W when `node` is a transpose of a 2-D W: W.T, W.mT, W.t(), W.transpose(0, 1), W.permute(1, 0), ..."""
    src = node.args[0] if node.args else None
    if not isinstance(src, fx.Node) or len(_shape(src) or ()) != 2:
        return None
    if node.op == "call_function" and node.target is getattr and node.args[1:] in (("T",), ("mT",), ("H",)):
        return src if node.args[1] != "H" or not _is_complex(src) else None
    if _is_call(node, (torch.t,), ("t",)):
        return src
    if _is_call(node, (torch.transpose, torch.swapaxes, torch.swapdims), ("transpose", "swapaxes", "swapdims")):
        dims = {_arg(node, 1, "dim0"), _arg(node, 2, "dim1")}
        return src if dims in ({0, 1}, {-1, -2}, {0, -1}, {-2, 1}) else None
    if _is_call(node, (torch.permute,), ("permute",)):
        if len(node.args) > 2:  # permute(1, 0)
            dims = node.args[1:]
        else:  # permute((1, 0)) / torch.permute(w, dims=(1, 0))
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dims")
        return src if tuple(dims or ()) in ((1, 0), (-1, -2), (1, -2), (-1, 0)) else None
    return None


def _is_complex(node: fx.Node) -> bool:
    value = _meta_value(node)
    return isinstance(value, torch.Tensor) and value.is_complex()


_CAST_METHODS = {"float": torch.float32, "double": torch.float64, "half": torch.float16,
                 "bfloat16": torch.bfloat16}


def _cast(node: Any) -> torch.dtype | None:
    """The dtype of a dtype-only cast (`.to(dtype)`, `.to(dtype=...)`, `.float()`, ...), else None."""
    if not isinstance(node, fx.Node) or node.op != "call_method":
        return None
    if node.target in _CAST_METHODS and len(node.args) == 1 and not node.kwargs:
        return _CAST_METHODS[node.target]
    if node.target not in ("to", "type"):
        return None
    positional = node.args[1:]
    extra = {k: v for k, v in node.kwargs.items() if k != "dtype"}
    if extra.pop("non_blocking", False) or extra.pop("copy", False) or extra or len(positional) > 1:
        return None
    dtype = positional[0] if positional else node.kwargs.get("dtype")
    return dtype if isinstance(dtype, torch.dtype) else None


@dataclass
class _Dropout:
    input: fx.Node
    p: float
    train: bool


_DROPOUT_FUNCS = (F.dropout, torch.dropout)


def _dropout(node: Any) -> _Dropout | FailedMatch | None:
    """`F.dropout(x, p, training)` / `torch.dropout(x, p, train)`, a failure when its flags are not constants."""
    if not _is_call(node, _DROPOUT_FUNCS):
        return None
    x = _arg(node, 0, "input")
    p = _arg(node, 1, "p", 0.5)
    train = _arg(node, 2, "training" if node.target is F.dropout else "train", True)
    inplace = _arg(node, 3, "inplace", False) if node.target is F.dropout else False
    if not isinstance(x, fx.Node):
        return None
    if not _is_number(p) or not isinstance(train, bool):
        return FailedMatch("dropout {} has a non-constant p or training flag", node)
    if inplace:
        return FailedMatch("dropout {} is in place: it overwrites the layer input", node)
    return _Dropout(x, float(p), train)


_MUL_FUNCS = (operator.mul, torch.mul, operator.imul)
_DIV_FUNCS = (operator.truediv, torch.div, torch.true_divide, operator.itruediv)


def _scale(node: Any) -> tuple[fx.Node, float] | FailedMatch | None:
    """(operand, factor) for `t * c`, `c * t`, `t / c` with c a Python number; a failure when the factor is a
    tensor or a symbolic value; None when `node` is no multiplication or division."""
    if _is_call(node, _MUL_FUNCS, ("mul", "mul_", "__mul__", "__rmul__")):
        a, b = _arg(node, 0, "input"), _arg(node, 1, "other")
        if isinstance(a, fx.Node) and _is_number(b):
            return a, float(b)
        if isinstance(b, fx.Node) and _is_number(a):
            return b, float(a)
        if isinstance(a, fx.Node) and isinstance(b, fx.Node):
            return FailedMatch("{} multiplies by {}, a {} and not a Python constant", node, b, _kind(b))
        return None
    if _is_call(node, _DIV_FUNCS, ("div", "div_", "__truediv__")):
        a, b = _arg(node, 0, "input"), _arg(node, 1, "other")
        if node.kwargs.get("rounding_mode") is not None or not isinstance(a, fx.Node):
            return None
        if _is_number(b) and b != 0:
            return a, 1.0 / float(b)
        if isinstance(b, fx.Node):
            return FailedMatch("{} divides by {}, a {} and not a Python constant", node, b, _kind(b))
    return None


def _kind(node: fx.Node) -> str:
    value = _meta_value(node)
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return "symbolic value"
    return "tensor" if isinstance(value, torch.Tensor) or value is None else type(value).__name__


_ADD_FUNCS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_", "__add__", "__iadd__", "__radd__")


def _add_other(node: fx.Node, operand: fx.Node) -> tuple[fx.Node, float] | FailedMatch | None:
    """For an add that takes `operand`: (the other operand, the constant it is scaled by via `alpha=`)."""
    if not _is_call(node, _ADD_FUNCS, _ADD_METHODS):
        return None
    a, b = _arg(node, 0, "input"), _arg(node, 1, "other")
    alpha = _arg(node, 2, "alpha", 1)
    if not isinstance(a, fx.Node) or not isinstance(b, fx.Node) or (a is operand) == (b is operand):
        return None
    if not _is_number(alpha):
        return FailedMatch("{} adds with a non-constant alpha", node)
    if b is operand and alpha != 1:
        return FailedMatch("{} scales the base result by alpha={}", node, alpha)
    return (b if a is operand else a), float(alpha)


# ----------------------------------------------------------------------------------------------- context


class _Names:
    """Module and parameter names of the user's model, looked up by object identity (nn_module_stack keys are
    `str(id(module))`), and the fallback that reads dynamo's source strings when no model is given."""

    def __init__(self, model: nn.Module | None) -> None:
        self.model = model
        self.modules: dict[int, str] = {}
        self.params: dict[int, str] = {}
        if model is not None:
            for name, mod in model.named_modules(remove_duplicate=False):
                self.modules.setdefault(id(mod), name)
            for name, p in model.named_parameters(remove_duplicate=False):
                self.params.setdefault(id(p), name)
            for name, b in model.named_buffers(remove_duplicate=False):
                self.params.setdefault(id(b), name)

    def module_path(self, key: str, source: str) -> str:
        found = self.modules.get(_id_of_key(key))
        return found if found is not None else normalise_source(source)


def _id_of_key(key: str) -> int:
    try:
        return int(str(key).split("@", 1)[0])
    except ValueError:
        return -1


_ROOT = re.compile(r"^L\[(['\"]).*?\1\]")
_DICT_ITEM = re.compile(r"\.__dict__\[(['\"])_(?:modules|parameters|buffers)\1\]\[(['\"])(.*?)\2\]")
_PRIVATE_ITEM = re.compile(r"\._(?:modules|parameters|buffers)\[(['\"])(.*?)\1\]")
_ITEM = re.compile(r"\[(['\"])(.*?)\1\]")
_INDEX = re.compile(r"\[(\d+)\]")


def normalise_source(source: str) -> str:
    """Turn a dynamo source string into a `named_modules()`-style path, relative to the compiled frame's root.

    >>> normalise_source("L['self'].__dict__['_modules']['base_model'].model.layers[0]._modules['q_proj']")
    'base_model.model.layers.0.q_proj'
    >>> normalise_source("L['self']")
    ''
    """
    s = _ROOT.sub("", source)
    s = _DICT_ITEM.sub(r".\3", s)
    s = _PRIVATE_ITEM.sub(r".\2", s)
    s = _ITEM.sub(r".\2", s)
    s = _INDEX.sub(r".\1", s)
    return s.lstrip(".")


@dataclass
class _Ctx:
    values: dict[fx.Node, Any]  # placeholder -> real example input
    names: _Names
    order: dict[fx.Node, int]

    def real(self, node: fx.Node | None) -> Any:
        return None if node is None else self.values.get(node)

    def requires_grad(self, node: fx.Node | None) -> bool | None:
        if node is None:
            return None
        value = self.real(node)
        if not isinstance(value, torch.Tensor):
            value = _meta_value(node)
        return bool(value.requires_grad) if isinstance(value, torch.Tensor) else None

    def sort(self, nodes: Iterable[fx.Node]) -> list[fx.Node]:
        return sorted(set(nodes), key=lambda n: self.order.get(n, -1))


def _ctx(gm: fx.GraphModule | fx.Graph, example_inputs: Any, model: nn.Module | None) -> _Ctx:
    graph = gm.graph if isinstance(gm, fx.GraphModule) else gm
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    values: dict[fx.Node, Any] = {}
    if example_inputs is not None:
        if not isinstance(example_inputs, (list, tuple)):
            raise TypeError(f"example_inputs: expected the list the backend received, got "
                            f"{type(example_inputs).__name__}")
        values = dict(zip(placeholders, example_inputs))
    return _Ctx(values, _Names(model), {n: i for i, n in enumerate(graph.nodes)})


# ----------------------------------------------------------------------------------------------- adapter walk


def _b_shape(b: _Linear) -> tuple[int, int] | None:
    """(out_features, rank) of a lora_B linear, from its weight (or its untransposed right operand)."""
    if b.weight is not None:
        shape = _shape(b.weight)
        return (shape[0], shape[1]) if shape and len(shape) == 2 else None
    raw = _shape(b.raw) if b.raw is not None else None
    return (raw[1], raw[0]) if raw and len(raw) == 2 else None


def _rank(b: _Linear) -> int | str:
    shape = _b_shape(b)
    return shape[1] if shape else "r"


def _low_rank(b: _Linear, x: fx.Node) -> bool:
    """B is (o x r) with r below both the layer's in and out features (True when shapes are unknown)."""
    shape, x_shape = _b_shape(b), _shape(x)
    if shape is None or not x_shape:
        return True
    out_features, rank = shape
    return rank < out_features and rank < x_shape[-1]


_EVIDENCE_DEPTH = 4  # how many nodes above lora_B's input to look for a lora_A


def _is_product(b: _Linear, x: fx.Node) -> bool:
    """Evidence of a LoRA product: a low-rank B with another linear (an A) just above it. This is what decides
    whether a failed attempt is reported: a low-rank projection of some other input (a conditioning
    embedding, ...) has no linear above it and is left alone silently."""
    if not _low_rank(b, x):
        return False
    frontier, seen = [b.input], set()
    for _ in range(_EVIDENCE_DEPTH):
        above = []
        for n in frontier:
            if n in seen:
                continue
            seen.add(n)
            if _linear(n) is not None:
                return True
            above.extend(n.all_input_nodes)
        frontier = above
    return False


def _strip_scales_and_casts(node: Any) -> Any:
    """The node below any constant scales and dtype casts (at most 8 of them) on top of `node`."""
    for _ in range(8):
        scaled = _scale(node)
        if isinstance(scaled, tuple):
            node = scaled[0]
        elif _cast(node) is not None:
            node = node.args[0]
        else:
            break
    return node


def _peek_product(node: Any, x: fx.Node) -> _Linear | None:
    """A LoRA product B(...) reachable from `node` through casts and constant scales, else None."""
    lin = _linear(_strip_scales_and_casts(node)) if isinstance(node, fx.Node) else None
    return lin if lin is not None and _is_product(lin, x) else None


def _unknown_op(where: str, node: fx.Node, x: fx.Node, evidence: bool) -> FailedMatch:
    """An op the walk does not know. Reported when the walk already holds a LoRA product (`evidence`), or when
    the op is unary and its input is one: tanh(B(A(x))) is a LoRA layer with an extra op, while an add of two
    tensors (say, of another site's output) is a different computation, not "an op between the pieces"."""
    products = []
    if len(node.all_input_nodes) == 1:
        products = [p.node for p in (_peek_product(a, x) for a in node.all_input_nodes) if p is not None]
    return FailedMatch("unsupported op {} " + where, node, report=evidence or bool(products),
                       nodes=[node, *products])


@dataclass
class _Walk:
    """One adapter found by the backward walk, with the linear nodes that name its module."""

    adapter: AdapterSite
    linears: list[fx.Node]


def _match_adapter(delta: fx.Node, x: fx.Node, index: int) -> _Walk | FailedMatch:
    """Walk back from the add's other operand to `x`: [cast] [scale]* B [scale]* A [scale|cast|dropout]*."""
    nodes: list[fx.Node] = []
    scale, delta_cast = 1.0, None
    cur = delta
    while (b := _linear(cur)) is None:  # after lora_B: constant scales and one cast
        scaled = _scale(cur)
        if isinstance(scaled, FailedMatch):
            products = [p.node for p in (_peek_product(a, x) for a in cur.all_input_nodes) if p is not None]
            return scaled.reported(nodes + [cur] + products) if products else scaled
        nodes.append(cur)
        if scaled is not None:
            cur, scale = scaled[0], scale * scaled[1]
        elif (dtype := _cast(cur)) is not None and delta_cast is None:
            cur, delta_cast = cur.args[0], dtype
        else:
            return _unknown_op("between lora_B and the add", cur, x, evidence=False)
    evidence = _is_product(b, x)
    nodes.append(b.node)
    scale_before_b = False
    cur = b.input
    while (a := _linear(cur)) is None:  # between lora_A and lora_B: constant scales only
        scaled = _scale(cur)
        if isinstance(scaled, FailedMatch):
            return scaled.reported(nodes + [cur]) if evidence else scaled
        if scaled is None:
            failure = _unknown_op("between lora_A and lora_B", cur, x, evidence)
            failure.nodes[:0] = nodes
            return failure
        nodes.append(cur)
        cur, scale, scale_before_b = scaled[0], scale * scaled[1], True
    nodes.append(a.node)
    if not evidence:
        return FailedMatch("{} is not a low-rank product", b.node)
    input_cast, dropout = None, None
    cur = a.input
    while cur is not x:  # before lora_A: one dropout, one cast, constant scales
        step: Any = _dropout(cur)
        if isinstance(step, FailedMatch):
            return step.reported(nodes + [cur])
        if step is not None and dropout is None:
            nodes.append(cur)
            dropout, cur = step, step.input
            continue
        dtype = _cast(cur)
        if dtype is not None and input_cast is None:
            nodes.append(cur)
            input_cast, cur = dtype, cur.args[0]
            continue
        scaled = _scale(cur)
        if isinstance(scaled, FailedMatch):
            return scaled.reported(nodes + [cur])
        if scaled is None:
            return FailedMatch("the adapter input reaches {} instead of the layer input {}", cur, x,
                               report=True, nodes=nodes + [cur])
        nodes.append(cur)
        cur, scale, scale_before_b = scaled[0], scale * scaled[1], True
    problem = _check_adapter_weights(a, b, scale_before_b)
    if problem is not None:  # a FailedMatch is falsy: test for presence
        return problem.reported(nodes)
    assert a.weight is not None and b.weight is not None  # _check_adapter_weights guarantees it
    views = [v for v in (a.view, b.view) if v is not None]
    adapter = AdapterSite(name=f"adapter{index}", lora_a=a.weight, lora_b=b.weight, scale=scale,
                          dropout_p=dropout.p if dropout else 0.0,
                          dropout_train=dropout.train if dropout else False,
                          lora_bias=b.bias, input_cast=input_cast, nodes=nodes + views, delta_cast=delta_cast)
    return _Walk(adapter, [a.node, b.node])


def _is_param_like(node: fx.Node | None) -> bool:
    return node is not None and node.op in ("placeholder", "get_attr")


def _check_weights(lin: _Linear, role: str) -> FailedMatch | None:
    if lin.weight is None:
        return FailedMatch("{} uses {} untransposed (x @ M with M stored as in x out); only linear(x, W) and "
                           "x @ W.T forms are supported", lin.node, lin.raw, nodes=[lin.node])
    if not _is_param_like(lin.weight):
        return FailedMatch("the " + role + " weight {} is computed in the graph, not a parameter", lin.weight,
                           nodes=[lin.node])
    if lin.bias is not None and not _is_param_like(lin.bias):
        return FailedMatch("the " + role + " bias {} is computed in the graph, not a parameter", lin.bias,
                           nodes=[lin.node])
    return None


def _check_adapter_weights(a: _Linear, b: _Linear, scale_before_b: bool) -> FailedMatch | None:
    if a.bias is not None:
        return FailedMatch("lora_A {} has a bias", a.node)
    problem = _check_weights(a, "lora_A")
    if problem is None:
        problem = _check_weights(b, "lora_B")
    if problem is not None:  # a FailedMatch is falsy: test for presence
        return problem
    if b.bias is not None and scale_before_b:
        return FailedMatch("the scale is applied before lora_B {}, whose bias would then be left unscaled",
                           b.node)
    a_shape, b_shape = _shape(a.weight), _shape(b.weight)  # type: ignore[arg-type]
    if a_shape and b_shape and a_shape[0] != b_shape[1]:
        return FailedMatch("lora_A {} and lora_B {} do not compose: shapes {} and {}", a.weight, b.weight,
                           a_shape, b_shape)
    return None


# ----------------------------------------------------------------------------------------------- one site


def _next_adapter(cur: fx.Node, x: fx.Node, index: int) -> tuple[_Walk, fx.Node] | FailedMatch | None:
    """The adapter added to `cur` by its add user, that add; None when `cur` feeds no add."""
    for user in cur.users:
        other = _add_other(user, cur)
        if other is None:
            continue
        if isinstance(other, FailedMatch):
            return other
        walk = _match_adapter(other[0], x, index)
        if not walk:
            return walk
        walk.adapter.scale *= other[1]
        return walk, user
    return None


def _bias_add(cur: fx.Node, base: _Linear) -> tuple[fx.Node, fx.Node] | None:
    """(bias, add) when `cur` feeds an add of a 1-D parameter of the base's out_features: `x @ W.T + b`."""
    if base.bias is not None or base.weight is None or base.quant is not None:
        return None
    out_features = (_shape(base.weight) or (None,))[0]
    for user in cur.users:
        other = _add_other(user, cur)
        if isinstance(other, tuple) and other[1] == 1 and _is_param_like(other[0]):
            shape = _shape(other[0])
            if shape is not None and len(shape) == 1 and shape[0] == out_features:
                return other[0], user
    return None


def match_site(node: fx.Node, example_inputs: list[Any] | tuple[Any, ...] | None = None, *,
               model: nn.Module | None = None) -> LoraSite | FailedMatch:
    """Try to read a LoRA site whose base linear is `node`: the site, or a falsy `FailedMatch` saying why not."""
    if not isinstance(node, fx.Node):
        raise TypeError(f"node: expected a torch.fx.Node, got {type(node).__name__}")
    return _match_site(node, _ctx(node.graph, example_inputs, model))


def _match_site(node: fx.Node, ctx: _Ctx) -> LoraSite | FailedMatch:
    base = _base_linear(node)
    if base is None:
        return FailedMatch("{} is not a linear", node)
    walks: list[_Walk] = []
    adds: list[fx.Node] = []
    cur = base.node
    while True:
        if (biased := _bias_add(cur, base)) is not None:  # a bias added on its own: part of the base
            base.bias, cur = biased
            adds.append(cur)
            continue
        step = _next_adapter(cur, base.input, len(walks))
        if step is None:
            break
        if isinstance(step, FailedMatch):
            if step.report and not walks:
                return step.reported([node])
            # Past the first adapter, an add of anything else (a residual, another site's output) ends the
            # site before it: the adapters found so far are still exactly what the nodes compute.
            break
        walk, cur = step
        walks.append(walk)
        adds.append(cur)
    if not walks:
        return FailedMatch("{} is not added to a low-rank product of its input", node)
    output_cast, output = None, cur
    if len(cur.users) == 1 and (dtype := _cast(next(iter(cur.users)))) is not None:
        output_cast, output = dtype, next(iter(cur.users))
    adapter_nodes = [n for w in walks for n in w.adapter.nodes]
    problem = _check_weights(base, "base")
    if problem is not None:  # a FailedMatch is falsy: test for presence
        return problem.reported([node, *adds, *adapter_nodes])
    nodes = ctx.sort([node, base.node, *base.extra, *adds, *adapter_nodes, output,
                      *([base.view] if base.view is not None else []),
                      *(base.quant.nodes if base.quant is not None else [])])
    nodes = _drop_shared_weight_views(nodes)
    problem = _check_escapes(nodes, output)
    if problem is not None:  # a FailedMatch is falsy: test for presence
        return problem.reported(nodes)
    linears = [node] + [n for w in walks for n in w.linears]
    path = _module_path(linears, ctx)
    node_set = set(nodes)
    _name_adapters(walks, path, ctx)
    adapters = []
    for walk in walks:
        ad = walk.adapter
        ad.nodes = [n for n in ctx.sort(ad.nodes) if n in node_set]
        ad.a_requires_grad = ctx.requires_grad(ad.lora_a)
        ad.b_requires_grad = ctx.requires_grad(ad.lora_b)
        ad.lora_bias_requires_grad = ctx.requires_grad(ad.lora_bias)
        adapters.append(ad)
    site = LoraSite(module_path=path, x=base.input, weight=base.weight, bias=base.bias,  # type: ignore[arg-type]
                    adapters=adapters, output=output, output_cast=output_cast, base_node=node, nodes=nodes,
                    weight_transposed=base.weight_transposed,
                    x_requires_grad=ctx.requires_grad(base.input),
                    weight_requires_grad=ctx.requires_grad(base.weight),
                    bias_requires_grad=ctx.requires_grad(base.bias))
    if base.quant is not None:  # the quant state is reachable from the real Params4bit behind the placeholder
        site.quant_state = getattr(ctx.real(base.weight), "quant_state", None)
        site.quant_compute_dtype = base.quant.compute_dtype or getattr(_meta_value(base.input), "dtype", None)
    return site


def _drop_shared_weight_views(nodes: list[fx.Node]) -> list[fx.Node]:
    """A transpose of a weight that something outside the site also reads is an input, not a site node."""
    node_set = set(nodes)
    return [n for n in nodes
            if not (_transposed(n) is not None and _is_param_like(n.args[0]) and not set(n.users) <= node_set)]


def _check_escapes(nodes: list[fx.Node], output: fx.Node) -> FailedMatch | None:
    node_set = set(nodes)
    for n in nodes:
        if n is output:
            continue
        outside = [u for u in n.users if u not in node_set]
        if outside:
            return FailedMatch("intermediate {} is also used outside the site, by {}", n, outside[0])
    return None


# ----------------------------------------------------------------------------------------------- names


def _deepest_module(node: fx.Node, ctx: _Ctx) -> str:
    """The innermost module a node was traced in ("" when it was traced in the frame's root)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    key, (source, _cls) = list(stack.items())[-1]
    return ctx.names.module_path(key, source)


def _module_path(nodes: Iterable[fx.Node], ctx: _Ctx) -> str:
    """The deepest module that contains all `nodes`, as the model's `named_modules()` name ("" is the root)."""
    paths = [p.split(".") if p else [] for p in (_deepest_module(n, ctx) for n in nodes)]
    if not paths:
        return ""
    common: list[str] = []
    for parts in zip(*paths):
        if any(p != parts[0] for p in parts):
            break
        common.append(parts[0])
    return ".".join(common)


_PARAM_TARGET = re.compile(r"_parameters_(.+?)_$")


def _adapter_name(ad: AdapterSite, a_linear: fx.Node, site_path: str, ctx: _Ctx, full: bool = False) -> str | None:
    """peft's adapter name ("default"), else the attribute A came from (torchtune's "lora_a", loralib's
    "lora_A"). `full`: the whole path of A below the site ("lora_A.default", "a.0"), to tell apart adapters
    whose short names collide (A's kept in a ParameterList)."""
    real = ctx.real(ad.lora_a)
    param = ctx.names.params.get(id(real)) if real is not None else None
    if param is None:
        module = _deepest_module(a_linear, ctx)
        if module and module != site_path:
            param = module + ".weight"
    if param is not None:
        prefix = site_path + "." if site_path else ""
        rel = param[len(prefix):] if param.startswith(prefix) else param
        parts = rel.split(".")
        if full:
            return ".".join(parts[:-1]) if parts[-1] == "weight" and len(parts) > 1 else rel
        return parts[-2] if len(parts) >= 2 else parts[0]
    found = _PARAM_TARGET.search(str(ad.lora_a.target))
    return found.group(1) if found else None


def _name_adapters(walks: list[_Walk], site_path: str, ctx: _Ctx) -> None:
    names = [_adapter_name(w.adapter, w.linears[0], site_path, ctx) for w in walks]
    if len(set(names)) < len(names):
        names = [_adapter_name(w.adapter, w.linears[0], site_path, ctx, full=True) for w in walks]
    if None in names or len(set(names)) < len(names):
        names = [f"adapter{i}" for i in range(len(walks))]
    for walk, name in zip(walks, names):
        walk.adapter.name = name  # type: ignore[assignment]


def _variant_reason(path: str, names: Iterable[str] | None, ctx: _Ctx) -> str | None:
    """With a model: a peft layer whose (given, else any) adapter is a LoRA variant is not plain LoRA."""
    if ctx.names.model is None:
        return None
    try:
        owner = ctx.names.model.get_submodule(path)
    except AttributeError:
        return None
    variants = getattr(owner, "lora_variant", None)
    if not isinstance(variants, dict) or not variants:
        return None
    wanted = [n for n in (names or variants) if n in variants]
    if not wanted:
        return None
    name = wanted[0]
    return (f"peft LoRA variant {type(variants[name]).__name__} on adapter {name!r}: its forward is variant code, "
            "not plain LoRA")


# ----------------------------------------------------------------------------------------------- a graph


def match_sites(gm: fx.GraphModule, example_inputs: list[Any] | tuple[Any, ...] | None = None, *,
                model: nn.Module | None = None) -> MatchResult:
    """Every LoRA site in a dynamo graph, and the LoRA-looking layers left alone with their reasons.

    `example_inputs` (the list a backend receives) gives the real placeholder values, for `requires_grad`;
    `model` gives exact module paths and adapter names (else they come from dynamo's source strings, relative
    to the compiled frame) and lets peft variant layers be reported instead of matched.
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"gm: expected a torch.fx.GraphModule, got {type(gm).__name__}")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module or None, got {type(model).__name__}")
    ctx = _ctx(gm, example_inputs, model)
    result = MatchResult(gm=gm)
    claimed: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        if node in claimed or _base_linear(node) is None:
            continue
        found = _match_site(node, ctx)
        if found:
            reason = _variant_reason(found.module_path, [a.name for a in found.adapters], ctx)
            if reason is None:
                result.sites.append(found)
            else:
                result.skipped.append(SkippedSite(found.module_path, reason, found.nodes))
            claimed.update(found.nodes)
        elif found.report:
            result.skipped.append(_skipped(found, [node, *found.nodes], ctx))
            claimed.update(found.nodes)
            claimed.add(node)
    result.skipped.extend(_unclaimed_products(gm, claimed, ctx))
    return result


def _skipped(failure: FailedMatch, nodes: list[fx.Node], ctx: _Ctx) -> SkippedSite:
    linears = [n for n in nodes if _linear(n) is not None]
    path = _module_path(linears or nodes, ctx)
    # A peft variant layer is named as such: what its graph pieces look like says less than that.
    reason = _variant_reason(path, None, ctx) or unsupported_base_reason(nodes, _owner(path, ctx)) or str(failure)
    return SkippedSite(path, reason, ctx.sort(nodes))


def _owner(path: str, ctx: _Ctx) -> nn.Module | None:
    """The module at `path` of the user's model, when there is a model and it has one."""
    if ctx.names.model is None:
        return None
    try:
        return ctx.names.model.get_submodule(path)
    except AttributeError:
        return None


def _unclaimed_products(gm: fx.GraphModule, claimed: set[fx.Node], ctx: _Ctx) -> list[SkippedSite]:
    """Rank-r products B(A(h)) that no site took: an adapter not added to its base (DoRA's pieces, ...)."""
    skipped = []
    for node in gm.graph.nodes:
        b = _linear(node)
        if b is None or node in claimed:
            continue
        a = _linear(_strip_scales_and_casts(b.input))  # through constant scales and casts to lora_A
        if a is None or a.node in claimed or not _low_rank(b, a.input):  # A is right above: evidence enough
            continue
        users = sorted(node.users, key=lambda n: ctx.order.get(n, -1))
        goes_to = " (its result goes to {})" if users else ""
        failure = FailedMatch("rank-{} product {} -> {} is not added to a base linear of the same input" + goes_to,
                              _rank(b), a.node, node, *users[:1], report=True)
        skipped.append(_skipped(failure, [a.node, node], ctx))
        claimed.update((a.node, node))
    return skipped


# ----------------------------------------------------------------------------------------------- a model


def match_model(model: nn.Module, example_inputs: tuple[Any, ...] | list[Any] = (),
                example_kwargs: dict[str, Any] | None = None) -> ModelMatch:
    """Capture `model` on one example call (see `capture`) and match every captured graph and subgraph."""
    captured = capture(model, example_inputs, example_kwargs)
    root = getattr(model, "_orig_mod", model)
    graphs = captured.all_graphs()
    results = [match_sites(g.gm, g.example_inputs, model=root) for g in graphs]
    return ModelMatch(captured, results, graphs)


def find_lora_params(model: nn.Module, example_inputs: tuple[Any, ...] | list[Any],
                     example_kwargs: dict[str, Any] | None = None) -> list[LoraParams]:
    """The real tensors of every LoRA site of `model`: capture, match, resolve placeholders to the Parameters.

    One entry per site (a module seen in several graphs is listed once), in graph order; layers that were
    skipped are not listed (`match_model(...).skipped` says why).
    """
    found = match_model(model, example_inputs, example_kwargs)
    root = getattr(model, "_orig_mod", model)
    params: list[LoraParams] = []
    seen: set[tuple[int, ...]] = set()
    for graph, result in zip(found.graphs, found.results):
        for site in result.sites:
            p = site_params(site, graph.value_of, root)
            key = (id(p.weight), *(id(a.lora_a) for a in p.adapters))
            if key not in seen:
                seen.add(key)
                params.append(p)
    return params


def site_params(site: LoraSite, value_of: Callable[[fx.Node], Any], model: nn.Module) -> LoraParams:
    """The real tensors of one site: `value_of` maps a placeholder to its example input
    (`CapturedGraph.value_of`); `model` gives the owning module (None when the path does not resolve)."""

    def real(node: fx.Node | None) -> Any:
        return None if node is None else value_of(node)

    adapters = [AdapterParams(a.name, real(a.lora_a), real(a.lora_b), float(a.scale), real(a.lora_bias))
                for a in site.adapters]
    try:
        module: nn.Module | None = model.get_submodule(site.module_path)
    except AttributeError:
        module = None
    return LoraParams(site.module_path, real(site.weight), real(site.bias), adapters, module,
                      weight_transposed=site.weight_transposed)


