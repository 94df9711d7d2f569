"""`OptimizeConfig`: the options shared by `optimize(model)` and `torch.compile(backend="runlora")`."""
from __future__ import annotations

from dataclasses import dataclass, fields

from .planner.search import SearchOptions

INNER_COMPILERS = ("inductor", "aot_eager", "eager")


@dataclass(frozen=True)
class OptimizeConfig:
    """How sites are planned and, for the backend, what compiles the rewritten graph.

    objective: "time" (fastest within the memory budget) or "memory" (lightest within `time_slack`).
    memory_budget: saved-for-backward bytes allowed per site, as a fraction of what peft's layer saves (1.0).
    time_slack: for objective="memory", how much slower than the fastest a lighter program may be.
    strategy: "model" (cost model), "flops" (RunLoRA's FLOPs argmin) or "lightest".
    inner: the compiler the backend hands the rewritten graph to: "inductor", "aot_eager" or "eager".
    dropout_rng: "torch" (peft's dropout masks bit for bit) or "fast" (`kernels.rng`: masks with the same keep
        probability within 2^-16, drawn several elements per random word; another random stream).
    """

    objective: str = "time"
    memory_budget: float = 1.0
    time_slack: float = 0.10
    strategy: str = "model"
    inner: str = "inductor"
    dropout_rng: str = "torch"

    def __post_init__(self) -> None:
        if self.inner not in INNER_COMPILERS:
            raise ValueError(f"inner must be one of {', '.join(INNER_COMPILERS)}, got {self.inner!r}")
        self.search_options  # validates the planner options

    @property
    def search_options(self) -> SearchOptions:
        return SearchOptions(self.objective, self.memory_budget, self.time_slack, self.strategy, self.dropout_rng)

    @classmethod
    def from_options(cls, options: dict | None) -> "OptimizeConfig":
        """Build from a user's dict, naming any option that does not exist."""
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown runlora_fx option(s): {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return cls(**options)
