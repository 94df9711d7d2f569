"""QLoRA: LoRA sites over bitsandbytes 4-bit bases.

Every 4-bit program equals peft's QLoRA layer on the same quantized weight (outputs and every gradient), for
nf4/fp4, with and without double quantization, fp32 and bf16 compute, with and without bias, under the planned
node itself, `optimize(model)` and `torch.compile(backend="runlora")`. The yardstick ("truth") dequantizes the
weight with bitsandbytes and runs the peft formula in float64: fp32-compute programs must match it tightly,
bf16-compute programs must be no further from it than peft's own layer is. The dequantized weight is saved only
when the plan says so (and `explain` shows it); 8-bit and other unsupported bases are left alone with a reason.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")
import bitsandbytes.functional as bnbf  # noqa: E402
from lora_models import assert_step_matches, loss_and_grads, tokens  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

import runlora_fx  # noqa: E402
import runlora_fx.backend as backend_mod  # noqa: E402
from runlora_fx.api import optimized_sites  # noqa: E402
from runlora_fx.backend import runlora_backend  # noqa: E402
from runlora_fx.demo_models import LLAMA_PROJECTIONS, build_qlora_llama, quantize_linear_4bit  # noqa: E402
from runlora_fx.kernels.dense import AdapterConfig, run_plan  # noqa: E402
from runlora_fx.kernels.qlora import QLoraLinearRunner  # noqa: E402
from runlora_fx.planner import device as device_mod  # noqa: E402
from runlora_fx.planner.cost import price, step_bytes, step_time  # noqa: E402
from runlora_fx.planner.device import calibrate, default_profile  # noqa: E402
from runlora_fx.planner.expr import (  # noqa: E402
    AdapterSpec, QuantSpec, SiteSpec, build_steps, enumerate_programs, stock_program)
from runlora_fx.planner.plan import Plan  # noqa: E402
from runlora_fx.planner.search import SearchOptions, search, stock_plan  # noqa: E402
from runlora_fx.saved_bytes import SavedBytes  # noqa: E402

PROFILE = default_profile("cpu")
FORMATS = list(itertools.product(("nf4", "fp4"), (True, False), (torch.float32, torch.bfloat16)))
SCALE = 2.0  # lora_alpha / r below


# ----------------------------------------------------------------------------------------------- models


class OneLayer(nn.Module):
    def __init__(self, base: nn.Module):
        super().__init__()
        self.fc = base

    def forward(self, x):
        return self.fc(x)


def _lora(net: nn.Module, peft_layer: str, dropout: float, targets: list[str]) -> nn.Module:
    if peft_layer == "bnb":
        net.is_loaded_in_4bit = True  # peft then wraps Linear4bit in its own lora.bnb.Linear4bit
    model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.5)  # non-zero B: every gradient is exercised
    return model


def qlora_layer(quant_type="nf4", compress_statistics=True, compute_dtype=torch.float32, bias=True,
                peft_layer="generic", dropout=0.1, dtype=torch.float32, seed=0):
    """A peft QLoRA layer (128 -> 64) over a freshly quantized weight, inside a one-layer model."""
    torch.manual_seed(seed)
    linear = nn.Linear(128, 64, bias=bias).to(dtype)
    net = OneLayer(quantize_linear_4bit(linear, quant_type=quant_type, compress_statistics=compress_statistics,
                                        compute_dtype=compute_dtype))
    model = _lora(net, peft_layer, dropout, ["fc"])
    return model, model.base_model.model.fc


def qlora_llama(peft_layer: str, offset: int, dropout: float = 0.05, layers: int = 1):
    """A tiny peft LLaMA whose seven projections cycle through FORMATS from `offset` (attention ones biased)."""
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, attention_bias=True)
    base = LlamaForCausalLM(cfg)
    formats = itertools.cycle(FORMATS[offset:] + FORMATS[:offset])
    for parent in [m for layer in base.model.layers for m in (layer.self_attn, layer.mlp)]:
        for name, child in list(parent.named_children()):
            if name in LLAMA_PROJECTIONS:
                qt, cs, cd = next(formats)
                setattr(parent, name, quantize_linear_4bit(child, quant_type=qt, compress_statistics=cs,
                                                           compute_dtype=cd))
    return _lora(base, peft_layer, dropout, list(LLAMA_PROJECTIONS))


def dense_twin(model: nn.Module) -> nn.Module:
    """A float64 copy whose 4-bit bases are plain linears holding the weights bitsandbytes dequantizes."""
    twin = copy.deepcopy(model)
    for module in list(twin.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                w = bnbf.dequantize_4bit(child.weight.data, child.weight.quant_state).float()
                lin.weight = nn.Parameter(w, requires_grad=False)
                if child.bias is not None:
                    lin.bias = nn.Parameter(child.bias.data.float(), requires_grad=False)
                setattr(module, name, lin)
    return twin.double()


def runner_of(layer, dropout: float, dtype=torch.float32) -> QLoraLinearRunner:
    base = layer.get_base_layer()
    return QLoraLinearRunner((AdapterConfig(SCALE, dropout),), SearchOptions(), base.weight.quant_state,
                             base.compute_dtype, dtype)


def all_plans(spec: SiteSpec):
    for program in enumerate_programs(spec):
        low = build_steps(spec, program)
        cost = price(low, PROFILE)
        yield Plan(spec, program, low, cost, cost)


# ----------------------------------------------------------------------------------------------- one layer


def _step(fn, x, params, G, seed):
    """Output and grads (x, then params) of `fn(x)` against the cotangent G, dropout drawn from `seed`."""
    x = x.detach().clone().requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in params]
    torch.manual_seed(seed)
    y = fn(x, *params)
    (y * G.to(y.dtype)).sum().backward()
    return [y.detach()] + [t.grad for t in (x, *params)]


def _peft_step(layer, x, G, seed):
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    y = layer(x)
    (y * G.to(y.dtype)).sum().backward()
    return [y.detach(), x.grad, a.grad.clone(), b.grad.clone()]


def _truth(layer, x, G, seed, dropout):
    base = layer.get_base_layer()
    wd = bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state).double()
    bias = base.bias.double() if base.bias is not None else None

    def formula(x, a, b):
        return F.linear(x, wd, bias) + F.linear(F.linear(F.dropout(x, dropout, True), a), b) * SCALE

    params = [layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()]
    return _step(formula, x.double(), params, G.double(), seed)


def _err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def _check_programs(quant_type, compress_statistics, compute_dtype, bias, peft_layer, dropout, select=None):
    """Run `select`ed programs (default: all) of this layer's space against peft's layer and the float64 truth."""
    model, layer = qlora_layer(quant_type, compress_statistics, compute_dtype, bias, peft_layer, dropout)
    base = layer.get_base_layer()
    g = torch.Generator().manual_seed(1)
    x, G = torch.randn(3, 5, 128, generator=g), torch.randn(3, 5, 64, generator=g)
    runner = runner_of(layer, dropout)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    spec = runner.spec_for(x.requires_grad_(), base.weight, base.bias, [(a, b, None)], True)
    assert spec.quant == QuantSpec(quant_type, 64, compress_statistics, compute_dtype)
    truth, stock = _truth(layer, x, G, 7, dropout), _peft_step(layer, x, G, 7)
    plans = list(all_plans(spec))
    assert any(p.program.keep_deq for p in plans) and any(not p.program.keep_deq for p in plans)
    assert any(p.program.forward == "merged" for p in plans) == (dropout == 0 and compute_dtype == torch.float32)
    for plan in select(plans) if select else plans:
        ours = _step(lambda x, a, b: run_plan(plan, x, base.weight, base.bias, [(a, b, None)], runner.constants()),
                     x, [a, b], G, 7)
        for k, (o, s, t) in enumerate(zip(ours, stock, truth)):
            scale = t.abs().max().item()
            if compute_dtype == torch.float32:  # tight: fp32 against the float64 truth
                assert _err(o, t) <= 2e-6 * scale + 1e-7, (plan.key, k, _err(o, t))
            else:  # no further from the truth than peft's own layer (bf16 compute)
                assert _err(o, t) <= 4 * _err(s, t) + 4 * torch.finfo(torch.bfloat16).eps * scale, (plan.key, k)
    return plans


@pytest.mark.parametrize("quant_type,compress_statistics,compute_dtype,bias,peft_layer,dropout", [
    ("nf4", True, torch.float32, True, "generic", 0.1),
    ("fp4", False, torch.float32, False, "bnb", 0.0),  # no dropout, fp32 compute: the merged programs join
    ("nf4", True, torch.bfloat16, True, "bnb", 0.1),
])
def test_every_4bit_program_equals_peft_qlora_layer(quant_type, compress_statistics, compute_dtype, bias,
                                                     peft_layer, dropout):
    _check_programs(quant_type, compress_statistics, compute_dtype, bias, peft_layer, dropout)


def _one_per_weight_use(plans):
    """A program per distinct way of using the base weight (forward order, dX order, kept merged / dequantized
    weight): the format only changes the dequantize step, which these cover."""
    seen = {}
    for p in plans:
        q = p.program
        seen.setdefault((q.forward, q.grad_x, q.keep_merged, q.keep_deq), p)
    return list(seen.values())


@pytest.mark.parametrize("quant_type,compress_statistics,compute_dtype", FORMATS)
@pytest.mark.parametrize("bias", [True, False])
def test_every_4bit_format_equals_peft_qlora_layer(quant_type, compress_statistics, compute_dtype, bias):
    dropout = 0.1 if bias else 0.0
    peft_layer = "bnb" if compress_statistics else "generic"
    _check_programs(quant_type, compress_statistics, compute_dtype, bias, peft_layer, dropout, _one_per_weight_use)


def test_bf16_activations_with_fp32_adapters():
    """A bf16 model with peft's fp32 adapters: the base computes in bf16, the adapters in fp32, summed in fp32."""
    model, layer = qlora_layer("nf4", True, torch.bfloat16, True, "generic", 0.1, dtype=torch.bfloat16)
    layer.lora_A["default"].float()
    layer.lora_B["default"].float()
    base = layer.get_base_layer()
    g = torch.Generator().manual_seed(2)
    x, G = torch.randn(4, 128, generator=g).bfloat16(), torch.randn(4, 64, generator=g)
    runner = runner_of(layer, 0.1, torch.bfloat16)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    spec = runner.spec_for(x.requires_grad_(), base.weight, base.bias, [(a, b, None)], True)
    assert spec.casts and spec.dtype == torch.bfloat16 and spec.base_dtype == torch.bfloat16
    truth, stock = _truth(layer, x, G, 3, 0.1), _peft_step(layer, x, G, 3)
    for plan in all_plans(spec):
        ours = _step(lambda x, a, b: run_plan(plan, x, base.weight, base.bias, [(a, b, None)], runner.constants()),
                     x, [a, b], G, 3)
        assert ours[0].dtype == torch.bfloat16 and ours[1].dtype == torch.bfloat16
        for k, (o, s, t) in enumerate(zip(ours, stock, truth)):
            eps = torch.finfo(o.dtype).eps
            assert _err(o, t) <= 4 * _err(s, t) + 4 * eps * t.abs().max().item(), (plan.key, k)


def test_saved_bytes_equal_what_autograd_observes_and_stock_is_peft():
    model, layer = qlora_layer("nf4", True, torch.bfloat16, True, "generic", 0.1)
    base = layer.get_base_layer()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(6, 128, requires_grad=True)
    runner = runner_of(layer, 0.1)
    spec = runner.spec_for(x, base.weight, base.bias, [(a, b, None)], True)
    def observed(fn) -> int:
        counter = SavedBytes(exclude=(base.weight, base.bias, a, b))
        with counter.hooks():
            fn()
        return counter.bytes

    for plan in all_plans(spec):
        got = observed(lambda: run_plan(plan, x, base.weight, base.bias, [(a, b, None)], runner.constants()))
        assert got == plan.cost.saved_bytes, plan.key
        wd = 64 * 128 * torch.bfloat16.itemsize
        assert ("Wd" in plan.lowered.saved) == plan.program.keep_deq
        if plan.program.keep_deq:
            assert plan.cost.saved_bytes >= wd
    assert observed(lambda: layer(x)) == stock_plan(spec, PROFILE).cost.saved_bytes


# ----------------------------------------------------------------------------------------------- planner


def test_dequantize_is_priced_in_bytes_and_time():
    quant = QuantSpec("nf4", 64, True, torch.bfloat16)
    spec = SiteSpec(256, 512, 384, (AdapterSpec(8),), quant=quant)
    low = build_steps(spec, stock_program(spec))
    (deq,) = [s for s in low.forward if s.op == "dequantize"]
    o, i = 384, 512
    assert step_bytes(deq, low) == o * i // 2 + o * i // 64 + o * i * 2  # codes + 8-bit absmax + bf16 weight
    assert step_time(deq, low, PROFILE) >= o * i / PROFILE.dequantize_rate
    assert [s.op for s in low.backward].count("dequantize") == 1  # stock (bitsandbytes) dequantizes again


def test_keeping_the_dequantized_weight_trades_memory_for_time():
    quant = QuantSpec("nf4", 64, True, torch.float32)
    spec = SiteSpec(512, 1024, 1024, (AdapterSpec(16, dropout=0.1),), quant=quant)  # dropout: no merged program
    plans = {p.program: p for p in all_plans(spec)}
    assert sum(p.keep_deq for p in plans) * 2 == len(plans)
    for program, plan in plans.items():
        if program.keep_deq:
            twin = plans[replace(program, keep_deq=False)]
            assert plan.cost.saved_bytes == twin.cost.saved_bytes + 1024 * 1024 * 4
            assert plan.cost.time < twin.cost.time
    assert not search(spec, SearchOptions(), PROFILE).program.keep_deq  # the stock budget has no room for it
    assert search(spec, SearchOptions(memory_budget=4.0), PROFILE).program.keep_deq


def test_calibrate_measures_the_dequantize_rate(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNLORA_FX_CACHE", str(tmp_path))
    monkeypatch.setattr(device_mod, "_loaded", {})
    profile = calibrate("cpu", dtypes=(torch.float32,), seconds=0.5, save=False)
    assert 1e6 < profile.dequantize_rate < 1e13 and profile.dequantize_rate != default_profile().dequantize_rate


def test_quant_spec_rejects_bad_formats():
    with pytest.raises(ValueError, match="quant_type"):
        QuantSpec("int4")
    with pytest.raises(ValueError, match="blocksize"):
        QuantSpec(blocksize=48)
    with pytest.raises(ValueError, match="compute dtype"):
        QuantSpec(compute_dtype=torch.float64)


# ----------------------------------------------------------------------------------------------- whole models


def _identity(model: nn.Module) -> dict:
    return {n: (id(t), t.dtype, tuple(t.shape)) for n, t in [*model.named_parameters(), *model.named_buffers()]}


@pytest.mark.parametrize("peft_layer,offset", [("generic", 0), ("bnb", 4)])
def test_optimize_qlora_llama_equals_peft(peft_layer, offset):
    model = qlora_llama(peft_layer, offset)
    ref, twin = copy.deepcopy(model), dense_twin(model)
    ids = tokens()
    before = _identity(model)
    runlora_fx.optimize(model, (), example_kwargs=dict(input_ids=ids, labels=ids))
    sites = optimized_sites(model)
    assert len(sites) == 7 and all(isinstance(s.runner, QLoraLinearRunner) for s in sites)
    expected = {QuantSpec(qt, 64, cs, cd) for qt, cs, cd in (FORMATS[offset:] + FORMATS[:offset])[:7]}
    assert {s.runner.quant_spec() for s in sites} == expected
    got, want = loss_and_grads(model, ids), loss_and_grads(ref, ids)
    assert_step_matches(got, want, loss_and_grads(twin, ids))
    assert _identity(model) == before  # same parameters and buffers: no dequantized copy was added to the model


def test_dequantized_weight_is_kept_only_when_the_plan_says_so():
    """No persistent full-precision copy: a planned step saves an (o x i) weight exactly when its plan keeps
    ``Wd``, and `explain` shows that choice."""
    for budget, keeps in ((1.0, False), (20.0, True)):
        model, layer = qlora_layer("fp4", False, torch.float32, True, "bnb", 0.1)
        x = torch.randn(2, 9, 128, requires_grad=True)
        report = runlora_fx.explain(model, (x,), memory_budget=budget)
        (row,) = report.sites
        assert ("wd" in row.plan.key.split("/")[-1].split("+")) == keeps
        assert ("Wd" in row.to_dict()["saved"]) == keeps and ("+wd" in str(report)) == keeps
        runlora_fx.optimize(model, (x,), memory_budget=budget)
        shapes = []
        params = {p.data_ptr() for p in model.parameters()}

        def pack(t):
            if t.data_ptr() not in params:
                shapes.append((tuple(t.shape), t.dtype))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x).sum().backward()
        assert (((64, 128), torch.float32) in shapes) == keeps


def _compiled(model, inner):
    """Compiled with the opaque ops drawing peft's own masks (`dropout_rng="torch"`): the tests compare with eager
    peft's step, and the backend's default generator follows the device profile (`default_dropout_rng`)."""
    torch._dynamo.reset()
    return torch.compile(model, backend=runlora_backend, options={"inner": inner, "dropout_rng": "torch"},
                         fullgraph=True)


@pytest.mark.parametrize("inner,peft_layer,offset", [("eager", "bnb", 2), ("aot_eager", "generic", 6)])
def test_compiled_qlora_step_equals_peft(inner, peft_layer, offset):
    model = qlora_llama(peft_layer, offset)
    ref, twin = copy.deepcopy(model), dense_twin(model)
    ids = tokens()
    got = loss_and_grads(_compiled(model, inner), ids)
    assert backend_mod.last_reports[-1]["rewritten"] == 7, backend_mod.last_reports[-1]["skipped"]
    assert_step_matches(got, loss_and_grads(ref, ids), loss_and_grads(twin, ids))


@pytest.mark.slow
def test_inductor_qlora_step_equals_peft_and_keeps_the_planned_ops():
    from torch._inductor.utils import run_and_get_code

    model, layer = qlora_layer("nf4", True, torch.bfloat16, True, "generic", 0.0)
    ref, twin = copy.deepcopy(model), dense_twin(model)
    x = torch.randn(2, 6, 128)

    def step(m, dtype=torch.float32):
        m.zero_grad(set_to_none=True)
        loss = m(x.to(dtype).requires_grad_()).square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    cm = _compiled(model, "inductor")
    got, code = run_and_get_code(lambda: step(cm))
    assert backend_mod.last_reports[-1]["rewritten"] == 1
    text = "\n".join(code)
    assert "runlora_fx.site_forward" in text and "runlora_fx.site_backward" in text
    got = (got[0], {n.removeprefix("_orig_mod."): g for n, g in got[1].items()})
    assert_step_matches(got, step(ref), step(twin, torch.float64))


# ----------------------------------------------------------------------------------------------- left alone


class MixedQuantNet(nn.Module):
    """One 8-bit (LLM.int8) layer, one 4-bit layer."""

    def __init__(self):
        super().__init__()
        lin = nn.Linear(128, 64)
        q8 = bnb.nn.Linear8bitLt(128, 64, bias=True, has_fp16_weights=False)
        q8.load_state_dict(lin.state_dict())
        self.fc8 = q8.to("cpu")
        self.fc4 = quantize_linear_4bit(nn.Linear(64, 32), compute_dtype=torch.bfloat16)

    def forward(self, x):
        return self.fc4(torch.relu(self.fc8(x)))


def test_8bit_base_is_left_untouched_and_reported():
    torch.manual_seed(0)
    model = _lora(MixedQuantNet(), "generic", 0.0, ["fc8", "fc4"])
    ref = copy.deepcopy(model)
    x = torch.randn(3, 128, requires_grad=True)
    runlora_fx.optimize(model, (x,))
    assert [s.path for s in optimized_sites(model)] == ["base_model.model.fc4"]
    (skipped,) = [s for s in model._runlora_fx.skipped if s.module_path == "base_model.model.fc8"]
    assert "Linear8bitLt" in skipped.reason and "8-bit" in skipped.reason
    assert "forward" not in model.base_model.model.fc8.__dict__  # the 8-bit layer runs its own forward
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    # the backend sees no model, only the graph: the reason comes from the layer's nn_module_stack
    restored = runlora_fx.restore(model)
    torch._dynamo.reset()
    torch.compile(restored, backend=runlora_backend, options={"inner": "eager"})(x)
    report = backend_mod.last_reports[-1]
    assert report["rewritten"] == 1
    assert any("Linear8bitLt" in s.reason for s in report["skipped"])


def test_eval_without_grad_on_cpu_is_left_to_bitsandbytes():
    """Where bitsandbytes switches to its fused CPU inference kernel (and repacks the weight), the planned
    forward steps aside; a model captured in that state reports the layer instead of planning it."""
    model, layer = qlora_layer("nf4", True, torch.bfloat16, True, "bnb", 0.1)
    base = layer.get_base_layer()
    x = torch.randn(2, 5, 128)
    runlora_fx.optimize(model, (x.clone().requires_grad_(),))
    (site,) = optimized_sites(model)
    assert site.runner.accepts(x.requires_grad_(), base.weight, layer)
    if not base.support_avx512bf16_for_cpu:
        pytest.skip("this CPU has no AVX512-bf16: bitsandbytes never repacks")
    model.eval()
    x = x.detach()
    assert not site.runner.accepts(x, base.weight, layer)
    twin = copy.deepcopy(model)
    runlora_fx.restore(twin)
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin(x))
    report = runlora_fx.explain(qlora_layer("nf4", True, torch.bfloat16, True, "bnb", 0.1)[0].eval(), (x,))
    assert not report.sites and "fused CPU inference kernel" in report.skipped[0].reason


def test_demo_builder_gives_a_plannable_qlora_llama():
    model = build_qlora_llama(dict(num_hidden_layers=1), quant_type="fp4", compute_dtype=torch.bfloat16,
                              peft_layer="bnb")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__module__ == "peft.tuners.lora.bnb" and isinstance(layer.get_base_layer(), bnb.nn.Linear4bit)
    assert layer.get_base_layer().weight.quant_state.quant_type == "fp4"
    with pytest.raises(ValueError, match="peft_layer"):
        build_qlora_llama(peft_layer="dense")
