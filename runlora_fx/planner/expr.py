"""The algebra of one LoRA site: the problem (`SiteSpec`), the choices (`Program`) and the steps they imply.

A site computes ``y = x W^T + b + sum_k s_k * (drop_k(x) A_k^T B_k^T + lb_k)``; W is dense, or a bitsandbytes
4-bit weight (`QuantSpec`) that the program dequantizes where it needs it. Every `Program` is one way to
evaluate that and its joint backward; `enumerate_programs` generates the whole space from a handful of
independent choices (the order of each contraction, what crosses from forward to backward) instead of a
hand-written list, and `build_steps` lowers a program to the step list that `planner.graphs` turns into FX graphs and
`planner.cost` prices. Steps are created on demand, so an intermediate shared by two gradients (``G B`` for dA
and dX, ``G^T x_d`` for dA and dB) is computed once, and nothing is computed or saved for a gradient that
nobody needs.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Iterator, Literal

import torch

from .ops import get as get_op
from .signature import SiteSignature, signature_of

ForwardOrder = Literal["chain", "merged"]
GradAOrder = Literal["zx", "bt"]  # dA = s (G B)^T x_d   |   dA = s B^T (G^T x_d)
GradBOrder = Literal["gu", "ta"]  # dB = s G^T (x_d A^T) |   dB = s (G^T x_d) A^T
GradXOrder = Literal["split", "merged"]  # dX = G W + sum s (G B) A (.)m   |   dX = G (W + sum s B A)
MaskStore = Literal["bool", "bits", "seed", "dense", "none"]

# How a dropout mask crosses to backward. The mask itself is always {0, 1}: the 1/(1-p) that torch's dropout puts
# into its noise is folded into the adapter's scale (`_Lowering.scale`), which costs no pass at all.
#   bool: one byte per element (uint8), drawn that way, so keeping it costs nothing extra (but multiplying x by a
#         byte mask widens it first: cost.widening_time; masks not kept as bytes are drawn in the adapters' dtype)
#   bits: 8 elements per byte, packed in forward and unpacked in backward
#   seed: the generator state before the draw (torch), or the mask's 8-byte seed (dropout_rng="fast"); backward
#         draws the same mask again
#   dense: the mask in the adapters' dtype, as torch's dropout keeps it (peft's program; never cheaper than bool)
MASK_STORES: tuple[str, ...] = ("bool", "bits", "seed")  # searched; "dense" only describes the stock program
RNG_STATE_BYTES = 5056  # torch's CPU generator state (a CUDA/Philox state is 16 bytes)
DROPOUT_RNGS = ("torch", "fast")  # F.dropout's stream (peft's masks) | kernels.rng: 4 elements per random word
FAST_MASK_LEVELS = 1 << 16  # the fast generator compares 16-bit integers with a threshold (kernels.rng)


def effective_p(p: float) -> float:
    """The drop probability the fast generator actually uses: p rounded to a multiple of 2^-16.

    >>> effective_p(0.05) == 3277 / 65536
    True
    """
    return round(p * FAST_MASK_LEVELS) / FAST_MASK_LEVELS
QUANT_TYPES = ("nf4", "fp4")
QUANT_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' 4-bit kernels accept
QUANT_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class QuantSpec:
    """A bitsandbytes 4-bit base weight (`Linear4bit`) as the planner sees it.

    The weight is stored packed, two 4-bit codes per byte, with one absmax per `blocksize` values (itself
    8-bit quantized when `compress_statistics`, bitsandbytes' "double quantization"). bitsandbytes casts x to
    `compute_dtype`, multiplies by the dequantized weight there, and casts the result back to x's dtype.
    """

    quant_type: str = "nf4"
    blocksize: int = 64
    compress_statistics: bool = True
    compute_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {', '.join(QUANT_TYPES)}, got {self.quant_type!r}")
        if self.blocksize not in QUANT_BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {QUANT_BLOCKSIZES}, got {self.blocksize!r}")
        if self.compute_dtype not in QUANT_COMPUTE_DTYPES:
            raise ValueError(f"4-bit compute dtype must be float32, bfloat16 or float16, got {self.compute_dtype}")

    def packed_shape(self, out_features: int, in_features: int) -> tuple[int]:
        """The packed weight: two codes per byte.

        >>> QuantSpec().packed_shape(3, 5)
        (8,)
        """
        return ((out_features * in_features + 1) // 2,)

    def stats_shape(self, out_features: int, in_features: int) -> tuple[int]:
        """One absmax per block (8-bit when compressed; the 256-block second level is left out as negligible).

        >>> QuantSpec(blocksize=64).stats_shape(64, 100)
        (100,)
        """
        return (-(-out_features * in_features // self.blocksize),)

    @property
    def stats_dtype(self) -> torch.dtype:
        return torch.uint8 if self.compress_statistics else torch.float32

    @property
    def label(self) -> str:
        """Short name for tables, e.g. ``nf4+dq:bfloat16``."""
        dq = "+dq" if self.compress_statistics else ""
        return f"{self.quant_type}{dq}:{str(self.compute_dtype).replace('torch.', '')}"


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter of a site as the planner sees it."""

    rank: int
    scale: float = 1.0
    dropout: float = 0.0
    lora_bias: bool = False
    grad_a: bool = True
    grad_b: bool = True
    grad_lora_bias: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"adapter rank must be a positive integer, got {self.rank!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"adapter dropout p must be in [0, 1), got {self.dropout!r}")


@dataclass(frozen=True)
class SiteSpec:
    """Everything the plan of one site depends on. N is the only field that changes between calls."""

    n: int  # rows of x once its leading dims are flattened
    in_features: int
    out_features: int
    adapters: tuple[AdapterSpec, ...]
    bias: bool = False
    dtype: torch.dtype = torch.float32  # input and result dtype; a dense base weight's dtype
    adapter_dtype: torch.dtype | None = None  # None: same as dtype
    grad_x: bool = True
    grad_bias: bool = False
    training: bool = True
    quant: QuantSpec | None = None  # a bitsandbytes 4-bit base (its bias, if any, is in quant.compute_dtype)
    x_readers: int = 1  # sites that read this very x (q/k/v, gate/up): a saved x is shared, so counted as a share
    dropout_rng: str = "torch"  # how masks are drawn (DROPOUT_RNGS); "fast" is not peft's stream

    def __post_init__(self) -> None:
        if self.dropout_rng not in DROPOUT_RNGS:
            raise ValueError(f"dropout_rng must be one of {', '.join(DROPOUT_RNGS)}, got {self.dropout_rng!r}")
        if not isinstance(self.x_readers, int) or self.x_readers < 1:
            raise ValueError(f"x_readers must be a positive integer, got {self.x_readers!r}")
        if not isinstance(self.n, torch.SymInt) and (not isinstance(self.n, int) or self.n < 0):
            raise ValueError(f"n must be a non-negative integer, got {self.n!r}")  # symbolic under torch.compile
        for name in ("in_features", "out_features"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.adapters:
            raise ValueError("a LoRA site needs at least one adapter")
        for dt in (self.dtype, self.adapter_dtype):
            if dt is not None and not dt.is_floating_point:
                raise ValueError(f"LoRA sites need floating dtypes, got {dt}")
        if self.quant is not None and not isinstance(self.quant, QuantSpec):
            raise ValueError(f"quant must be a QuantSpec or None, got {type(self.quant).__name__}")

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.adapter_dtype or self.dtype

    @property
    def base_dtype(self) -> torch.dtype:
        """The dtype of the base matmul: a 4-bit base's compute dtype, else the site's dtype."""
        return self.quant.compute_dtype if self.quant is not None else self.dtype

    @property
    def casts(self) -> bool:
        """peft casts x to the adapters' dtype and sums in the promoted dtype (fp32 adapters over bf16)."""
        return self.compute_dtype != self.dtype

    def drops(self, k: int) -> bool:
        return self.training and self.adapters[k].dropout > 0.0

    @property
    def any_dropout(self) -> bool:
        return any(self.drops(k) for k in range(len(self.adapters)))

    @property
    def merge_valid(self) -> bool:
        """x (W + sum s B A)^T equals the chain only when every adapter reads the very same x as the base, in the
        base's own dtype."""
        return not self.any_dropout and not self.casts and self.base_dtype == self.dtype

    def with_n(self, n: int) -> "SiteSpec":
        return replace(self, n=n)

    @property
    def signature(self) -> SiteSignature:
        """The order, parameters and grad flags of this site's inputs."""
        return signature_of(self)


@dataclass(frozen=True)
class Program:
    """One member of the plan space. Per-adapter choices apply to every adapter of the site alike."""

    forward: ForwardOrder = "chain"
    grad_a: GradAOrder = "zx"
    grad_b: GradBOrder = "gu"
    grad_x: GradXOrder = "split"
    keep_u: bool = True  # save x_d A^T from forward (else recompute it in backward)
    keep_xd: bool = True  # save x_d itself (else save x and re-apply the mask)
    mask: MaskStore = "bool"
    keep_merged: bool = False  # save W + sum s B A from forward (else rebuild it in backward)
    keep_deq: bool = False  # 4-bit base: save the weight dequantized in forward (else dequantize again)

    @property
    def key(self) -> str:
        """Short stable name, e.g. ``chain/zx.gu.split/u+xd+bool`` (``wd``: the dequantized 4-bit weight is kept)."""
        saved = [s for s, on in (("u", self.keep_u), ("xd", self.keep_xd), ("m", self.keep_merged),
                                 ("wd", self.keep_deq)) if on]
        mask = [] if self.mask == "none" else [self.mask]
        return f"{self.forward}/{self.grad_a}.{self.grad_b}.{self.grad_x}/{'+'.join(saved + mask) or '-'}"


STOCK = Program()  # what peft / autograd does: chain forward, saves x_d, x_d A^T and torch's dense dropout noise
STOCK_DROPOUT_MASK: MaskStore = "dense"


def stock_program(spec: SiteSpec) -> Program:
    """The program that peft's layer runs under autograd, written in this algebra (the budget's reference)."""
    return canonical(spec, replace(STOCK, mask=STOCK_DROPOUT_MASK))


def needs(spec: SiteSpec) -> dict[str, bool]:
    """Which gradients exist at all: the pruning that makes LoRA-FA and frozen inputs cheap."""
    ads = spec.adapters
    return {
        "x": spec.grad_x,
        "A": any(a.grad_a for a in ads),
        "B": any(a.grad_b for a in ads),
        "lb": any(a.lora_bias and a.grad_lora_bias for a in ads),
        "b": spec.bias and spec.grad_bias,
    }


def canonical(spec: SiteSpec, p: Program) -> Program:
    """Collapse choices that make no difference for this spec, so each distinct program appears once."""
    need = needs(spec)
    if not need["A"]:
        p = replace(p, grad_a="zx")
    if not need["B"]:
        p = replace(p, grad_b="gu")
    if not need["B"] or p.grad_b != "gu":
        p = replace(p, keep_u=False)
    if not need["x"]:
        p = replace(p, grad_x="split")
    if p.grad_x != "merged":
        p = replace(p, keep_merged=False)
    if spec.quant is None or not need["x"] or p.keep_merged:
        p = replace(p, keep_deq=False)  # backward never reads the base weight
    uses_xd = need["A"] or (need["B"] and (p.grad_b == "ta" or not p.keep_u))
    if not spec.any_dropout:
        # without dropout x_d is x (or its cast): "keep x_d" only matters when a cast makes it a new tensor
        p = replace(p, mask="none")
        if not spec.casts or not uses_xd:
            p = replace(p, keep_xd=True)
    else:
        mask_needed = need["x"] or (uses_xd and not p.keep_xd)
        if not mask_needed:
            p = replace(p, mask="none")
        if not uses_xd:
            p = replace(p, keep_xd=True)
    return p


def valid(spec: SiteSpec, p: Program) -> bool:
    """Whether a program computes the site exactly (up to rounding)."""
    if (p.forward == "merged" or p.grad_x == "merged") and not spec.merge_valid:
        return False
    return True


def enumerate_programs(spec: SiteSpec) -> Iterator[Program]:
    """Every distinct valid program for `spec`: the product of the independent choices, canonicalised."""
    seen: set[Program] = set()
    choices = itertools.product(
        ("chain", "merged"), ("zx", "bt"), ("gu", "ta"), ("split", "merged"),
        (True, False), (True, False), MASK_STORES, (True, False), (False, True) if spec.quant else (False,),
    )
    for combo in choices:
        p = canonical(spec, Program(*combo))
        if p not in seen and valid(spec, p):
            seen.add(p)
            yield p


# ---------------------------------------------------------------------------------------------------------------
# Lowering a program to steps.


@dataclass(frozen=True)
class Step:
    """One operation of a program: `op` names a `planner.ops` StepOp (which defines its formula, price and FX
    emission); `args` name tensors of the run."""

    op: str
    out: str
    args: tuple[str, ...]
    alpha: float = 1.0
    ta: bool = False
    tb: bool = False
    p: float = 0.0  # dropout probability for mask ops
    dtype: torch.dtype | None = None  # cast target / mask dtype
    form: str = ""  # mm only: "" the plain call, "swap" (op(b)^T op(a)^T)^T, "pack" op(b) copied to the other order

    def formula(self) -> str:
        """The step as algebra, e.g. ``W + 2·B0 A0`` (what Plan tables print)."""
        return get_op(self.op).formula(self)


@dataclass
class Lowered:
    """A program as steps: forward steps, the names saved for backward, backward steps, gradient names."""

    forward: list[Step]
    saved: list[str]
    backward: list[Step]
    grads: dict[str, str]  # input name -> name of its gradient in the backward environment
    output: str = "y"
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    x_readers: int = 1  # sites sharing x (SiteSpec.x_readers): a saved x costs this site a share
    signature: SiteSignature | None = None  # the site's inputs: which names are parameters (set by build_steps)


class _Lowering:
    """Builds steps on demand with memoisation: asking twice for ``Z0`` emits its step once."""

    def __init__(self, spec: SiteSpec, program: Program):
        self.spec, self.p = spec, program
        self.steps: list[Step] = []
        self.known: set[str] = set()
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for name, (shape, dtype) in spec.signature.input_layout(spec).items():
            self._input(name, shape, dtype)

    def _input(self, name, shape, dtype):
        self.known.add(name)
        self.shapes[name], self.dtypes[name] = shape, dtype

    def emit(self, step: Step, shape: tuple[int, ...], dtype: torch.dtype) -> str:
        if step.out not in self.known:
            self.steps.append(step)
            self.known.add(step.out)
            self.shapes[step.out], self.dtypes[step.out] = shape, dtype
        return step.out

    # -- shared pieces ---------------------------------------------------------------------------------------
    def xa(self) -> str:
        """x in the adapters' dtype (peft's input cast)."""
        if not self.spec.casts:
            return "x"
        return self.emit(Step("cast", "xa", ("x",), dtype=self.spec.compute_dtype), self.shapes["x"], self.spec.compute_dtype)

    def w(self) -> str:
        """The base weight as a dense matrix: W itself, or a 4-bit W dequantized to the compute dtype."""
        q = self.spec.quant
        if q is None:
            return "W"
        shape = (self.spec.out_features, self.spec.in_features)
        return self.emit(Step("dequantize", "Wd", ("W", "qs"), dtype=q.compute_dtype), shape, q.compute_dtype)

    @property
    def fast(self) -> bool:
        """Masks come from kernels.rng (the stock "dense" store stays torch's draw: it is peft's program)."""
        return self.spec.dropout_rng == "fast" and self.p.mask != "dense"

    def drop_p(self, k: int) -> float:
        """The drop probability actually used: the fast generator's is p rounded to 2^-16."""
        p = self.spec.adapters[k].dropout
        return effective_p(p) if self.fast else p

    def scale(self, k: int) -> float:
        """Adapter k's scale on every product through its masked input: s / (1-p) under dropout, since the mask
        is kept as {0, 1} (torch's noise is mask / (1-p)); the lora bias alone is never dropped."""
        a = self.spec.adapters[k]
        return a.scale / (1.0 - self.drop_p(k)) if self.spec.drops(k) else a.scale

    def cast(self, out: str, name: str, dtype: torch.dtype) -> str:
        """`name` in `dtype`; reuses the adapters' cast (xa, Ga) when it is the same one."""
        if self.dtypes[name] == dtype:
            return name
        return self.emit(Step("cast", out, (name,), dtype=dtype), self.shapes[name], dtype)

    def mm(self, out, a, b, ta=False, tb=False, alpha=1.0) -> str:
        sa, sb = self.shapes[a], self.shapes[b]
        m = sa[1] if ta else sa[0]
        n = sb[0] if tb else sb[1]
        return self.emit(Step("mm", out, (a, b), alpha=alpha, ta=ta, tb=tb), (m, n), self.dtypes[a])

    def addmm(self, out, acc, a, b, ta=False, tb=False, alpha=1.0) -> str:
        return self.emit(Step("addmm", out, (acc, a, b), alpha=alpha, ta=ta, tb=tb), self.shapes[acc], self.dtypes[acc])


class _Forward(_Lowering):
    def mask_dtype(self) -> torch.dtype:
        """One byte per element where forward keeps or packs the mask ("bool", "bits"); otherwise the adapters'
        dtype, drawn as such at no extra cost, so that multiplying x by it needs no widening copy."""
        return torch.uint8 if self.p.mask in ("bool", "bits") else self.spec.compute_dtype

    def dropout_mask(self, k: int) -> str:
        """Adapter k's {0, 1} dropout mask, drawn like F.dropout draws its noise (same RNG use, same zeros), or
        from kernels.rng when fast; in `mask_dtype`."""
        p = self.spec.adapters[k].dropout
        xa, dt = self.xa(), self.mask_dtype()
        if self.fast:
            seed = self.emit(Step("rng_seed", f"sd{k}", (xa,)), (), torch.int64)
            return self.emit(Step("fast_mask", f"md{k}", (seed,), p=p, dtype=dt), self.shapes[xa], dt)
        if self.p.mask == "seed":
            self.emit(Step("rng_state", f"rng{k}", (xa,)), (RNG_STATE_BYTES,), torch.uint8)
        return self.emit(Step("draw_mask", f"md{k}", (xa,), p=p, dtype=dt), self.shapes[xa], dt)

    def xd(self, k: int) -> str:
        if not self.spec.drops(k):
            return self.xa()
        md = self.dropout_mask(k)
        return self.emit(Step("mul", f"xd{k}", (self.xa(), md)), self.shapes["x"], self.spec.compute_dtype)

    def u(self, k: int) -> str:
        return self.mm(f"U{k}", self.xd(k), f"A{k}", tb=True)

    def merged_weight(self) -> str:
        acc = self.w()
        for k, a in enumerate(self.spec.adapters):
            acc = self.addmm(f"M{k}" if k < len(self.spec.adapters) - 1 else "M", acc, f"B{k}", f"A{k}", alpha=a.scale)
        return acc

    def base(self) -> str:
        """x W^T + b in the site's dtype. A 4-bit base runs in its compute dtype, as bitsandbytes does: cast x,
        multiply by the dequantized weight, cast the result back."""
        spec, n, o = self.spec, self.spec.n, self.spec.out_features
        bdt = spec.base_dtype
        xb = (self.xa() if spec.casts and spec.compute_dtype == bdt else self.cast("xq", "x", bdt))
        name = "yb" if bdt == spec.dtype else "yq"
        y = self.emit(Step("linear", name, (xb, self.w()) + (("b",) if spec.bias else ())), (n, o), bdt)
        return self.cast("yb", y, spec.dtype)

    def total_bias(self) -> str | None:
        acc = "b" if self.spec.bias else None
        for k, a in enumerate(self.spec.adapters):
            if a.lora_bias:
                if acc is None:
                    acc = self.emit(Step("scale", f"bt{k}", (f"lb{k}",), alpha=a.scale), (self.spec.out_features,), self.spec.dtype)
                else:
                    acc = self.emit(Step("axpy", f"bt{k}", (acc, f"lb{k}"), alpha=a.scale), (self.spec.out_features,), self.spec.dtype)
        return acc

    def output(self) -> str:
        spec, n, o = self.spec, self.spec.n, self.spec.out_features
        if self.p.forward == "merged":
            bias = self.total_bias()
            args = ("x", self.merged_weight()) + ((bias,) if bias else ())
            return self.emit(Step("linear", "y", args), (n, o), spec.dtype)
        # chain: draw every adapter's mask first, in adapter order, exactly as peft consumes the RNG
        xds = [self.xd(k) for k in range(len(spec.adapters))]
        acc = self.base()
        if spec.casts:
            acc = self.emit(Step("cast", "yc", (acc,), dtype=spec.compute_dtype), (n, o), spec.compute_dtype)
        for k, a in enumerate(spec.adapters):
            u = self.mm(f"U{k}", xds[k], f"A{k}", tb=True)
            acc = self.addmm(f"y{k}", acc, u, f"B{k}", tb=True, alpha=self.scale(k))
            if a.lora_bias:
                acc = self.emit(Step("axpy", f"yl{k}", (acc, f"lb{k}"), alpha=a.scale), (n, o), spec.compute_dtype)
        if spec.casts:
            acc = self.emit(Step("cast", "yo", (acc,), dtype=spec.dtype), (n, o), spec.dtype)
        return acc


def build_steps(spec: SiteSpec, program: Program) -> Lowered:
    """Lower `program` for `spec`: forward steps, saved names, backward steps and the gradients' names."""
    if not valid(spec, program):
        raise ValueError(f"program {program.key} is not valid for this site (dropout or dtype cast prevents merging)")
    fwd = _Forward(spec, program)
    y = fwd.output()
    bwd = _Backward(spec, program, fwd)
    grads = bwd.gradients()
    forward_steps = fwd.steps  # _Backward appended forward-only producers (saved tensors) through fwd.emit
    return Lowered(forward_steps, bwd.saved, bwd.steps, grads, output=y,
                   shapes={**fwd.shapes, **bwd.shapes}, dtypes={**fwd.dtypes, **bwd.dtypes}, x_readers=spec.x_readers,
                   signature=spec.signature)


class _Backward(_Lowering):
    """Backward steps. A tensor the program keeps is taken from forward (emitted there if forward lacks it)."""

    def __init__(self, spec: SiteSpec, program: Program, fwd: _Forward):
        super().__init__(spec, program)
        self.fwd = fwd
        self.saved: list[str] = []
        self.known.discard("x")  # x reaches backward only if the program keeps it
        self._input("G", (spec.n, spec.out_features), spec.dtype)

    def keep(self, name: str) -> str:
        """Take `name` from forward (computing it there if forward did not), and mark it saved."""
        if name not in self.saved:
            self.saved.append(name)
        self._input(name, self.fwd.shapes[name], self.fwd.dtypes[name])
        return name

    def ga(self) -> str:
        if not self.spec.casts:
            return "G"
        return self.emit(Step("cast", "Ga", ("G",), dtype=self.spec.compute_dtype), self.shapes["G"], self.spec.compute_dtype)

    def xa(self) -> str:
        self.keep("x")
        return super().xa()

    def mask(self, k: int) -> str:
        """Adapter k's {0, 1} dropout mask in backward, kept or rebuilt as the program stores it."""
        spec, p = self.spec, self.spec.adapters[k].dropout
        shape, name = self.fwd.shapes["x"], f"md{k}"
        if name in self.known:
            return name
        fmd = self.fwd.dropout_mask(k)
        store = self.p.mask
        if store in ("bool", "dense"):
            return self.keep(fmd)
        dt = self.fwd.mask_dtype()  # a redrawn mask is used as drawn: in the adapters' dtype
        if store == "seed" and self.fast:
            self.keep(f"sd{k}")
            return self.emit(Step("fast_mask", name, (f"sd{k}",), p=p, dtype=dt), shape, dt)
        if store == "seed":
            self.keep(f"rng{k}")
            return self.emit(Step("redraw_mask", name, (f"rng{k}",), p=p, dtype=dt), shape, dt)
        nbytes = -(-math.prod(shape) // 8)
        self.fwd.emit(Step("pack_bits", f"mp{k}", (fmd,)), (nbytes,), torch.uint8)
        self.keep(f"mp{k}")
        return self.emit(Step("unpack_bits", name, (f"mp{k}",)), shape, torch.uint8)

    def xd(self, k: int) -> str:
        if self.p.keep_xd:
            return self.keep(self.fwd.xd(k))
        if not self.spec.drops(k):
            return self.xa()
        return self.emit(Step("mul", f"xd{k}", (self.xa(), self.mask(k))), self.fwd.shapes["x"], self.spec.compute_dtype)

    def z(self, k: int) -> str:
        return self.mm(f"Z{k}", self.ga(), f"B{k}")

    def t(self, k: int) -> str:
        return self.mm(f"T{k}", self.ga(), self.xd(k), ta=True)

    def u(self, k: int) -> str:
        if self.p.keep_u:
            self.fwd.u(k)
            return self.keep(f"U{k}")
        return self.mm(f"U{k}", self.xd(k), f"A{k}", tb=True)

    def w(self) -> str:
        if self.p.keep_deq:
            self.fwd.w()
            return self.keep("Wd")
        return super().w()

    def merged_weight(self) -> str:
        if self.p.keep_merged:
            self.fwd.merged_weight()
            return self.keep("M")
        acc = self.w()
        for k, a in enumerate(self.spec.adapters):
            acc = self.addmm(f"M{k}" if k < len(self.spec.adapters) - 1 else "M", acc, f"B{k}", f"A{k}", alpha=a.scale)
        return acc

    def gradients(self) -> dict[str, str]:
        spec, p, grads = self.spec, self.p, {}
        for k, a in enumerate(spec.adapters):
            if a.grad_a:
                if p.grad_a == "zx":
                    grads[f"A{k}"] = self.mm(f"dA{k}", self.z(k), self.xd(k), ta=True, alpha=self.scale(k))
                else:
                    grads[f"A{k}"] = self.mm(f"dA{k}", f"B{k}", self.t(k), ta=True, alpha=self.scale(k))
            if a.grad_b:
                if p.grad_b == "gu":
                    grads[f"B{k}"] = self.mm(f"dB{k}", self.ga(), self.u(k), ta=True, alpha=self.scale(k))
                else:
                    grads[f"B{k}"] = self.mm(f"dB{k}", self.t(k), f"A{k}", tb=True, alpha=self.scale(k))
            if a.lora_bias and a.grad_lora_bias:
                grads[f"lb{k}"] = self.emit(Step("sum_rows", f"dlb{k}", (self.ga(),), alpha=a.scale), (spec.out_features,), spec.compute_dtype)
        if spec.bias and spec.grad_bias:
            grads["b"] = self.emit(Step("sum_rows", "db", ("G",)), (spec.out_features,), spec.dtype)
        if spec.grad_x:
            grads["x"] = self.grad_x()
        return grads

    def grad_x(self) -> str:
        spec, n, i = self.spec, self.spec.n, self.spec.in_features
        if self.p.grad_x == "merged":
            return self.mm("dx", "G", self.merged_weight())
        bdt = spec.base_dtype
        if bdt == spec.dtype:
            dx = self.mm("dxb", "G", self.w())
        else:  # a 4-bit base in another compute dtype: G cast in, the product cast back (bitsandbytes' backward)
            g = self.ga() if spec.casts and spec.compute_dtype == bdt else self.cast("Gq", "G", bdt)
            dx = self.cast("dxb", self.mm("dxq", g, self.w()), spec.dtype)
        low = None
        for k, a in enumerate(spec.adapters):
            if not spec.casts:  # accumulate straight into dx: one addmm, or one fused pass through the mask
                if not spec.drops(k):
                    dx = self.addmm(f"dx{k}", dx, self.z(k), f"A{k}", alpha=a.scale)
                else:
                    dl = self.mm(f"dl{k}", self.z(k), f"A{k}")
                    args = (dx, dl, self.mask(k))
                    dx = self.emit(Step("addcmul", f"dx{k}", args, alpha=self.scale(k)), (n, i), spec.dtype)
                continue
            part = self.mm(f"dl{k}", self.z(k), f"A{k}", alpha=self.scale(k))
            if spec.drops(k):
                part = self.emit(Step("mul", f"dm{k}", (part, self.mask(k))), (n, i), spec.compute_dtype)
            low = part if low is None else self.emit(Step("axpy", f"ds{k}", (low, part)), (n, i), spec.compute_dtype)
        if low is not None:
            if spec.casts:
                low = self.emit(Step("cast", "dlc", (low,), dtype=spec.dtype), (n, i), spec.dtype)
            dx = self.emit(Step("axpy", "dx", (dx, low)), (n, i), spec.dtype)
        return dx


def expressions(low: Lowered) -> dict[str, str]:
    """The output and every gradient as a tree over the inputs alone: intermediate names (and scales) erased, so
    two programs compare by what they compute and in which order, e.g. ``dA0: mm(tr(mm(G,B0)),x)``."""
    forward = {s.out: s for s in low.forward}

    def expand(name: str, phase_defs: dict[str, Step], fallback: dict[str, Step]) -> str:
        step = phase_defs.get(name) or fallback.get(name)
        if step is None:
            return name
        defs = phase_defs if name in phase_defs else fallback
        sub = [expand(a, defs, forward) for a in step.args]
        render = get_op(step.op).expression
        return render(step, sub) if render else f"{step.op}({','.join(sub)})"

    out = {"y": expand(low.output, forward, {})}
    for grad_of, name in low.grads.items():
        # backward names may shadow forward ones (a mask rebuilt, M recomputed): resolve in backward order
        upto = {}
        for s in low.backward:
            upto[s.out] = s
            if s.out == name:
                break
        out["d" + grad_of] = expand(name, upto, forward)
    return out
