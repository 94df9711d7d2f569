"""planner.orient: a skinny product runs in its other form exactly where the device profile measured it faster,
computes the same sums in every layout, and is priced at its measured gain; peft's own program is never changed."""
from __future__ import annotations

import itertools
import json
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runlora_fx.planner.cost import price, step_time
from runlora_fx.planner.device import DeviceProfile, default_profile
from runlora_fx.planner.expr import AdapterSpec, SiteSpec, Step, build_steps, stock_program
from runlora_fx.planner.graphs import steps_graph
from runlora_fx.planner.orient import MIN_GAIN, orient, skinny_product
from runlora_fx.planner.search import candidates, stock_plan

PLAIN = replace(default_profile("cpu"), skinny_gain={})  # no gain measured for anything


def measured(gb: float, gu: float, ranks=(2, 4, 8, 16)) -> DeviceProfile:
    return replace(PLAIN, skinny_gain={"float32": {"gb": [(r, gb) for r in ranks], "gu": [(r, gu) for r in ranks]}})


SPEC = SiteSpec(512, 256, 384, (AdapterSpec(8, 2.0, 0.0),))


def _forms(low) -> dict[str, str]:
    return {s.out: s.form for s in low.forward + low.backward if s.form}


def test_cpu_defaults_orient_fp32_at_small_ranks_only_with_mkl(monkeypatch):
    """Until calibrate() runs, a CPU with MKL orients fp32 products at r <= 8 (gains below what MKL measured) and
    nothing from r = 16, in no other dtype; another BLAS gets no default gain."""
    import runlora_fx.planner.device as device_mod

    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: True)
    mkl = default_profile("cpu")
    low = build_steps(SPEC, stock_program(SPEC))
    assert _forms(orient(low, mkl)) == {"Z0": "pack", "dB0": "swap"}
    wide = SiteSpec(512, 256, 384, (AdapterSpec(16, 2.0, 0.0),))
    assert _forms(orient(build_steps(wide, stock_program(wide)), mkl)) == {}
    bf16 = SiteSpec(512, 256, 384, (AdapterSpec(8, 2.0, 0.0),), dtype=torch.bfloat16)
    assert _forms(orient(build_steps(bf16, stock_program(bf16)), mkl)) == {}
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: False)
    assert device_mod.default_profile("cpu").skinny_gain == {}


def test_profile_without_gains_changes_nothing():
    low = build_steps(SPEC, stock_program(SPEC))
    assert orient(low, PLAIN) is low
    assert all(not _forms(p.lowered) for p in candidates(SPEC, PLAIN, prune=False))


def test_forms_follow_the_measured_gain_per_product():
    low = build_steps(SPEC, stock_program(SPEC))  # dB = G^T U and Z = G B, as peft runs them
    assert _forms(orient(low, measured(2.0, 3.0))) == {"Z0": "pack", "dB0": "swap"}
    assert _forms(orient(low, measured(1.0, 3.0))) == {"dB0": "swap"}
    assert _forms(orient(low, measured(MIN_GAIN * 0.99, 0.5))) == {}
    # rank 8 is not near any rank timed at 64 alone: nothing measured there, nothing changed
    assert _forms(orient(low, measured(2.0, 3.0, ranks=(64,)))) == {}


def test_wide_products_are_never_skinny():
    """G W (the base's dX) and T = G^T x_d have no narrow output: no form, whatever the profile says."""
    low = build_steps(SPEC, stock_program(SPEC))
    kinds = {s.out: skinny_product(s, low) for s in low.backward if s.op == "mm"}
    assert kinds["Z0"] == "gb" and kinds["dB0"] == "gu" and kinds["dxb"] is None and kinds["dA0"] is None
    wide = SiteSpec(4096, 256, 384, (AdapterSpec(8, 2.0, 0.0),))
    everywhere = [(2 ** k, 9.0) for k in range(13)]  # a gain measured at every rank up to 4096
    everything = replace(PLAIN, skinny_gain={"float32": {"gb": everywhere, "gu": everywhere}})
    oriented = [_forms(p.lowered) for p in candidates(wide, everything, prune=False)]
    assert any(oriented) and all(set(f) <= {"Z0", "dB0"} for f in oriented)


def test_stock_plan_is_peft_as_it_runs_and_the_oriented_price_is_the_gain():
    fast = replace(measured(2.0, 4.0), bandwidth=1e18, launch_overhead=0.0)  # the matmul's compute bound alone
    stock = stock_plan(SPEC, fast)
    assert not _forms(stock.lowered)
    low = orient(stock.lowered, fast)
    db = next(s for s in low.backward if s.out == "dB0")
    plain_db = next(s for s in stock.lowered.backward if s.out == "dB0")
    assert step_time(plain_db, low, fast) == pytest.approx(4.0 * step_time(db, low, fast))
    assert price(low, fast).time < stock.cost.time


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 12), k=st.integers(1, 12), n=st.integers(1, 12), alpha=st.sampled_from([1.0, -0.5]),
       data=st.data())
def test_every_form_computes_the_plain_product(m, k, n, alpha, data):
    """Whatever the operands' transposes, "swap" and "pack" give op(a) @ op(b) (float64, to rounding)."""
    ta, tb = data.draw(st.booleans()), data.draw(st.booleans())
    a = torch.randn((k, m) if ta else (m, k), dtype=torch.float64)
    b = torch.randn((n, k) if tb else (k, n), dtype=torch.float64)
    want = alpha * ((a.t() if ta else a) @ (b.t() if tb else b))
    for form in ("", "swap", "pack"):
        step = Step("mm", "c", ("a", "b"), alpha=alpha, ta=ta, tb=tb, form=form)
        (got,) = steps_graph([step], ["a", "b"], {"a": tuple(a.shape), "b": tuple(b.shape), "c": (m, n)})(a, b)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=form)


def test_formulas_say_which_form_runs():
    swap = Step("mm", "dB0", ("G", "U0"), alpha=2.0, ta=True, form="swap")
    pack = Step("mm", "Z0", ("G", "B0"), form="pack")
    assert swap.formula() == "2·G^T U0   [as (U0^T G)^T]" and pack.formula() == "G B0   [B0 packed as B0^T]"


def test_profile_lookup_rounds_rank_in_log_scale_and_round_trips(tmp_path):
    p = measured(2.0, 3.0, ranks=(2, 4, 8, 16, 32, 64))
    assert p.skinny_speedup("gu", torch.float32, 6) == 3.0 and p.skinny_speedup("gu", torch.float32, 129) == 1.0
    assert p.skinny_speedup("gu", torch.bfloat16, 8) == 1.0  # bf16 not measured
    back = DeviceProfile.from_json(p.to_json())
    assert back.skinny_gain == p.skinny_gain and isinstance(back.skinny_gain["float32"]["gb"][0], tuple)
    old = {k: v for k, v in json.loads(p.to_json()).items() if k != "skinny_gain"}  # a file without the field
    assert DeviceProfile.from_json(json.dumps(old)).skinny_gain == default_profile("cpu").skinny_gain  # the defaults


def test_calibrate_measures_every_product_at_every_rank(monkeypatch):
    import runlora_fx.planner.device as device_mod

    monkeypatch.setattr(device_mod, "_loaded", {})  # calibrate() installs its result: keep it from other tests
    prof = device_mod.calibrate("cpu", dtypes=(torch.float32,), seconds=0.3, save=False)
    got = prof.skinny_gain["float32"]
    assert set(got) == set(device_mod.SKINNY_PRODUCTS)
    for product, r in itertools.product(device_mod.SKINNY_PRODUCTS, device_mod.SKINNY_RANKS):
        gain = dict(got[product])[r]
        assert 0 < gain < float("inf")  # a measured ratio at every rank (the minimum over both widths)
