"""The RunLoRA paper's rule, written as a baseline: FLOPs argmin over its forward1-4 and backward1-8.

The paper's code (github.com/KamikaziZen/RunLoRA, `runlora/runlora.py`, `RunLoRACollection.get_best_by_flops`)
counts the FLOPs of each forward and each backward separately and takes the first minimum of each. In this
project's notation (x: N x i, W: o x i, A: r x i, B: o x r, G = dY):

* forward1 / forward3: ``y = x W^T + (x A^T) B^T`` (the same products in another order: equal FLOPs, so the
  argmin always returns forward1); forward2 / forward4: ``y = x (W + B A)^T`` (forward4 ties with forward2).
* backward1..8 are the eight combinations of three choices, each recomputing ``x A^T`` rather than saving it:
  dA as ``(G B)^T x`` ("zx") or ``B^T (G^T x)`` ("bt"); dB as ``G^T (x A^T)`` ("gu") or ``(G^T x) A^T``
  ("ta"); dX as ``G W + (G B) A`` ("split") or ``G (W + B A)`` ("merged").

The paper's code ignores dropout. With dropout the merged forms are not equivalent, so this baseline applies the
rule to the valid ones only (forward1; backward 1, 2, 3, 6) and lets the dropout module outside the LoRA
function save torch's dense noise, as a user wrapping the paper's layer would.
"""
from __future__ import annotations

from runlora_fx.planner.expr import Program, SiteSpec, canonical, valid

FORWARDS: dict[str, str] = {"forward1": "chain", "forward2": "merged", "forward3": "chain", "forward4": "merged"}
BACKWARDS: dict[str, tuple[str, str, str]] = {  # (grad_a, grad_b, grad_x)
    "backward1": ("zx", "gu", "split"),
    "backward2": ("zx", "ta", "split"),
    "backward3": ("bt", "ta", "split"),
    "backward4": ("bt", "ta", "merged"),
    "backward5": ("zx", "gu", "merged"),
    "backward6": ("bt", "gu", "split"),
    "backward7": ("bt", "gu", "merged"),
    "backward8": ("zx", "ta", "merged"),
}


def forward_flops(name: str, n: int, i: int, o: int, r: int) -> int:
    """FLOPs of a paper forward (bias ignored, as the paper counts).

    >>> forward_flops("forward1", 2, 3, 5, 1) == 2*2*3*5 + 2*2*3*1 + 2*2*1*5
    True
    >>> forward_flops("forward2", 2, 3, 5, 1) == 2*3*5*1 + 2*2*3*5
    True
    """
    if FORWARDS[name] == "chain":
        return 2 * n * i * o + 2 * n * i * r + 2 * n * r * o
    return 2 * i * o * r + 2 * n * i * o


def backward_flops(name: str, n: int, i: int, o: int, r: int) -> int:
    """FLOPs of a paper backward with x, A and B all needing gradients; shared products counted once.

    >>> n, i, o, r = 7, 11, 13, 3
    >>> backward_flops("backward1", n, i, o, r) == 2*n*i*o + 4*n*r*o + 6*n*i*r
    True
    >>> backward_flops("backward4", n, i, o, r) == 4*n*i*o + 6*i*r*o
    True
    """
    grad_a, grad_b, grad_x = BACKWARDS[name]
    products: dict[str, int] = {}
    if grad_a == "zx":
        products["Z = G B"] = 2 * n * o * r
        products["dA = Z^T x"] = 2 * r * n * i
    else:
        products["T = G^T x"] = 2 * o * n * i
        products["dA = B^T T"] = 2 * r * o * i
    if grad_b == "gu":
        products["U = x A^T"] = 2 * n * i * r
        products["dB = G^T U"] = 2 * o * n * r
    else:
        products["T = G^T x"] = 2 * o * n * i
        products["dB = T A^T"] = 2 * o * i * r
    if grad_x == "split":
        products["Z = G B"] = 2 * n * o * r
        products["dX = G W + Z A"] = 2 * n * o * i + 2 * n * r * i
    else:
        products["dX = G (W + B A)"] = 2 * o * r * i + 2 * n * o * i
    return sum(products.values())


def choose(spec: SiteSpec) -> tuple[str, str]:
    """The (forward, backward) names the paper's FLOPs rule picks for `spec` (first minimum, like its code).

    >>> from runlora_fx.planner.expr import AdapterSpec
    >>> choose(SiteSpec(8192, 1024, 2736, (AdapterSpec(8),)))
    ('forward2', 'backward5')
    >>> choose(SiteSpec(64, 1024, 2736, (AdapterSpec(8),)))
    ('forward1', 'backward1')
    """
    n, i, o = spec.n, spec.in_features, spec.out_features
    r = max(a.rank for a in spec.adapters)

    def ok(fwd: str, bwd: str) -> bool:
        return valid(spec, _program(fwd, bwd))

    fwds = [f for f in FORWARDS if ok(f, "backward1")]
    bwds = [b for b in BACKWARDS if ok("forward1", b)]
    fwd = min(fwds, key=lambda f: (forward_flops(f, n, i, o, r), list(FORWARDS).index(f)))
    bwd = min(bwds, key=lambda b: (backward_flops(b, n, i, o, r), list(BACKWARDS).index(b)))
    return fwd, bwd


def _program(fwd: str, bwd: str, dropout: bool = False) -> Program:
    grad_a, grad_b, grad_x = BACKWARDS[bwd]
    return Program(forward=FORWARDS[fwd], grad_a=grad_a, grad_b=grad_b, grad_x=grad_x, keep_u=False,
                   keep_xd=True, mask="dense" if dropout else "none", keep_merged=False)


def program(spec: SiteSpec) -> Program:
    """The paper's pick for `spec` as a Program of this project's algebra (runnable with `run_plan`)."""
    fwd, bwd = choose(spec)
    return canonical(spec, _program(fwd, bwd, spec.any_dropout))


def names(spec: SiteSpec) -> str:
    """``forward2+backward5``: the paper's own names for its pick."""
    return "+".join(choose(spec))
