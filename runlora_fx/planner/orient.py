"""Orient a lowered program's skinny products: compute each in whichever equivalent form this device runs faster.

Why: a BLAS picks its kernel from the operands' memory order, and for products whose output is only r columns
wide it can pick a slow one. MKL on an AVX2 CPU ran LoRA's Z = G B (B stored o x r) 1.8-3.2x and dB = G^T U 2.9-6.1x
slower than the same products as G (B^T packed)^T and (U^T G)^T at r = 4..8 (fp32, N = 512..2048; `python -m
benchmarks.profile skinny`), and faster at r >= 16. Which form wins is a property of the device and its BLAS, so
`calibrate()` measures it (`DeviceProfile.skinny_gain`) and this pass only reads the profile (whose defaults,
before calibration, hold gains for fp32 on MKL CPUs only). The forms are the same sums, so only rounding can differ; stock (peft's) programs are
never oriented, since they are priced as peft runs them.
"""
from __future__ import annotations

from dataclasses import replace

from .device import SKINNY_RANKS, DeviceProfile
from .expr import Lowered, Step

# A form is used only when calibration measured it at least this much faster (timings on a shared machine move by
# a few percent; a rounding change is not worth less).
MIN_GAIN = 1.10
FORMS = {"gb": "pack", "gu": "swap"}  # DeviceProfile.skinny_gain's products -> the Step.form that computes them
PRODUCTS = {form: product for product, form in FORMS.items()}


def skinny_product(step: Step, low: Lowered) -> str | None:
    """"gb" for a plain product op(a) @ b whose b is stored k x n with n narrow (at most twice the widest rank
    calibrate() times, and below the other dimensions), "gu" for a^T @ b with such an output; None for anything
    else (the forms calibrate() did not time)."""
    if step.op != "mm" or step.tb or step.form:
        return None
    (m0, m1), (k, n) = low.shapes[step.args[0]], low.shapes[step.args[1]]
    m = m1 if step.ta else m0
    if not n < min(m, k) or n > 2 * SKINNY_RANKS[-1]:
        return None
    return "gu" if step.ta else "gb"


def _gain(product: str, step: Step, low: Lowered, profile: DeviceProfile) -> float:
    return profile.skinny_speedup(product, low.dtypes[step.args[0]], low.shapes[step.args[1]][1])


def speedup(step: Step, low: Lowered, profile: DeviceProfile) -> float:
    """How much faster the step's form runs than the plain call, by the profile (1.0 for a plain step)."""
    product = PRODUCTS.get(step.form)
    return 1.0 if product is None else _gain(product, step, low, profile)


def orient(low: Lowered, profile: DeviceProfile) -> Lowered:
    """`low` with each skinny product in the form the profile measured at least MIN_GAIN faster."""
    def oriented(step: Step) -> Step:
        product = skinny_product(step, low)
        if product is None or _gain(product, step, low, profile) < MIN_GAIN:
            return step
        return replace(step, form=FORMS[product])

    forward, backward = [oriented(s) for s in low.forward], [oriented(s) for s in low.backward]
    if forward == low.forward and backward == low.backward:
        return low
    return replace(low, forward=forward, backward=backward)
