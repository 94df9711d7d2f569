"""A planned dense site under `torch.autocast`: run the Plan in autocast's dtype, as `F.linear` would.

Under autocast, `F.linear` casts its floating inputs (x, W, b) to the autocast dtype and returns that dtype, and
peft's layer does the same for every linear of the site (base, A, B), so the whole site runs in the autocast
dtype and its result is in that dtype. Here the tensors are cast once, outside the planned node (autograd casts
the gradients back to each parameter's dtype, as it does for autocast's own casts), and the Plan for that dtype
runs with autocast off, so its steps do not cast again. float64 tensors, which autocast leaves alone, and 4-bit
bases fall back to the original forward.
"""
from __future__ import annotations

import torch

# floating dtypes autocast casts for a lower-precision op (it leaves float64 alone)
CAST_BY_AUTOCAST = (torch.float32, torch.float16, torch.bfloat16)


def accepts(runner, x: torch.Tensor, tensors: list[torch.Tensor], module=None) -> bool:
    """`runner.accepts` as the call would see it: after autocast's casts when autocast is on. `tensors` are the
    site's parameters, the base weight first (None for an absent bias)."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):  # checked inline: this runs at every call
        return runner.accepts(x, tensors[0], module)
    dtype = torch.get_autocast_dtype(device)
    if runner.quant_spec() is not None or any(t is not None and t.dtype not in CAST_BY_AUTOCAST for t in (x, *tensors)):
        return False
    like = lambda t: torch.empty((), dtype=dtype, device=t.device).expand(t.shape)  # noqa: E731 - no copy
    return runner.accepts(like(x), like(tensors[0]), module)


def call(runner, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, adapters, training: bool):
    """`runner(x, weight, bias, adapters, training)`, in autocast's dtype when autocast is on."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return runner(x, weight, bias, adapters, training)
    dtype = torch.get_autocast_dtype(device)

    def cast(t):
        return t if t is None or t.dtype == dtype else t.to(dtype)

    with torch.autocast(x.device.type, enabled=False):
        return runner(cast(x), cast(weight), cast(bias), [tuple(cast(t) for t in ad) for ad in adapters], training)
