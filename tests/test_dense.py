"""Every program of the space equals the peft formula, for outputs and every gradient; saved bytes are measured."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runlora_fx.kernels.dense import AdapterConfig, LoraLinearRunner, run_plan
from runlora_fx.planner.cost import price
from runlora_fx.planner.device import default_profile
from runlora_fx.planner.expr import AdapterSpec, SiteSpec, build_steps, enumerate_programs
from runlora_fx.planner.orient import orient
from runlora_fx.planner.plan import Plan
from runlora_fx.saved_bytes import SavedBytes

PROFILE = default_profile("cpu")
# a profile that measured every skinny product's other form faster (`planner.orient`) at every rank
ORIENTED = replace(PROFILE, skinny_gain={dt: {p: [(2 ** k, 2.0) for k in range(12)] for p in ("gb", "gu")}
                                         for dt in ("float64", "float32", "bfloat16")})


def peft_reference(x, weight, bias, adapters, configs, training):
    """peft's `lora.Linear.forward`, written plainly: base, then per adapter cast, dropout, A, B, scale, add."""
    result = F.linear(x, weight, bias)
    result_dtype = result.dtype
    for (a, b, lb), cfg in zip(adapters, configs):
        xa = x.to(a.dtype)
        xd = F.dropout(xa, cfg.dropout, training)
        result = result + F.linear(F.linear(xd, a), b, lb) * cfg.scale
    return result.to(result_dtype)


def make_case(seed, lead, i, o, ranks, bias, lora_bias, dtype, adapter_dtype, grads):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, dt=dtype: torch.randn(*s, generator=g, dtype=torch.float64).to(dt)  # noqa: E731
    x = rnd(*lead, i)
    weight, b = rnd(o, i), (rnd(o) if bias else None)
    adapters = [(rnd(r, i, dt=adapter_dtype), rnd(o, r, dt=adapter_dtype), rnd(o, dt=adapter_dtype) if lora_bias else None)
                for r in ranks]
    gx, ga, gb = grads
    x.requires_grad_(gx)
    for a, bb, lb in adapters:
        a.requires_grad_(ga)
        bb.requires_grad_(gb)
        if lb is not None:
            lb.requires_grad_(True)
    return x, weight, b, adapters


def clone_case(x, weight, b, adapters):
    c = lambda t: None if t is None else t.detach().clone().requires_grad_(t.requires_grad)  # noqa: E731
    return c(x), weight, b, [tuple(c(t) for t in ad) for ad in adapters]


def grads_of(x, adapters):
    ts = [x] + [t for ad in adapters for t in ad if t is not None]
    return [t.grad for t in ts if t.requires_grad]


def run_both(plan, case, configs, training, seed=0):
    """Outputs and grads of the planned node and of the reference, drawing dropout from the same seed."""
    g_seed = torch.Generator().manual_seed(seed + 1)
    ours, ref = clone_case(*case), clone_case(*case)
    torch.manual_seed(seed)
    y = run_plan(plan, ours[0], ours[1], ours[2], ours[3])
    torch.manual_seed(seed)
    y_ref = peft_reference(ref[0], ref[1], ref[2], ref[3], configs, training)
    G = torch.randn(y_ref.shape, generator=g_seed, dtype=torch.float64).to(y_ref.dtype)
    if y.requires_grad:
        (y * G).sum().backward()
        (y_ref * G).sum().backward()
    return (y, grads_of(ours[0], ours[3])), (y_ref, grads_of(ref[0], ref[3]))


def spec_of(case, configs, training):
    runner = LoraLinearRunner(tuple(configs))
    x, weight, b, adapters = case
    return runner.spec_for(x, weight, b, adapters, training)


def all_plans(spec, oriented=False):
    """Every program of the space as a Plan; `oriented`: with each skinny product in its other form."""
    for program in enumerate_programs(spec):
        low = orient(build_steps(spec, program), ORIENTED) if oriented else build_steps(spec, program)
        cost = price(low, PROFILE)
        yield Plan(spec, program, low, cost, cost)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lead=st.sampled_from([(1,), (3,), (2, 3), (1, 1, 4)]),
    i=st.integers(1, 9), o=st.integers(1, 9),
    ranks=st.lists(st.integers(1, 11), min_size=1, max_size=2),
    bias=st.booleans(), lora_bias=st.booleans(),
    dropout=st.sampled_from([0.0, 0.3]), training=st.booleans(),
    grads=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    seed=st.integers(0, 2**16), oriented=st.booleans(),
)
def test_every_program_matches_peft_formula_float64(lead, i, o, ranks, bias, lora_bias, dropout, training, grads, seed,
                                                    oriented):
    configs = [AdapterConfig(scale=0.5 + k, dropout=dropout, lora_bias=lora_bias) for k in range(len(ranks))]
    case = make_case(seed, lead, i, o, ranks, bias, lora_bias, torch.float64, torch.float64, grads)
    spec = spec_of(case, configs, training)
    n_programs = 0
    for plan in all_plans(spec, oriented):
        (y, gs), (y_ref, gs_ref) = run_both(plan, case, configs, training, seed)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12, msg=plan.key)
        assert len(gs) == len(gs_ref)
        for g, g_ref in zip(gs, gs_ref):
            torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12, msg=plan.key)
        n_programs += 1
    assert n_programs >= 1


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_working_dtypes_within_stock_tolerance(dtype, adapter_dtype, dropout):
    """In fp32/bf16 every program is as close to the float64 truth as the stock layer itself is."""
    configs = [AdapterConfig(scale=2.0, dropout=dropout, lora_bias=True)]
    case64 = make_case(3, (4, 16), 48, 40, [8], True, True, torch.float64, torch.float64, (True, True, True))
    case = tuple(t.detach().to(dtype) if t is not None else None for t in case64[:3])
    adapters = [tuple(t.detach().to(adapter_dtype) for t in ad) for ad in case64[3]]
    case = (case[0].requires_grad_(), case[1], case[2], [tuple(t.requires_grad_() for t in ad) for ad in adapters])
    spec = spec_of(case, configs, True)
    truth_y, truth_g = run_both(next(iter(all_plans(spec_of(case64, configs, True)))), case64, configs, True)[1]
    (_, _), (y_stock, g_stock) = run_both(next(iter(all_plans(spec))), case, configs, True)
    err = lambda a, b: (a.double() - b.double()).abs().max().item()  # noqa: E731
    stock_err = [err(y_stock, truth_y)] + [err(g, t) for g, t in zip(g_stock, truth_g)]
    oriented = list(all_plans(spec, oriented=True))
    assert any(s.form for p in oriented for s in p.lowered.backward)  # the other forms do run here
    for plan in [*all_plans(spec), *oriented]:
        (y, gs), _ = run_both(plan, case, configs, True)
        assert y.dtype == dtype and all(g.dtype == t.dtype for g, t in zip(gs, g_stock))
        ours = [err(y, truth_y)] + [err(g, t) for g, t in zip(gs, truth_g)]
        for k, (e, s, t) in enumerate(zip(ours, stock_err, [truth_y] + truth_g)):
            scale = t.abs().max().item()
            assert e <= 4 * s + 4 * torch.finfo(dtype).eps * scale, (plan.key, k, e, s)


@pytest.mark.parametrize("store", ["bool", "bits", "seed", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_mask_is_torch_dropouts_on_same_seed(store, dtype):
    """The node draws its {0, 1} mask as F.dropout draws its noise (same zeros, same RNG use afterwards), so a
    seeded run keeps peft's mask; the kept x_d is x times the mask, the 1/(1-p) being in the scales."""
    x = torch.randn(64, 32, dtype=dtype)
    torch.manual_seed(7)
    ref = F.dropout(x, 0.25, True)
    after_ref = torch.rand(3)
    spec = SiteSpec(64, 32, 32, (AdapterSpec(4, dropout=0.25),), dtype=dtype, grad_x=False, training=True)
    from runlora_fx.planner.expr import Program
    low = build_steps(spec, Program(mask=store, keep_xd=False))
    from runlora_fx.kernels.executor import run
    torch.manual_seed(7)
    env = run([s for s in low.forward if s.op in ("rng_state", "draw_mask", "mul")], {"x": x}, low.shapes)
    assert torch.equal(torch.rand(3), after_ref)
    assert torch.equal(env["md0"] != 0, ref != 0)
    assert torch.equal(env["xd0"], x * (ref != 0))


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 19), min_size=1, max_size=3), p=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_bits_round_trip(shape, p, seed):
    from runlora_fx.kernels.masks import pack_bits, unpack_bits
    mask = torch.empty(shape, dtype=torch.uint8).bernoulli_(p, generator=torch.Generator().manual_seed(seed))
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_bits(packed, tuple(shape)), mask)


@pytest.mark.parametrize("dropout,training", [(0.0, True), (0.2, True), (0.2, False)])
@pytest.mark.parametrize("grads", [(True, True, True), (True, False, True), (False, True, True), (False, False, True)])
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.float64])
def test_saved_bytes_equal_what_autograd_observes(dropout, training, grads, adapter_dtype):
    configs = [AdapterConfig(1.5, dropout), AdapterConfig(0.5, dropout)]
    case = make_case(1, (3, 5), 24, 16, [4, 6], False, False, torch.float64, adapter_dtype, grads)
    spec = spec_of(case, configs, training)
    for plan in all_plans(spec):
        x, weight, b, adapters = clone_case(*case)
        counter = SavedBytes(exclude=[weight] + [t for ad in adapters for t in ad if t is not None])
        with counter.hooks():
            run_plan(plan, x, weight, b, adapters)
        assert counter.bytes == plan.cost.saved_bytes, plan.key


def test_stock_program_saved_bytes_equal_peft_reference_under_autograd():
    """The budget's reference ('stock') saves what autograd saves for the plain peft formula."""
    from runlora_fx.planner.search import stock_plan
    for dropout in (0.0, 0.3):
        configs = [AdapterConfig(2.0, dropout)]
        case = make_case(0, (6,), 20, 12, [4], False, False, torch.float32, torch.float32, (True, True, True))
        spec = spec_of(case, configs, True)
        counter = SavedBytes(exclude=[case[1]] + [t for t in case[3][0] if t is not None])
        with counter.hooks():
            peft_reference(*case, configs, True)
        assert counter.bytes == stock_plan(spec, PROFILE).cost.saved_bytes


def test_runner_dispatches_a_plan_per_n():
    runner = LoraLinearRunner((AdapterConfig(1.0),))
    w, a, b = torch.randn(8, 16), torch.randn(2, 16, requires_grad=True), torch.zeros(8, 2, requires_grad=True)
    specs = []
    for n in (1, 7, 300):
        x = torch.randn(n, 16, requires_grad=True)
        specs.append(runner.spec_for(x, w, None, [(a, b, None)], True))
        runner(x, w, None, [(a, b, None)], True).sum().backward()
    assert [s.n for s in specs] == [1, 7, 300]


def test_runner_plan_cache_follows_every_field_of_the_call():
    """The per-call-signature cache returns the plan spec_for + plan_for would, for every change of shape, grad
    flag, training mode, grad mode and device profile, and the very same Plan on a repeated call."""
    from runlora_fx.planner import device

    runner = LoraLinearRunner((AdapterConfig(2.0, 0.1),))
    w, b = torch.randn(8, 16), torch.randn(8)
    a0, b0 = torch.randn(2, 16, requires_grad=True), torch.zeros(8, 2, requires_grad=True)

    def check(x, bias, a, training):
        got = runner._plan_of_call(x, w, bias, [(a, b0, None)], training)
        want = runner.plan_for(runner.spec_for(x, w, bias, [(a, b0, None)], training), x.device)
        assert got.spec == want.spec and got.program == want.program
        return got

    x = torch.randn(5, 16, requires_grad=True)
    first = check(x, None, a0, True)
    assert runner._plan_of_call(x, w, None, [(a0, b0, None)], True) is first
    seen = {first.spec}
    for call in [(torch.randn(7, 16, requires_grad=True), None, a0, True),  # another N
                 (x.detach(), None, a0, True),  # x without grad
                 (x, b, a0, True),  # a bias
                 (x, None, a0.detach(), True),  # frozen A (LoRA-FA)
                 (x, None, a0, False)]:  # eval: no dropout
        seen.add(check(*call).spec)
    with torch.no_grad():
        seen.add(check(x, None, a0, True).spec)
    assert len(seen) == 7
    other = device.DeviceProfile("cpu", {"float32": [(8, 1e9)]}, 1e10, 1e-6)
    loaded = dict(device._loaded)
    try:
        device._loaded[device.device_key("cpu")] = other
        assert runner._plan_of_call(x, w, None, [(a0, b0, None)], True) is not first  # re-planned on the new profile
    finally:
        device._loaded.clear()
        device._loaded.update(loaded)


@pytest.mark.parametrize("bad,match", [
    (dict(x=torch.randn(3, 5)), "features"),
    (dict(x=torch.randn(3, 4, dtype=torch.float64)), "dtype"),
    (dict(a=torch.randn(2, 5)), "do not fit"),
    (dict(b=torch.randn(6, 3)), "do not fit"),
    (dict(w=torch.randn(6)), "2-D"),
])
def test_bad_input_is_a_clear_error(bad, match):
    args = dict(x=torch.randn(3, 4), w=torch.randn(6, 4), a=torch.randn(2, 4), b=torch.randn(6, 2))
    args.update(bad)
    runner = LoraLinearRunner((AdapterConfig(1.0),))
    with pytest.raises(ValueError, match=match):
        runner(args["x"], args["w"], None, [(args["a"], args["b"], None)], True)


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), "rank"), (dict(dropout=1.0), "dropout"), (dict(dropout=-0.1), "dropout"),
])
def test_bad_adapter_spec(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdapterSpec(**{"rank": 4, **kwargs})


def test_non_floating_dtype_rejected():
    with pytest.raises(ValueError, match="floating"):
        SiteSpec(4, 4, 4, (AdapterSpec(2),), dtype=torch.int32)


def test_frozen_base_required():
    runner = LoraLinearRunner((AdapterConfig(1.0),))
    with pytest.raises(ValueError, match="frozen"):
        runner(torch.randn(2, 4), torch.randn(3, 4, requires_grad=True), None, [(torch.randn(1, 4), torch.randn(3, 1), None)], True)


def test_inference_without_grad_saves_nothing():
    runner = LoraLinearRunner((AdapterConfig(1.0, 0.1),))
    x = torch.randn(5, 8, requires_grad=True)
    with torch.no_grad():
        spec = runner.spec_for(x, torch.randn(4, 8), None, [(torch.randn(2, 8), torch.randn(4, 2), None)], False)
    plan = runner.plan_for(spec, x.device)
    assert plan.cost.saved_bytes == 0 and not plan.lowered.backward
    assert math.isfinite(plan.cost.time)
