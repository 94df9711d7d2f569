"""The "runlora" torch.compile backend: match LoRA sites in dynamo's graph, plan them, hand on to inductor.

Registered through the `torch_dynamo_backends` entry point, so `torch.compile(model, backend="runlora")` works
after `pip install` with no import. Options travel in torch.compile's `options` dict:

    torch.compile(model, backend="runlora", options={"inner": "aot_eager", "objective": "memory"})

(see `OptimizeConfig` for every option, plus `lowering` below). Two lowerings:

* "joint": tag each site's nodes, compile with inductor and
  `passes.joint.JointPass` as its joint-graph pass, which re-associates the site's matmuls and fixes its saved set
  inside the joint graph, so inductor still fuses the pointwise work. With inner "aot_eager" the same joint
  passes and partitioner run, and the partitioned aten graphs run eagerly (no code generation).
* "opaque": each site becomes one custom op (`kernels.ops`) that runs the Plan chosen per call for the actual N.

"auto" (the default, `auto_lowering`) takes "joint", or "opaque" where the graph has a site only the opaque ops
plan (4-bit, Conv1D) or no joint graph is run (inner "eager").

The last graph's report is kept in `last_reports` for `explain`.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch.fx.experimental.symbolic_shapes import optimization_hint

from .config import OptimizeConfig
from .passes.annotate import annotate
from .passes.joint import JointPass, SitePlan
from .passes.match import match_sites
from .passes.eligibility import rewrite_reason, runner_for, x_readers
from .passes.rewrite import RUNNERS_ATTR, rewrite_sites
from .passes.site import LoraSite, SkippedSite
from .planner.device import get_profile
from .planner.fused import search_fused
from .planner.search import SearchOptions

LOWERINGS = ("auto", "joint", "opaque")
last_reports: list[dict] = []


def _val(node):
    return None if node is None else node.meta.get("example_value", node.meta.get("val"))


def _plan(site: LoraSite, options: SearchOptions, readers: int, seed: bool):
    """The compiled path's Plan for `site`, from the example values dynamo recorded (N at its hint)."""
    x, w = _val(site.x), _val(site.weight)
    n = x.numel() // w.shape[1]
    n = optimization_hint(n) if isinstance(n, torch.SymInt) else n
    adapters = [(_val(a.lora_a), _val(a.lora_b), _val(a.lora_bias)) for a in site.adapters]
    grads = [site.x_requires_grad is not False, False]
    grads += [site.bias_requires_grad is True] if site.bias is not None else []
    for a in site.adapters:
        grads += [a.a_requires_grad is not False, a.b_requires_grad is not False]
        grads += [a.lora_bias_requires_grad is not False] if a.lora_bias is not None else []
    training = any(a.dropout_train for a in site.adapters)
    runner = runner_for(site, options, readers)
    spec = runner.spec_from(n, w, _val(site.bias), adapters, training, grads)
    profile = get_profile(x.device)
    if spec.dropout_rng == "fast":  # the joint pass draws "fast" masks with `seeded_keep`: ATen's draw, in bulk
        profile = replace(profile, fast_rng_rate=profile.rng_rate)
    return search_fused(spec, options, profile, seed=seed)


def plan_joint(sites: list[LoraSite], options: SearchOptions,
               codegen: bool = True) -> tuple[JointPass, list[SkippedSite]]:
    """Tag every plannable site and build the joint pass that applies its plan; the others, with reasons.

    A mask is regenerated from its seed where inductor generates the code (`codegen`; the eager kernel of
    `inductor_random` ignores its seed) or where the fast generator draws it (a pure function of its seed);
    `fallback_random` keeps ATen's stateful draw, and so eager's masks."""
    plans, skipped = {}, []
    readers = x_readers(sites)
    fallback = torch._inductor.config.fallback_random
    if fallback:  # the user asked for ATen's stream (eager's masks): no other generator
        options = replace(options, dropout_rng="torch")
    fast = options.dropout_rng == "fast"
    seed = (codegen or fast) and not fallback
    for site in sites:
        reason = rewrite_reason(site)
        if reason is None and site.quant_compute_dtype is not None:
            reason = "4-bit base: the joint-graph pass plans dense bases only (use lowering='opaque')"
        if reason is None and site.weight_transposed:
            reason = "Conv1D base (weight stored in x out): the joint-graph pass plans linear bases only " \
                     "(use lowering='opaque')"
        if reason:
            skipped.append(SkippedSite(site.module_path, reason))
            continue
        sid = len(plans)
        plan = _plan(site, options, readers[site.x], seed)
        forms = {s.out: s.form for s in plan.lowered.backward}
        ks = range(len(site.adapters))
        plans[sid] = SitePlan(site.module_path, plan.program, tuple(float(a.scale) for a in site.adapters),
                              fast_masks=fast and plan.spec.any_dropout,
                              pack_z=tuple(forms.get(f"Z{k}") == "pack" for k in ks),
                              swap_db=tuple(forms.get(f"dB{k}") == "swap" for k in ks))
        annotate(site, sid)
    return JointPass(plans), skipped


def _eager_inner(gm: torch.fx.GraphModule, example_inputs, **kwargs):
    """compile_fx's inner compiler for inner="aot_eager": run the partitioned aten graph as it is."""
    from torch._functorch.aot_autograd import make_boxed_func

    return make_boxed_func(gm.forward)


def compile_joint(gm: torch.fx.GraphModule, example_inputs, pass_: JointPass, inner: str):
    """Compile with inductor's pipeline and `pass_` as its joint-graph pass (per compile, not global)."""
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    patches = {"joint_custom_post_pass": pass_}
    return compile_fx(gm, example_inputs, inner_compile=compile_fx_inner if inner == "inductor" else _eager_inner,
                      config_patches=patches)


def default_dropout_rng(example_inputs, lowering: str) -> str:
    """The compiled path's mask generator when the user names none. A compiled graph's masks are not eager's
    anyway (inductor draws its own stream), so the choice is speed alone, and only a CPU has one to make:

    * joint: "fast", each mask drawn in bulk by `kernels.masks.seeded_keep` from inductor's seed, since inductor's
      own per-element draw costs 26 ms over 1.4 M values on one thread here against 1.2-1.4 ms;
    * opaque: whichever of ATen's draw (`kernels.exact_bernoulli`, eager's masks) and the fast generator the
      device profile measures faster.

    Elsewhere, and under inductor's `fallback_random` (eager's stream asked for, as in parity tests), "torch"."""
    device = next((t.device for t in example_inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
    if torch._inductor.config.fallback_random or device.type != "cpu":
        return "torch"
    if lowering == "joint":
        return "fast"
    profile = get_profile(device)
    return "fast" if profile.fast_rng_rate > profile.rng_rate else "torch"


def auto_lowering(sites: list[LoraSite], inner: str) -> str:
    """"joint" (it measured faster on 3 of the 4 rows of the 60m fp32 step, docs/COMPILED.md), unless the graph
    runs no joint graph (inner "eager") or has a site only the opaque ops plan (a 4-bit or a Conv1D base)."""
    if inner == "eager" or any(s.quant_compute_dtype is not None or s.weight_transposed for s in sites):
        return "opaque"
    return "joint"


def runlora_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, **kwargs):
    """Plan LoRA sites, then compile with the inner compiler."""
    options = {**(options or {}), **kwargs}
    lowering = options.pop("lowering", "auto")
    if lowering not in LOWERINGS:
        raise ValueError(f"lowering must be one of {', '.join(LOWERINGS)}, got {lowering!r}")
    inner = options.get("inner", OptimizeConfig().inner)
    if lowering == "joint" and inner == "eager":
        raise ValueError("lowering='joint' needs inner 'inductor' or 'aot_eager' (it runs in the joint graph)")
    found = match_sites(gm, example_inputs)
    if lowering == "auto":
        lowering = auto_lowering(found.sites, inner)
    options.setdefault("dropout_rng", default_dropout_rng(example_inputs, lowering))
    config = OptimizeConfig.from_options(options)
    if lowering == "opaque":
        count, not_rewritten = rewrite_sites(gm, found.sites, config.search_options)
        _report({"lowering": "opaque", "rewritten": count, "skipped": found.skipped + not_rewritten})
        if config.inner == "eager":
            return gm.forward  # holds gm, which holds its runners
        return _owning(torch._dynamo.lookup_backend(config.inner)(gm, example_inputs), gm)
    pass_, not_planned = plan_joint(found.sites, config.search_options, codegen=config.inner == "inductor")
    compiled = compile_joint(gm, example_inputs, pass_, config.inner)
    report = pass_.report
    left = [SkippedSite(path, reason) for path, reason in report.left.items()]
    cached = not report.applied and not report.left and bool(pass_.plans)
    programs = {p.module_path: p.program.key for p in pass_.plans.values()} if cached else dict(report.applied)
    _report({"lowering": "joint", "rewritten": len(programs), "skipped": found.skipped + not_planned + left,
             "programs": programs, "from_cache": cached})
    return compiled


def _report(entry: dict) -> None:
    last_reports.append(entry)
    del last_reports[:-16]


def _owning(compiled, gm: torch.fx.GraphModule):
    """`compiled`, made to keep the rewritten graph's runners alive for as long as dynamo keeps it (the ops'
    site registry holds them weakly, so they go with the compiled graph)."""
    runners = getattr(gm, RUNNERS_ATTR, [])
    try:
        setattr(compiled, RUNNERS_ATTR, runners)
        return compiled
    except AttributeError:  # a callable without attributes: wrap it, keeping dynamo's calling convention
        def call(*args):
            return compiled(*args)

        call._boxed_call = getattr(compiled, "_boxed_call", False)
        setattr(call, RUNNERS_ATTR, runners)
        return call
