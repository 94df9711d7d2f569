"""The "runlora" torch.compile backend: match LoRA sites in dynamo's graph, rewrite them, hand on to inductor.

Registered through the `torch_dynamo_backends` entry point, so `torch.compile(model, backend="runlora")` works
after `pip install` with no import. Options travel in torch.compile's `options` dict:

    torch.compile(model, backend="runlora", options={"inner": "aot_eager", "objective": "memory"})

(see `OptimizeConfig` for every option). The last graph's report is kept in `last_reports` for `explain`.
"""
from __future__ import annotations

import torch

from .config import OptimizeConfig
from .passes.match import match_sites
from .passes.rewrite import RUNNERS_ATTR, rewrite_sites

last_reports: list[dict] = []


def runlora_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, **kwargs):
    """Rewrite LoRA sites, then compile with the inner compiler."""
    config = OptimizeConfig.from_options({**(options or {}), **kwargs})
    found = match_sites(gm, example_inputs)
    count, not_rewritten = rewrite_sites(gm, found.sites, config.search_options)
    last_reports.append({"rewritten": count, "skipped": found.skipped + not_rewritten})
    del last_reports[:-16]
    if config.inner == "eager":
        return gm.forward  # holds gm, which holds its runners
    return _owning(torch._dynamo.lookup_backend(config.inner)(gm, example_inputs), gm)


def _owning(compiled, gm: torch.fx.GraphModule):
    """`compiled`, made to keep the rewritten graph's runners alive for as long as dynamo keeps it (the ops'
    site registry holds them weakly, so they go with the compiled graph)."""
    runners = getattr(gm, RUNNERS_ATTR, [])
    try:
        setattr(compiled, RUNNERS_ATTR, runners)
        return compiled
    except AttributeError:  # a callable without attributes: wrap it, keeping dynamo's calling convention
        def call(*args):
            return compiled(*args)

        call._boxed_call = getattr(compiled, "_boxed_call", False)
        setattr(call, RUNNERS_ATTR, runners)
        return call
