"""torch.compile(backend="runlora"): same loss and LoRA gradients as plain peft; the plan survives aot_autograd and
inductor; dynamic shapes run the plan of their own N; the backend is found through its entry point."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from lora_models import assert_step_matches, float64_truth, loss_and_grads, tiny_llama, tokens

import runlora_fx.backend as backend_mod
from runlora_fx.backend import runlora_backend
from runlora_fx.kernels import ops


def compiled(model, inner, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend=runlora_backend, options={"inner": inner, **options}, fullgraph=True)


@pytest.mark.parametrize("dtype,inner,lowering", [
    (torch.float64, "eager", "auto"), (torch.float64, "aot_eager", "opaque"), (torch.float32, "aot_eager", "opaque"),
    (torch.bfloat16, "aot_eager", "opaque"), (torch.float32, "aot_eager", "joint"),
])
@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_compiled_step_equals_peft(dtype, inner, lowering, dropout):
    """Masks equal eager peft's: the opaque ops draw them with F.dropout, the joint path (aot_eager: no inductor
    code, so no seed replay) with fallback_random's ATen dropout. The joint path runs inductor's decompositions,
    which differ from eager by ~1e-7 even in float64 with no pass at all, so it is compared in float32 against the
    float64 truth."""
    model = tiny_llama(dropout, dtype)
    ref = copy.deepcopy(model)
    ids = tokens()
    with torch._inductor.config.patch(fallback_random=True):
        got = loss_and_grads(compiled(model, inner, lowering=lowering), ids)
    assert backend_mod.last_reports[-1]["rewritten"] == 7
    want = loss_and_grads(ref, ids)
    assert_step_matches(got, want, None if dtype == torch.float64 else float64_truth(ref, ids))


@pytest.mark.slow
def test_inductor_step_equals_peft_and_keeps_the_planned_ops():
    from torch._inductor.utils import run_and_get_code

    model = tiny_llama(0.0, torch.float32)
    ref = copy.deepcopy(model)
    ids = tokens()
    cm = compiled(model, "inductor", lowering="opaque")
    got, code = run_and_get_code(lambda: loss_and_grads(cm, ids))
    assert backend_mod.last_reports[-1]["rewritten"] == 7
    assert_step_matches(got, loss_and_grads(ref, ids), float64_truth(ref, ids))
    text = "\n".join(code)
    assert text.count("runlora_fx.site_forward") >= 7 and text.count("runlora_fx.site_backward") >= 7


def test_dynamic_sequence_lengths_recompile_once_and_plan_per_n(monkeypatch):
    model = tiny_llama(0.0, torch.float32)
    compiles = []

    def counting(gm, inputs, **kw):
        compiles.append(1)
        return runlora_backend(gm, inputs, options={"inner": "aot_eager", "lowering": "opaque"})

    seen = []
    original = ops.LoraLinearRunner.plan_for

    def spy(self, spec, device, layout=None):
        if layout is not None:  # the run-time choice inside the ops
            seen.append(spec.n)
        return original(self, spec, device, layout)

    monkeypatch.setattr(ops.LoraLinearRunner, "plan_for", spy)
    torch._dynamo.reset()
    cm = torch.compile(model, backend=counting)
    for seq in (6, 9, 13):
        seen.clear()
        cm(input_ids=tokens(2, seq), labels=tokens(2, seq)).loss.backward()
        assert seen and set(seen) == {2 * seq}  # forward and backward ops planned for this call's N
    assert len(compiles) <= 2


@pytest.mark.parametrize("user_imports", [False, True])
def test_backend_is_found_by_name(user_imports):
    """The entry point makes the name work with no import; importing runlora_fx too must not register it twice."""
    code = ("import torch\n" + ("import runlora_fx, runlora_fx.backend\n" if user_imports else "") +
            "f = torch.compile(lambda x: x * 2, backend='runlora', options={'inner': 'eager'})\n"
            "print(f(torch.ones(3)).sum().item())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["6.0"]


def test_unknown_option_names_it():
    with pytest.raises(ValueError, match="objectiv"):
        runlora_backend(torch.fx.symbolic_trace(torch.nn.Linear(2, 2)), [], options={"objectiv": "time"})
    with pytest.raises(ValueError, match="inner"):
        runlora_backend(torch.fx.symbolic_trace(torch.nn.Linear(2, 2)), [], options={"inner": "tvm"})
    with pytest.raises(ValueError, match="lowering"):
        runlora_backend(torch.fx.symbolic_trace(torch.nn.Linear(2, 2)), [], options={"lowering": "fused"})


def test_model_without_lora_compiles_unchanged():
    lin = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    x = torch.randn(3, 4)
    torch._dynamo.reset()
    out = torch.compile(lin, backend=runlora_backend, options={"inner": "eager"})(x)
    torch.testing.assert_close(out, lin(x))
    assert backend_mod.last_reports[-1]["rewritten"] == 0


@pytest.mark.slow
def test_opaque_ops_return_gradients_in_the_layout_their_fake_declares(monkeypatch):
    """A skinny product in its other form (`planner.orient`) computes dB as a transposed view; the opaque backward
    op must still return what its fake implementation declares (contiguous, like the parameter): inductor's
    generated code checks every extern output's strides (`assert_size_stride`)."""
    from dataclasses import replace

    import runlora_fx.kernels.dense as dense_mod
    from runlora_fx.planner.device import default_profile

    everywhere = [(2 ** k, 9.0) for k in range(12)]
    oriented = replace(default_profile("cpu"), skinny_gain={"float32": {"gb": everywhere, "gu": everywhere}})
    monkeypatch.setattr(dense_mod, "get_profile", lambda device: oriented)
    monkeypatch.setattr(ops, "get_profile", lambda device: oriented)
    planned, plans = ops._planned, []
    monkeypatch.setattr(ops, "_planned", lambda *a: plans.append(planned(*a)[1]) or planned(*a))
    model = tiny_llama(0.0, torch.float32)
    ref, ids = copy.deepcopy(model), tokens(4, 64)  # N = 256; "flops" keeps dB = G^T U and Z = G B at hidden 32
    got = loss_and_grads(compiled(model, "inductor", lowering="opaque", strategy="flops"), ids)
    assert any(s.form == "swap" for p in plans for s in p.lowered.backward)  # dB did run as (U^T G)^T
    assert_step_matches(got, loss_and_grads(ref, ids), float64_truth(ref, ids))
