"""`Tensor.bernoulli_(p)` on CPU, bit for bit, in bulk: the same mask and the same generator state after.

Why: with ``dropout_rng="torch"`` each mask is `F.dropout`'s noise, ATen's serial `bernoulli_` (one mt19937 64-bit
draw per element under the generator's lock), which was most of what LoRA costs over the frozen model in a training
step. `exact_bernoulli.cpp` draws the same words in blocks (twist and temper in vector loops, a threshold on the
53-bit integer) and leaves the generator where `bernoulli_` leaves it, so a seeded run (peft's masks, every later
draw) is unchanged. Over 1024 x 1376 here: 9.3-9.7 ms for torch's, 1.2-1.4 ms for this one, uint8, float32 or
bfloat16, one thread or two (`python -m benchmarks.profile masks 1024 1376`, min of 4 rounds, 2026-12-01).

It is built at first use (`torch.utils.cpp_extension`, cached in torch's extension dir) and used only when torch's
own kernel is that serial one (checked once: on Intel CPUs with MKL torch draws from MKL instead) and the build's
output matches it; otherwise, or with ``RUNLORA_FX_EXACT_BERNOULLI=0`` (read at first use), `bernoulli_` is torch's.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sysconfig
import warnings
from pathlib import Path
from typing import Iterator

import torch

ENV = "RUNLORA_FX_EXACT_BERNOULLI"
DTYPES = frozenset({torch.uint8, torch.bool, torch.float32, torch.float64, torch.bfloat16, torch.float16})

_op = None  # the loaded op; False once it is known to be unavailable


def bernoulli_(out: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """`out.bernoulli_(p, generator=generator)`, through the exact kernel when it applies (a contiguous CPU tensor
    of a `DTYPES` dtype, not requiring grad, with no dispatch mode active) and is available."""
    if (type(out) is torch.Tensor and out.is_cpu and out.dtype in DTYPES and out.is_contiguous() and not out.requires_grad and 0.0 <= p <= 1.0
            and (generator is None or generator.device.type == "cpu")
            and not torch._C._len_torch_dispatch_stack()):
        op = _load()
        if op and op(out, float(p), generator):
            return out
    return out.bernoulli_(p, generator=generator)


def available() -> bool:
    """Whether `bernoulli_` runs the exact kernel in this process (builds it on first call)."""
    return bool(_load())


def _load():
    """The op, built and checked on first use (`ENV` is read then), or False."""
    global _op
    if _op is None:
        _op = False
        if os.environ.get(ENV) != "0" and _torch_draws_per_element():
            try:
                _op = _build()
            except Exception as err:  # no compiler, no ninja, a header change: torch's kernel stays
                warnings.warn(f"runlora_fx: the exact bernoulli_ kernel did not build ({type(err).__name__}: "
                              f"{str(err)[:200]}); dropout masks use torch's bernoulli_", RuntimeWarning)
            if _op and not _matches_torch(_op):
                warnings.warn("runlora_fx: the exact bernoulli_ kernel does not match this torch's bernoulli_; "
                              "dropout masks use torch's", RuntimeWarning)
                _op = False
    return _op


def _torch_draws_per_element() -> bool:
    """torch's bernoulli_ takes two 32-bit mt19937 outputs per element (its serial kernel), not one seed (MKL)."""
    a, b = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    torch.empty(3, dtype=torch.uint8).bernoulli_(0.5, generator=a)
    torch.empty(6, dtype=torch.int32).random_(0, 2, generator=b)  # a small range: one 32-bit output each
    return torch.equal(a.get_state(), b.get_state())


def _matches_torch(op) -> bool:
    """One check of the built kernel against torch on a private generator, across a block boundary."""
    a, b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    want = torch.empty(1001, dtype=torch.float32).bernoulli_(0.3, generator=a)
    got = torch.empty(1001, dtype=torch.float32)
    return op(got, 0.3, b) and torch.equal(got, want) and torch.equal(a.get_state(), b.get_state())


def _build():
    from torch.utils import cpp_extension

    src = Path(__file__).with_suffix(".cpp")
    with _ninja_on_path():
        cpp_extension.load("runlora_fx_exact_bernoulli", [str(src)], extra_cflags=["-O3"], is_python_module=False)
    return torch.ops.runlora_fx_rng.bernoulli_


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """torch runs `ninja` from PATH; the `ninja` package installs it next to this Python, which a venv that is not
    activated does not put on PATH."""
    path, scripts = os.environ.get("PATH"), sysconfig.get_path("scripts")
    if shutil.which("ninja") is not None or not scripts:
        yield
        return
    os.environ["PATH"] = os.pathsep.join(filter(None, (scripts, path)))
    try:
        yield
    finally:
        if path is None:
            del os.environ["PATH"]
        else:
            os.environ["PATH"] = path
