"""`OptimizeConfig`: the options shared by `optimize(model)` and `torch.compile(backend="runlora")`."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from .planner.search import SearchOptions

INNER_COMPILERS = ("inductor", "aot_eager", "eager")
SEARCH_FIELDS = tuple(f.name for f in fields(SearchOptions))


@dataclass(frozen=True)
class OptimizeConfig:
    """How sites are planned and, for the backend, what compiles the rewritten graph.

    search_options: how each site's program is chosen (`SearchOptions`: objective, memory_budget, time_slack,
        strategy, dropout_rng: "torch" for peft's masks bit for bit or "fast" for `kernels.rng`; validated there).
    inner: the compiler the backend hands the rewritten graph to: "inductor", "aot_eager" or "eager".

    Build it directly (`OptimizeConfig(SearchOptions(objective="memory"))`) or from a user's flat options with
    `from_options` (what `optimize(model, **options)` and the backend's `options` dict do).
    """

    search_options: SearchOptions = field(default_factory=SearchOptions)
    inner: str = "inductor"

    def __post_init__(self) -> None:
        if not isinstance(self.search_options, SearchOptions):
            raise TypeError(f"search_options must be a SearchOptions, got {type(self.search_options).__name__}")
        if self.inner not in INNER_COMPILERS:
            raise ValueError(f"inner must be one of {', '.join(INNER_COMPILERS)}, got {self.inner!r}")

    @classmethod
    def from_options(cls, options: dict | None) -> "OptimizeConfig":
        """Build from a user's flat dict (the SearchOptions fields and `inner`), naming any option that does not
        exist."""
        options = dict(options or {})
        known = {*SEARCH_FIELDS, "inner"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown runlora_fx option(s): {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        search = SearchOptions(**{k: v for k, v in options.items() if k in SEARCH_FIELDS})
        return cls(search, **{k: v for k, v in options.items() if k not in SEARCH_FIELDS})
