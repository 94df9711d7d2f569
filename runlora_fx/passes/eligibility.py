"""Which matched sites the planned node can run, and the runner for each: shared by the graph rewrite
(`passes.rewrite`) and the eager patching (`api.optimize`, `api.explain`).
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx

from ..kernels.bnb import PACKED_FOR_CPU_REASON, is_packed_for_cpu, quant_spec_of
from ..kernels.dense import AdapterConfig, LoraLinearRunner
from ..kernels.qlora import QLoraLinearRunner
from ..planner.search import SearchOptions
from .site import LoraSite


def _dtype(node: fx.Node | None) -> torch.dtype | None:
    val = node.meta.get("val", node.meta.get("example_value")) if node is not None else None
    return getattr(val, "dtype", None)


def _quant_reason(site: LoraSite) -> str | None:
    """Why a 4-bit site cannot be planned, or None."""
    state, cd = site.quant_state, site.quant_compute_dtype
    if state is None:
        return "the 4-bit base's bitsandbytes quant state is not reachable (no real Params4bit behind the weight)"
    if is_packed_for_cpu(state):
        return PACKED_FOR_CPU_REASON
    try:
        quant_spec_of(state, cd)
    except (ValueError, TypeError) as err:
        return f"unsupported 4-bit format: {err}"
    if site.bias is not None and site.bias_requires_grad:
        return "the 4-bit base's bias requires grad (bitsandbytes' 4-bit layer has no planned bias gradient)"
    if site.bias is not None and _dtype(site.bias) != cd:
        return f"the 4-bit base's bias is {_dtype(site.bias)}, not its compute dtype {cd}"
    return None


def rewrite_reason(site: LoraSite) -> str | None:
    """Why this site cannot be rewritten by the planned node, or None when it can."""
    if site.weight_requires_grad:
        return "the base weight requires grad (the planned node keeps the base frozen)"
    if site.quant_compute_dtype is not None and (reason := _quant_reason(site)):
        return reason
    # a 4-bit base computes in its compute dtype and returns x's dtype: the site's dtype is x's
    base = _dtype(site.x) if site.quant_compute_dtype is not None else _dtype(site.weight)
    out = _dtype(site.output)
    adapter = {_dtype(a.lora_a) for a in site.adapters} | {_dtype(a.lora_b) for a in site.adapters}
    if None in adapter or base is None or out is None:
        return "dtypes of the site's tensors are unknown (no example values in the graph)"
    if len(adapter) != 1:
        return f"adapters use different dtypes {sorted(map(str, adapter))}"
    (adtype,) = adapter
    if out != base:
        return f"the site's result is {out}, not the base dtype {base}"
    for a in site.adapters:
        cast = a.input_cast or base
        if cast != adtype:
            return f"adapter {a.name} reads x as {cast} but its weights are {adtype}"
    if any(a.dropout_p > 0 and a.dropout_train for a in site.adapters) and \
            len({a.dropout_train for a in site.adapters if a.dropout_p > 0}) > 1:
        return "adapters disagree on dropout training mode"
    return None


def runner_for(site: LoraSite, options: SearchOptions, x_readers: int = 1) -> LoraLinearRunner:
    """The runner for `site`; `x_readers` sites (this one included) read the same x and may share it saved."""
    configs = tuple(AdapterConfig(float(a.scale), float(a.dropout_p) if a.dropout_train else 0.0, a.lora_bias is not None)
                    for a in site.adapters)
    if site.quant_compute_dtype is not None:
        runner = QLoraLinearRunner(configs, options, site.quant_state, site.quant_compute_dtype, _dtype(site.x))
    else:
        runner = LoraLinearRunner(configs, options)
    runner.x_readers = x_readers
    return runner


def x_readers(sites: list[LoraSite]) -> dict[fx.Node, int]:
    """How many of `sites` read each input node."""
    return Counter(site.x for site in sites)
