"""dropout_rng="fast": keep rate, independence between sites and steps, determinism, the regenerated mask, and the
planned site against the formula with the very masks the generator draws (float64, every program)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from runlora_fx.kernels import rng
from runlora_fx.kernels.dense import AdapterConfig, LoraLinearRunner, run_plan
from runlora_fx.planner.cost import price
from runlora_fx.planner.device import default_profile
from runlora_fx.planner.expr import (RNG_STATE_BYTES, AdapterSpec, SiteSpec, build_steps, enumerate_programs,
                                    stock_program)
from runlora_fx.planner.plan import Plan
from runlora_fx.planner.search import SearchOptions, search
from runlora_fx.saved_bytes import SavedBytes

from test_dense import clone_case, grads_of, make_case

PROFILE = default_profile("cpu")
CPU = torch.device("cpu")
FAST = SearchOptions(dropout_rng="fast")


@pytest.mark.parametrize("p", [0.05, 0.1, 1 / 3, 0.5, 0.9])
def test_keep_rate_is_binomial_with_the_effective_probability(p):
    assert abs(rng.effective_p(p) - p) <= 2.0**-17
    torch.manual_seed(0)
    n = 1 << 20
    mask = rng.fast_mask(rng.new_seed(CPU), (1024, 1024), p)
    assert mask.dtype == torch.uint8 and set(mask.unique().tolist()) <= {0, 1}
    keep = 1 - rng.effective_p(p)
    sigma = math.sqrt(n * keep * (1 - keep))
    assert abs(mask.sum().item() - n * keep) < 5 * sigma  # a binomial test at 5 sigma


def test_no_dropout_keeps_everything():
    assert rng.fast_mask(rng.new_seed(CPU), (5, 7), 0.0).all()


def _identity_site(dim: int, p: float):
    """A site whose output is its adapter's mask / (1-p_eff): x = 1, W = 0, A = B = I, scale 1."""
    runner = LoraLinearRunner((AdapterConfig(1.0, p),), FAST)
    w = torch.zeros(dim, dim)
    a = torch.eye(dim).requires_grad_()
    b = torch.eye(dim).requires_grad_()
    return lambda n: runner(torch.ones(n, dim), w, None, [(a, b, None)], True) * (1 - rng.effective_p(p))


def _corr(m1: torch.Tensor, m2: torch.Tensor) -> float:
    a, b = m1.double().flatten(), m2.double().flatten()
    return (((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std())).item()


def test_planned_site_masks_uncorrelated_between_sites_and_steps_and_repeat_under_manual_seed():
    p, n, dim = 0.3, 512, 128
    site1, site2 = _identity_site(dim, p), _identity_site(dim, p)
    torch.manual_seed(11)
    step1 = [site1(n).detach(), site2(n).detach()]
    step2 = [site1(n).detach(), site2(n).detach()]
    masks = step1 + step2
    for m in masks:
        assert set(m.round().unique().tolist()) == {0.0, 1.0}  # the output is exactly the {0, 1} mask
        assert abs(1 - m.mean().item() - rng.effective_p(p)) < 0.01
    bound = 5 / math.sqrt(n * dim)  # 5 sigma of the correlation of independent masks
    for i in range(4):
        for j in range(i + 1, 4):
            assert abs(_corr(masks[i], masks[j])) < bound, (i, j)
    torch.manual_seed(11)
    again = [site1(n).detach(), site2(n).detach(), site1(n).detach(), site2(n).detach()]
    assert all(torch.equal(x, y) for x, y in zip(masks, again))
    torch.manual_seed(12)
    assert not torch.equal(site1(n).detach(), masks[0])


def fast_reference(x, weight, bias, adapters, configs):
    """The site's formula with the fast generator's masks: one seed per adapter from the global generator, in
    adapter order, each mask scaled by 1 / (1 - p_eff)."""
    result = F.linear(x, weight, bias)
    for (a, b, lb), cfg in zip(adapters, configs):
        mask = rng.fast_mask(rng.new_seed(x.device), tuple(x.shape), cfg.dropout).to(x.dtype)
        xd = x * mask / (1 - rng.effective_p(cfg.dropout))
        result = result + F.linear(F.linear(xd, a), b, lb) * cfg.scale
    return result


def fast_plans(spec: SiteSpec):
    for program in enumerate_programs(spec):
        low = build_steps(spec, program)
        cost = price(low, PROFILE)
        yield Plan(spec, program, low, cost, cost)


@pytest.mark.parametrize("bias,lora_bias", [(False, False), (True, True)])
@pytest.mark.parametrize("grads", [(True, True, True), (False, True, False), (True, False, True)])
def test_every_fast_program_matches_the_formula_with_the_generators_masks_float64(bias, lora_bias, grads):
    configs = [AdapterConfig(1.5, 0.3, lora_bias), AdapterConfig(0.5, 0.05, lora_bias)]
    case = make_case(3, (2, 5), 12, 10, [3, 4], bias, lora_bias, torch.float64, torch.float64, grads)
    runner = LoraLinearRunner(tuple(configs), FAST)
    spec = runner.spec_for(case[0], case[1], case[2], case[3], True)
    assert spec.dropout_rng == "fast"
    stores = set()
    for plan in fast_plans(spec):
        stores.add(plan.program.mask)
        ours, ref = clone_case(*case), clone_case(*case)
        torch.manual_seed(5)
        y = run_plan(plan, *ours)
        torch.manual_seed(5)
        y_ref = fast_reference(*ref, configs)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12, msg=plan.key)
        G = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        torch.manual_seed(99)  # backward must not read the global generator: a seed store regenerates its own
        (y * G).sum().backward()
        (y_ref * G).sum().backward()
        for got, want in zip(grads_of(ours[0], ours[3]), grads_of(ref[0], ref[3])):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=plan.key)
    assert {"bool", "bits", "seed"} <= stores or not grads[0]


def test_seed_store_saves_an_eight_byte_seed_not_the_generator_state():
    spec = SiteSpec(64, 32, 48, (AdapterSpec(4, 2.0, 0.1),), dropout_rng="fast")
    torch_spec = SiteSpec(64, 32, 48, (AdapterSpec(4, 2.0, 0.1),))
    seed_plans = [p for p in fast_plans(spec) if p.program.mask == "seed"]
    assert seed_plans
    for plan in seed_plans:
        saved = {n: (plan.lowered.shapes[n], plan.lowered.dtypes[n]) for n in plan.lowered.saved}
        assert saved["sd0"] == ((), torch.int64) and not any(n.startswith("rng") for n in saved)
        twin = build_steps(torch_spec, plan.program)
        assert price(twin, PROFILE).saved_bytes - plan.cost.saved_bytes == RNG_STATE_BYTES - rng.SEED_BYTES
        x = torch.randn(64, 32, requires_grad=True)
        w = torch.randn(48, 32)
        a, b = torch.randn(4, 32, requires_grad=True), torch.randn(48, 4, requires_grad=True)
        counter = SavedBytes(exclude=[w, a, b])
        with counter.hooks():
            run_plan(plan, x, w, None, [(a, b, None)])
        assert counter.bytes == plan.cost.saved_bytes, plan.key


def test_fast_draw_is_priced_by_its_own_rate():
    spec = SiteSpec(2048, 512, 512, (AdapterSpec(8, 2.0, 0.05),), dropout_rng="fast")
    plan = search(spec, FAST, PROFILE)
    draws = [s for s in plan.lowered.forward if s.op == "fast_mask"]
    assert draws and not any(s.op == "draw_mask" for s in plan.lowered.forward)
    from runlora_fx.planner.cost import step_time
    from runlora_fx.planner.device import DeviceProfile

    slow = DeviceProfile(**{**PROFILE.__dict__, "fast_rng_rate": PROFILE.fast_rng_rate / 10})
    assert step_time(draws[0], plan.lowered, slow) > 5 * step_time(draws[0], plan.lowered, PROFILE)
    # the stock program stays peft's (torch's draw), so the speedup a plan reports is against peft's real cost
    stock = build_steps(spec, stock_program(spec))
    assert any(s.op == "draw_mask" for s in stock.forward) and not any(s.op == "fast_mask" for s in stock.forward)


def test_dropout_rng_option_is_validated_everywhere():
    from runlora_fx.config import OptimizeConfig

    assert OptimizeConfig.from_options({"dropout_rng": "fast"}).search_options.dropout_rng == "fast"
    assert OptimizeConfig().search_options.dropout_rng == "torch"
    for bad in (lambda: OptimizeConfig.from_options({"dropout_rng": "philox"}), lambda: SearchOptions(dropout_rng="x"),
                lambda: SiteSpec(4, 4, 4, (AdapterSpec(2),), dropout_rng="")):
        with pytest.raises(ValueError, match="dropout_rng"):
            bad()


def test_torch_rng_plans_draw_no_fast_mask():
    spec = SiteSpec(64, 32, 48, (AdapterSpec(4, 2.0, 0.1),))
    for plan in fast_plans(spec):
        assert not any(s.op in ("fast_mask", "rng_seed") for s in plan.lowered.forward + plan.lowered.backward)


def _demo_losses(dropout_rng: str | None, seed: int, steps: int = 30) -> list[float]:
    """The demo's model and batches (tiny widths), trained `steps` steps; dropout drawn from `seed`. None: peft."""
    import runlora_fx
    from runlora_fx.demo import DemoConfig, batches, build_model

    cfg = DemoConfig(hidden=64, ffn=128, layers=1, heads=4, vocab=64, batch=4, seq=32, rank=4, dropout=0.1)
    model = build_model(cfg).train()
    data = batches(cfg, 4)
    if dropout_rng is not None:
        runlora_fx.optimize(model, example_kwargs={"input_ids": data[0]}, dropout_rng=dropout_rng)
        assert len(runlora_fx.api.optimized_sites(model)) == 7
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(seed)
    losses = []
    for k in range(steps):
        ids = data[k % len(data)]
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_training_with_fast_masks_stays_within_the_noise_of_peft():
    """Two peft runs that differ only in their dropout seed set the noise; the fast-mask run must sit as close to
    peft's curve as that (3x the noise), and learn as much."""
    peft_a, peft_b, fast = _demo_losses(None, 0), _demo_losses(None, 1), _demo_losses("fast", 0)
    gap = lambda u, v: sum(abs(x - y) for x, y in zip(u, v)) / len(u)  # noqa: E731
    noise = gap(peft_a, peft_b)
    assert 0 < noise and gap(fast, peft_a) <= 3 * noise, (gap(fast, peft_a), noise)
    tail = lambda v: sum(v[-5:]) / 5  # noqa: E731
    learned = peft_a[0] - tail(peft_a)
    assert learned > 10 * noise  # the curve falls well beyond the noise, so the comparison means something
    assert abs(tail(fast) - tail(peft_a)) <= 3 * noise + 0.1 * learned


@pytest.mark.slow
def test_backend_option_draws_the_same_fast_masks_as_optimize():
    import copy

    import runlora_fx
    from lora_models import loss_and_grads, tiny_llama, tokens

    model, ids = tiny_llama(dropout=0.2), tokens()
    eager = runlora_fx.optimize(copy.deepcopy(model), (ids,), dropout_rng="fast")
    compiled = torch.compile(copy.deepcopy(model), backend="runlora",
                             options={"dropout_rng": "fast", "inner": "eager"})
    peft_loss, _ = loss_and_grads(model, ids)
    (loss_e, grads_e), (loss_c, grads_c) = loss_and_grads(eager, ids), loss_and_grads(compiled, ids)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-5, msg=name)
    assert abs(loss_e.item() - peft_loss.item()) > 1e-6  # another stream than peft's masks


@pytest.mark.parametrize("dropout_rng", ["torch", "fast"])
def test_masks_not_kept_as_bytes_are_drawn_in_the_adapters_dtype_and_byte_masks_pay_the_widening(dropout_rng):
    from runlora_fx.planner.cost import widening_time

    spec = SiteSpec(256, 64, 96, (AdapterSpec(4, 2.0, 0.1),), dropout_rng=dropout_rng)
    plans = {p.program.mask: p for p in fast_plans(spec) if p.program.forward == "chain" and p.program.keep_xd
             and p.program.keep_u and p.program.grad_a == "zx" and p.program.grad_b == "gu"}
    for store, plan in plans.items():
        low = plan.lowered
        drawn = [s for s in low.forward + low.backward if s.op in ("draw_mask", "redraw_mask", "fast_mask")]
        want = torch.uint8 if store in ("bool", "bits") else torch.float32
        assert drawn and all(s.dtype == want and low.dtypes[s.out] == want for s in drawn), store
        muls = [s for s in low.forward + low.backward if s.op in ("mul", "addcmul")]
        widened = [s for s in muls if widening_time(s, low, PROFILE) > 0]
        assert bool(widened) == (store in ("bool", "bits")), store
    # and it runs: the mask drawn in the adapters' dtype is the very mask the byte store draws
    x = torch.randn(256, 64, dtype=torch.float64)
    w, a, b = torch.randn(96, 64, dtype=torch.float64), torch.randn(4, 64, dtype=torch.float64), torch.randn(96, 4, dtype=torch.float64)
    spec64 = SiteSpec(256, 64, 96, (AdapterSpec(4, 2.0, 0.1),), dtype=torch.float64, dropout_rng=dropout_rng)
    outs = {}
    for plan in fast_plans(spec64):
        if plan.program.mask in ("bool", "seed"):
            torch.manual_seed(1)
            outs.setdefault(plan.program.mask, run_plan(plan, x, w, None, [(a, b, None)]).detach())
    torch.testing.assert_close(outs["seed"], outs["bool"], rtol=1e-12, atol=1e-12)
