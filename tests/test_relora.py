"""ReLoRA merges: the model's function is unchanged, the adapters restart trainable, parameters keep identity."""
from __future__ import annotations

import importlib.util
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from runlora_fx.passes.site import AdapterParams, LoraParams
from runlora_fx.train import merge_and_reinit

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(dtype=torch.float64, seed=0, **lora):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager")
    # init_lora_weights=False draws B at random too, so that the merge has something to fold.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, init_lora_weights=False, **lora)
    return get_peft_model(LlamaForCausalLM(cfg), config).to(dtype).eval()


class MLP(nn.Module):
    def __init__(self, bias2=False):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 24), nn.Linear(24, 8, bias=bias2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def peft_mlp(dtype=torch.float64, seed=0, bias2=False, **lora):
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], init_lora_weights=False, **lora)
    return get_peft_model(MLP(bias2), config).to(dtype).eval()


def llama_outputs(model, seed=1):
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    return out.logits.double(), out.loss.double()


def snapshot(model):
    return {name: (p, p.data_ptr()) for name, p in model.named_parameters()}


def assert_restarted(sites):
    """B is zero, A is a fresh kaiming-uniform draw (bound 1/sqrt(fan_in)), not zero."""
    for site in sites:
        for ad in site.adapters:
            assert torch.count_nonzero(ad.lora_b) == 0
            fan_in = ad.lora_a.shape[1]
            assert ad.lora_a.abs().max() <= 1 / math.sqrt(fan_in) + 1e-7
            assert torch.count_nonzero(ad.lora_a) == ad.lora_a.numel()  # a real draw, not zeros


# ----------------------------------------------------------------------------------------------- peft, dense


def test_peft_llama_float64_function_unchanged_and_identity_kept():
    model = tiny_llama()
    before_params = snapshot(model)
    old_a = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    logits0, loss0 = llama_outputs(model)
    sites = merge_and_reinit(model)
    logits1, loss1 = llama_outputs(model)
    assert len(sites) == 2 * len(LLAMA_TARGETS)
    torch.testing.assert_close(logits1, logits0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss1, loss0, rtol=1e-12, atol=1e-12)
    assert_restarted(sites)
    after = snapshot(model)
    assert after.keys() == before_params.keys()
    for name, (p, ptr) in before_params.items():
        assert after[name][0] is p and after[name][1] == ptr, name
    for name, a in old_a.items():  # A was re-drawn, not kept
        assert not torch.equal(dict(model.named_parameters())[name], a)


def test_after_merge_every_adapter_gets_a_gradient():
    """The original ReLoRA zeroed A and B: every adapter gradient is then zero for the whole next cycle."""
    model = tiny_llama().train()
    sites = merge_and_reinit(model)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    model(input_ids=ids, labels=ids).loss.backward()
    for site in sites:
        for ad in site.adapters:
            assert ad.lora_b.grad is not None and ad.lora_b.grad.abs().max() > 0, site.module_path


def test_merge_twice_is_exact_and_second_merge_adds_nothing():
    model = tiny_llama(seed=4)
    merge_and_reinit(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    merge_and_reinit(model)  # B is zero now: the weights must not move at all
    for n, p in model.named_parameters():
        if "base_layer" in n:
            assert torch.equal(p, weights[n]), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peft_llama_low_precision_within_stock_error(dtype):
    """After a merge the model is as close to the float64 model as the stock layer was (one rounding of W)."""
    reference, _ = llama_outputs(tiny_llama(torch.float64))
    model = tiny_llama(dtype)
    logits0, loss0 = llama_outputs(model)
    merge_and_reinit(model)
    logits1, loss1 = llama_outputs(model)
    stock_error = (logits0 - reference).abs().max()
    assert stock_error > 0
    assert (logits1 - reference).abs().max() <= 4 * stock_error
    assert (loss1 - loss0).abs() <= 4 * stock_error
    assert all(p.dtype == dtype for p in model.parameters())


def test_multiple_active_adapters_all_merged():
    model = peft_mlp()
    model.add_adapter("second", LoraConfig(r=3, lora_alpha=5, target_modules=["fc1", "fc2"],
                                           init_lora_weights=False))
    model.base_model.set_adapter(["default", "second"])
    x = torch.randn(7, 16, dtype=torch.float64)
    y0 = model(x)
    sites = merge_and_reinit(model)
    assert sorted(len(s.adapters) for s in sites) == [2, 2]
    torch.testing.assert_close(model(x), y0, rtol=1e-12, atol=1e-12)
    assert_restarted(sites)


def test_inactive_adapter_is_left_alone():
    model = peft_mlp()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["fc1", "fc2"], init_lora_weights=False))
    other_b = model.base_model.model.fc1.lora_B["other"].weight.detach().clone()
    x = torch.randn(7, 16, dtype=torch.float64)
    y0 = model(x)
    merge_and_reinit(model)
    torch.testing.assert_close(model(x), y0, rtol=1e-12, atol=1e-12)
    assert torch.equal(model.base_model.model.fc1.lora_B["other"].weight, other_b)


def test_lora_bias_folded_into_base_bias():
    model = peft_mlp(bias2=True, lora_bias=True)
    x = torch.randn(7, 16, dtype=torch.float64)
    y0 = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both base layers have a bias: nothing to warn about
        sites = merge_and_reinit(model)
    torch.testing.assert_close(model(x), y0, rtol=1e-12, atol=1e-12)
    for site in sites:
        assert torch.count_nonzero(site.adapters[0].lora_bias) == 0


def test_lora_bias_without_base_bias_is_kept_and_reported():
    model = peft_mlp(bias2=False, lora_bias=True)  # fc2 has no base bias
    fc2 = model.base_model.model.fc2
    kept = fc2.lora_B["default"].bias.detach().clone()
    x = torch.randn(7, 16, dtype=torch.float64)
    y0 = model(x)
    with pytest.warns(UserWarning, match="fc2.*no bias"):
        merge_and_reinit(model)
    torch.testing.assert_close(model(x), y0, rtol=1e-12, atol=1e-12)
    assert fc2.base_layer.bias is None
    assert torch.equal(fc2.lora_B["default"].bias, kept)
    assert torch.count_nonzero(model.base_model.model.fc1.lora_B["default"].bias) == 0  # fc1 folded


def test_peft_conv1d_fan_in_fan_out():
    from transformers.pytorch_utils import Conv1D

    class GPT2ish(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn, self.c_proj = Conv1D(24, 16), Conv1D(16, 24)  # (nf, nx): weight stored (in, out)

        def forward(self, x):
            return self.c_proj(torch.tanh(self.c_attn(x)))

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft notes that it sets fan_in_fan_out itself
        model = get_peft_model(GPT2ish(), LoraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                                                      init_lora_weights=False)).double()
    x = torch.randn(5, 16, dtype=torch.float64)
    y0 = model(x)
    merge_and_reinit(model)
    torch.testing.assert_close(model(x), y0, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------- refusals


def test_refusals_leave_the_model_untouched():
    model = peft_mlp()
    model.base_model.model.fc2.merge()
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="fc2.*merged"):
        merge_and_reinit(model)
    for n, p in model.named_parameters():  # fc1 was fine, but nothing may move before everything is checked
        assert torch.equal(p, state[n]), n


def test_dora_refused():
    model = peft_mlp(use_dora=True)
    with pytest.raises(ValueError, match="variant"):
        merge_and_reinit(model)


def test_disabled_adapters_refused():
    model = peft_mlp()
    with model.disable_adapter(), pytest.raises(ValueError, match="disabled"):
        merge_and_reinit(model)


def test_bad_sites_refused():
    lin = nn.Linear(8, 6).double()
    a, b = nn.Parameter(torch.randn(2, 8, dtype=torch.float64)), nn.Parameter(torch.randn(5, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="sites:.*do not fit"):
        merge_and_reinit(None, sites=[LoraParams("lin", lin.weight, None, [AdapterParams("x", a, b, 1.0)])])
    with pytest.raises(ValueError, match="model"):
        merge_and_reinit(None)


def test_tied_weight_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(10, 8), nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.emb(ids))

    model = get_peft_model(Tied(), LoraConfig(r=2, target_modules=["head"], init_lora_weights=False))
    with pytest.raises(ValueError, match="tied"):
        merge_and_reinit(model)


# ----------------------------------------------------------------------------------------------- other styles


class TuneLoRALinear(nn.Module):
    """torchtune's LoRALinear layout: weight/bias on the module, lora_a/lora_b as nn.Linear, `scaling`."""

    def __init__(self, i, o, r, alpha, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i) / i**0.5, requires_grad=False)
        self.bias = nn.Parameter(torch.randn(o), requires_grad=False) if bias else None
        self.lora_a, self.lora_b = nn.Linear(i, r, bias=False), nn.Linear(r, o, bias=False)
        nn.init.normal_(self.lora_b.weight)
        self.scaling = alpha / r

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.lora_b(self.lora_a(x)) * self.scaling

    def sites(self, path):
        return LoraParams(path, self.weight, self.bias,
                          [AdapterParams("lora", self.lora_a.weight, self.lora_b.weight, self.scaling)], self)


class LoraLibLinear(nn.Linear):
    """loralib's Linear: an nn.Linear with lora_A (r x in) and lora_B (out x r) parameters."""

    def __init__(self, i, o, r, alpha):
        super().__init__(i, o)
        self.lora_A, self.lora_B = nn.Parameter(torch.randn(r, i)), nn.Parameter(torch.randn(o, r))
        self.scaling = alpha / r

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling

    def sites(self, path):
        return LoraParams(path, self.weight, self.bias,
                          [AdapterParams("lora", self.lora_A, self.lora_B, self.scaling)], self)


class HandWritten(nn.Module):
    """Raw parameters, any number of adapters, optionally a (in, out) base like GPT-2's Conv1D."""

    def __init__(self, i, o, ranks, scales, bias=True, fan_in_fan_out=False):
        super().__init__()
        self.fan_in_fan_out = fan_in_fan_out
        self.w = nn.Parameter(torch.randn(*((i, o) if fan_in_fan_out else (o, i))), requires_grad=False)
        self.b = nn.Parameter(torch.randn(o), requires_grad=False) if bias else None
        self.a = nn.ParameterList(nn.Parameter(torch.randn(r, i)) for r in ranks)
        self.bb = nn.ParameterList(nn.Parameter(torch.randn(o, r)) for r in ranks)
        self.scales = scales

    def forward(self, x):
        y = x @ self.w if self.fan_in_fan_out else x @ self.w.T
        if self.b is not None:
            y = y + self.b
        for a, b, s in zip(self.a, self.bb, self.scales):
            y = y + s * ((x @ a.T) @ b.T)
        return y

    def sites(self, path):
        adapters = [AdapterParams(str(k), a, b, s) for k, (a, b, s) in enumerate(zip(self.a, self.bb, self.scales))]
        return LoraParams(path, self.w, self.b, adapters, self)


class ThreeStyles(nn.Module):
    def __init__(self):
        super().__init__()
        self.tune = TuneLoRALinear(12, 20, 3, 6.0)
        self.loralib = LoraLibLinear(20, 16, 2, 4.0)
        self.hand = HandWritten(16, 6, [2, 3], [0.5, 2.0])

    def forward(self, x):
        return self.hand(torch.tanh(self.loralib(torch.tanh(self.tune(x)))))

    def sites(self):
        return [self.tune.sites("tune"), self.loralib.sites("loralib"), self.hand.sites("hand")]


def test_torchtune_loralib_handwritten_float64():
    torch.manual_seed(0)
    model = ThreeStyles().double()
    x = torch.randn(9, 12, dtype=torch.float64)
    target = torch.randn(9, 6, dtype=torch.float64)
    y0 = model(x)
    loss0 = F.mse_loss(y0, target)
    sites = merge_and_reinit(model, sites=model.sites())
    y1 = model(x)
    torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(F.mse_loss(y1, target), loss0, rtol=1e-12, atol=1e-12)
    assert [s.module_path for s in sites] == ["tune", "loralib", "hand"]
    assert_restarted(sites)


def test_repeated_site_is_merged_once():
    """A module called twice shows up twice in a graph; its update must be added once."""
    torch.manual_seed(0)
    layer = TuneLoRALinear(8, 8, 2, 2.0).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    y0 = layer(layer(x))
    sites = merge_and_reinit(layer, sites=[layer.sites("l"), layer.sites("l")])
    assert len(sites) == 1
    torch.testing.assert_close(layer(layer(x)), y0, rtol=1e-12, atol=1e-12)


needs_matcher = pytest.mark.skipif(not importlib.util.find_spec("runlora_fx.passes.match"),
                                   reason="runlora_fx.passes.match (the graph matcher) is not available")


@needs_matcher
def test_matcher_sites_merge_every_style():
    torch.manual_seed(0)
    model = ThreeStyles().double()
    # A bias added by a separate `+ b` after `x @ w.T` is not matched yet (reported to the matcher's owner).
    model.hand = HandWritten(16, 6, [2, 3], [0.5, 2.0], bias=False).double()
    x = torch.randn(9, 12, dtype=torch.float64)
    y0 = model(x)
    sites = merge_and_reinit(model, example_inputs=(x,))
    assert sorted(s.module_path.split(".")[-1] for s in sites) == ["hand", "loralib", "tune"]
    torch.testing.assert_close(model(x), y0, rtol=1e-12, atol=1e-12)
    assert_restarted(sites)


@needs_matcher
def test_matcher_and_module_walk_agree_on_peft():
    from runlora_fx.passes.match import find_lora_params
    from runlora_fx.train.relora import find_peft_lora_params

    def key(sites):
        return sorted((id(s.weight), tuple((id(a.lora_a), id(a.lora_b), a.scale, id(a.lora_bias))
                                           for a in s.adapters)) for s in sites)

    model = peft_mlp(bias2=True, lora_bias=True)
    x = torch.randn(7, 16, dtype=torch.float64)
    assert key(find_lora_params(model, (x,))) == key(find_peft_lora_params(model))


def test_overlapping_site_records_merge_each_adapter_once():
    """Two discoveries may describe one site with different adapter lists; each update is still added once."""
    torch.manual_seed(0)
    layer = HandWritten(8, 5, [2, 3], [1.5, -0.5]).double()
    full = layer.sites("h")
    partial = LoraParams("h", layer.w, None, [full.adapters[1]], layer)
    x = torch.randn(4, 8, dtype=torch.float64)
    y0 = layer(x)
    sites = merge_and_reinit(layer, sites=[partial, full, partial])
    assert len(sites) == 1 and len(sites[0].adapters) == 2 and sites[0].bias is layer.b
    torch.testing.assert_close(layer(x), y0, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not importlib.util.find_spec("runlora_fx.api"), reason="runlora_fx.optimize is not available")
def test_optimized_model_still_merges():
    """optimize() patches the owning modules' forward; the merge must still find and fold every site, and the
    patched model must agree with itself before and after."""
    import runlora_fx
    from runlora_fx.api import optimized_sites

    model = peft_mlp(bias2=True)
    x = torch.randn(7, 16, dtype=torch.float64)
    runlora_fx.optimize(model, (x,))
    assert len(optimized_sites(model)) == 2
    y0 = model(x)
    assert len(merge_and_reinit(model)) == 2  # the module walk
    torch.testing.assert_close(model(x), y0, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        for site in optimized_sites(model):
            site.params.adapters[0].lora_b.normal_()  # a trained cycle
    y1 = model(x)
    sites = merge_and_reinit(model, example_inputs=(x,))  # the graph no longer shows the patched sites
    assert len(sites) == 2
    torch.testing.assert_close(model(x), y1, rtol=1e-12, atol=1e-12)
    assert_restarted(sites)


@settings(max_examples=40, deadline=None)
@given(o=st.integers(1, 9), i=st.integers(1, 9), ranks=st.lists(st.integers(1, 5), min_size=1, max_size=3),
       scale=st.floats(-4, 4, allow_nan=False), bias=st.booleans(), fan_in_fan_out=st.booleans(),
       seed=st.integers(0, 2**16))
def test_merge_preserves_any_site_float64(o, i, ranks, scale, bias, fan_in_fan_out, seed):
    torch.manual_seed(seed)
    layer = HandWritten(i, o, ranks, [scale * (k + 1) for k in range(len(ranks))], bias, fan_in_fan_out).double()
    x = torch.randn(5, i, dtype=torch.float64)
    y0 = layer(x)
    generator = torch.Generator().manual_seed(seed)
    merge_and_reinit(layer, sites=[layer.sites("hand")], generator=generator)
    torch.testing.assert_close(layer(x), y0, rtol=1e-12, atol=1e-12)
    assert_restarted([layer.sites("hand")])


def test_generator_makes_the_restart_reproducible():
    draws = []
    for _ in range(2):
        torch.manual_seed(0)
        layer = HandWritten(6, 4, [3], [1.0]).double()
        merge_and_reinit(layer, sites=[layer.sites("h")], generator=torch.Generator().manual_seed(7))
        draws.append(layer.a[0].detach().clone())
    assert torch.equal(*draws)
