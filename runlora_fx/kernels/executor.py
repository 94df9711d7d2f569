"""Run a lowered program: one small interpreter for every Plan, so what a Plan prints is what executes.

Each step is one or two torch calls; the interpreter adds a dict lookup per step, negligible next to the matmuls
of any layer worth planning.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..planner.expr import Step


def draw_dropout_noise(x: torch.Tensor, p: float) -> torch.Tensor:
    """torch's dropout noise exactly as `F.dropout` draws it on CPU: bernoulli(1-p) in x's dtype, divided by 1-p.

    Drawing it this way consumes the RNG like `F.dropout(x, p)` does, so a seeded run keeps peft's mask.
    """
    return torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)


def rng_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def redraw_dropout_noise(state: torch.Tensor, like: torch.Tensor, p: float) -> torch.Tensor:
    """Regenerate the noise drawn in forward from the generator state saved just before it, leaving the
    global RNG untouched."""
    device = like.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if device.type == "cuda":
            torch.cuda.set_rng_state(state, device)
        else:
            torch.set_rng_state(state)
        return draw_dropout_noise(like, p)


_BIT_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def _bit_weights(device: torch.device) -> torch.Tensor:
    if device not in _BIT_WEIGHTS:
        _BIT_WEIGHTS[device] = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)
    return _BIT_WEIGHTS[device]


def pack_bits(t: torch.Tensor) -> torch.Tensor:
    """Nonzero entries of `t` as a bitmap, 8 per byte (1/8 of a bool mask)."""
    flat = (t != 0).flatten().to(torch.uint8)
    flat = F.pad(flat, (0, (-flat.numel()) % 8)).view(-1, 8)
    return (flat * _bit_weights(t.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= d
    bits = (packed.unsqueeze(1) & _bit_weights(packed.device)) != 0
    return bits.flatten()[:n].view(shape)


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
            out = draw_dropout_noise(a[0], s.p)
        elif s.op == "rng_state":
            out = rng_state(a[0].device)
        elif s.op == "redraw_mask":
            like = torch.empty(shapes[s.out], dtype=s.dtype, device=env["G"].device)
            out = redraw_dropout_noise(a[0], like, s.p)
        elif s.op == "mul":
            out = a[0] * a[1]
        elif s.op == "scale":
            out = a[0] * s.alpha
        elif s.op == "to_bool":
            out = a[0] != 0
        elif s.op == "from_bool":
            out = a[0].to(s.dtype).div_(1 - s.p)
        elif s.op == "pack_bits":
            out = pack_bits(a[0])
        elif s.op == "unpack_bits":
            out = unpack_bits(a[0], shapes[s.out]).to(s.dtype).div_(1 - s.p)
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
