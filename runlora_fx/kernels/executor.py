"""Run a lowered program: one small interpreter for every Plan, so what a Plan prints is what executes.

Each step is one or two torch calls; the interpreter adds a dict lookup per step, negligible next to the matmuls
of any layer worth planning.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..planner.expr import Step
from .rng import fast_mask, new_seed


def draw_mask(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, p: float) -> torch.Tensor:
    """A {0, 1} dropout mask, drawn as `F.dropout` draws its noise on CPU (bernoulli(1-p) over x's shape): the
    same RNG use and the same zeros, so a seeded run keeps peft's mask; the 1/(1-p) lives in the plan's scales."""
    return torch.empty(shape, dtype=dtype, device=device).bernoulli_(1 - p)


def rng_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


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


# Bit packing in a few whole-tensor int64 passes instead of per-bit ones. Packing: 8 mask bytes b_0..b_7 read
# as one little-endian int64 v = sum b_j 2^(8j); v * sum_j 2^(56-7j) puts b_j alone at bit 56+j (every other
# partial product lands at a distinct bit below 56 or overflows past 63, so nothing carries into the top byte).
# Unpacking looks each byte up in a 256-entry table of its 8 bits as bytes.
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


def _mm(a: torch.Tensor, b: torch.Tensor, s: Step) -> torch.Tensor:
    return (a.t() if s.ta else a), (b.t() if s.tb else b)


def run(steps: list[Step], env: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Execute `steps` in order, adding each result to `env` (returned). A 4-bit weight's quant state sits in `env`
    as "qs" next to the packed weight "W"."""
    for s in steps:
        a = [env[name] for name in s.args]
        if s.op == "linear":
            out = F.linear(a[0], a[1], a[2] if len(a) > 2 else None)
        elif s.op == "mm":
            x, y = _mm(a[0], a[1], s)
            out = x @ y
            if s.alpha != 1.0:
                out.mul_(s.alpha)
        elif s.op == "addmm":
            x, y = _mm(a[1], a[2], s)
            out = torch.addmm(a[0], x, y, alpha=s.alpha)
        elif s.op == "cast":
            out = a[0].to(s.dtype)
        elif s.op == "draw_mask":
            out = draw_mask(a[0].shape, s.dtype, a[0].device, s.p)
        elif s.op == "rng_state":
            out = rng_state(a[0].device)
        elif s.op == "redraw_mask":
            out = redraw_mask(a[0], shapes[s.out], s.dtype, env["G"].device, s.p)
        elif s.op == "rng_seed":
            out = new_seed(a[0].device)
        elif s.op == "fast_mask":
            out = fast_mask(a[0], shapes[s.out], (env["G"] if "G" in env else env["x"]).device, s.p, s.dtype)
        elif s.op == "mul":
            out = a[0] * a[1]
        elif s.op == "addcmul":
            out = torch.addcmul(a[0], a[1], a[2], value=s.alpha)
        elif s.op == "scale":
            out = a[0] * s.alpha
        elif s.op == "pack_bits":
            out = pack_bits(a[0])
        elif s.op == "unpack_bits":
            out = unpack_bits(a[0], shapes[s.out])
        elif s.op == "axpy":
            out = torch.add(a[0], a[1], alpha=s.alpha)
        elif s.op == "sum_rows":
            out = a[0].sum(0)
            if s.alpha != 1.0:
                out.mul_(s.alpha)
        elif s.op == "dequantize":
            from .qlora import dequantize  # bitsandbytes is imported only when a 4-bit plan runs

            out = dequantize(a[0], a[1], s.dtype)
        else:  # pragma: no cover - the lowering only emits the ops above
            raise NotImplementedError(f"executor has no op {s.op!r}")
        env[s.out] = out
    return env
