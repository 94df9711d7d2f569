"""ReLoRA merges into bitsandbytes 4-bit bases: dequantize, add, re-quantize, same objects.

Tolerance: the merge re-quantizes the merged weight once, so each entry may move by at most half the widest gap
of the 4-bit code times its block's absmax (0.152 * absmax for NF4), plus the error of the stored absmax (8-bit
when statistics are compressed). The layer's output then moves by exactly x @ error^T.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from runlora_fx.train import merge_and_reinit

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402


def to_4bit(linear, quant_type, compress_statistics, blocksize=64):
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=torch.float32, quant_type=quant_type, compress_statistics=compress_statistics)
    q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                 compress_statistics=compress_statistics, blocksize=blocksize)
    q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q.to("cpu")  # quantizes


class QNet(nn.Module):
    def __init__(self, quant_type="nf4", compress_statistics=True):
        super().__init__()
        self.fc1 = to_4bit(nn.Linear(128, 64), quant_type, compress_statistics)  # 2 blocks per row
        self.fc2 = nn.Linear(64, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def qlora_model(quant_type="nf4", compress_statistics=True, init_lora_weights=False, seed=0):
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], init_lora_weights=init_lora_weights)
    return get_peft_model(QNet(quant_type, compress_statistics), config)


def dequantized(weight):
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()


def stored_absmax(weight):
    state = weight.quant_state
    if state.nested:
        return bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return state.absmax.float()


def requantization_bound(weight, exact, slack=0.0):
    """Per entry: half the widest code gap times the block's true absmax, plus the stored absmax's error."""
    state = weight.quant_state
    half_gap = state.code.float().sort().values.diff().max() / 2
    blocks = exact.reshape(-1, state.blocksize)
    true_absmax = blocks.abs().amax(dim=1)
    per_block = (half_gap + slack) * true_absmax + (stored_absmax(weight) - true_absmax).abs() + 1e-6
    return per_block[:, None].expand_as(blocks).reshape(exact.shape)


def exact_merge(layer):
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    return dequantized(layer.base_layer.weight) + s * (b @ a).detach()


@pytest.mark.parametrize("quant_type,compress_statistics", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_4bit_merge_within_one_requantization(quant_type, compress_statistics):
    model = qlora_model(quant_type, compress_statistics).train()  # train mode: bitsandbytes does not repack
    layer = model.base_model.model.fc1
    weight = layer.base_layer.weight
    state = weight.quant_state
    fields = (state.quant_type, state.blocksize, state.nested, state.dtype, weight.shape, weight.dtype)
    exact = exact_merge(layer)
    x = torch.randn(6, 128)
    with torch.no_grad():
        h0 = layer(x)
    sites = merge_and_reinit(model)
    assert len(sites) == 2
    assert layer.base_layer.weight is weight and weight.quant_state is state  # same objects, updated in place
    assert (state.quant_type, state.blocksize, state.nested, state.dtype, weight.shape, weight.dtype) == fields
    error = dequantized(weight) - exact
    assert (error.abs() <= requantization_bound(weight, exact)).all()
    assert error.abs().max() > 0  # the bound is not vacuous: re-quantization does round
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    with torch.no_grad():
        h1 = layer(x)
    torch.testing.assert_close(h1 - h0, x @ error.T, rtol=1e-4, atol=1e-4)


def test_4bit_model_loss_within_requantization():
    model = qlora_model().train()
    x, target = torch.randn(16, 128), torch.randn(16, 8)
    loss0 = nn.functional.mse_loss(model(x), target)
    merge_and_reinit(model)
    loss1 = nn.functional.mse_loss(model(x), target)
    # NF4 re-quantization of one layer: a small relative change, not an exact one.
    assert 0 < abs(loss1 - loss0) <= 0.02 * loss0


def test_4bit_zero_update_does_not_requantize():
    """With B = 0 there is nothing to add; re-quantizing anyway would drift the compressed statistics."""
    model = qlora_model(init_lora_weights=True)  # peft's default init: B = 0
    weight = model.base_model.model.fc1.base_layer.weight
    packed, absmax = weight.data.clone(), weight.quant_state.absmax.clone()
    merge_and_reinit(model)
    assert torch.equal(weight.data, packed) and torch.equal(weight.quant_state.absmax, absmax)


@pytest.mark.parametrize("compress_statistics", [True, False])
def test_4bit_merge_after_cpu_repacking(compress_statistics):
    """On CPUs with AVX512-bf16, bitsandbytes repacks a 4-bit weight (bf16 absmax) on the first eval forward;
    the merge must undo that. The same model merged without repacking is the reference."""
    twin = qlora_model(compress_statistics=compress_statistics).train()
    exact = exact_merge(twin.base_model.model.fc1)
    merge_and_reinit(twin)

    model = qlora_model(compress_statistics=compress_statistics).eval()
    weight = model.base_model.model.fc1.base_layer.weight
    with torch.no_grad():
        model(torch.randn(2, 128))
    if not getattr(weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-bf16, so bitsandbytes does not repack")
    merge_and_reinit(model)
    assert model.base_model.model.fc1.base_layer.weight is weight
    # The packed round trip rounds absmax to bf16 (2^-8 relative) before the merge: allow 1% of absmax for it.
    assert (dequantized(weight) - exact).abs().le(requantization_bound(weight, exact, slack=0.01)).all()
    x = torch.randn(6, 128)
    with torch.no_grad():  # eval forward repacks again and must still run
        torch.testing.assert_close(model(x), twin.eval()(x), rtol=0.05, atol=0.05)
