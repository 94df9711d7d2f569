"""Run a list of steps by name (tests and debugging): the steps become one FX graph (`planner.graphs`) and run.

Plans do not come through here: the eager node and the compiled ops call a Plan's own cached graphs
(`Plan.forward_graph`, `Plan.backward_graph`).
"""
from __future__ import annotations

import torch

from ..planner.expr import Step
from ..planner.graphs import steps_graph


def run(steps: list[Step], env: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Execute `steps` in order over the named inputs in `env`, adding each result to `env` (returned)."""
    inputs = list(env)
    results = steps_graph(steps, inputs, shapes).forward(*[env[n] for n in inputs])
    env.update(zip((s.out for s in steps), results))
    return env
