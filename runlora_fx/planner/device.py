"""Device profiles: how fast this device multiplies, moves bytes and launches kernels.

The cost model turns FLOPs and bytes into time with these numbers. `calibrate()` measures them in a few seconds
and caches them per device; without a cached profile `default_profile()` returns documented, conservative
defaults (see docs/COST_MODEL.md), so planning never blocks on a measurement.
"""
from __future__ import annotations

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
CALIBRATION_BIG_DIM = 1024
# 4-bit values dequantized per second until calibrate() measures it (bitsandbytes 0.50 on a 2-core CPU: 0.2-1e9).
DEFAULT_DEQUANTIZE_RATE = {"cpu": 3e8, "cuda": 1e11}
DEQUANTIZE_CALIBRATION_SHAPE = (2048, 2048)
# Dropout noise values drawn per second until calibrate() measures it: CPU RNG is far slower than a memory pass
# (torch 2.13 on a 2-core CPU: 3e7 to 8e7 measured), which decides whether regenerating a mask beats storing it.
DEFAULT_RNG_RATE = {"cpu": 5e7, "cuda": 5e10}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float64: "float64"}


@dataclass(eq=False)  # hashed by identity: plan caches are keyed by the profile they were priced with
class DeviceProfile:
    """Matmul rate per dtype as (smallest dim, FLOP/s) points, memory bandwidth, per-kernel overhead, and how fast
    a bitsandbytes 4-bit weight is dequantized (values written per second)."""

    device: str
    matmul_rate: dict[str, list[tuple[int, float]]]
    bandwidth: float  # bytes/s
    launch_overhead: float  # s per kernel
    measured: bool = False
    meta: dict = field(default_factory=dict)
    dequantize_rate: float = DEFAULT_DEQUANTIZE_RATE["cpu"]  # 4-bit values dequantized per second
    rng_rate: float = DEFAULT_RNG_RATE["cpu"]  # dropout noise values drawn per second

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

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "DeviceProfile":
        d = json.loads(text)
        d["matmul_rate"] = {k: [tuple(p) for p in v] for k, v in d["matmul_rate"].items()}
        return cls(**d)


def device_key(device: torch.device | str) -> str:
    """A stable name for a device: the CPU model and thread count, or the CUDA device name."""
    device = torch.device(device)
    if device.type == "cuda":
        return "cuda-" + torch.cuda.get_device_name(device).replace(" ", "_")
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}t"


def cache_dir() -> Path:
    """`$RUNLORA_FX_CACHE`, else `$XDG_CACHE_HOME/runlora_fx`, else `~/.cache/runlora_fx`."""
    if os.environ.get("RUNLORA_FX_CACHE"):
        return Path(os.environ["RUNLORA_FX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "runlora_fx"


def _profile_path(device: torch.device | str) -> Path:
    return cache_dir() / f"profile-{device_key(device)}-torch{torch.__version__.split('+')[0]}.json"


def default_profile(device: torch.device | str = "cpu") -> DeviceProfile:
    """Conservative defaults used until `calibrate()` has run: a 2-core CPU, or a mid-range CUDA GPU."""
    device = torch.device(device)
    if device.type == "cuda":
        rates = {"float32": [(8, 0.5e12), (128, 8e12), (512, 15e12)],
                 "bfloat16": [(8, 1e12), (128, 30e12), (512, 100e12)],
                 "float16": [(8, 1e12), (128, 30e12), (512, 100e12)]}
        return DeviceProfile(device_key(device), rates, bandwidth=1.0e12, launch_overhead=6e-6,
                             dequantize_rate=DEFAULT_DEQUANTIZE_RATE["cuda"], rng_rate=DEFAULT_RNG_RATE["cuda"])
    rates = {"float32": [(8, 8e9), (32, 25e9), (128, 45e9), (512, 60e9)],
             "bfloat16": [(8, 2e9), (32, 5e9), (128, 8e9), (512, 10e9)],
             "float64": [(8, 4e9), (32, 12e9), (128, 22e9), (512, 30e9)]}
    return DeviceProfile("cpu", rates, bandwidth=8e9, launch_overhead=8e-6, dequantize_rate=DEFAULT_DEQUANTIZE_RATE["cpu"])


_loaded: dict[str, DeviceProfile] = {}


def get_profile(device: torch.device | str = "cpu") -> DeviceProfile:
    """The cached calibration for `device` if there is one, else the defaults. Read from disk once per process."""
    key = device_key(device)
    if key not in _loaded:
        path = _profile_path(device)
        try:
            _loaded[key] = DeviceProfile.from_json(path.read_text())
        except (OSError, ValueError, TypeError, KeyError):
            _loaded[key] = default_profile(device)
    return _loaded[key]


def _time(fn, device: torch.device, budget: float) -> float:
    """Median seconds per call of `fn`, repeating for about `budget` seconds after one warm-up."""
    fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, start = [], time.perf_counter()
    while not times or (time.perf_counter() - start < budget and len(times) < 200):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _dequantize_rate(device: torch.device, budget: float) -> float | None:
    """4-bit values dequantized per second (nf4 with double quantization), or None without bitsandbytes."""
    try:
        import bitsandbytes.functional as bnbf

        w = torch.randn(*DEQUANTIZE_CALIBRATION_SHAPE, device=device)
        packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    except Exception:  # noqa: BLE001 - not installed, or no 4-bit backend for this device
        return None
    return w.numel() / _time(lambda: bnbf.dequantize_4bit(packed, state), device, budget)


def calibrate(device: torch.device | str = "cpu", dtypes=(torch.float32, torch.bfloat16), *, save: bool = True,
              seconds: float = 6.0) -> DeviceProfile:
    """Measure matmul rates, bandwidth, launch overhead and (with bitsandbytes) the 4-bit dequantize rate on
    `device` (about `seconds` s) and cache the result."""
    device = torch.device(device)
    per = seconds / (len(dtypes) * len(CALIBRATION_MIN_DIMS) + 4)
    big = CALIBRATION_BIG_DIM
    rates: dict[str, list[tuple[int, float]]] = {}
    for dt in dtypes:
        pts = []
        for d in CALIBRATION_MIN_DIMS:
            a = torch.randn(big, big, device=device, dtype=dt)
            b = torch.randn(big, d, device=device, dtype=dt)
            t = _time(lambda: a @ b, device, per)
            pts.append((d, 2.0 * big * big * d / t))
        rates[_DTYPE_NAMES[dt]] = pts
    x = torch.empty(8 * 1024 * 1024, device=device)  # 32 MB: larger than the caches of the machines this targets
    bandwidth = 2 * x.numel() * x.element_size() / _time(lambda: x.mul_(1.0), device, per)
    tiny = torch.ones(1, device=device)
    overhead = _time(lambda: tiny.add(tiny), device, per)
    dequantize_rate = _dequantize_rate(device, per) or default_profile(device).dequantize_rate
    noise = torch.empty(1024 * 1024, device=device)
    rng_rate = noise.numel() / _time(lambda: noise.bernoulli_(0.95), device, per)
    profile = DeviceProfile(device_key(device), rates, bandwidth, overhead, measured=True,
                            meta={"torch": torch.__version__, "threads": torch.get_num_threads(), "when": time.time()},
                            dequantize_rate=dequantize_rate, rng_rate=rng_rate)
    if save:
        path = _profile_path(device)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(profile.to_json())
    _loaded[device_key(device)] = profile
    return profile
