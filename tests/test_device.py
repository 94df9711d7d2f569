"""Device profiles: monotone rate curves, the elementwise bound, cache compatibility, capability-dependent defaults,
and that step_time reads the elementwise rate. Nothing here asserts that anything is fast."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from runlora_fx.planner import device as device_mod
from runlora_fx.planner.cost import MATMUL_OPS, price, step_time
from runlora_fx.planner.device import DeviceProfile, calibrate, default_profile, get_profile, monotone_curve
from runlora_fx.planner.expr import AdapterSpec, SiteSpec, build_steps, enumerate_programs

# steps that step_time prices by other rates than the elementwise one
NOT_ELEMENTWISE = set(MATMUL_OPS) | {"dequantize", "draw_mask", "redraw_mask", "rng_state", "pack_bits", "unpack_bits"}

# A profile as the format-1 code wrote it (no elementwise_rate, non-monotone fp32 curve).
OLD_JSON = json.dumps({
    "device": "cpu-x86_64-2t",
    "matmul_rate": {"float32": [[8, 30e9], [32, 26e9], [128, 26e9], [512, 45e9]],
                    "bfloat16": [[8, 69e9], [32, 184e9], [128, 419e9], [512, 358e9]]},
    "bandwidth": 13.5e9, "launch_overhead": 3.4e-6, "measured": True,
    "meta": {"torch": "2.13.0+cpu", "threads": 2, "when": 0.0},
    "dequantize_rate": 1.2e9, "rng_rate": 7.5e7,
})


def _is_monotone(points) -> bool:
    dims, rates = [d for d, _ in points], [r for _, r in points]
    return dims == sorted(dims) and all(a <= b for a, b in zip(rates, rates[1:]))


def test_monotone_curve_is_the_running_max_of_sorted_points():
    noisy = [(128, 26.0), (8, 30.0), (512, 45.0), (32, 26.0), (1024, 40.0)]
    fit = monotone_curve(noisy)
    assert fit == [(8, 30.0), (32, 30.0), (128, 30.0), (512, 45.0), (1024, 45.0)]
    assert _is_monotone(fit)
    assert all(r >= dict(noisy)[d] for d, r in fit)  # every measurement is a lower bound
    assert monotone_curve(fit) == fit


def test_elementwise_time_is_the_slower_of_memory_and_compute():
    p = DeviceProfile("cpu", {"float32": [(8, 1e9)]}, bandwidth=1e10, launch_overhead=1e-6,
                      elementwise_rate={"float32": 1e9, "bfloat16": 2.5e8})
    assert p.elementwise_time(10**6, torch.float32, 10**6) == pytest.approx(1e-3)  # compute bound
    assert p.elementwise_time(10**6, torch.float32, 10**8) == pytest.approx(1e-2)  # memory bound
    assert p.elementwise_time(10**6, torch.bfloat16, 10**6) == pytest.approx(4e-3)
    # a dtype without a rate (uint8, float16 here) uses float32's
    assert p.elementwise_time(10**6, torch.uint8, 10**6) == p.elementwise_time(10**6, torch.float32, 10**6)
    assert p.elementwise_time(10**6, torch.float16, 10**6) == p.elementwise_time(10**6, torch.float32, 10**6)
    # without any elementwise rate only the memory bound applies
    bare = DeviceProfile("cpu", {"float32": [(8, 1e9)]}, 1e10, 1e-6)
    assert bare.elementwise_time(10**6, torch.float32, 10**6) == pytest.approx(1e-4)


def test_from_json_fills_missing_fields_and_drops_unknown_ones():
    old = DeviceProfile.from_json(OLD_JSON)
    assert old.measured and old.bandwidth == 13.5e9 and old.rng_rate == 7.5e7
    assert old.elementwise_rate == default_profile("cpu").elementwise_rate  # missing: the CPU defaults
    assert all(_is_monotone(c) for c in old.matmul_rate.values())  # the stored curve was not monotone
    newer = json.loads(OLD_JSON) | {"elementwise_rate": {"float32": 2e9}, "some_future_field": [1, 2]}
    loaded = DeviceProfile.from_json(json.dumps(newer))
    assert loaded.elementwise_rate == {"float32": 2e9} and not hasattr(loaded, "some_future_field")
    assert DeviceProfile.from_json(loaded.to_json()).to_json() == loaded.to_json()  # round trip
    bare = DeviceProfile.from_json(json.dumps({"device": "cpu-x86_64-2t", "bandwidth": 1e9}))
    assert bare.bandwidth == 1e9 and bare.matmul_rate == default_profile("cpu").matmul_rate
    with pytest.raises(ValueError):
        DeviceProfile.from_json("[1, 2]")


def test_an_old_format_cache_file_is_ignored_and_a_broken_one_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNLORA_FX_CACHE", str(tmp_path))
    monkeypatch.setattr(device_mod, "_loaded", {})
    torch_version = torch.__version__.split("+")[0]
    (tmp_path / f"profile-{device_mod.device_key('cpu')}-torch{torch_version}.json").write_text(OLD_JSON)
    assert not get_profile("cpu").measured  # the format-1 name is not read: defaults
    monkeypatch.setattr(device_mod, "_loaded", {})
    device_mod._profile_path("cpu").write_text("{not json")
    assert not get_profile("cpu").measured
    monkeypatch.setattr(device_mod, "_loaded", {})
    device_mod._profile_path("cpu").write_text(OLD_JSON)  # current name, old content: loads with defaults filled
    assert get_profile("cpu").measured and get_profile("cpu").elementwise_rate


@pytest.mark.parametrize("support", ["amx", "avx512_bf16", "none"])
def test_default_bf16_rates_follow_the_cpu_capability(monkeypatch, support):
    monkeypatch.setattr(device_mod, "cpu_bf16_support", lambda: support)
    p = default_profile("cpu")
    assert p.matmul_rate["bfloat16"] == device_mod._CPU_BF16_MATMUL[support]
    assert p.elementwise_rate["bfloat16"] == device_mod._CPU_BF16_ELEMENTWISE[support]
    assert all(_is_monotone(c) for c in p.matmul_rate.values())
    if support == "amx":  # AMX runs bf16 far above fp32 (140-930 GFLOP/s on the benchmark machine)
        assert p.rate(torch.bfloat16, 128) > p.rate(torch.float32, 128)


def test_cpu_bf16_support_reads_torch_feature_helpers(monkeypatch):
    helpers = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    owners = [torch.cpu] + ([torch._C._cpu] if hasattr(torch._C, "_cpu") else [])

    def fake(caps, amx=False, avx=False):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps, raising=False)
        for owner in owners:
            monkeypatch.setattr(owner, helpers[0], lambda: amx, raising=False)
            monkeypatch.setattr(owner, helpers[1], lambda: avx, raising=False)

    fake({"amx_bf16": True})
    assert device_mod.cpu_bf16_support() == "amx"
    fake({}, amx=True)
    assert device_mod.cpu_bf16_support() == "amx"
    fake({}, avx=True)
    assert device_mod.cpu_bf16_support() == "avx512_bf16"
    fake({})
    assert device_mod.cpu_bf16_support() == "none"

    def broken():
        raise RuntimeError("no cpuinfo")

    monkeypatch.setattr(torch.cpu, "get_capabilities", broken, raising=False)
    assert device_mod.cpu_bf16_support() == "none"


def test_short_calibration_gives_positive_rates_and_monotone_curves(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNLORA_FX_CACHE", str(tmp_path))
    monkeypatch.setattr(device_mod, "_loaded", {})
    monkeypatch.setattr(device_mod, "_dequantize_rate", lambda device, budget: None)  # skip importing bitsandbytes
    p = calibrate("cpu", dtypes=(torch.float32, torch.bfloat16), seconds=0.3, save=False)
    assert not list(tmp_path.iterdir())  # save=False writes nothing
    assert p.measured and p.meta["format"] == device_mod.PROFILE_FORMAT
    assert set(p.matmul_rate) == set(p.elementwise_rate) == {"float32", "bfloat16"}
    for curve in p.matmul_rate.values():
        assert [d for d, _ in curve] == list(device_mod.CALIBRATION_MIN_DIMS) and _is_monotone(curve)
        assert all(r > 0 for _, r in curve)
    assert all(r > 0 for r in p.elementwise_rate.values())
    assert p.bandwidth > 0 and p.launch_overhead > 0 and p.rng_rate > 0 and p.dequantize_rate > 0
    assert DeviceProfile.from_json(p.to_json()).matmul_rate == p.matmul_rate


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_time_of_elementwise_steps_follows_the_elementwise_rate(dtype):
    spec = SiteSpec(512, 256, 384, (AdapterSpec(8, dropout=0.1),), dtype=dtype)
    base = replace(default_profile("cpu"), bandwidth=1e15, elementwise_rate={"float32": 1e9, "bfloat16": 1e9})
    name = "float32" if dtype == torch.float32 else "bfloat16"
    slower = replace(base, elementwise_rate={**base.elementwise_rate, name: 1e8})
    for program in enumerate_programs(spec):
        low = build_steps(spec, program)
        assert price(low, slower).time > price(low, base).time
        for s in low.forward + low.backward:
            t0, t1 = step_time(s, low, base), step_time(s, low, slower)
            if s.op in NOT_ELEMENTWISE:
                assert t0 == t1  # matmuls, RNG and dequantize ignore the elementwise rate
            elif low.dtypes[s.out].is_floating_point:
                assert t1 > t0, s  # priced at the output dtype's rate
            else:  # a uint8/bool result is priced at float32's rate, whatever the compute dtype
                assert (t1 > t0) == (name == "float32"), s


def test_bit_packing_is_priced_at_its_own_rates():
    """A bits mask store's pack and unpack are gathers and shifts, not memory passes: each follows its rate,
    counted in mask elements (the packed side is an eighth of that)."""
    spec = SiteSpec(512, 256, 384, (AdapterSpec(8, dropout=0.1),))
    base = replace(default_profile("cpu"), bandwidth=1e15, launch_overhead=0.0, pack_rate=1e9, unpack_rate=1e9)
    seen = set()
    for program in enumerate_programs(spec):
        low = build_steps(spec, program)
        for s in low.forward + low.backward:
            if s.op in ("pack_bits", "unpack_bits"):
                seen.add(s.op)
                rate = "pack_rate" if s.op == "pack_bits" else "unpack_rate"
                assert step_time(s, low, base) == pytest.approx(512 * 256 / 1e9)
                assert step_time(s, low, replace(base, **{rate: 1e8})) == pytest.approx(512 * 256 / 1e8)
    assert seen == {"pack_bits", "unpack_bits"}


def test_the_suite_never_reads_this_machines_calibration():
    """tests/conftest.py points the profile cache at a directory of this session, so a calibrated development
    machine plans the tests as a fresh CI machine does."""
    import os
    from pathlib import Path

    assert device_mod.cache_dir() == Path(os.environ["RUNLORA_FX_CACHE"])
    assert device_mod.cache_dir() != Path.home() / ".cache" / "runlora_fx"
