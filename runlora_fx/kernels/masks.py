"""Dropout masks and bit packing: their runtime and their step ops (``draw_mask``, ``rng_state``, ``redraw_mask``,
``pack_bits``, ``unpack_bits``), registered in `planner.ops` on import.

The mask is drawn as `F.dropout` draws its noise (the same RNG use, the same zeros), so a seeded run keeps peft's
mask; it is {0, 1}, the 1/(1-p) being folded into the plan's scales.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..planner.ops import StepOp, register
from . import exact_bernoulli


def draw_mask(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, p: float) -> torch.Tensor:
    """A {0, 1} dropout mask, drawn as `F.dropout` draws its noise on CPU (bernoulli(1-p) over x's shape): the
    same RNG use and the same zeros, so a seeded run keeps peft's mask; the 1/(1-p) lives in the plan's scales.
    On CPU the draw is `exact_bernoulli`'s (the same mask and generator state as torch's, faster)."""
    return exact_bernoulli.bernoulli_(torch.empty(shape, dtype=dtype, device=device), 1 - p)


def draw_mask_like(x: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
    return draw_mask(x.shape, dtype, x.device, p)


@torch.library.custom_op("runlora_fx::seeded_keep", mutates_args=())
def seeded_keep(seed: torch.Tensor, shape: list[int], p: float) -> torch.Tensor:
    """The bool keep mask bernoulli(1-p) of `shape`, drawn from a private generator seeded by `seed`: for compiled
    graphs, where `passes.joint` swaps inductor's per-element draw (26 ms over 1.4 M values on one thread here,
    against 1.2-1.4 ms for `exact_bernoulli`) for it. A pure function of the seed tensor, so the partitioner may
    recompute it in backward instead of saving it; the keep probability is exactly 1-p, as inductor's."""
    gen = torch.Generator(device=seed.device)
    gen.manual_seed(int(seed))
    return exact_bernoulli.bernoulli_(torch.empty(shape, dtype=torch.bool, device=seed.device), 1 - p, gen)


@seeded_keep.register_fake
def _(seed: torch.Tensor, shape: list[int], p: float) -> torch.Tensor:
    return seed.new_empty(shape, dtype=torch.bool)


def rng_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def rng_state_for(x: torch.Tensor) -> torch.Tensor:
    return rng_state(x.device)


def redraw_mask(state: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                p: float) -> torch.Tensor:
    """Draw again the mask drawn in forward, from the generator state saved just before it, leaving the
    global RNG untouched."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if device.type == "cuda":
            torch.cuda.set_rng_state(state, device)
        else:
            torch.set_rng_state(state)
        return draw_mask(shape, dtype, device, p)


def redraw_mask_on(state: torch.Tensor, like: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
                   p: float) -> torch.Tensor:
    """`redraw_mask` on the device of `like` (the incoming gradient)."""
    return redraw_mask(state, shape, dtype, like.device, p)


# Bit packing in a few whole-tensor int64 passes instead of per-bit ones. Packing: 8 mask bytes b_0..b_7 read
# as one little-endian int64 v = sum b_j 2^(8j); v * sum_j 2^(56-7j) puts b_j alone at bit 56+j (every other
# partial product lands at a distinct bit below 56 or overflows past 63, so nothing carries into the top byte).
# Unpacking looks each byte up in a 256-entry table of its 8 bits as bytes (one table per device, 2 KiB).
_PACK_MAGIC = 0x0102040810204080
_UNPACK_TABLES: dict[torch.device, torch.Tensor] = {}


def _unpack_table(device: torch.device) -> torch.Tensor:
    if device not in _UNPACK_TABLES:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        _UNPACK_TABLES[device] = bits.to(torch.uint8).view(torch.int64).reshape(256).to(device)
    return _UNPACK_TABLES[device]


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A {0, 1} uint8 mask as a bitmap, 8 elements per byte (element j of each group of 8 in bit j).

    >>> pack_bits(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1], dtype=torch.uint8)).tolist()
    [13, 1]
    """
    flat = mask.reshape(-1)
    if flat.numel() % 8:
        flat = F.pad(flat, (0, -flat.numel() % 8))
    return ((flat.view(torch.int64) * _PACK_MAGIC) >> 56).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The uint8 {0, 1} mask of `shape` that `pack_bits` packed.

    >>> unpack_bits(torch.tensor([13, 1], dtype=torch.uint8), (9,)).tolist()
    [1, 0, 1, 1, 0, 0, 0, 0, 1]
    """
    n = math.prod(shape)
    return _unpack_table(packed.device)[packed.long()].view(torch.uint8)[:n].view(shape)


# Packing multiplies and shifts the mask read as int64 before narrowing; unpacking widens the packed bytes to int64
# indices before the table lookup: extra bytes per mask element and extra kernels beyond the step's own pass.
_PACK_EXTRA = (5, 2)
_UNPACK_EXTRA = (2, 1)

register(StepOp(  # a {0, 1} dropout mask in `dtype`, RNG-identical to F.dropout's
    "draw_mask", formula=lambda s: f"bernoulli(1-{s.p:g}) like {s.args[0]}",
    emit=lambda em, s, a: em.call(draw_mask_like, a[0], s.p, s.dtype),
    reads=False, pricing="throughput", rate="rng_rate"))

register(StepOp(  # the generator state before a draw (seed store): no kernel
    "rng_state", formula=lambda s: f"rng state before drawing for {s.args[0]}",
    emit=lambda em, s, a: em.call(rng_state_for, a[0]),
    kernels=lambda s: 0, reads=False, pricing="bandwidth"))

register(StepOp(
    "redraw_mask", formula=lambda s: f"bernoulli(1-{s.p:g}) redrawn from {s.args[0]}",
    emit=lambda em, s, a: em.call(redraw_mask_on, a[0], em.env["G"], em.shapes[s.out], s.dtype, s.p),
    reads=False, pricing="throughput", rate="rng_rate"))

register(StepOp(
    "pack_bits", formula=lambda s: f"bits({s.args[0]})", emit=lambda em, s, a: em.call(pack_bits, a[0]),
    kernels=lambda s: 1 + _PACK_EXTRA[1],
    extra_bytes=lambda s, low: _PACK_EXTRA[0] * math.prod(low.shapes[s.args[0]]),
    pricing="throughput", rate="pack_rate"))

register(StepOp(
    "unpack_bits", formula=lambda s: f"unbits({s.args[0]})",
    emit=lambda em, s, a: em.call(unpack_bits, a[0], em.shapes[s.out]),
    kernels=lambda s: 1 + _UNPACK_EXTRA[1],
    extra_bytes=lambda s, low: _UNPACK_EXTRA[0] * math.prod(low.shapes[s.out]),
    pricing="throughput", rate="unpack_rate"))
