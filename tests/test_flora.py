"""Flora optimizer: projections, equivalence with transformers' Adafactor, compressed momentum, state size."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runlora_fx.train import Flora
from runlora_fx.train.flora import compress, compressible, decompress, projection_seed, random_projection

Adafactor = pytest.importorskip("transformers.optimization").Adafactor

F64 = torch.float64
# The rule these small-shape tests were written for: every 2-D matrix with min(shape) >= rank is compressed
# (the default follows the authors: min side >= 128, sides within 4x; tested in its own section).
EVERY_MATRIX = dict(min_size=0, max_aspect_ratio=math.inf)


def _params(shapes, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float32).to(dtype).requires_grad_() for s in shapes]


def _grads(params, t):
    gen = torch.Generator().manual_seed(1000 + t)
    return [torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) for p in params]


def _step(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


# -- projections --------------------------------------------------------------------------------------------


def test_projection_is_regenerated_bit_identically_and_leaves_global_rng_alone():
    rng = torch.get_rng_state()
    a = random_projection(4, 9, projection_seed(3, 0, 5, 2), "cpu", torch.float32)
    b = random_projection(4, 9, projection_seed(3, 0, 5, 2), "cpu", torch.float32)
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), rng)
    for other in [(4, 0, 5, 2), (3, 1, 5, 2), (3, 0, 6, 2), (3, 0, 5, 3)]:
        assert not torch.equal(a, random_projection(4, 9, projection_seed(*other), "cpu", torch.float32))


def test_projection_is_gaussian_scaled_by_one_over_sqrt_rank():
    p = random_projection(64, 512, 123, "cpu", torch.float32)
    assert p.shape == (64, 512)
    assert abs(p.mean().item()) < 0.005  # 7 standard errors
    assert p.std().item() == pytest.approx(1 / 8, rel=0.02)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 12), n=st.integers(1, 12), rank=st.integers(1, 5))
def test_compress_runs_along_the_smaller_dimension(m, n, rank):
    x = torch.randn(m, n, dtype=F64)
    p = random_projection(rank, min(m, n), 7, "cpu", F64)
    c = compress(p, x)
    assert c.shape == (rank, max(m, n))
    expected = p.T @ p @ x if m <= n else x @ p.T @ p
    torch.testing.assert_close(decompress(p, c, x.shape), expected, rtol=1e-12, atol=1e-12)


def test_flora_projection_is_identical_across_calls_and_optimizers_with_the_same_seed():
    def stepped(seed):
        params = _params([(6, 10), (12, 5)])
        opt = Flora(params, lr=1e-2, rank=3, seed=seed, **EVERY_MATRIX)
        _step(opt, params, _grads(params, 0))
        return opt, params

    (o1, p1), (o2, p2), (o3, p3) = stepped(0), stepped(0), stepped(1)
    for i in range(2):
        assert torch.equal(o1.projection(p1[i]), o1.projection(p1[i]))
        assert torch.equal(o1.projection(p1[i]), o2.projection(p2[i]))
        assert not torch.equal(o1.projection(p1[i]), o3.projection(p3[i]))
    assert o1.projection(p1[0]).shape == (3, 6) and o1.projection(p1[1]).shape == (3, 5)


# -- equivalence with transformers' Adafactor when nothing is compressed --------------------------------------

SHAPES = [(5, 7), (9, 4), (7,), (2, 3, 4)]


@pytest.mark.parametrize("beta1", [0.9, None])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("relative_step,scale_parameter", [(False, True), (False, False), (True, True)])
def test_uncompressed_flora_equals_transformers_adafactor(beta1, weight_decay, relative_step, scale_parameter):
    a, b = _params(SHAPES), _params(SHAPES)
    lr = None if relative_step else 3e-2
    common = dict(lr=lr, beta1=beta1, weight_decay=weight_decay, relative_step=relative_step,
                  scale_parameter=scale_parameter)
    flora = Flora(a, rank=100, **common)  # rank above every dimension: nothing is compressed
    ref = Adafactor(b, warmup_init=False, **common)
    for t in range(6):
        grads = _grads(a, t)
        _step(flora, a, grads)
        _step(ref, b, grads)
        for x, y in zip(a, b):
            assert torch.equal(x, y), f"step {t}"


def test_uncompressed_flora_equals_adafactor_on_bfloat16_params():
    a, b = _params(SHAPES, torch.bfloat16), _params(SHAPES, torch.bfloat16)
    flora = Flora(a, lr=1e-2, rank=100)
    ref = Adafactor(b, lr=1e-2, beta1=0.9, relative_step=False)
    for t in range(3):
        grads = _grads(a, t)
        _step(flora, a, grads)
        _step(ref, b, grads)
    for x, y in zip(a, b):
        assert x.dtype == torch.bfloat16 and torch.equal(x, y)


# -- compressed momentum ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(16, 30), (30, 16)])
def test_compressed_trajectory_equals_the_algorithm_by_hand(shape):
    """The authors' order (flora-opt's ``flora_step_``): with ``u`` the preconditioned gradient (unclipped, no lr),
    step ``lr * clip((1-b1) u + b1 P^T C, clip)``; then every kappa steps ``C <- P_new P_old^T C``; then
    ``C <- b1 C + (1-b1) P u`` with the current (possibly new) projection.

    ``u`` does not depend on the momentum, so a momentum-free Adafactor with lr 1 and no clipping fed the same
    gradients supplies it. Gradients share a direction so that momentum builds up and the clip is exercised.
    """
    b1, kappa, rank, lr, clip = 0.8, 2, 2, 1e-2, 0.7
    (p,), (q,) = _params([shape]), _params([shape])
    flora = Flora([p], lr=lr, rank=rank, kappa=kappa, beta1=b1, clip_threshold=clip, scale_parameter=False, **EVERY_MATRIX)
    plain = Adafactor([q], lr=1.0, beta1=None, clip_threshold=1e30, relative_step=False, scale_parameter=False)
    expected = p.detach().clone()
    c = torch.zeros(rank, max(shape), dtype=F64)
    count, clipped = 0, 0
    (base,) = _grads([p], 0)
    proj = random_projection(rank, min(shape), projection_seed(0, 0, 0, count), "cpu", F64)
    for t in range(1, 6):
        g = base + 0.3 * _grads([p], t)[0]
        before = q.detach().clone()
        _step(plain, [q], [g])
        u = before - q.detach()
        applied = (1 - b1) * u + b1 * decompress(proj, c, shape)
        rms = (applied.norm() / applied.numel() ** 0.5).item()
        clipped += rms > clip
        expected -= lr * applied / max(1.0, rms / clip)
        if t % kappa == 0:
            count += 1
            new = random_projection(rank, min(shape), projection_seed(0, 0, 0, count), "cpu", F64)
            c, proj = compress(new, decompress(proj, c, shape)), new
        c = b1 * c + (1 - b1) * compress(proj, u)
        _step(flora, [p], [g])
        torch.testing.assert_close(p.detach(), expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(flora.state[p]["exp_avg_proj"], c, rtol=1e-10, atol=1e-12)
    assert flora.state[p]["resamples"] == 2
    assert clipped >= 2


@pytest.mark.parametrize("shape", [(6, 11), (11, 6)])
def test_transfer_equals_decompress_with_old_then_compress_with_new(shape):
    """A zero gradient on the transfer step makes the pre-transfer state b1 * C exactly."""
    b1, kappa = 0.9, 3
    (p,) = _params([shape])
    opt = Flora([p], lr=1e-2, rank=4, kappa=kappa, beta1=b1, **EVERY_MATRIX)
    for t in range(kappa - 1):
        _step(opt, [p], _grads([p], t))
    old_p, old_c = opt.projection(p), opt.state[p]["exp_avg_proj"].clone()
    _step(opt, [p], [torch.zeros_like(p)])
    new_p = opt.projection(p)
    assert not torch.equal(old_p, new_p)
    by_hand = compress(new_p, decompress(old_p, b1 * old_c, shape))
    torch.testing.assert_close(opt.state[p]["exp_avg_proj"], by_hand, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(opt.momentum(p), decompress(new_p, by_hand, shape), rtol=1e-13, atol=1e-15)


def test_kappa_controls_when_the_projection_changes():
    (p,) = _params([(8, 8)])
    opt = Flora([p], lr=1e-2, rank=2, kappa=3, **EVERY_MATRIX)
    seen = []
    for t in range(7):
        _step(opt, [p], _grads([p], t))
        seen.append(opt.projection(p))
    changes = [not torch.equal(a, b) for a, b in zip(seen, seen[1:])]
    assert changes == [False, True, False, False, True, False]  # after steps 3 and 6


# -- state size -------------------------------------------------------------------------------------------


def _formula_numel(shape, rank, beta1):
    if len(shape) == 1:
        return shape[0] * (2 if beta1 is not None else 1)
    m, n = shape
    momentum = 0 if beta1 is None else (rank * max(m, n) if min(m, n) >= rank else m * n)
    return momentum + m + n


@settings(max_examples=20, deadline=None)
@given(
    shapes=st.lists(st.one_of(st.tuples(st.integers(1, 20), st.integers(1, 20)), st.tuples(st.integers(1, 20))),
                    min_size=1, max_size=4),
    rank=st.integers(1, 6),
    beta1=st.sampled_from([0.9, None]),
    dtype=st.sampled_from([torch.float32, F64]),
)
def test_state_bytes_equal_the_formula(shapes, rank, beta1, dtype):
    params = _params(shapes, dtype)
    opt = Flora(params, lr=1e-2, rank=rank, beta1=beta1, **EVERY_MATRIX)
    _step(opt, params, _grads(params, 0))
    size = torch.finfo(dtype).bits // 8
    assert opt.state_bytes() == size * sum(_formula_numel(s, rank, beta1) for s in shapes)
    measured = sum(t.nbytes for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    assert opt.state_bytes() == measured


def test_compressed_state_of_a_large_matrix_is_rank_times_max_plus_m_plus_n():
    (p,) = _params([(64, 256)], torch.float32)
    opt = Flora([p], lr=1e-2, rank=8, **EVERY_MATRIX)
    _step(opt, [p], _grads([p], 0))
    assert opt.state_bytes() == 4 * (8 * 256 + 64 + 256)
    assert opt.state[p]["exp_avg_proj"].shape == (8, 256)


# -- which parameters are compressed: the authors' thresholds ------------------------------------------------

# name: (shape, compressed by default at rank 8). Sizes of a small LLM's parameter kinds.
KINDS = {
    "embedding": ((1000, 128), False),  # sides differ by 7.8x > 4
    "lm_head": ((128, 1000), False),
    "attention": ((128, 128), True),
    "mlp": ((352, 128), True),  # 2.75x
    "mlp, 4x": ((128, 512), True),  # exactly 4x: compressed (the authors skip only > 4x)
    "small": ((64, 96), False),  # smaller side 64 < 128
    "norm": ((128,), False),
}


def _kind_numel(shape, rank, compressed):
    """Flora's state numbers (beta1 = 0.9): compressed ``rank max + m + n``, else momentum ``m n`` + ``m + n``."""
    if len(shape) == 1:
        return 2 * shape[0]
    m, n = shape
    return (rank * max(m, n) if compressed else m * n) + m + n


@pytest.mark.parametrize("options,also", [({}, set()), (dict(min_size=64), {"small"}),
                                          (dict(max_aspect_ratio=8), {"embedding", "lm_head"})])
def test_state_of_each_kind_of_parameter_equals_the_formula(options, also):
    rank = 8
    params = _params([shape for shape, _ in KINDS.values()], torch.float32)
    opt = Flora(params, lr=1e-2, rank=rank, **options)
    _step(opt, params, _grads(params, 0))
    for (name, (shape, default)), p in zip(KINDS.items(), params):
        compressed = default or name in also
        state = opt.state[p]
        assert ("exp_avg_proj" in state) == compressed, name
        assert sum(t.nbytes for t in state.values() if isinstance(t, torch.Tensor)) == \
            4 * _kind_numel(shape, rank, compressed), name
    assert opt.state_bytes() == 4 * sum(_kind_numel(shape, rank, default or name in also)
                                        for name, (shape, default) in KINDS.items())


def test_compressible_boundaries():
    t = lambda *shape: torch.empty(shape)
    assert compressible(t(128, 512), 8) and not compressible(t(128, 513), 8)
    assert not compressible(t(127, 300), 8) and compressible(t(127, 300), 8, min_size=127)
    assert not compressible(t(128, 128), 129)  # the rank still bounds the smaller side
    assert not compressible(t(128, 128, 2), 8) and not compressible(t(128), 8)
    assert compressible(t(2, 1000), 2, min_size=0, max_aspect_ratio=math.inf)


def test_thresholds_can_differ_per_param_group():
    big, small = _params([(128, 128), (64, 64)], torch.float32)
    opt = Flora([{"params": [big]}, {"params": [small], "min_size": 0}], lr=1e-2, rank=8)
    _step(opt, [big, small], _grads([big, small], 0))
    assert "exp_avg_proj" in opt.state[big] and "exp_avg_proj" in opt.state[small]


# -- options and errors -----------------------------------------------------------------------------------


def test_beta1_none_keeps_no_momentum():
    (p,) = _params([(6, 6)])
    opt = Flora([p], lr=1e-2, rank=2, beta1=None)
    _step(opt, [p], _grads([p], 0))
    assert opt.momentum(p) is None
    with pytest.raises(ValueError, match="not compressed"):
        opt.projection(p)


def test_state_dict_round_trip_continues_identically():
    a = _params([(6, 10), (10,)])
    opt = Flora(a, lr=1e-2, rank=3, kappa=2, **EVERY_MATRIX)
    for t in range(3):
        _step(opt, a, _grads(a, t))
    b = [x.detach().clone().requires_grad_() for x in a]
    opt_b = Flora(b, lr=1e-2, rank=3, kappa=2, **EVERY_MATRIX)
    opt_b.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch shares state tensors otherwise
    for t in range(3, 6):
        _step(opt, a, _grads(a, t))
        _step(opt_b, b, _grads(b, t))
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_sparse_gradient_is_a_clear_error():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = Flora(emb.parameters(), lr=1e-2, rank=2)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(lr=0.0), "lr"),
        (dict(lr=None), "lr"),
        (dict(relative_step=True), "lr"),
        (dict(rank=0), "rank"),
        (dict(rank=2.5), "rank"),
        (dict(kappa=0), "kappa"),
        (dict(beta1=1.0), "beta1"),
        (dict(beta1=-0.1), "beta1"),
        (dict(decay_rate=0.5), "decay_rate"),
        (dict(clip_threshold=0), "clip_threshold"),
        (dict(eps=1e-3), "eps"),
        (dict(eps=(1e-30, -1.0)), "eps"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(seed=-1), "seed"),
        (dict(min_size=-1), "min_size"),
        (dict(min_size=1.5), "min_size"),
        (dict(max_aspect_ratio=0.5), "max_aspect_ratio"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    args = dict(lr=1e-2, rank=2) | kwargs
    with pytest.raises(ValueError, match=name):
        Flora(_params([(3, 3)]), **args)


def test_bad_option_in_a_param_group_is_caught():
    with pytest.raises(ValueError, match="rank"):
        Flora([{"params": _params([(3, 3)]), "rank": 0}], lr=1e-2, rank=2)
    with pytest.raises(ValueError, match="max_aspect_ratio"):
        Flora([{"params": _params([(3, 3)]), "max_aspect_ratio": 0}], lr=1e-2, rank=2)


def test_module_doctests():
    import doctest

    import runlora_fx.train.flora as flora

    result = doctest.testmod(flora)
    assert result.attempted > 0 and result.failed == 0
