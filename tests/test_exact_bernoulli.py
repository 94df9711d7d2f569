"""The exact bernoulli_ kernel against torch's own: the same mask, the same generator state after, the same next
draws, from fresh seeds, mid-block states, a cached normal sample and explicit generators; and its fallbacks."""
from __future__ import annotations

import math
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runlora_fx.kernels import exact_bernoulli as eb
from runlora_fx.kernels import masks

SIZES = (0, 1, 2, 623, 624, 625, 1247, 1248, 100003, (37, 41))
DTYPES = (torch.uint8, torch.bool, torch.float32, torch.bfloat16, torch.float16, torch.float64)
QS = (0.0, 0.05, 0.5, 0.95, 1.0)


def _seeded(seed: int):
    return lambda: torch.manual_seed(seed)


def _after_randint(seed: int, count: int):  # `count` 32-bit outputs taken: a state in the middle of a block
    return lambda: (torch.manual_seed(seed), torch.randint(0, 10, (count,)))


def _after_randn(seed: int, count: int):  # fewer than 16 values: the generator caches its next normal sample
    return lambda: (torch.manual_seed(seed), torch.randn(count, dtype=torch.float64), torch.randn(count))


STARTS = {"seed 0": _seeded(0), "seed 12345": _seeded(12345), "seed 2^40+3": _seeded(2**40 + 3),
          "randint 7": _after_randint(1, 7), "randint 1301": _after_randint(2, 1301), "randn 5": _after_randn(3, 5)}

needs_kernel = pytest.mark.skipif(not eb.available(), reason="the exact bernoulli_ kernel is not available here")


def assert_same_as_torch(start, shape, dtype: torch.dtype, q: float) -> None:
    """Global generator: mask, state and the next uniform and normal draws equal torch's."""
    results = []
    for draw in (lambda out: out.bernoulli_(q), lambda out: eb.bernoulli_(out, q)):
        start()
        mask = draw(torch.empty(shape, dtype=dtype))
        results.append((mask, torch.get_rng_state(), torch.rand(1000), torch.randn(3)))
    (want, want_state, want_u, want_n), (got, got_state, got_u, got_n) = results
    assert got.dtype == dtype and got.shape == want.shape
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (shape, dtype, q)
    assert torch.equal(got_state, want_state) and torch.equal(got_u, want_u) and torch.equal(got_n, want_n)


@needs_kernel
@pytest.mark.parametrize("start", list(STARTS), ids=list(STARTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_global_generator_matches_torch(start: str, dtype: torch.dtype) -> None:
    for shape in SIZES:
        for q in QS:
            assert_same_as_torch(STARTS[start], shape, dtype, q)


@needs_kernel
@pytest.mark.parametrize("dtype", (torch.uint8, torch.float32, torch.bfloat16), ids=str)
def test_explicit_generator_matches_torch_and_leaves_the_global_one(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    global_state = torch.get_rng_state()
    for shape in SIZES:
        a, b = torch.Generator().manual_seed(99), torch.Generator().manual_seed(99)
        torch.empty(3, dtype=torch.int32).random_(0, 5, generator=a)
        torch.empty(3, dtype=torch.int32).random_(0, 5, generator=b)
        want = torch.empty(shape, dtype=dtype).bernoulli_(0.9, generator=a)
        got = eb.bernoulli_(torch.empty(shape, dtype=dtype), 0.9, generator=b)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        assert torch.equal(a.get_state(), b.get_state())
        assert torch.equal(torch.rand(50, generator=a), torch.rand(50, generator=b))
    assert torch.equal(torch.get_rng_state(), global_state)


@needs_kernel
def test_threshold_is_strict_at_the_exact_uniform_value() -> None:
    """uniform_ on float64 draws the u that bernoulli_ compares (one 64-bit draw, 53 bits): at p = u the element
    is 0, just above it 1, in both kernels. u below 1/8 has doubles between u and u +- 2^-53, where rounding p 2^53
    the wrong way would show."""
    for seed in range(100):
        torch.manual_seed(seed)
        u = torch.empty(1, dtype=torch.float64).uniform_().item()
        if u < 0.125:
            break
    for q, first in ((u, 0), (math.nextafter(u, 2.0), 1), (math.nextafter(u, -1.0), 0)):
        assert_same_as_torch(_seeded(seed), 5, torch.uint8, q)
        torch.manual_seed(seed)
        assert eb.bernoulli_(torch.empty(5, dtype=torch.uint8), q)[0].item() == first


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 3000), q=st.floats(0.0, 1.0), seed=st.integers(0, 2**32 - 1), pre=st.integers(0, 1300),
       dtype=st.sampled_from(DTYPES))
def test_random_cases_match_torch(n: int, q: float, seed: int, pre: int, dtype: torch.dtype) -> None:
    assert_same_as_torch(_after_randint(seed, pre), n, dtype, q)


@needs_kernel
def test_in_place_like_torch() -> None:
    out = torch.empty(10, dtype=torch.uint8)
    version = out._version
    assert eb.bernoulli_(out, 0.5) is out and out._version == version + 1
    assert set(out.tolist()) <= {0, 1}


@needs_kernel
def test_engine_state_outside_what_mt19937_produces_is_left_to_torch() -> None:
    """left_ = next_ = 624 passes torch's set_state check but is no state the engine reaches: the op declines and
    touches nothing (its caller then runs torch's bernoulli_)."""
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    state[8:12] = torch.tensor([624], dtype=torch.int32).view(torch.uint8)  # left
    state[16:24] = torch.tensor([624], dtype=torch.int64).view(torch.uint8)  # next
    g.set_state(state)
    out = torch.zeros(100, dtype=torch.uint8)
    assert not torch.ops.runlora_fx_rng.bernoulli_(out, 0.5, g)
    assert torch.equal(g.get_state(), state) and not out.any()


def _fallback_matches(make_out, q: float = 0.7) -> None:
    torch.manual_seed(4)
    want = make_out().bernoulli_(q)
    torch.manual_seed(4)
    got = eb.bernoulli_(make_out(), q)
    assert torch.equal(got, want)
    assert got.is_contiguous() == want.is_contiguous()


def test_outputs_the_kernel_does_not_take_go_to_torch() -> None:
    _fallback_matches(lambda: torch.empty(30, 40).t())  # not contiguous
    _fallback_matches(lambda: torch.empty(30, 40, dtype=torch.int32))  # another dtype
    with pytest.raises(RuntimeError):
        eb.bernoulli_(torch.empty(5), 1.5)  # torch's own error
    with pytest.raises(RuntimeError):
        eb.bernoulli_(torch.empty(5, requires_grad=True), 0.5)  # a leaf requiring grad, in place


def test_disabled_by_the_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(eb.ENV, "0")
    monkeypatch.setattr(eb, "_op", None)
    assert not eb.available()
    for shape in (0, 625, (37, 41)):
        _fallback_matches(lambda: torch.empty(shape, dtype=torch.float32), 0.95)


def test_built_where_torch_draws_per_element() -> None:
    """With a compiler and ninja at hand and torch's serial kernel in use, the exact kernel must be the one used."""
    if not (shutil.which("c++") and (shutil.which("ninja") or _has_ninja_package())
            and eb._torch_draws_per_element()):
        pytest.skip("no toolchain, or this torch draws bernoulli_ through MKL")
    assert eb.available()


def _has_ninja_package() -> bool:
    try:
        import ninja  # noqa: F401
    except ImportError:
        return False
    return True


def test_draw_and_redraw_mask_are_torch_s_draw() -> None:
    """masks.draw_mask is F.dropout's noise (bernoulli_(1 - p) over x's shape) and redraw_mask replays it."""
    x = torch.randn(40, 70)
    torch.manual_seed(8)
    state = torch.get_rng_state()
    want = torch.empty_like(x).bernoulli_(0.9)
    after = torch.get_rng_state()
    torch.set_rng_state(state)
    got = masks.draw_mask(x.shape, x.dtype, x.device, 0.1)
    assert torch.equal(got, want) and torch.equal(torch.get_rng_state(), after)
    assert torch.equal(masks.redraw_mask(state, x.shape, torch.uint8, x.device, 0.1), want.to(torch.uint8))
    assert torch.equal(torch.get_rng_state(), after)
