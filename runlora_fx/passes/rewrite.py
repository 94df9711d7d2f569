"""Replace each matched LoRA site by one call of the planned node (`kernels.ops.lora_site`).

Why: the site's nodes (base linear, dropout, casts, two skinny linears, scale, add, final cast) fix one
evaluation order and leave the saved set to autograd; one opaque call lets the planner choose both. The rewrite
only swaps nodes whose value it reproduces exactly (see passes/README.md for the invariants it keeps); which
sites qualify is `passes.eligibility`'s decision.
"""
from __future__ import annotations

import logging

import torch.fx as fx

from ..kernels.ops import lora_site, register_site
from ..planner.search import SearchOptions
from ..planner.signature import SiteSignature
from .eligibility import rewrite_reason, runner_for, x_readers
from .site import LoraSite, SkippedSite

# the attribute of a rewritten GraphModule holding its sites' runners (the op registry holds them weakly)
RUNNERS_ATTR = "runlora_fx_runners"

log = logging.getLogger(__name__)


def rewrite_sites(gm: fx.GraphModule, sites: list[LoraSite], options: SearchOptions) -> tuple[int, list[SkippedSite]]:
    """Swap every rewritable site for one `lora_site` call; returns the count and the sites left alone. `gm` keeps
    the sites' runners (attribute `RUNNERS_ATTR`): they live exactly as long as the graph module."""
    graph, count, skipped = gm.graph, 0, []
    readers = x_readers(sites)
    owned = getattr(gm, RUNNERS_ATTR, None)
    if owned is None:
        owned = []
        setattr(gm, RUNNERS_ATTR, owned)
    for site in sites:
        reason = rewrite_reason(site)
        if reason:
            skipped.append(SkippedSite(site.module_path, reason))
            continue
        runner = runner_for(site, options, readers[site.x])
        owned.append(runner)
        sid = register_site(runner)
        training = any(a.dropout_train for a in site.adapters)
        adapters = [(a.lora_a, a.lora_b, a.lora_bias) for a in site.adapters]
        flat = SiteSignature.of_tensors(site.bias, adapters).flatten_adapters(adapters)
        with graph.inserting_before(site.output):
            new = graph.call_function(lora_site, (site.x, site.weight, site.bias, flat, sid, training))
        new.meta.update({k: v for k, v in site.output.meta.items() if k in ("val", "example_value", "nn_module_stack", "stack_trace")})
        site.output.replace_all_uses_with(new)
        for node in reversed(site.nodes):
            if node is not new and not node.users:
                graph.erase_node(node)
        count += 1
        log.debug("rewrote %s as site %d", site.module_path, sid)
    if count:
        graph.lint()
        gm.recompile()
    return count, skipped
