"""The joint-graph pass: rewrite each tagged LoRA site of aot_autograd's forward+backward graph into its Plan.

Runs inside inductor as `joint_custom_post_pass`, so after it inductor still fuses every pointwise op around the
matmuls (which an opaque per-site op prevents). For each site (tagged by `passes.annotate`) it finds the forward
matmuls (base, x_d A^T, U B^T) and the backward ones (G_s^T U, G_s B, Z^T x_d, Z A, G W), then

* re-associates dB = (G_s^T x_d) A^T and dA = B^T (G_s^T x_d) where the Plan says so, sharing G_s^T x_d;
* merges dX = G (W + s B A) and the forward x (W + s B A)^T where the Plan says so (one dropout-free adapter);
* computes Z = G_s B and dB = G_s^T U in the memory order the device multiplies faster where the Plan's steps say
  so (`planner.orient`: G_s (B^T packed)^T, (U^T G_s)^T);
* fixes what crosses to backward with the partitioner's recompute policies (`meta["recompute"]`): U saved or
  recomputed, x_d saved or rebuilt from x and the mask, the mask saved as bool or regenerated from its seed
  (inductor's `inductor_random` is a pure function of seed and offset), the merged weight saved or rebuilt.

Every check runs before the first edit, so a site whose graph is not the expected shape is left exactly as
inductor would compile it, and its reason is reported. Gradients keep the stock layer's scale placement: G_s is
autograd's own `s * G`.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._inductor.pattern_matcher import stable_topological_sort
from torch.utils.checkpoint import CheckpointPolicy

from ..kernels.masks import seeded_keep
from ..planner.expr import Program
from .annotate import tag_of

aten, prims = torch.ops.aten, torch.ops.prims
MM = (aten.mm.default, aten.addmm.default)
VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
AC_GRAPH_ID = 0  # one id for every tag: cleanup_recompute_tags only splits regions with increasing ids


class Unsupported(Exception):
    """The site's joint graph is not one the pass can prove it rewrites exactly."""


@dataclass(frozen=True)
class SitePlan:
    """What the backend chose for one site: the program and the per-adapter scales (for the merged weight)."""

    module_path: str
    program: Program
    scales: tuple[float, ...]
    fast_masks: bool = False  # draw the masks with `kernels.masks.seeded_keep` instead of inductor's per-element draw
    # per adapter, the skinny products in their faster form (`planner.orient`): Z = G (B^T packed)^T, dB = (U^T G)^T
    pack_z: tuple[bool, ...] = ()
    swap_db: tuple[bool, ...] = ()


@dataclass
class JointReport:
    applied: dict[str, str] = field(default_factory=dict)  # module path -> program key
    left: dict[str, str] = field(default_factory=dict)  # module path -> why the site is left to inductor


def _mats(n: fx.Node) -> tuple[fx.Node, fx.Node]:
    """The two matrix operands of an mm / addmm."""
    return n.args[-2], n.args[-1]  # type: ignore[return-value]


def _is_transpose_of(n, of: fx.Node) -> bool:
    return isinstance(n, fx.Node) and n.target is aten.permute.default and n.args[0] is of and list(n.args[1]) == [1, 0]


def _untransposed(n: fx.Node) -> fx.Node:
    """The weight behind a linear's `permute(W, [1, 0])` operand (Unsupported when it is not one)."""
    if not (isinstance(n, fx.Node) and n.target is aten.permute.default and _is_transpose_of(n, n.args[0])):
        raise Unsupported(f"a merged weight needs the linear's weight as permute(W), got {n}")
    return n.args[0]


def _through_views(n: fx.Node) -> fx.Node:
    while n.target in VIEWS:
        n = n.args[0]
    return n


class _Graph:
    """The joint graph with node order, backward set and helpers that build nodes with fake values."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.order = {n: i for i, n in enumerate(graph.nodes)}
        tangents = [n for n in graph.nodes if n.op == "placeholder" and "tangents" in str(n.target)]
        bw: set[fx.Node] = set()
        stack = list(tangents)
        while stack:
            n = stack.pop()
            if n not in bw:
                bw.add(n)
                stack.extend(n.users)
        self.backward = bw
        self.has_backward = bool(tangents)
        self.fake_mode = torch._guards.detect_fake_mode([n.meta["val"] for n in graph.nodes if "val" in n.meta])

    def make(self, target, args: tuple, before: fx.Node, tag_like: fx.Node, backward: bool, **kwargs) -> fx.Node:
        """A new node before `before`, with meta["val"] from running `target` on the arguments' fake values."""
        with self.graph.inserting_before(before):
            node = self.graph.call_function(target, args, kwargs)
        vals = fx.node.map_arg(args, lambda a: a.meta["val"])
        with self.fake_mode:
            node.meta["val"] = target(*vals, **kwargs)
        for key in ("custom", "nn_module_stack", "stack_trace"):
            if key in tag_like.meta:
                node.meta[key] = tag_like.meta[key]
        node.meta["partitioner_tag"] = "is_backward" if backward else "is_forward"
        return node

    def first(self, nodes) -> fx.Node:
        return min(nodes, key=lambda n: self.order.get(n, len(self.order)))


def _tag(node: fx.Node, policy: CheckpointPolicy) -> None:
    node.meta["recompute"] = policy
    node.meta["ac_graph_id"] = AC_GRAPH_ID


@dataclass
class _Adapter:
    fa: fx.Node  # U = x_d A^T (forward)
    fb: fx.Node  # U B^T (forward)
    db: fx.Node | None  # G_s^T U
    z: fx.Node | None  # Z = G_s B
    da: fx.Node | None  # Z^T x_d
    dl: fx.Node | None  # Z A
    chain: list[fx.Node]  # pointwise nodes from x to x_d (cast, mask multiply, scale), in order
    mask: fx.Node | None  # the bool mask (gt of a random draw, or native_dropout's second output)
    random: list[fx.Node]  # the draw behind the mask (inductor_random), when it can be replayed from its seed
    native_dropout: fx.Node | None  # fallback_random: ATen's op, to be split into mask and multiply


@dataclass
class _Site:
    plan: SitePlan
    nodes: list[fx.Node]
    base: fx.Node  # forward x W^T (+ b)
    base_bw: fx.Node | None  # G W
    adapters: list[_Adapter]


def _find(g: _Graph, plan: SitePlan, nodes: list[fx.Node]) -> _Site:
    if any("recompute" in n.meta for n in nodes):
        raise Unsupported("the site is inside an activation-checkpointed region (its recompute policy is the user's)")

    def mms(role: str, j: int, backward: bool) -> list[fx.Node]:
        return [n for n in nodes if n.target in MM and tag_of(n)[1:] == (role, j) and (n in g.backward) == backward]

    def one(found: list[fx.Node], what: str) -> fx.Node:
        if len(found) != 1:
            raise Unsupported(f"expected one {what} matmul in the joint graph, found {len(found)}")
        return found[0]

    base = one(mms("base", -1, False), "forward base")
    bw = mms("base", -1, True)
    if len(bw) > 1:
        raise Unsupported(f"the base linear has {len(bw)} backward matmuls (a trainable base weight?)")
    adapters = []
    for j in range(len(plan.scales)):
        fa, fb = one(mms("A", j, False), f"forward lora_A[{j}]"), one(mms("B", j, False), f"forward lora_B[{j}]")
        if _mats(fb)[0] is not fa or fa.target is not aten.mm.default:
            raise Unsupported(f"adapter {j}: lora_B does not read lora_A's product")
        db = z = da = dl = None
        for n in mms("B", j, True):
            if _mats(n)[1] is fa and db is None:
                db = n
            elif _is_transpose_of(_mats(n)[1], _mats(fb)[1]) and z is None:
                z = n
            else:
                raise Unsupported(f"adapter {j}: unrecognised backward matmul {n.name} of lora_B")
        for n in mms("A", j, True):
            if z is not None and _is_transpose_of(_mats(n)[0], z) and da is None:
                da = n
            elif z is not None and _mats(n)[0] is z and _is_transpose_of(_mats(n)[1], _mats(fa)[1]) and dl is None:
                dl = n
            else:
                raise Unsupported(f"adapter {j}: unrecognised backward matmul {n.name} of lora_A")
        if da is not None and _mats(da)[1] is not _mats(fa)[0]:
            raise Unsupported(f"adapter {j}: dA does not read the forward's x_d")
        adapters.append(_Adapter(fa, fb, db, z, da, dl, *_input_chain(g, _mats(fa)[0], nodes, j)))
    return _Site(plan, nodes, base, bw[0] if bw else None, adapters)


def _input_chain(g: _Graph, xd2: fx.Node, nodes: list[fx.Node], j: int):
    """The adapter's pointwise nodes between the site's x and x_d, its mask and the draw behind it."""
    own = {n for n in nodes if tag_of(n)[1:] == ("adapter", j) and n not in g.backward}
    chain, mask, random, native = [], None, [], None
    cur = xd2
    while cur in own or cur.target in VIEWS:
        if cur.target is operator.getitem and cur.args[0].target is aten.native_dropout.default:
            native = cur.args[0]
            chain.append(cur)
            cur = native.args[0]
            continue
        if cur.target in VIEWS:
            cur = cur.args[0]
            continue
        if cur.target not in (aten.mul.Tensor, prims.convert_element_type.default):
            raise Unsupported(f"adapter {j}: unrecognised op {cur.target} between x and lora_A")
        chain.append(cur)
        tensors = [a for a in cur.args if isinstance(a, fx.Node)]
        masks = [a for a in tensors if a.meta["val"].dtype == torch.bool]
        if masks:
            if mask is not None or len(tensors) != 2:
                raise Unsupported(f"adapter {j}: more than one dropout mask")
            mask = masks[0]
            cur = next(a for a in tensors if a is not mask)
        else:
            if len(tensors) != 1:
                raise Unsupported(f"adapter {j}: {cur.name} mixes two activations")
            cur = tensors[0]
    if native is not None:
        mask = next((u for u in native.users if u.args[1] == 1), None)
    elif mask is not None:
        random = [mask] + [a for a in mask.args if isinstance(a, fx.Node) and a.target is prims.inductor_random.default]
        if len(random) != 2:
            random = []
    return list(reversed(chain)), mask, random, native


def _check(site: _Site, fallback_random: bool) -> None:
    """Raise Unsupported when the plan needs a structure this graph lacks (before any edit)."""
    p = site.plan.program
    merged = p.forward == "merged" or p.grad_x == "merged"
    for j, ad in enumerate(site.adapters):
        if site.plan.fast_masks and ad.mask is not None and not _replaceable_draw(ad):
            raise Unsupported(f"adapter {j}: the mask is not inductor's `inductor_random(shape, seed) > p`")
        if p.mask == "seed" and ad.mask is not None and not ad.random:
            why = "fallback_random keeps ATen's stateful dropout" if fallback_random else "no replayable draw"
            raise Unsupported(f"adapter {j}: the mask cannot be regenerated from a seed ({why})")
        if merged and (ad.chain or ad.fb.target is not aten.mm.default):
            raise Unsupported("a merged weight needs an adapter that reads x itself, with no lora bias")
        if merged:
            for n in (ad.fa, ad.fb, site.base):
                _untransposed(_mats(n)[1])
    if p.grad_x == "merged":
        _dx_join(site)
    if p.forward == "merged":
        _out_join(site)
    for j, ad in enumerate(site.adapters):
        if _flag(site.plan.swap_db, j) and ad.db is not None and p.grad_b == "gu" \
                and not _is_transpose_of(_mats(ad.db)[0], _mats(ad.db)[0].args[0]):
            raise Unsupported(f"adapter {j}: dB is not mm(permute(G), U)")


def _flag(flags: tuple[bool, ...], j: int) -> bool:
    return j < len(flags) and flags[j]


def _up(n: fx.Node) -> fx.Node | None:
    """The single user of `n` past views, or None."""
    while len(n.users) == 1:
        n = next(iter(n.users))
        if n.target not in VIEWS:
            return n
    return None


def _dx_join(site: _Site) -> fx.Node:
    """The add that sums the adapter's Z A into x's gradient, when the base's G W is summed into the same tree of
    adds (sibling sites' contributions may come in between): dropping Z A there and merging its weight into G W
    keeps the total."""
    ad = site.adapters[0]
    if site.base_bw is None or ad.dl is None:
        raise Unsupported("dX merge: the graph computes no dX")
    add, tree = _up(ad.dl), set()
    cur = add
    while cur is not None and cur.target is aten.add.Tensor and len(cur.args) == 2:
        if any(a.meta["val"].shape != cur.meta["val"].shape for a in cur.args if isinstance(a, fx.Node)):
            raise Unsupported("dX merge: x's gradient is summed with broadcasting")
        tree.add(cur)
        cur = _up(cur)
    if add not in tree or _up(site.base_bw) not in tree:
        raise Unsupported("dX merge: Z A and G W are not summed into x's gradient by one tree of adds")
    return add


def _out_join(site: _Site) -> fx.Node:
    """The forward add of the base's result and the adapter's s U B^T."""
    for n in site.nodes:
        if n.target is aten.add.Tensor and tag_of(n)[1] == "out" and len(n.args) == 2:
            sides = [_through_views(a) if isinstance(a, fx.Node) else None for a in n.args]
            if site.base in sides and len(site.base.users) == 1:
                return n
    raise Unsupported("forward merge: no add of the base's result and the adapter's")


def _apply(g: _Graph, site: _Site) -> None:
    p, s = site.plan.program, site.plan.scales
    merged_w: fx.Node | None = None

    def merged_weight(before: fx.Node, backward: bool) -> fx.Node:
        nonlocal merged_w
        if merged_w is None:
            ad = site.adapters[0]
            (a, b, w) = (_untransposed(_mats(n)[1]) for n in (ad.fa, ad.fb, site.base))
            make = lambda t, args: g.make(t, args, before, site.base, backward)  # noqa: E731
            ba = make(aten.mm.default, (b, a))
            merged_w = make(aten.add.Tensor, (w, make(aten.mul.Tensor, (ba, s[0]))))
            for n in (ba, merged_w, merged_w.args[1]):
                _tag(n, CheckpointPolicy.MUST_SAVE if p.keep_merged else CheckpointPolicy.MUST_RECOMPUTE)
        return merged_w

    if p.forward == "merged":
        add = _out_join(site)
        mw = merged_weight(site.base, backward=False)
        mt = g.make(aten.permute.default, (mw, [1, 0]), site.base, site.base, False)
        site.base.replace_input_with(_mats(site.base)[1], mt)
        base_side = next(a for a in add.args if _through_views(a) is site.base)
        add.replace_all_uses_with(base_side)
    if p.grad_x == "merged":
        add = _dx_join(site)
        g2 = _mats(site.base_bw)[0]
        dx = g.make(aten.mm.default, (g2, merged_weight(site.base_bw, backward=True)), site.base_bw, site.base_bw, True)
        site.base_bw.replace_all_uses_with(dx)
        add.replace_all_uses_with(next(a for a in add.args if _through_views(a) is not site.adapters[0].dl))
    for j, ad in enumerate(site.adapters):
        _apply_adapter(g, site, ad)
        if _flag(site.plan.pack_z, j) and ad.z is not None:
            _pack_z(g, ad)
        if _flag(site.plan.swap_db, j) and ad.db is not None and p.grad_b == "gu":
            _swap_db(g, ad)


def _pack_z(g: _Graph, ad: _Adapter) -> None:
    """Z = G_s B as G_s (B^T copied contiguous)^T: the same sums, the memory order the device multiplies faster."""
    z, bt = ad.z, _mats(ad.z)[1]
    packed = g.make(aten.clone.default, (bt.args[0],), z, z, True, memory_format=torch.contiguous_format)
    z.replace_input_with(bt, g.make(aten.permute.default, (packed, [1, 0]), z, z, True))


def _swap_db(g: _Graph, ad: _Adapter) -> None:
    """dB = G_s^T U as (U^T G_s)^T (`_check` made sure the first operand is permute(G_s))."""
    db = ad.db
    gst, u = _mats(db)
    ut = g.make(aten.permute.default, (u, [1, 0]), db, db, True)
    prod = g.make(aten.mm.default, (ut, gst.args[0]), db, db, True)
    db.replace_all_uses_with(g.make(aten.permute.default, (prod, [1, 0]), db, db, True))


def _apply_adapter(g: _Graph, site: _Site, ad: _Adapter) -> None:
    p = site.plan.program
    xd2, at = _mats(ad.fa)
    if site.plan.fast_masks and ad.mask is not None:
        _fast_draw(g, ad)
    if ad.native_dropout is not None:
        _split_native_dropout(g, ad)
        xd2 = _mats(ad.fa)[0]
    t = None

    def shared_t(before: fx.Node) -> fx.Node:
        """G_s^T x_d, shared by dB (ta) and dA (bt)."""
        nonlocal t
        if t is None:
            if ad.db is not None:
                gst = _mats(ad.db)[0]
            else:
                gst = g.make(aten.permute.default, (_mats(ad.z)[0], [1, 0]), before, before, True)
            t = g.make(aten.mm.default, (gst, xd2), before, before, True)
        return t

    replaced = [n for n, want in ((ad.db, p.grad_b == "ta"), (ad.da, p.grad_a == "bt")) if n is not None and want]
    if replaced:
        before = g.first(replaced)
        if ad.db is not None and p.grad_b == "ta":
            ad.db.replace_all_uses_with(g.make(aten.mm.default, (shared_t(before), at), ad.db, ad.db, True))
        if ad.da is not None and p.grad_a == "bt":
            da = g.make(aten.mm.default, (_mats(ad.fb)[1], shared_t(before)), ad.da, ad.da, True)
            ad.da.replace_all_uses_with(da)
    if ad.db is not None and p.grad_b == "gu":
        _tag(ad.fa, CheckpointPolicy.MUST_SAVE if p.keep_u else CheckpointPolicy.MUST_RECOMPUTE)
    if ad.chain:
        for n in ad.chain:
            _tag(n, CheckpointPolicy.MUST_RECOMPUTE)
        if p.keep_xd:
            _tag(ad.chain[-1], CheckpointPolicy.MUST_SAVE)
    if ad.mask is not None:
        if p.mask == "seed" and ad.random:
            for n in ad.random:
                _tag(n, CheckpointPolicy.MUST_RECOMPUTE)
        else:
            _tag(ad.mask, CheckpointPolicy.MUST_SAVE)


def _replaceable_draw(ad: _Adapter) -> bool:
    """Whether the adapter's mask is `inductor_random(shape, seed, "rand") > p` (the decomposition of dropout)."""
    if len(ad.random) != 2:
        return False
    gt, draw = ad.random
    return gt.target is aten.gt.Scalar and gt.args[0] is draw and draw.args[2] == "rand"


def _fast_draw(g: _Graph, ad: _Adapter) -> None:
    """Swap inductor's per-element draw `inductor_random(shape, seed) > p` for `seeded_keep` of the same seed: the
    same keep probability 1-p (so dropout's 1/(1-p) stays right), another stream, drawn in bulk."""
    gt, draw = ad.random
    p, (shape, seed, _) = gt.args[1], draw.args
    keep = g.make(seeded_keep._opoverload, (seed, list(shape), p), gt, gt, backward=False)
    gt.replace_all_uses_with(keep)
    ad.mask, ad.random = keep, [keep]


def _split_native_dropout(g: _Graph, ad: _Adapter) -> None:
    """ATen's native_dropout (fallback_random) as mask, x * mask, * 1/(1-p): its own formula, so x_d can be rebuilt
    in backward from x and the saved mask without drawing again."""
    nd = ad.native_dropout
    out = next(u for u in nd.users if u.args[1] == 0)
    x, p = nd.args[0], nd.args[1]
    if ad.mask is None:  # nothing read the mask (no dX): take it from the op
        ad.mask = g.make(operator.getitem, (nd, 1), out, out, False)
    xm = g.make(aten.mul.Tensor, (x, ad.mask), out, out, False)
    xd = g.make(aten.mul.Tensor, (xm, 1.0 / (1.0 - p)), out, out, False)
    out.replace_all_uses_with(xd)
    ad.chain = [n for n in ad.chain if n is not out] + [xm, xd]
    ad.random = []


class JointPass(CustomGraphPass):
    """`joint_custom_post_pass` for one compiled graph: its sites' plans, and what it did with each."""

    def __init__(self, plans: dict[int, SitePlan]):
        self.plans = plans
        self.report = JointReport()

    def __call__(self, graph: fx.Graph) -> None:
        g = _Graph(graph)
        groups: dict[int, list[fx.Node]] = {}
        for n in graph.nodes:
            if (tag := tag_of(n)) is not None and tag[0] in self.plans:
                groups.setdefault(tag[0], []).append(n)
        fallback = torch._inductor.config.fallback_random
        for sid, plan in self.plans.items():
            try:
                if not g.has_backward:
                    raise Unsupported("inference graph (no backward): left to inductor")
                site = _find(g, plan, groups.get(sid, []))
                _check(site, fallback)
            except Unsupported as why:
                self.report.left[plan.module_path] = str(why)
                continue
            _apply(g, site)
            self.report.applied[plan.module_path] = plan.program.key
        if self.report.applied:
            stable_topological_sort(graph)
            graph.eliminate_dead_code()

    def uuid(self) -> bytes:
        """The pass's source and its plans: inductor's FX graph cache must not reuse a graph planned otherwise."""
        plans = repr(sorted((k, v) for k, v in self.plans.items()))
        return get_hash_for_files((__file__, __file__.replace("joint.py", "annotate.py")), plans)
