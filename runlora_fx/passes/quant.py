"""Recognise a bitsandbytes 4-bit base call in a dynamo graph, and name the quantized bases that are not supported.

What dynamo makes of `bitsandbytes.nn.Linear4bit.forward` (bitsandbytes 0.50, torch 2.13), for both peft's generic
LoRA layer around a `Linear4bit` and peft's own `lora.bnb.Linear4bit`:

    xc = x.to(compute_dtype)                       # always traced, even when it is a no-op
    bc = bias.to(compute_dtype)                    # with a bias
    Wv = W4.view(-1, 1)                            # W4: the Params4bit placeholder (its real object has .quant_state)
    r  = autograd_function_apply(fwd_body, bwd_body, Wv, xc, <quant state tensors>, bc, ...)[0]   # x needs grad
    r  = bitsandbytes.gemm_4bit(xc, Wv, shape, absmax, blocksize, quant_type, bias=bc, ...)        # no grad
    y  = r.to(x.dtype)
    y  = y.clone()                                 # peft's bnb layer only

`fwd_body` is a subgraph whose placeholders are the call's operands in order; the `gemm_4bit` inside it says which
operand is x, which the weight and which the bias. The quant-state tensors (absmax, the second-level state of
double quantization) arrive as placeholders too, but the matcher does not need them: the real `Params4bit`
behind the weight placeholder carries its `quant_state`.

In eval mode with an input that needs no grad, on a CPU with AVX512-bf16, bitsandbytes repacks the weight and
calls `gemv_4bit` instead; that layer is left to bitsandbytes (and reported). So is every other quantized base
(`Linear8bitLt`, ...): `unsupported_base_reason` names it.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch import nn

from ..kernels.bnb import PACKED_FOR_CPU_REASON

_RESHAPE_METHODS = ("view", "reshape", "t", "contiguous")


@dataclass
class Linear4bitCall:
    """One 4-bit base call normalised to ``y = (x.to(cd) @ deq(W)^T + b.to(cd)).to(x.dtype)``."""

    call: fx.Node  # the autograd_function_apply or gemm_4bit node
    input: fx.Node  # x as the layer received it, before the compute-dtype cast
    weight: fx.Node  # the packed Params4bit (a placeholder)
    bias: fx.Node | None  # the bias parameter, before its cast
    compute_dtype: torch.dtype | None  # None when x is not cast (then it computes in x's dtype)
    output: fx.Node  # the base result as the layer uses it (after the cast back, and peft's clone)
    nodes: list[fx.Node] = field(default_factory=list)  # every node of the base call, output included


def _is_gemm_4bit(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and \
        str(node.target).startswith("bitsandbytes.gemm_4bit")


def _is_gemv_4bit(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and \
        str(node.target).startswith("bitsandbytes.gemv_4bit")


def _is_autograd_apply(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and \
        node.target is torch.ops.higher_order.autograd_function_apply


def _cast_dtype(node: Any) -> torch.dtype | None:
    """The dtype of `t.to(dtype)` / `t.to(dtype=dtype)`, else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_method" and node.target == "to"):
        return None
    if len(node.args) == 2 and not node.kwargs and isinstance(node.args[1], torch.dtype):
        return node.args[1]
    if len(node.args) == 1 and set(node.kwargs) == {"dtype"} and isinstance(node.kwargs["dtype"], torch.dtype):
        return node.kwargs["dtype"]
    return None


def _strip_reshapes(node: Any, chain: list[fx.Node]) -> Any:
    """Follow `.view(...)`, `.reshape(...)`, `.t()`, `.contiguous()` back to their source, recording them."""
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in _RESHAPE_METHODS:
        chain.append(node)
        node = node.args[0]
    return node


def _gemm_operands(gemm: fx.Node) -> tuple[Any, Any, Any]:
    """(A, B, bias) of a gemm_4bit call: `gemm_4bit(A, B, shapeB, absmax, blocksize, quant_type, bias=...)`."""
    bias = gemm.args[6] if len(gemm.args) > 6 else gemm.kwargs.get("bias")
    return gemm.args[0], gemm.args[1], bias


def _apply_operands(node: fx.Node) -> tuple[Any, Any, Any] | None:
    """(A, B, bias) as operands of an autograd_function_apply whose forward body is one gemm_4bit call."""
    body_attr = node.args[0] if node.args else None
    owner = node.graph.owning_module
    if not (isinstance(body_attr, fx.Node) and body_attr.op == "get_attr" and owner is not None):
        return None
    body = getattr(owner, str(body_attr.target), None)
    if not isinstance(body, fx.GraphModule):
        return None
    gemms = [n for n in body.graph.nodes if _is_gemm_4bit(n)]
    if len(gemms) != 1:
        return None
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    outer = dict(zip(placeholders, node.args[2:]))

    def to_outer(inner: Any) -> Any:
        if inner is None:
            return None
        inner = _strip_reshapes(inner, [])
        return outer.get(inner, _MISSING)

    operands = tuple(to_outer(a) for a in _gemm_operands(gemms[0]))
    return None if _MISSING in operands else operands  # type: ignore[return-value]


_MISSING = object()


def linear4bit(node: Any) -> Linear4bitCall | None:
    """The 4-bit base call whose bitsandbytes node is `node`, or None when `node` is not one."""
    if _is_gemm_4bit(node):
        operands, head = _gemm_operands(node), [node]
        out = node
    elif _is_autograd_apply(node):
        found = _apply_operands(node)
        if found is None:
            return None
        operands = found
        getitems = [u for u in node.users if u.op == "call_function" and u.target is operator.getitem
                    and u.args[1:] == (0,)]
        if len(node.users) != 1 or len(getitems) != 1:
            return None
        head = [a for a in node.args[:2] if isinstance(a, fx.Node)] + [node]
        out = getitems[0]
    else:
        return None
    a, b, bias = operands
    chain: list[fx.Node] = [*head] + ([out] if out is not node else [])
    weight = _strip_reshapes(b, chain)
    if not (isinstance(a, fx.Node) and isinstance(weight, fx.Node) and weight.op in ("placeholder", "get_attr")):
        return None
    compute_dtype, x = _cast_dtype(a), a
    if compute_dtype is not None:
        chain.append(a)
        x = a.args[0]
    if bias is not None:
        if not isinstance(bias, fx.Node):
            return None
        if _cast_dtype(bias) is not None:
            chain.append(bias)
            bias = bias.args[0]
    if len(out.users) == 1 and _cast_dtype(next(iter(out.users))) is not None:
        out = next(iter(out.users))
        chain.append(out)
    if len(out.users) == 1 and _is_clone(next(iter(out.users))):
        out = next(iter(out.users))
        chain.append(out)
    return Linear4bitCall(node, x, weight, bias, compute_dtype, out, chain)


def _is_clone(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target == "clone":
        return len(node.args) == 1 and not node.kwargs
    return node.op == "call_function" and node.target is torch.clone and len(node.args) == 1 and not node.kwargs


# ----------------------------------------------------------------------------------------------- unsupported


SUPPORTED_QUANTIZED = ("bitsandbytes.nn.modules.Linear4bit",)


def _qualname(cls: Any) -> str:
    return f"{getattr(cls, '__module__', '')}.{getattr(cls, '__qualname__', getattr(cls, '__name__', repr(cls)))}"


def _quantized_class(entry: Any) -> str | None:
    """The qualified name of a bitsandbytes module class that is not a 4-bit `Linear4bit` (subclasses such as
    `LinearNF4` included), else None. `entry` is a class or an nn_module_stack value `(source, class)`."""
    cls = entry[1] if isinstance(entry, tuple) and len(entry) > 1 else entry
    names = [cls] if isinstance(cls, str) else [_qualname(c) for c in getattr(cls, "__mro__", (cls,))]
    if not names[0].startswith("bitsandbytes") or any(n in SUPPORTED_QUANTIZED for n in names):
        return None
    return names[0]


def _stack_keys(node: fx.Node) -> list[str]:
    return list((node.meta.get("nn_module_stack") or {}).keys())


def unsupported_base_reason(nodes: Iterable[fx.Node], owner: nn.Module | None = None) -> str | None:
    """Why the layer that computed `nodes` (a LoRA product no site took) has a base runlora_fx cannot plan: a
    quantized base other than a 4-bit `Linear4bit`, or a `Linear4bit` in bitsandbytes' CPU inference layout.
    Read from the graph (the nn_module_stack of the layer's other nodes) and, when given, from the owning module.
    None when nothing says the base is quantized."""
    nodes = [n for n in nodes if isinstance(n, fx.Node)]
    if owner is not None:
        base = owner.get_base_layer() if hasattr(owner, "get_base_layer") else None
        weight = getattr(base, "weight", None)
        if base is not None and isinstance(weight, torch.Tensor):
            name = _quantized_class(type(base))
            if name is not None:
                return _bnb_reason(name)
            supported = any(_qualname(c) in SUPPORTED_QUANTIZED for c in type(base).__mro__)
            if not weight.is_floating_point() and not supported:
                return (f"the base layer {type(base).__name__} stores its weight as {weight.dtype} "
                        f"({type(weight).__name__}), a quantized format runlora_fx does not plan; left untouched")
    stacks = [_stack_keys(n) for n in nodes]
    if not nodes or not all(stacks):
        return None
    common: list[str] = []
    for keys in zip(*stacks):
        if any(k != keys[0] for k in keys):
            break
        common.append(keys[0])
    if not common:
        return None
    layer = common[-1]
    for n in nodes[0].graph.nodes:
        stack = n.meta.get("nn_module_stack") or {}
        if layer not in stack or n.op != "call_function":
            continue
        if _is_gemv_4bit(n):
            return PACKED_FOR_CPU_REASON
        inner = _quantized_class(stack[list(stack)[-1]])
        if inner is not None:
            return _bnb_reason(inner)
    return None


def _bnb_reason(qualified: str) -> str:
    name = qualified.rsplit(".", 1)[-1]
    kind = " (8-bit LLM.int8)" if "8bit" in name else ""
    return (f"the base layer is bitsandbytes {name}{kind}: runlora_fx plans dense and 4-bit (Linear4bit, nf4/fp4) "
            "bases only; left untouched")
