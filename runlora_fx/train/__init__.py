"""Training methods built on LoRA layers: ReLoRA (merge-and-restart) and Flora (compressed momentum/gradients).

Imported lazily so that `import runlora_fx` does not pull in transformers.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "merge_and_reinit": "relora",
    "reset_optimizer_state": "relora",
    "jagged_cosine_schedule": "relora",
    "ReLoRA": "relora",
    "ReLoRACallback": "relora",
    "Flora": "flora",
    "FloraAccumulator": "flora",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'runlora_fx.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
