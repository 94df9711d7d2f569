"""Tag each matched site's nodes in dynamo's graph so the joint-graph pass can find them again after aot_autograd.

Why `meta["custom"]`: aot_autograd copies a fixed list of meta keys from the node being traced onto every aten
node it emits, forward and backward (`torch/fx/proxy.py::_COPY_META_FIELDS`; a backward node inherits the key
of the forward op it differentiates). `custom` is on that list and is meant for user annotations
(`torch.fx.traceback.annotate`), so the tag survives decomposition and functionalization; a user's own entries in
the dict are kept.
"""
from __future__ import annotations

import torch.fx as fx

from .site import LoraSite

KEY = "runlora_fx"


def roles(site: LoraSite) -> dict[fx.Node, tuple[str, int]]:
    """(role, adapter index) of every node of `site`: "base" (the base linear and its weight view), "A" / "B" (an
    adapter's linear and its weight view), "adapter" (its dropout, casts and scales), "out" (the adds, the final
    cast). The joint pass only needs the matmuls' roles and the adapter's pointwise nodes."""
    out: dict[fx.Node, tuple[str, int]] = {n: ("out", -1) for n in site.nodes}
    for n in site.nodes:
        if n is site.base_node or site.weight in n.all_input_nodes and n is not site.output:
            out[n] = ("base", -1)
    for j, ad in enumerate(site.adapters):
        weights = {"A": ad.lora_a, "B": ad.lora_b}
        views = {role: {w} | {n for n in ad.nodes if w in n.all_input_nodes and len(n.all_input_nodes) == 1}
                 for role, w in weights.items()}
        for n in ad.nodes:
            role = next((r for r, vs in views.items() if n in vs or set(n.all_input_nodes) & vs), "adapter")
            out[n] = (role, j)
    return out


def annotate(site: LoraSite, site_id: int) -> None:
    """Write the site's tag into each of its nodes' `meta["custom"]`."""
    for node, (role, j) in roles(site).items():
        custom = dict(node.meta.get("custom") or {})
        custom[KEY] = (site_id, role, j)
        node.meta["custom"] = custom


def tag_of(node: fx.Node) -> tuple[int, str, int] | None:
    """(site id, role, adapter index) of a node of the joint graph, or None for a node of no site."""
    custom = node.meta.get("custom")
    return custom.get(KEY) if isinstance(custom, dict) else None
