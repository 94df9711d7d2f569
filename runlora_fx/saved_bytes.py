"""`SavedBytes`: the exact count of what autograd keeps from forward to backward, for the demo and benchmarks."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch


class SavedBytes:
    """Bytes kept from forward to backward, counted exactly with `saved_tensors_hooks` (no timing, no noise).

    A tensor is counted once per storage (x saved by two nodes is one buffer), and tensors whose storage belongs to
    `exclude` (parameters and buffers: alive anyway) are not counted. `raw` is the plain sum over every save.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self.exclude = {_storage_key(t) for t in exclude}
        self.storages: dict[tuple, int] = {}
        self.raw = 0
        self.count = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.count += 1
        self.raw += t.nbytes
        key = _storage_key(t)
        if key not in self.exclude and t.device.type != "meta":
            self.storages[key] = max(self.storages.get(key, 0), t.untyped_storage().nbytes())
        return t

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    @contextmanager
    def hooks(self):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            yield self

    def to_dict(self) -> dict:
        return {"bytes": self.bytes, "raw_bytes": self.raw, "tensors": self.count, "storages": len(self.storages)}


def _storage_key(t: torch.Tensor) -> tuple:
    try:
        return (t.device.type, t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # tensors without storage (fake, sparse): count by identity
        return ("id", id(t))
