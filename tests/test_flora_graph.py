"""FloraAccumulator(planned_backward=True): plain trainable linears produce their compressed weight gradient directly.

The planned model must give the same decompressed gradients as the accumulator's hook path (float64 to 1e-12,
float32 within the rounding bound), never form or save an o x i weight gradient between syncs, take the direct
program only where the cost rule says it is cheaper, and fall back to the plain linear whenever the node does not
apply (no_grad, eval, accumulator removed). The cost rule itself is tested for both outcomes. `optimize()` does
not touch plain linears at all (a model that does not use Flora keeps its forwards and pickles).
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import runlora_fx
from runlora_fx.kernels import flora_linear
from runlora_fx.kernels.flora_linear import active_accumulator
from runlora_fx.planner.compressed_grad import flops_rule, plan_compressed_grad
from runlora_fx.planner.device import DeviceProfile, default_profile
from runlora_fx.train import FloraAccumulator
from runlora_fx.train.flora import compress

F64, F32 = torch.float64, torch.float32
RANK, BATCH, SEQ = 2, 2, 4
N = BATCH * SEQ
# A profile on which only FLOPs matter (flat matmul rate, free bytes, launches and random draws), so that the
# planner's choice in the model tests is the FLOPs rule whatever calibration this machine has cached.
FLAT = DeviceProfile("flat", {"float32": [(1, 1e9), (1 << 20, 1e9)], "float64": [(1, 1e9), (1 << 20, 1e9)]},
                     bandwidth=1e18, launch_overhead=0.0, rng_rate=1e18)


class Net(nn.Module):
    """Linears of both orientations, with and without bias, a LayerNorm, and a last layer (3 -> 2) whose
    compressed gradient is cheaper through the full gradient at N = 8, r = 2."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(6, 10)  # o > i, bias
        self.norm = nn.LayerNorm(10)
        self.down = nn.Linear(10, 5, bias=False)  # o < i
        self.mid = nn.Linear(5, 12, bias=False)  # o > i
        self.head = nn.Linear(12, 3)  # o < i, bias
        self.tail = nn.Linear(3, 2)  # planner: "full"

    def forward(self, x):
        h = self.norm(torch.tanh(self.up(x)))
        return self.tail(self.head(torch.tanh(self.mid(self.down(h)))))


LINEARS = ("up", "down", "mid", "head", "tail")


def expected_choice(layer: nn.Linear) -> str:
    full, direct = flops_rule(N, layer.in_features, layer.out_features, RANK)
    return "direct" if direct < full else "full"


@pytest.fixture(autouse=True)
def flat_profile(monkeypatch):
    monkeypatch.setattr(flora_linear, "get_profile", lambda device: FLAT)


def make(dtype=F64, seed=0):
    torch.manual_seed(seed)
    return Net().to(dtype)


def batches(count, dtype=F64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, SEQ, 6, generator=gen, dtype=dtype), torch.randn(BATCH, SEQ, 2, generator=gen, dtype=dtype))
            for _ in range(count)]


def loss(model, batch, k):
    x, y = batch
    return nn.functional.mse_loss(model(x), y) / k


def optimize(model, dtype=F64):
    return runlora_fx.optimize(model, (torch.randn(BATCH, SEQ, 6, dtype=dtype),))


def accumulator(model, planned=False, **kwargs):
    """An accumulator at RANK that compresses Net's small layers (below the authors' min_size of 128)."""
    return FloraAccumulator(model, rank=RANK, min_size=0, planned_backward=planned, **kwargs)


def planned(model, **kwargs):
    return accumulator(model, planned=True, **kwargs)


def _runner(acc, name):
    return next(s.runner for s in acc.planned if s.path == name)


class OutputShapes(TorchDispatchMode):
    """Records the shape of every tensor an op produces (run around a backward), except views of ``exclude``
    (the parameters: a detach or transpose of a weight is not a new o x i tensor)."""

    def __init__(self, exclude=()):
        super().__init__()
        self.shapes = set()
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.exclude:
                self.shapes.add(tuple(t.shape))
        return out


def test_optimize_leaves_plain_linears_alone_and_the_model_pickles():
    """A model that does not use Flora: optimize() touches none of its plain linears, and it still pickles
    (Net too, whose down -> mid pair is a rank-5 product that optimize records as skipped)."""
    for model, n in ((nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 2)), 3),
                     (Net(), len(LINEARS))):
        model = model.to(F64)
        runlora_fx.optimize(model, (torch.randn(BATCH, SEQ, 6, dtype=F64),))
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        assert len(linears) == n and all("forward" not in m.__dict__ for m in linears)
        torch.save(model, io.BytesIO())


def test_plain_linears_are_found_and_the_planner_splits_them():
    model = make()
    acc = planned(model)
    assert sorted(s.path for s in acc.planned) == sorted(LINEARS)
    assert {name: expected_choice(getattr(model, name)) for name in LINEARS} == {
        "up": "direct", "down": "direct", "mid": "direct", "head": "direct", "tail": "full"}


@pytest.mark.parametrize("x_grad", [False, True])
@pytest.mark.parametrize("order", ["optimize_first", "accumulator_first"])
def test_float64_equals_the_hook_path_and_never_forms_the_weight_gradient(x_grad, order):
    k, windows = 3, 2
    model, ref = make(), make()
    if order == "optimize_first":
        optimize(model)
        acc = planned(model, accumulation_steps=k)
    else:
        acc = planned(model, accumulation_steps=k)
        optimize(model)
    ref_acc = accumulator(ref, accumulation_steps=k)
    runners = {s.path: s.runner for s in acc.planned}
    for runner in runners.values():  # optimize's capture call (accumulator_first) ran them once, forward only
        runner.calls = dict.fromkeys(runner.calls, 0)
    direct = {n for n in LINEARS if expected_choice(getattr(model, n)) == "direct"}
    weights = {getattr(model, n).weight: n for n in LINEARS}
    for w in range(windows):
        for j, batch in enumerate(batches(k, seed=10 + w)):
            xs = [batch[0].clone().requires_grad_(x_grad) for _ in range(2)]
            saved = []
            shapes = OutputShapes(exclude=list(model.parameters()))
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                out = loss(model, (xs[0], batch[1]), k)
            if j < k - 1:
                with shapes:
                    out.backward()
            else:
                out.backward()
            loss(ref, (xs[1], batch[1]), k).backward()
            if x_grad:
                torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-12, atol=1e-14)
            else:
                assert xs[0].grad is None
            # nothing o x i is saved for backward except the weights themselves (parameters, alive anyway)
            for t in saved:
                for name in direct:
                    weight = getattr(model, name).weight
                    if t.shape in (weight.shape, weight.T.shape):
                        assert t.data_ptr() == weight.data_ptr(), name
            if j < k - 1:  # between syncs: no weight gradient anywhere, and no o x i tensor made in backward
                assert all(p.grad is None for p in weights), [weights[p] for p in weights if p.grad is not None]
                for name in direct:
                    o, i = getattr(model, name).weight.shape
                    assert (o, i) not in shapes.shapes and (i, o) not in shapes.shapes, name
                assert acc.buffer_bytes() == ref_acc.buffer_bytes() > 0
        assert acc.updates == ref_acc.updates == w + 1 and acc.micro_batches == 0
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14, msg=name)
            p.grad = q.grad = None
    for name in LINEARS:
        want = 2 * k if name in direct else 0
        assert runners[name].calls["direct"] == want, name
        assert runners[name].calls["full"] == 2 * k - want, name
        assert runners[name].last_plan.choice == expected_choice(getattr(model, name))


def test_the_shape_detector_sees_the_hook_path_form_the_weight_gradient():
    """The check above is meaningful: the hook path does make an o x i tensor in backward."""
    ref = make()
    accumulator(ref, accumulation_steps=2)
    shapes = OutputShapes(exclude=list(ref.parameters()))
    with shapes:
        loss(ref, batches(1)[0], 2).backward()
    assert (10, 6) in shapes.shapes and (5, 10) in shapes.shapes


def _abs_bound(name, layer_inputs, layer_grads, proj):
    """Sum over micro-batches of |P^T| |P| |G|^T |X| (o <= i) or |G|^T |X| |P|^T |P| (o > i), in float64."""
    total = 0
    for x, g in zip(layer_inputs[name], layer_grads[name]):
        g2, x2 = g.reshape(-1, g.shape[-1]).double().abs(), x.reshape(-1, x.shape[-1]).double().abs()
        total = total + g2.T @ x2
    pp = proj.double().abs().T @ proj.double().abs()
    return pp @ total if total.shape[0] <= total.shape[1] else total @ pp


def test_float32_is_within_the_rounding_bound_of_the_hook_path():
    k = 2
    model, ref = make(F32), make(F32)
    acc = planned(model, accumulation_steps=k)
    accumulator(ref, accumulation_steps=k)
    projections = {n: acc.projection(getattr(model, n).weight) for n in LINEARS}
    inputs, grads = {n: [] for n in LINEARS}, {n: [] for n in LINEARS}
    for n in LINEARS:
        def hook(module, args, out, n=n):
            inputs[n].append(args[0].detach())
            out.register_hook(lambda g: grads[n].append(g.detach()))
        getattr(ref, n).register_forward_hook(hook)
    for batch in batches(k, F32):
        loss(model, batch, k).backward()
        loss(ref, batch, k).backward()
    eps = torch.finfo(F32).eps
    for n in LINEARS:
        o, i = getattr(model, n).weight.shape
        # each path: the products over N and min(o, i) (either order), the k-term sum, then P^T C over r;
        # |fl - exact| <= K u |P^T||P||G^T||X| with K that total reduction length, so the two differ by <= K eps.
        reduction = N + min(o, i) + k + RANK
        bound = reduction * eps * _abs_bound(n, inputs, grads, projections[n])
        diff = (getattr(model, n).weight.grad.double() - getattr(ref, n).weight.grad.double()).abs()
        assert (diff <= bound).all(), (n, (diff / bound).max().item())


def test_compressed_weight_grad_equals_compressing_the_full_gradient():
    gen = torch.Generator().manual_seed(3)
    for o, i in ((5, 9), (9, 5), (6, 6)):
        g, x = torch.randn(7, o, generator=gen, dtype=F64), torch.randn(7, i, generator=gen, dtype=F64)
        proj = torch.randn(3, min(o, i), generator=gen, dtype=F64)
        torch.testing.assert_close(flora_linear.compressed_weight_grad(g, x, proj), compress(proj, g.T @ x),
                                   rtol=1e-12, atol=1e-13)


# ------------------------------------------------------------------------------------------------- fallbacks


def test_no_grad_and_eval_run_the_plain_linear():
    model, ref = make(), make()
    acc = planned(model, accumulation_steps=2)
    accumulator(ref, accumulation_steps=2)
    up = _runner(acc, "up")
    x, y = batches(1)[0]
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    assert up.calls == {"direct": 0, "full": 0, "plain": 1}
    model.eval(), ref.eval()
    loss(model, (x, y), 2).backward()  # eval with grad: the hook path still compresses
    loss(ref, (x, y), 2).backward()
    assert up.calls["plain"] == 2 and up.calls["direct"] == 0
    assert model.up.weight.grad is None and acc.micro_batches == 1
    model.train(), ref.train()
    loss(model, (x, y), 2).backward()
    loss(ref, (x, y), 2).backward()
    assert up.calls["direct"] == 1
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)


def test_after_remove_the_layer_is_plain_again():
    model, ref = make(), make()
    acc = planned(model, accumulation_steps=3)
    batch = batches(1)[0]
    assert active_accumulator(model.up.weight) is acc
    up = _runner(acc, "up")
    acc.remove()
    assert active_accumulator(model.up.weight) is None
    loss(model, batch, 1).backward()
    loss(ref, batch, 1).backward()
    assert up.calls == {"direct": 0, "full": 0, "plain": 0} and "forward" not in model.up.__dict__  # its own forward
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)  # full, uncompressed gradients


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_planned_model_without_accumulator_runs_the_plain_linear(how):
    """The copy's parameters are compressed by no accumulator: its planned linears fall back to the plain one."""
    model, ref = make(), make()
    planned(model, accumulation_steps=3)
    if how == "deepcopy":
        clone = copy.deepcopy(model)
    else:
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        clone = torch.load(buf, weights_only=False)
    batch = batches(1)[0]
    loss(clone, batch, 1).backward()
    loss(ref, batch, 1).backward()
    assert clone.up.forward.runner.calls == {"direct": 0, "full": 0, "plain": 1}
    for p, q in zip(clone.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)


def test_removed_between_forward_and_backward_gives_the_full_gradient():
    model, ref = make(), make()
    acc = planned(model, accumulation_steps=3)
    batch = batches(1)[0]
    out = loss(model, batch, 1)
    assert _runner(acc, "up").calls["direct"] == 1
    acc.remove()
    out.backward()
    loss(ref, batch, 1).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)


def test_a_stale_grad_is_folded_like_the_hook_does():
    """zero_grad(set_to_none=False) leaves a zero .grad: the hook compresses it away, so must the node."""
    model, ref = make(), make()
    planned(model, accumulation_steps=2)
    accumulator(ref, accumulation_steps=2)
    for m in (model, ref):
        for p in m.parameters():
            p.grad = torch.ones_like(p)
    for batch in batches(2):
        loss(model, batch, 2).backward()
        loss(ref, batch, 2).backward()
        if model.up.weight.grad is not None and ref.up.weight.grad is not None:
            break
        assert model.up.weight.grad is None and ref.up.weight.grad is None
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)


def test_remove_unplans_and_frozen_or_subclassed_linears_are_left_alone():
    class Sub(nn.Linear):
        pass

    model = make()
    model.extra = Sub(2, 2)
    model.frozen = nn.Linear(2, 2).requires_grad_(False)
    acc = planned(model)
    assert sorted(s.path for s in acc.planned) == sorted(LINEARS)
    assert all("forward" in getattr(model, n).__dict__ for n in LINEARS)
    acc.remove()
    assert all("forward" not in getattr(model, n).__dict__ for n in LINEARS)
    assert acc.planned == [] and not hasattr(model, "_runlora_fx")


def test_a_filter_excludes_a_linear():
    acc = accumulator(make(), planned=lambda module, path: path != "mid")
    assert sorted(s.path for s in acc.planned) == sorted(set(LINEARS) - {"mid"})


def test_the_planned_backward_is_opt_in_and_follows_the_thresholds():
    model = make()
    accumulator(model)  # planned_backward=False
    assert all("forward" not in getattr(model, n).__dict__ for n in LINEARS)
    acc = FloraAccumulator(model, rank=RANK, planned_backward=True)  # authors' min_size 128: nothing compressed
    assert acc.planned == [] and not any(acc.compressed(p) for p in model.parameters())
    with pytest.raises(ValueError, match="planned_backward"):
        FloraAccumulator(model, rank=RANK, planned_backward="yes")


def test_the_kernel_layer_does_not_import_the_training_layer():
    """Dependencies point train -> kernels only: the registry of active accumulators lives in the kernel."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(flora_linear))
    modules = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert modules and not any("train" in m for m in modules), modules


def _assert_accumulates_beside_the_plain_model(compiled, acc, model, ref, k):
    """k micro-batches through `compiled` (wrapping `model`, accumulated by `acc`) and through the plain `ref`
    with its own accumulator: the weight gradient stays compressed until the sync, and the synced grads agree in
    float64."""
    accumulator(ref, accumulation_steps=k)
    for j, batch in enumerate(batches(k)):
        loss(compiled, batch, k).backward()
        loss(ref, batch, k).backward()
        if j < k - 1:
            assert model.up.weight.grad is None
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)


def test_compiled_model_with_the_accumulator_uses_the_hook_path_correctly():
    """torch.compile(backend="runlora") does not plan Flora layers; the accumulator's hooks still see every grad."""
    from runlora_fx.backend import runlora_backend

    k = 2
    model, ref = make(), make()
    compiled = torch.compile(model, backend=runlora_backend, options={"inner": "aot_eager"})
    _assert_accumulates_beside_the_plain_model(compiled, accumulator(model, accumulation_steps=k), model, ref, k)


# ------------------------------------------------------------------------------------------------- the cost rule


def test_cost_rule_flops_and_both_outcomes():
    # FLOPs are the rule's formulas, for both orientations
    for n, i, o, r in ((8, 6, 10, 2), (8, 12, 3, 2), (4096, 4096, 11008, 8)):
        plan = plan_compressed_grad(n, i, o, r, F32, FLAT)
        assert (plan.full.flops, plan.direct.flops) == flops_rule(n, i, o, r)
        assert plan.full.saved_bytes == plan.direct.saved_bytes == n * i * 4  # both keep x only
        # transient: "full" holds the o x i gradient and C, "direct" the N x r product and C
        assert plan.full.peak_bytes == (o * i + r * max(o, i)) * 4
        assert plan.direct.peak_bytes == (n * r + r * max(o, i)) * 4
    # on a flat profile the choice is the FLOPs argmin: direct for a wide layer, full when r ~ min(o, i)
    assert plan_compressed_grad(8, 12, 3, 2, F32, FLAT).choice == "direct"
    assert plan_compressed_grad(8, 3, 2, 2, F32, FLAT).choice == "full"
    # on the default CPU profile the rank-r products run at the slow end of the rate curve: both outcomes occur
    cpu = default_profile("cpu")
    big = plan_compressed_grad(4096, 4096, 4096, 8, torch.bfloat16, cpu)
    assert big.choice == "direct" and big.direct.time < big.full.time / 10
    wide_rank = plan_compressed_grad(4096, 256, 256, 128, F32, cpu)
    assert wide_rank.choice == "full" and wide_rank.direct.flops < wide_rank.full.flops  # fewer FLOPs, yet slower
    text = str(wide_rank)
    assert "->  full" in text and "T = G P^T" in text and "dW = G^T X" in text
    assert wide_rank.to_dict()["choice"] == "full"


def test_cost_rule_rejects_bad_shapes():
    with pytest.raises(ValueError, match="r <= min"):
        plan_compressed_grad(8, 3, 2, 4, F32, FLAT)


def test_add_compressed_checks_its_arguments():
    model = make()
    acc = accumulator(model)
    with pytest.raises(ValueError, match="compresses"):
        acc.add_compressed(model.up.bias, torch.zeros(RANK, 10, dtype=F64))
    with pytest.raises(ValueError, match="must be"):
        acc.add_compressed(model.up.weight, torch.zeros(RANK, 6, dtype=F64))


def test_compiling_a_planned_model_runs_the_planned_linears_eagerly():
    """torch.compile over planned linears: each is a graph break (torch.compiler.disable), same grads."""
    k = 2
    model, ref = make(), make()
    acc = planned(model, accumulation_steps=k)
    compiled = torch.compile(model, backend="aot_eager")
    _assert_accumulates_beside_the_plain_model(compiled, acc, model, ref, k)
    assert _runner(acc, "up").calls["direct"] == k


def test_autocast_runs_the_plain_linear():
    model = make(F32)
    acc = planned(model, accumulation_steps=2)
    x, y = batches(1, F32)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    nn.functional.mse_loss(out.float(), y).backward()
    assert _runner(acc, "up").calls == {"direct": 0, "full": 0, "plain": 1}
    assert model.up.weight.grad is None  # the hook path compressed it
