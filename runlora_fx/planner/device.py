"""Device profiles: how fast this device multiplies, moves bytes, runs elementwise passes and launches kernels.

The cost model turns FLOPs, elements and bytes into time with these numbers. `calibrate()` measures them in a few
seconds and caches them per device; without a cached profile `default_profile()` returns documented, conservative
defaults (see docs/COST_MODEL.md), so planning never blocks on a measurement.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# Smallest dimension of the matmuls timed by calibrate(): LoRA's skinny products (rank 8..256) run far below the
# device's peak, so the rate is kept as a curve over the smallest dimension, not one number.
CALIBRATION_MIN_DIMS = (8, 32, 128, 512)
# The other dimensions of the timed products: LoRA's (N x i) @ (i x r), (N x r) @ (r x o) and G^T U =
# (o x N) @ (N x r), with N tokens (512..8192 in the benchmarks) and i = o features.
CALIBRATION_TOKENS = 2048
CALIBRATION_BIG_DIM = 1024
# Elementwise passes are timed on a 1024 x 1024 multiply: larger than L2, so what is measured is a real pass.
ELEMENTWISE_CALIBRATION_SHAPE = (1024, 1024)
# Each timed point is the fastest of this many short runs' medians (see _time).
CALIBRATION_REPEATS = 3
# Bumped when what calibrate() measures changes, so an older cached file is not read as a current one. Format 2
# added elementwise_rate and the LoRA shapes (format-1 files have no version in the name); 3: rng_rate is the
# registry's draw_mask (kernels.exact_bernoulli where it builds); 4: skinny_gain; 5 (this one): pack_rate and
# unpack_rate.
PROFILE_FORMAT = 5
# 4-bit values dequantized per second until calibrate() measures it (bitsandbytes 0.50 on a 2-core CPU: 0.2-1e9).
DEFAULT_DEQUANTIZE_RATE = {"cpu": 3e8, "cuda": 1e11}
DEQUANTIZE_CALIBRATION_SHAPE = (2048, 2048)
# Dropout noise values drawn per second until calibrate() measures it: CPU RNG is far slower than a memory pass
# (torch 2.13 on a 2-core CPU: 3e7 to 8e7 measured), which decides whether regenerating a mask beats storing it.
DEFAULT_RNG_RATE = {"cpu": 5e7, "cuda": 5e10}
# The same for the fast generator (kernels.rng: four mask elements per random 64-bit word and one comparison pass):
# 6e8 measured on one thread of this machine, unloaded; on a GPU it is as fast as torch's own draw.
DEFAULT_FAST_RNG_RATE = {"cpu": 3e8, "cuda": 5e10}
# Mask elements per second through kernels.masks.pack_bits and unpack_bits (a "bits" mask store) until calibrate()
# measures them. Not memory passes on a CPU: unpacking is a table gather, 1.7-2.3e9 elements/s here, packing
# 2.6-7.8e9 (`python -m benchmarks.profile masks 512 512` and `... 2048 1376`; calibrate() measured 2.5e9 and
# 8.2e9 over 1 M elements); priced as memory passes, unpacking came out 2.5x too cheap at 512 x 512.
DEFAULT_PACK_RATE = {"cpu": 4e9, "cuda": 1e11}
DEFAULT_UNPACK_RATE = {"cpu": 2e9, "cuda": 1e11}
BITS_CALIBRATION_NUMEL = 1024 * 1024
# The two products of LoRA's backward whose output has a skinny second dimension (the rank r), and the equivalent
# form of each that calibrate() times against the plain call (`planner.orient` applies the faster one):
#   "gb": Z = G B, B stored o x r (NN layout)  -> G (B^T packed contiguous)^T, a copy of the small B
#   "gu": dB = G^T U (TN layout)              -> (U^T G)^T, the transposed product, no copy
# MKL on an AVX2 CPU (torch 2.13, fp32, N=512..2048, r = 4..8) ran the plain forms 1.8-3.2x ("gb") and 2.9-6.1x ("gu")
# slower; at r >= 16 the plain forms were faster; in bf16 without native support "gb" packed was 3.6-8.8x
# faster at every rank (`python -m benchmarks.profile skinny`).
SKINNY_PRODUCTS = ("gb", "gu")
SKINNY_RANKS = (2, 4, 8, 16, 32, 64)  # the ranks calibrate() times; a product with a wider output is never changed
SKINNY_CALIBRATION_TOKENS = 1024
# Which form wins at r >= 16 moved with the width o (fp32, N=1024: "gu" ran 1.6x faster in its other form at
# o=1024 and 0.85x at o=1376), so a gain is the smaller of two widths': a multiple of 256, and one that is not.
SKINNY_CALIBRATION_WIDTHS = (512, 1376)
# Until calibrate() runs: on a CPU whose torch multiplies with MKL (x86 builds), fp32 gains at the low end of what
# it measured here (1.8-6.1x at r = 4..8), below 1 from r = 16, so the defaults orient r <= 11 only; nothing for
# other dtypes or BLAS libraries, whose kernels were not measured.
_CPU_MKL_FP32_SKINNY_GAIN = [(2, 1.5), (4, 1.5), (8, 1.5), (16, 0.9), (32, 0.9), (64, 0.9)]
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float64: "float64"}

# CPU bf16 matmul defaults (FLOP/s at smallest dims 8/32/128/512) by how the CPU multiplies bf16. AMX tiles:
# Sapphire Rapids (2 cores, torch 2.13) ran LoRA's three forms at 30-80 / 75-200 / 200-400 / 200-450 GFLOP/s
# (geometric mean; square products 70-220 / 180-490 / 420-790 / 360-930). AVX512-BF16 dot products: about twice
# fp32 on large products, like fp32 on skinny ones. Neither: converted to fp32 and back, slower than fp32.
_CPU_BF16_MATMUL = {
    "amx": [(8, 30e9), (32, 80e9), (128, 200e9), (512, 300e9)],
    "avx512_bf16": [(8, 8e9), (32, 25e9), (128, 60e9), (512, 100e9)],
    "none": [(8, 2e9), (32, 5e9), (128, 8e9), (512, 10e9)],
}
# CPU elementwise defaults (elements/s, 1024x1024 multiply): on CPUs the passes are compute bound. fp32 measured
# 0.8-3e9 unloaded (1-2 threads) and bf16 with native support as fast; without it bf16 converts every element.
# Under load 2-thread passes fell to 7e7 (OpenMP waits for the busy core), which calibrate() does capture.
_CPU_BF16_ELEMENTWISE = {"amx": 1e9, "avx512_bf16": 1e9, "none": 3e8}


def monotone_curve(points) -> list[tuple[int, float]]:
    """Sorted by dimension, each rate raised to the largest rate measured at a smaller or equal dimension.

    Why a running maximum rather than isotonic regression: load only slows a measurement down, so every measured
    rate is a lower bound of the true one, and if the true rate does not fall as the smallest dimension grows,
    the tightest curve above all those bounds is the running maximum. Isotonic regression would instead average a
    good point with a load-slowed one.

    >>> monotone_curve([(32, 26.0), (8, 30.0), (128, 26.0), (512, 45.0)])
    [(8, 30.0), (32, 30.0), (128, 30.0), (512, 45.0)]
    """
    out, best = [], 0.0
    for d, r in sorted((int(d), float(r)) for d, r in points):
        best = max(best, r)
        out.append((d, best))
    return out


@dataclass(eq=False)  # hashed by identity: plan caches are keyed by the profile they were priced with
class DeviceProfile:
    """Matmul rate per dtype as (smallest dim, FLOP/s) points, memory bandwidth, per-kernel overhead, how fast
    a bitsandbytes 4-bit weight is dequantized (values written per second), the dropout RNG rates (torch's draw
    and the fast generator's, `kernels.rng`), and the elementwise rate per dtype (elements per second; empty
    means elementwise passes are bandwidth bound)."""

    device: str
    matmul_rate: dict[str, list[tuple[int, float]]]
    bandwidth: float  # bytes/s
    launch_overhead: float  # s per kernel
    measured: bool = False
    meta: dict = field(default_factory=dict)
    dequantize_rate: float = DEFAULT_DEQUANTIZE_RATE["cpu"]  # 4-bit values dequantized per second
    rng_rate: float = DEFAULT_RNG_RATE["cpu"]  # dropout noise values drawn per second
    fast_rng_rate: float = DEFAULT_FAST_RNG_RATE["cpu"]  # mask elements per second of kernels.rng.fast_mask
    pack_rate: float = DEFAULT_PACK_RATE["cpu"]  # mask elements per second packed to bits
    unpack_rate: float = DEFAULT_UNPACK_RATE["cpu"]  # mask elements per second unpacked from bits
    elementwise_rate: dict[str, float] = field(default_factory=dict)  # elements per second, by dtype name
    # dtype name -> SKINNY_PRODUCTS name -> [(rank, plain time / other form's time)], measured; empty: not measured
    skinny_gain: dict[str, dict[str, list[tuple[int, float]]]] = field(default_factory=dict)

    def rate(self, dtype: torch.dtype, min_dim: int) -> float:
        """FLOP/s of a matmul whose smallest dimension is `min_dim`, interpolated log-log between points.

        >>> p = DeviceProfile("cpu", {"float32": [(8, 1e9), (512, 64e9)]}, 1e10, 1e-6)
        >>> round(p.rate(torch.float32, 64) / 1e9, 1)
        8.0
        >>> p.rate(torch.float32, 4096) == 64e9
        True
        """
        points = self.matmul_rate.get(_DTYPE_NAMES.get(dtype, "float32")) or self.matmul_rate["float32"]
        if min_dim <= points[0][0]:
            return points[0][1] * max(min_dim, 1) / points[0][0]
        for (d0, r0), (d1, r1) in zip(points, points[1:]):
            if min_dim <= d1:
                w = (math.log(min_dim) - math.log(d0)) / (math.log(d1) - math.log(d0))
                return math.exp(math.log(r0) + w * (math.log(r1) - math.log(r0)))
        return points[-1][1]

    def elementwise_time(self, numel: int, dtype: torch.dtype, nbytes: int) -> float:
        """Seconds of an elementwise pass over `numel` elements of `dtype` moving `nbytes`: the slower of the
        memory bound and the compute bound (CPUs are often compute bound here, bf16 more than fp32). A dtype
        without a rate uses float32's; without either, only the memory bound applies.

        >>> p = DeviceProfile("cpu", {"float32": [(8, 1e9)]}, 1e10, 1e-6, elementwise_rate={"float32": 1e9})
        >>> p.elementwise_time(1000, torch.bfloat16, 12000) == max(12000 / 1e10, 1000 / 1e9)
        True
        """
        rate = self.elementwise_rate.get(_DTYPE_NAMES.get(dtype, "float32")) or self.elementwise_rate.get("float32")
        return max(nbytes / self.bandwidth, numel / rate if rate else 0.0)

    def skinny_speedup(self, product: str, dtype: torch.dtype, rank: int) -> float:
        """How much faster `product`'s other form ran than the plain call at the calibrated rank nearest `rank` (in
        log scale; 1.0 when not measured, or when no rank within a factor of 2 was timed).

        >>> p = DeviceProfile("cpu", {}, 1e10, 1e-6, skinny_gain={"float32": {"gu": [(4, 4.0), (8, 3.0), (16, 0.8)]}})
        >>> p.skinny_speedup("gu", torch.float32, 8), p.skinny_speedup("gu", torch.float32, 12), p.skinny_speedup("gb", torch.float32, 8)
        (3.0, 0.8, 1.0)
        """
        points = self.skinny_gain.get(_DTYPE_NAMES.get(dtype, ""), {}).get(product)
        if not points:
            return 1.0
        dist = lambda p: abs(math.log2(p[0]) - math.log2(max(rank, 1)))  # noqa: E731
        nearest = min(points, key=lambda p: (dist(p), -p[0]))
        return nearest[1] if dist(nearest) <= 1 else 1.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "DeviceProfile":
        """Fields missing from `text` (a file written before they existed) take the defaults of its device type;
        unknown fields are dropped, so a newer file still loads."""
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError("a device profile is a JSON object")
        kind = "cuda" if str(d.get("device", "cpu")).startswith("cuda") else "cpu"
        known = {f.name for f in dataclasses.fields(cls)}
        d = {**_default_fields(kind), **{k: v for k, v in d.items() if k in known}}
        d["matmul_rate"] = {k: monotone_curve(v) for k, v in d["matmul_rate"].items()}
        d["elementwise_rate"] = {k: float(v) for k, v in d["elementwise_rate"].items()}
        d["skinny_gain"] = {dt: {prod: [(int(r), float(g)) for r, g in pts] for prod, pts in by.items()}
                            for dt, by in d["skinny_gain"].items()}
        return cls(**d)


_CPU_KEYS: dict[int, str] = {}  # thread count -> key: `get_profile` runs at every planned call


def device_key(device: torch.device | str) -> str:
    """A stable name for a device: the CPU model and thread count, or the CUDA device name."""
    device = torch.device(device)
    if device.type == "cuda":
        return "cuda-" + torch.cuda.get_device_name(device).replace(" ", "_")
    threads = torch.get_num_threads()
    key = _CPU_KEYS.get(threads)
    if key is None:
        key = _CPU_KEYS[threads] = f"cpu-{platform.machine()}-{threads}t"
    return key


def cache_dir() -> Path:
    """`$RUNLORA_FX_CACHE`, else `$XDG_CACHE_HOME/runlora_fx`, else `~/.cache/runlora_fx`."""
    if os.environ.get("RUNLORA_FX_CACHE"):
        return Path(os.environ["RUNLORA_FX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "runlora_fx"


def _profile_path(device: torch.device | str) -> Path:
    name = f"profile-v{PROFILE_FORMAT}-{device_key(device)}-torch{torch.__version__.split('+')[0]}.json"
    return cache_dir() / name


def cpu_bf16_support() -> str:
    """How this CPU multiplies bf16: "amx", "avx512_bf16" or "none". Probes whichever of torch's (private,
    version-dependent) CPU feature helpers exist; anything missing or failing reads as "none", the conservative
    defaults."""
    try:
        caps = dict(torch.cpu.get_capabilities())
    except Exception:  # noqa: BLE001 - older torch
        caps = {}
    owners = (getattr(torch, "cpu", None), getattr(torch._C, "_cpu", None))

    def has(feature: str, helper: str) -> bool:
        if caps.get(feature):
            return True
        for owner in owners:
            try:
                if getattr(owner, helper)():
                    return True
            except Exception:  # noqa: BLE001 - helper absent in this torch version
                pass
        return False

    if has("amx_bf16", "_is_amx_tile_supported"):
        return "amx"
    if has("avx512_bf16", "_is_avx512_bf16_supported"):
        return "avx512_bf16"
    return "none"


def _default_fields(kind: str) -> dict:
    """Default profile fields of a device type ("cpu" or "cuda"), without touching the device."""
    if kind == "cuda":
        rates = {"float32": [(8, 0.5e12), (128, 8e12), (512, 15e12)],
                 "bfloat16": [(8, 1e12), (128, 30e12), (512, 100e12)],
                 "float16": [(8, 1e12), (128, 30e12), (512, 100e12)]}
        # elementwise passes on a GPU are bandwidth bound: rates far above bandwidth / bytes per element
        return dict(device="cuda", matmul_rate=rates, bandwidth=1.0e12, launch_overhead=6e-6, measured=False, meta={},
                    dequantize_rate=DEFAULT_DEQUANTIZE_RATE["cuda"], rng_rate=DEFAULT_RNG_RATE["cuda"],
                    fast_rng_rate=DEFAULT_FAST_RNG_RATE["cuda"], pack_rate=DEFAULT_PACK_RATE["cuda"],
                    unpack_rate=DEFAULT_UNPACK_RATE["cuda"],
                    elementwise_rate={"float32": 1e12, "bfloat16": 1e12, "float16": 1e12}, skinny_gain={})
    bf16 = cpu_bf16_support()
    rates = {"float32": [(8, 8e9), (32, 25e9), (128, 45e9), (512, 60e9)],
             "bfloat16": list(_CPU_BF16_MATMUL[bf16]),
             "float64": [(8, 4e9), (32, 12e9), (128, 22e9), (512, 30e9)]}
    elementwise = {"float32": 1e9, "bfloat16": _CPU_BF16_ELEMENTWISE[bf16], "float16": _CPU_BF16_ELEMENTWISE[bf16],
                   "float64": 5e8}
    skinny = {"float32": {p: list(_CPU_MKL_FP32_SKINNY_GAIN) for p in SKINNY_PRODUCTS}} \
        if torch.backends.mkl.is_available() else {}
    return dict(device="cpu", matmul_rate=rates, bandwidth=8e9, launch_overhead=8e-6, measured=False,
                meta={"bf16": bf16}, dequantize_rate=DEFAULT_DEQUANTIZE_RATE["cpu"], rng_rate=DEFAULT_RNG_RATE["cpu"],
                fast_rng_rate=DEFAULT_FAST_RNG_RATE["cpu"], pack_rate=DEFAULT_PACK_RATE["cpu"],
                unpack_rate=DEFAULT_UNPACK_RATE["cpu"], elementwise_rate=elementwise, skinny_gain=skinny)


def default_profile(device: torch.device | str = "cpu") -> DeviceProfile:
    """Conservative defaults used until `calibrate()` has run: a 2-core CPU (bf16 rates by `cpu_bf16_support()`),
    or a mid-range CUDA GPU."""
    device = torch.device(device)
    fields = _default_fields("cuda" if device.type == "cuda" else "cpu")
    if device.type == "cuda":
        fields["device"] = device_key(device)
    return DeviceProfile(**fields)


_loaded: dict[str, DeviceProfile] = {}


def get_profile(device: torch.device | str = "cpu") -> DeviceProfile:
    """The cached calibration for `device` if there is one, else the defaults. Read from disk once per process."""
    key = device_key(device)
    if key not in _loaded:
        path = _profile_path(device)
        try:
            _loaded[key] = DeviceProfile.from_json(path.read_text())
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            _loaded[key] = default_profile(device)
    return _loaded[key]


def _time(fn, device: torch.device, budget: float, repeats: int = CALIBRATION_REPEATS) -> float:
    """Seconds per call of `fn`: the fastest of `repeats` short runs' medians, after one warm-up, in about
    `budget` seconds (the warm-up included; at least one run of one call). Load on a shared machine only slows
    a run down, so the fastest run is the least disturbed; the median inside a run drops one-off stalls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    fn()
    sync()
    warm = time.perf_counter() - t0
    repeats = max(1, min(repeats, int((budget - warm) / max(warm, 1e-9))))  # as many runs as the budget holds calls
    per_run = max(budget - warm, 0.0) / repeats
    best = math.inf
    for _ in range(repeats):
        times, start = [], time.perf_counter()
        # stop before a call that would overrun the run's share, so slow calls do not stretch calibration
        while not times or (time.perf_counter() - start + times[-1] <= per_run and len(times) < 100):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        times.sort()
        best = min(best, times[len(times) // 2])
    return best


def _lora_matmul_rate(dtype: torch.dtype, d: int, device: torch.device, budget: float) -> float:
    """FLOP/s of LoRA's products with rank `d`: x A^T = (N x i) @ (i x d), u B^T = (N x d) @ (d x o) and the
    weight gradient G^T u = (o x N) @ (N x d), in the layouts LoRA stores them (A is d x i, B is o x d, G is
    N x o), as the geometric mean of the three rates (they have equal FLOPs).

    Why the geometric mean: programs differ in which of these they run (keep or recompute x A^T, chain or merged
    forward), so the curve should be typical of all three; the total time (harmonic mean) would be set by the
    slowest form alone (G^T u runs 3-10x slower than the others in bf16 on a CPU), and the fastest form would
    repeat the square-shape optimism this replaces."""
    n, big = CALIBRATION_TOKENS, CALIBRATION_BIG_DIM
    x = torch.randn(n, big, device=device, dtype=dtype)
    a = torch.randn(d, big, device=device, dtype=dtype)
    u = torch.randn(n, d, device=device, dtype=dtype)
    b = torch.randn(big, d, device=device, dtype=dtype)
    g = torch.randn(n, big, device=device, dtype=dtype)
    forms = (lambda: x @ a.t(), lambda: u @ b.t(), lambda: g.t() @ u)
    times = [_time(f, device, budget / len(forms)) for f in forms]
    return 2.0 * n * big * d / math.exp(sum(math.log(t) for t in times) / len(times))


def skinny_forms(product: str, g: torch.Tensor, other: torch.Tensor):
    """The plain call and the other form of a SKINNY_PRODUCTS product, as two functions of no argument:
    "gb" takes G (N x o) and B (o x r), "gu" takes G (N x o) and U (N x r)."""
    if product == "gb":
        return (lambda: g @ other), (lambda: g @ other.t().contiguous().t())
    return (lambda: g.t() @ other), (lambda: (other.t() @ g).t())


def _skinny_gains(dtype: torch.dtype, device: torch.device, budget: float) -> dict[str, list[tuple[int, float]]]:
    """Plain time / other form's time of each SKINNY_PRODUCTS product at each SKINNY_RANKS rank, over N =
    SKINNY_CALIBRATION_TOKENS tokens: the smaller over the SKINNY_CALIBRATION_WIDTHS widths o."""
    n, widths = SKINNY_CALIBRATION_TOKENS, SKINNY_CALIBRATION_WIDTHS
    share = budget / (2 * len(SKINNY_PRODUCTS) * len(SKINNY_RANKS) * len(widths))
    gains = {(p, r): math.inf for p in SKINNY_PRODUCTS for r in SKINNY_RANKS}
    for o in widths:
        g = torch.randn(n, o, device=device, dtype=dtype)
        for product, r in gains:
            other = torch.randn(o if product == "gb" else n, r, device=device, dtype=dtype)
            plain, alt = skinny_forms(product, g, other)
            gains[product, r] = min(gains[product, r], _time(plain, device, share) / _time(alt, device, share))
    return {p: [(r, gains[p, r]) for r in SKINNY_RANKS] for p in SKINNY_PRODUCTS}


def _elementwise_rate(dtype: torch.dtype, device: torch.device, budget: float) -> float:
    """Elements per second of an out-of-place binary multiply, the typical LoRA elementwise pass (mask, scale)."""
    a = torch.randn(*ELEMENTWISE_CALIBRATION_SHAPE, device=device, dtype=dtype)
    b = torch.randn(*ELEMENTWISE_CALIBRATION_SHAPE, device=device, dtype=dtype)
    return a.numel() / _time(lambda: a * b, device, budget)


def _dequantize_rate(device: torch.device, budget: float) -> float | None:
    """4-bit values dequantized per second (nf4 with double quantization), or None without bitsandbytes."""
    try:
        import bitsandbytes.functional as bnbf

        w = torch.randn(*DEQUANTIZE_CALIBRATION_SHAPE, device=device)
        packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    except Exception:  # noqa: BLE001 - not installed, or no 4-bit backend for this device
        return None
    return w.numel() / _time(lambda: bnbf.dequantize_4bit(packed, state), device, budget)


def _mask_draw(like: torch.Tensor, fast: bool):
    """A dropout mask's draw like `like` as a Plan runs it, torch's (`kernels.masks`) or the fast generator's
    (seed, then mask; `kernels.rng`): through the step-op registry, so the planner measures what it prices."""
    from .expr import Step
    from .graphs import steps_graph

    steps = [Step("rng_seed", "sd", ("x",)), Step("fast_mask", "md", ("sd",), p=0.05, dtype=torch.uint8)] if fast \
        else [Step("draw_mask", "md", ("x",), p=0.05, dtype=torch.uint8)]
    graph = steps_graph(steps, ["x"], {"x": tuple(like.shape), "sd": (), "md": tuple(like.shape)})
    return lambda: graph(like)


def _bits_rates(device: torch.device, budget: float) -> tuple[float, float]:
    """Mask elements per second through the registry's pack_bits and unpack_bits steps (what the planner prices)."""
    from .expr import Step
    from .graphs import steps_graph

    n = BITS_CALIBRATION_NUMEL
    mask = (torch.rand(n, device=device) > 0.05).to(torch.uint8)
    shapes = {"m": (n,), "p": (n // 8,), "u": (n,)}
    pack = steps_graph([Step("pack_bits", "p", ("m",))], ["m"], shapes)
    unpack = steps_graph([Step("unpack_bits", "u", ("p",))], ["p"], shapes)
    packed = pack(mask)[0]
    return n / _time(lambda: pack(mask), device, budget / 2), n / _time(lambda: unpack(packed), device, budget / 2)


def calibrate(device: torch.device | str = "cpu", dtypes=(torch.float32, torch.bfloat16), *, save: bool = True,
              seconds: float = 6.0) -> DeviceProfile:
    """Measure matmul rates on LoRA's shapes, elementwise rates, the skinny products' faster forms, bandwidth,
    launch overhead, the RNG rates and (with bitsandbytes) the 4-bit dequantize rate on `device` (about `seconds`
    s) and cache the result."""
    device = torch.device(device)
    # budget units: one per matmul point (its three forms share it), one per elementwise dtype, one per dtype for
    # the skinny products' forms, and six more
    per = seconds / (len(dtypes) * (len(CALIBRATION_MIN_DIMS) + 2) + 6)
    rates: dict[str, list[tuple[int, float]]] = {}
    elementwise: dict[str, float] = {}
    skinny: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for dt in dtypes:
        name = _DTYPE_NAMES[dt]
        rates[name] = monotone_curve([(d, _lora_matmul_rate(dt, d, device, per)) for d in CALIBRATION_MIN_DIMS])
        elementwise[name] = _elementwise_rate(dt, device, per)
        skinny[name] = _skinny_gains(dt, device, per)
    src = torch.empty(8 * 1024 * 1024, device=device)  # 32 MB: larger than the caches of the machines this targets
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * src.element_size() / _time(lambda: dst.copy_(src), device, per)
    del src, dst
    tiny = torch.ones(1, device=device)
    overhead = _time(lambda: tiny.add(tiny), device, per)
    dequantize_rate = _dequantize_rate(device, per) or default_profile(device).dequantize_rate
    noise = torch.empty(1024 * 1024, device=device)
    rng_rate = noise.numel() / _time(_mask_draw(noise, fast=False), device, per)
    fast_rng_rate = noise.numel() / _time(_mask_draw(noise, fast=True), device, per)
    pack_rate, unpack_rate = _bits_rates(device, per)
    profile = DeviceProfile(device_key(device), rates, bandwidth, overhead, measured=True,
                            meta={"torch": torch.__version__, "threads": torch.get_num_threads(), "when": time.time(),
                                  "format": PROFILE_FORMAT},
                            dequantize_rate=dequantize_rate, rng_rate=rng_rate, fast_rng_rate=fast_rng_rate,
                            pack_rate=pack_rate, unpack_rate=unpack_rate, elementwise_rate=elementwise,
                            skinny_gain=skinny)
    if save:
        path = _profile_path(device)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(profile.to_json())
    _loaded[device_key(device)] = profile
    return profile
