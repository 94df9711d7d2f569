"""The timing harness every figure goes through: contenders interleaved, warm-up first, medians, pairwise ratios.

On a shared machine the load changes from second to second. Timing A five times and then B five times would
compare A under one load with B under another; interleaving (A B C A B C ...) puts every contender under the same
conditions within a round, and a ratio taken round by round (A's k-th time over B's k-th time) cancels most of
the drift that the two share. The median of those per-round ratios is the figure quoted; the medians of the raw
times are reported beside it.

Everything here except `interleaved` is a small pure function of lists of floats (tested in
tests/test_benchmarks.py without timing anything).
"""
from __future__ import annotations

import gc
import math
import time
from typing import Callable, Mapping, Sequence

Contender = Callable[[], object]


def interleaved(contenders: Mapping[str, Contender], repeats: int, warmup: int = 1, *,
                clock: Callable[[], float] = time.perf_counter, sync: Callable[[], None] | None = None,
                trace: list[str] | None = None) -> dict[str, list[float]]:
    """Run `warmup` untimed rounds, then `repeats` timed rounds; each round calls every contender once, in order.

    Returns seconds per call, ``{name: [round 0, round 1, ...]}``. `sync` (e.g. ``torch.cuda.synchronize``) is
    called before and after each timed call; `trace`, when given, receives the name of every call made (warm-up
    included), which is how the tests check the order. Garbage collection is paused while timing.

    >>> ticks = iter(range(100))
    >>> interleaved({"a": lambda: None, "b": lambda: None}, repeats=2, warmup=1, clock=lambda: next(ticks))
    {'a': [1, 1], 'b': [1, 1]}
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    names = list(contenders)
    times: dict[str, list[float]] = {n: [] for n in names}
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for n in names:
            if trace is not None:
                trace.append(n)
            contenders[n]()
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            for n in names:
                if trace is not None:
                    trace.append(n)
                sync()
                t0 = clock()
                contenders[n]()
                sync()
                times[n].append(clock() - t0)
    finally:
        if was_enabled:
            gc.enable()
    return times


def median(xs: Sequence[float]) -> float:
    """The median (mean of the two middle values for an even count).

    >>> median([3, 1, 2]), median([4, 1, 3, 2])
    (2, 2.5)
    """
    if not xs:
        raise ValueError("median of an empty list")
    s = sorted(xs)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile, q in [0, 1].

    >>> quantile([1, 2, 3, 4, 5], 0.25), quantile([1, 2, 3, 4, 5], 1.0)
    (2.0, 5.0)
    """
    if not xs:
        raise ValueError("quantile of an empty list")
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))


def pairwise_ratios(times: Mapping[str, Sequence[float]], num: str, den: str) -> list[float]:
    """Round-by-round ratios ``times[num][k] / times[den][k]`` (both timed in the same round).

    >>> pairwise_ratios({"a": [2.0, 3.0], "b": [4.0, 3.0]}, "a", "b")
    [0.5, 1.0]
    """
    a, b = times[num], times[den]
    if len(a) != len(b):
        raise ValueError(f"{num} has {len(a)} rounds but {den} has {len(b)}: ratios need the same rounds")
    return [x / y for x, y in zip(a, b)]


def ratio_stats(times: Mapping[str, Sequence[float]], num: str, den: str) -> dict[str, float]:
    """Median of the per-round ratios (the quoted figure), its quartiles, and the ratio of the medians.

    >>> ratio_stats({"a": [1.0, 2.0, 3.0], "b": [2.0, 2.0, 2.0]}, "a", "b")["median"]
    1.0
    """
    r = pairwise_ratios(times, num, den)
    return {"median": median(r), "q1": quantile(r, 0.25), "q3": quantile(r, 0.75),
            "of_medians": median(times[num]) / median(times[den]), "rounds": len(r)}


def summarize(times: Mapping[str, Sequence[float]]) -> dict[str, dict[str, float]]:
    """Per contender: median, quartiles, min and count of its times (seconds).

    >>> summarize({"a": [1.0, 3.0, 2.0]})["a"]["median"]
    2.0
    """
    return {n: {"median": median(t), "q1": quantile(t, 0.25), "q3": quantile(t, 0.75), "min": min(t), "n": len(t)}
            for n, t in times.items()}


def geomean(xs: Sequence[float]) -> float:
    """Geometric mean (the average of ratios).

    >>> round(geomean([0.5, 2.0]), 12)
    1.0
    """
    if not xs:
        raise ValueError("geometric mean of an empty list")
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def shares_removed(times: Mapping[str, Sequence[float]], contender: str, stock: str, floor: str) -> list[float]:
    """Round by round, the share of what `stock` costs over `floor` that `contender` removes:
    ``(stock - contender) / (stock - floor)``. 1 means the contender runs as fast as the floor (LoRA free), 0 as
    slow as the stock, negative slower. A round where stock is not slower than the floor has no LoRA cost to
    share and is left out.

    >>> shares_removed({"c": [1.5, 2.0], "s": [2.0, 2.0], "f": [1.0, 1.0]}, "c", "s", "f")
    [0.5, 0.0]
    """
    c, s, f = times[contender], times[stock], times[floor]
    if not len(c) == len(s) == len(f):
        raise ValueError(f"{contender}, {stock} and {floor} need the same rounds, got {len(c)}, {len(s)}, {len(f)}")
    return [(b - a) / (b - z) for a, b, z in zip(c, s, f) if b > z]


def share_stats(times: Mapping[str, Sequence[float]], contender: str, stock: str, floor: str) -> dict[str, float]:
    """Median of the per-round shares removed (the quoted figure), its quartiles, and the share computed from the
    three medians (None where the stock was never slower than the floor).

    >>> share_stats({"c": [1.5, 1.5, 1.8], "s": [2.0, 2.0, 2.0], "f": [1.0, 1.0, 1.0]}, "c", "s", "f")["median"]
    0.5
    """
    r = shares_removed(times, contender, stock, floor)
    ms, mf = median(times[stock]), median(times[floor])
    of_medians = (ms - median(times[contender])) / (ms - mf) if ms > mf else None
    if not r:  # None, not NaN: the results are JSON
        return {"median": None, "q1": None, "q3": None, "of_medians": of_medians, "rounds": 0}
    return {"median": median(r), "q1": quantile(r, 0.25), "q3": quantile(r, 0.75), "of_medians": of_medians,
            "rounds": len(r)}
