"""The joint-graph pass (passes/joint.py): every program it runs equals eager peft, the partitioned graphs have
the planned matmul order and saved set, and a site it cannot prove equivalent is left to inductor with a reason.

Most tests run inductor's joint passes and partitioner but not its code generation (inner "aot_eager": the
partitioned aten graphs run as they are), which is what the pass changes and is cheap to compile."""
from __future__ import annotations

import copy
import os
from dataclasses import replace

import pytest
import torch
from lora_models import assert_step_matches, float64_truth, loss_and_grads, tiny_llama, tokens
from torch import nn

import runlora_fx.backend as backend_mod
from runlora_fx.backend import plan_joint, runlora_backend
from runlora_fx.config import OptimizeConfig
from runlora_fx.passes.match import match_sites
from runlora_fx.planner.expr import AdapterSpec, Program, SiteSpec, enumerate_programs
from runlora_fx.planner.fused import compiled_valid

aten = torch.ops.aten


@pytest.fixture(autouse=True)
def _no_caches():
    """The pass must run on every compile here (a cache hit would skip it)."""
    with torch._functorch.config.patch(enable_autograd_cache=False), torch._inductor.config.patch(fx_graph_cache=False):
        yield


def forced(program: Program | None, graphs: list | None = None, passes: list | None = None, codegen: bool = False,
           dropout_rng: str = "torch", forms: bool = False):
    """A dynamo backend that plans every site with `program` (None: the planner's choice) and keeps a summary of
    the partitioned forward and backward graphs in `graphs` (`codegen`: then let inductor generate the code);
    `forms`: every skinny product in its other form (`planner.orient`), whatever this machine measured."""
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    def inner(gm, example_inputs, **kwargs):
        if graphs is not None:
            graphs.append(_summary(gm))
        return compile_fx_inner(gm, example_inputs, **kwargs) if codegen else make_boxed_func(gm.forward)

    def backend(gm, example_inputs):
        found = match_sites(gm, example_inputs)
        pass_, _ = plan_joint(found.sites, OptimizeConfig.from_options({"dropout_rng": dropout_rng}).search_options)
        if program is not None:
            pass_.plans = {k: replace(v, program=program) for k, v in pass_.plans.items()}
        # the forms as asked, not as this machine's calibration measured them
        pass_.plans = {k: replace(v, pack_z=(forms,) * len(v.scales), swap_db=(forms,) * len(v.scales))
                       for k, v in pass_.plans.items()}
        if passes is not None:
            passes.append(pass_)
        return compile_fx(gm, example_inputs, inner_compile=inner, config_patches={"joint_custom_post_pass": pass_})

    return backend


def _programs(dropout: float) -> list:
    """The programs the pass runs for a site of the tiny model that together cover every choice (each is a
    compile); RUNLORA_ALL_PROGRAMS=1 runs all of them."""
    spec = SiteSpec(20, 32, 32, (AdapterSpec(4, 2.0, dropout),))
    programs = [p for p in enumerate_programs(spec) if compiled_valid(spec, p, seed=False)]
    seen, out = set(), []
    for p in programs:
        choices = set(enumerate(vars(p).values()))
        fast = not choices <= seen
        seen |= choices
        if fast or os.environ.get("RUNLORA_ALL_PROGRAMS"):
            out.append(pytest.param(p, id=p.key))
    return out


@pytest.mark.parametrize("program", _programs(0.0))
def test_every_dropout_free_program_equals_peft(program):
    """With every skinny product in its other form, too (the dropout programs below run the plain forms)."""
    model = tiny_llama(0.0, torch.float32)
    ref, ids, passes = copy.deepcopy(model), tokens(), []
    torch._dynamo.reset()
    got = loss_and_grads(torch.compile(model, backend=forced(program, passes=passes, forms=True), fullgraph=True), ids)
    report = passes[-1].report
    # q/k/v of the first layer have no dX (nothing before them trains): a dX merge is reported there, not run
    assert set(report.applied.values()) == {program.key} and len(report.applied) + len(report.left) == 7
    assert all("no dX" in why for why in report.left.values()) and len(report.applied) >= 4
    assert_step_matches(got, loss_and_grads(ref, ids), float64_truth(ref, ids))


@pytest.mark.parametrize("program", _programs(0.1))
@torch._inductor.config.patch(fallback_random=True)
def test_dropout_programs_draw_eager_peft_masks_under_fallback_random(program):
    """With fallback_random inductor draws with ATen's dropout from the global generator, as eager peft does:
    same masks, so the same loss and gradients."""
    model = tiny_llama(0.1, torch.float32)
    ref, ids, passes = copy.deepcopy(model), tokens(), []
    torch._dynamo.reset()
    got = loss_and_grads(torch.compile(model, backend=forced(program, passes=passes), fullgraph=True), ids)
    assert set(passes[-1].report.applied.values()) == {program.key} and len(passes[-1].report.applied) == 7
    assert_step_matches(got, loss_and_grads(ref, ids), float64_truth(ref, ids))


class Site(nn.Module):
    """One LoRA linear (peft's formula) with a trainable input, so every gradient of the site exists."""

    def __init__(self, i=16, o=24, r=4, p=0.1):
        super().__init__()
        torch.manual_seed(0)
        self.base = nn.Linear(i, o, bias=False).requires_grad_(False)
        self.lora_A, self.lora_B = nn.Linear(i, r, bias=False), nn.Linear(r, o, bias=False)
        nn.init.normal_(self.lora_B.weight)
        self.drop = nn.Dropout(p) if p else nn.Identity()

    def forward(self, x):
        return self.base(x) + 2.0 * self.lora_B(self.lora_A(self.drop(x)))


def _summary(gm) -> dict:
    """What the tests read of a partitioned graph: its outputs' and its matmuls' shapes, whether it draws."""
    outputs = gm.graph.find_nodes(op="output")[0].args[0]
    vals = [a.meta["val"] if isinstance(a, torch.fx.Node) else None for a in outputs]
    return {"outputs": [(tuple(v.shape), v.dtype) for v in vals if isinstance(v, torch.Tensor)],
            "mm": [tuple(n.meta["val"].shape) for n in gm.graph.nodes if n.target is aten.mm.default],
            "draws": any(n.target is torch.ops.prims.inductor_random.default for n in gm.graph.nodes),
            "fast": sum(n.target is torch.ops.runlora_fx.seeded_keep.default for n in gm.graph.nodes),
            "packed": sum(n.target is aten.clone.default and n.kwargs.get("memory_format") is torch.contiguous_format
                          for n in gm.graph.nodes)}


def _partitioned(program, p=0.1, n=40, codegen=False, dropout_rng="torch", forms=False):
    """(forward summary, backward summary, saved (shape, dtype)s, gradients) of `Site` planned with `program`."""
    graphs, model = [], Site(p=p)
    x = torch.randn(n, 16, requires_grad=True)
    torch._dynamo.reset()
    torch.manual_seed(5)
    backend = forced(program, graphs, codegen=codegen, dropout_rng=dropout_rng, forms=forms)
    torch.compile(model, backend=backend, fullgraph=True)(x).square().sum().backward()
    fw, bw = graphs
    return fw, bw, fw["outputs"][1:], (x.grad, model.lora_A.weight.grad, model.lora_B.weight.grad)


def test_partitioned_graphs_follow_the_plan():
    """N=40, i=16, o=24, r=4. Stock: dB = G^T U, U saved. ta/bt: dB and dA through T = G^T x_d (o x i), shared;
    nothing of rank r saved; x_d not saved but rebuilt from x and the bool mask."""
    stock = Program("chain", "zx", "gu", "split", True, True, "bool")
    _, bw, saved, _ = _partitioned(stock)
    assert ((40, 4), torch.float32) in saved and (24, 16) not in bw["mm"]
    assert ((40, 16), torch.bool) in saved

    planned = Program("chain", "bt", "ta", "split", False, False, "bool")
    _, bw, saved, _ = _partitioned(planned)
    shapes = saved
    assert ((40, 4), torch.float32) not in shapes and ((40, 16), torch.bool) in shapes
    assert shapes.count(((40, 16), torch.float32)) == 1  # x alone; x_d is rebuilt in backward
    assert bw["mm"].count((24, 16)) == 1  # T computed once for dA and dB
    assert (4, 16) in bw["mm"] and (24, 4) in bw["mm"]


def test_skinny_products_run_in_their_other_form():
    """pack_z / swap_db: the backward computes dB as (U^T G)^T, an r x o product instead of o x r, and Z from a
    contiguous copy of B^T; the gradients are the plain forms' (the same sums)."""
    stock = Program("chain", "zx", "gu", "split", True, True, "bool")
    _, plain_bw, _, plain = _partitioned(stock, p=0.0)
    graphs, model = [], Site(p=0.0)
    x = torch.randn(40, 16, requires_grad=True)
    torch._dynamo.reset()
    torch.manual_seed(5)
    torch.compile(model, backend=forced(stock, graphs, forms=True), fullgraph=True)(x).square().sum().backward()
    bw = graphs[1]
    assert (24, 4) in plain_bw["mm"] and (4, 24) not in plain_bw["mm"]
    assert (4, 24) in bw["mm"] and (24, 4) not in bw["mm"] and bw["packed"] == 1 and plain_bw["packed"] == 0
    for got, want in zip((x.grad, model.lora_A.weight.grad, model.lora_B.weight.grad), plain):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.slow
def test_skinny_forms_under_inductor_code_generation():
    """The same with inductor's generated code (it checks the strides of every extern output)."""
    stock = Program("chain", "zx", "gu", "split", True, True, "bool")
    *_, plain = _partitioned(stock, p=0.0, codegen=True)
    *_, oriented = _partitioned(stock, p=0.0, codegen=True, forms=True)
    for got, want in zip(oriented, plain):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_backend_takes_the_forms_the_profile_measured_faster(monkeypatch):
    """plan_joint sets pack_z / swap_db from the chosen plan's oriented steps: on with a profile that measured the
    other forms faster at this rank, off with one that measured no gain."""
    from runlora_fx.planner.device import default_profile

    captured = []
    torch._dynamo.reset()
    torch.compile(Site(i=256, o=256, p=0.0), backend=lambda gm, ex: captured.extend((gm, ex)) or gm.forward)(
        torch.randn(512, 256, requires_grad=True))  # a size where the planner keeps dB = G^T U
    sites = match_sites(*captured).sites
    fast = replace(default_profile("cpu"), skinny_gain={"float32": {"gb": [(4, 2.0)], "gu": [(4, 3.0)]}})
    for profile, want in ((replace(fast, skinny_gain={}), (False,)), (fast, (True,))):
        monkeypatch.setattr(backend_mod, "get_profile", lambda d, p=profile: p)
        pass_, _ = plan_joint(sites, OptimizeConfig().search_options)
        (plan,) = pass_.plans.values()
        assert plan.program.grad_b == "gu" and plan.swap_db == want and plan.pack_z == want


@pytest.mark.slow
def test_recomputed_u_and_regenerated_mask():
    """keep_u=False: U recomputed in backward (an N x r mm there, not saved). mask=seed: the backward redraws the
    mask with inductor's seeded random, nothing of the mask's size is saved, and the gradients equal the same
    compile that saves the mask (same seed, same draw). Needs inductor's code: the eager kernel of
    `inductor_random` ignores its seed."""
    kept = Program("chain", "zx", "gu", "split", True, False, "bool")
    _, _, _, grads_kept = _partitioned(kept, codegen=True)
    seeded = Program("chain", "zx", "gu", "split", False, False, "seed")
    fw, bw, saved, grads = _partitioned(seeded, codegen=True)
    assert not any(s[0] == (40, 16) and s[1] == torch.bool for s in saved)
    assert ((40, 4), torch.float32) not in saved and (40, 4) in bw["mm"]
    assert bw["draws"]
    for a, b in zip(grads, grads_kept):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask", ["bool", "seed"])
def test_fast_masks_replace_inductor_draw_and_give_the_masked_step(mask, monkeypatch):
    """dropout_rng="fast": the joint graph draws each mask with `seeded_keep` from inductor's seed, none with
    `inductor_random`; "seed" regenerates the same mask in backward (nothing of the mask's size saved), "bool"
    saves it. The step equals peft's formula evaluated with the recorded mask."""
    from runlora_fx.kernels import exact_bernoulli

    drawn, draw = [], exact_bernoulli.bernoulli_

    def recording(out, p, generator=None):
        drawn.append((generator.initial_seed(), draw(out, p, generator).clone()))
        return out

    monkeypatch.setattr(exact_bernoulli, "bernoulli_", recording)
    program = Program("chain", "zx", "gu", "split", True, True, mask)
    fw, bw, saved, grads = _partitioned(program, dropout_rng="fast")
    assert not fw["draws"] and not bw["draws"] and fw["fast"] == 1 and bw["fast"] == (mask == "seed")
    assert (((40, 16), torch.bool) in saved) == (mask == "bool")
    assert len(drawn) == 1 + (mask == "seed") and len({s for s, _ in drawn}) == 1
    keep = drawn[0][1]
    assert keep.dtype == torch.bool and all(torch.equal(keep, m) for _, m in drawn)
    model, x = Site(p=0.1), torch.randn(40, 16, requires_grad=True)  # the same weights and x as _partitioned
    xd = x * keep / (1 - 0.1)
    (model.base(x) + 2.0 * model.lora_B(model.lora_A(xd))).square().sum().backward()
    for got, want in zip(grads, (x.grad, model.lora_A.weight.grad, model.lora_B.weight.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


def test_backend_default_generator_follows_the_device_profile(monkeypatch):
    """With no dropout_rng given, the joint lowering on a CPU draws with `seeded_keep`; the opaque one takes the
    generator the device profile measures faster; other devices, and fallback_random (eager's stream asked
    for), keep "torch". Under fallback_random no site is given fast masks even when asked."""
    from runlora_fx.planner.device import get_profile

    cpu = get_profile("cpu")
    for fast_rate, want in ((cpu.rng_rate * 4, "fast"), (cpu.rng_rate / 4, "torch")):
        monkeypatch.setattr(backend_mod, "get_profile", lambda d, r=fast_rate: replace(cpu, fast_rng_rate=r))
        assert backend_mod.default_dropout_rng([torch.zeros(2)], "opaque") == want
        assert backend_mod.default_dropout_rng([torch.zeros(2)], "joint") == "fast"
        with torch._inductor.config.patch(fallback_random=True):
            assert backend_mod.default_dropout_rng([torch.zeros(2)], "joint") == "torch"
    assert backend_mod.default_dropout_rng([torch.zeros(2, device="meta")], "joint") == "torch"
    found = match_sites(*_captured(tiny_llama(0.1)))
    fast = OptimizeConfig.from_options({"dropout_rng": "fast"}).search_options
    assert all(p.fast_masks for p in plan_joint(found.sites, fast)[0].plans.values())
    with torch._inductor.config.patch(fallback_random=True):
        assert not any(p.fast_masks for p in plan_joint(found.sites, fast)[0].plans.values())


def _captured(model):
    """dynamo's graph of one forward of `model` and its example inputs."""
    out = []

    def grab(gm, example_inputs):
        out.extend((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=grab, fullgraph=True)(input_ids=tokens())
    return out


def test_merged_forward_and_dx_use_one_weight_sum():
    """p=0 merged/…/merged: forward is x (W + s B A)^T and dX is G (W + s B A): no N x r product in forward,
    and dX is one N x i mm in backward."""
    fw, bw, _, grads = _partitioned(Program("merged", "zx", "gu", "merged", False, True, "none"), p=0.0)
    fw_shapes, bw_shapes = fw["mm"], bw["mm"]
    assert (40, 4) not in fw_shapes and (24, 16) in fw_shapes + bw_shapes
    assert bw_shapes.count((40, 16)) == 1
    assert all(g is not None for g in grads)


@torch._inductor.config.patch(fallback_random=True)
def test_site_the_pass_cannot_prove_is_left_with_its_reason():
    """A merged program forced on a dropout site cannot be run: the site is left as inductor compiles it (the
    step still equals peft's under fallback_random) and the reason is reported."""
    model = Site(p=0.1)
    ref, passes = copy.deepcopy(model), []
    x = torch.randn(40, 16)
    torch._dynamo.reset()
    torch.manual_seed(5)
    got = torch.compile(model, backend=forced(Program("merged", "zx", "gu", "merged", False, True, "bool"),
                                              passes=passes), fullgraph=True)(x)
    torch.manual_seed(5)
    torch.testing.assert_close(got, ref(x))
    (why,) = passes[-1].report.left.values()
    assert "merged weight" in why and not passes[-1].report.applied


def test_backend_reports_programs_and_matches_peft_in_bf16():
    """The backend's own choice (fused pricing), bf16 base with peft's fp32 adapters, p=0: stock tolerance."""
    model = tiny_llama(0.0, torch.bfloat16)
    ref, ids = copy.deepcopy(model), tokens()
    torch._dynamo.reset()
    cm = torch.compile(model, backend=runlora_backend, options={"inner": "aot_eager", "lowering": "joint"},
                       fullgraph=True)
    got = loss_and_grads(cm, ids)
    report = backend_mod.last_reports[-1]
    assert report["lowering"] == "joint" and report["rewritten"] == 7 and len(report["programs"]) == 7
    assert_step_matches(got, loss_and_grads(ref, ids), float64_truth(ref, ids))


def test_recompiles_over_sequence_lengths_no_more_than_plain_inductor_passes():
    def counting(make):
        calls = []

        def backend(gm, example_inputs):
            calls.append(1)
            return make(gm, example_inputs)
        return backend, calls

    from torch._functorch.aot_autograd import make_boxed_func
    from torch._inductor.compile_fx import compile_fx

    def aten_graphs(gm, ex):
        return compile_fx(gm, ex, inner_compile=lambda g, e, **k: make_boxed_func(g.forward))

    plain, plain_calls = counting(aten_graphs)
    joint = {"inner": "aot_eager", "lowering": "joint"}
    ours, our_calls = counting(lambda gm, ex: runlora_backend(gm, ex, options=joint))
    for backend in (plain, ours):
        model = tiny_llama(0.0, torch.float32)
        torch._dynamo.reset()
        cm = torch.compile(model, backend=backend)
        for seq in (6, 9, 13):
            loss_and_grads(cm, tokens(2, seq))
    assert 1 <= len(our_calls) <= len(plain_calls)


@pytest.mark.slow
def test_inductor_step_equals_peft_with_the_joint_pass():
    """The whole pipeline with code generation: fp32, p=0, 1e-5."""
    model = tiny_llama(0.0, torch.float32)
    ref, ids = copy.deepcopy(model), tokens()
    torch._dynamo.reset()
    cm = torch.compile(model, backend=runlora_backend, options={"lowering": "joint"}, fullgraph=True)
    got = loss_and_grads(cm, ids)
    assert backend_mod.last_reports[-1]["rewritten"] == 7
    want = loss_and_grads(ref, ids)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-5, atol=1e-5, msg=name)


def test_bf16_adapters_on_an_fp32_base_sum_in_fp32():
    """peft casts x to the adapters' bf16 and adds their result to the fp32 base result in fp32; the pass keeps
    that add, so the compiled step stays as close to the float64 truth as peft's."""
    model = tiny_llama(0.0, torch.float32)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.bfloat16()
    ref, ids = copy.deepcopy(model), tokens()
    torch._dynamo.reset()
    cm = torch.compile(model, backend=runlora_backend, options={"inner": "aot_eager", "lowering": "joint"},
                       fullgraph=True)
    got = loss_and_grads(cm, ids)
    assert backend_mod.last_reports[-1]["rewritten"] == 7
    truth = copy.deepcopy(ref).double()
    assert_step_matches(got, loss_and_grads(ref, ids), loss_and_grads(truth, ids))


def test_auto_lowering_is_joint_for_dense_sites_and_opaque_where_only_the_ops_plan():
    """lowering="auto": the joint lowering for a dense LLaMA; the opaque ops when a site is a Conv1D base (the
    joint pass leaves those to inductor) or when inner="eager" runs no joint graph."""
    backend_mod.last_reports.clear()
    torch._dynamo.reset()
    loss_and_grads(torch.compile(tiny_llama(0.0), backend=runlora_backend, options={"inner": "aot_eager"}), tokens())
    assert backend_mod.last_reports[-1]["lowering"] == "joint" and backend_mod.last_reports[-1]["rewritten"] == 7
    found = match_sites(*_captured(tiny_llama(0.0)))
    assert backend_mod.auto_lowering(found.sites, "eager") == "opaque"
    assert backend_mod.auto_lowering([replace(found.sites[0], weight_transposed=True)], "inductor") == "opaque"
    assert backend_mod.auto_lowering(found.sites, "inductor") == "joint"
