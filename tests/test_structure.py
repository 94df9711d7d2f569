"""Structure: the package's imports point one way (planner <- kernels <- passes <- api/backend <- train) with no
cycle; the eager node runs a Plan's generated code; compiled graphs' runners are freed with the graphs."""
from __future__ import annotations

import ast
import gc
import importlib
import pkgutil
import weakref
from pathlib import Path

import networkx as nx
import torch

import runlora_fx
from runlora_fx.kernels.dense import run_plan
from runlora_fx.planner.expr import AdapterSpec, SiteSpec
from runlora_fx.planner.search import search

PACKAGE = Path(runlora_fx.__file__).parent
# the layer of every module: a module may import only its own layer or lower ones
LAYERS = {"planner": 0, "kernels": 1, "passes": 2, "train": 4}
TOP = 3  # api, backend, config, report, cli, demo, ... and the package itself
# known upward edges, each fixed on another branch (the coordinator removes them when merging)
KNOWN: set[tuple[str, str]] = set()  # upward edges allowed (none)


def _modules() -> list[str]:
    return ["runlora_fx"] + [m.name for m in pkgutil.walk_packages([str(PACKAGE)], "runlora_fx.")]


def _path(module: str) -> Path:
    rel = Path(*module.split(".")[1:])
    return PACKAGE / rel / "__init__.py" if (PACKAGE / rel).is_dir() else PACKAGE / rel.with_suffix(".py")


def _resolve(name: str, modules: set[str]) -> str | None:
    """The package module an import of `name` loads last (`a.b.c` may be an attribute of module `a.b`)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> nx.DiGraph:
    """An edge from each module to every package module it imports, at top level or inside a function."""
    modules = set(_modules())
    g = nx.DiGraph()
    g.add_nodes_from(modules)
    for mod in modules:
        is_pkg = _path(mod).name == "__init__.py"
        package = mod if is_pkg else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(_path(mod).read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    parent = ".".join(parts[:len(parts) - node.level + 1])
                    base = f"{parent}.{base}" if base else parent
                targets = [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                dep = _resolve(t, modules)
                if dep is not None and dep != mod:
                    g.add_edge(mod, dep)
    return g


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], TOP) if len(parts) > 1 else TOP


def test_every_module_imports():
    names = _modules()
    assert len(names) > 20  # the walk finds the package's modules
    for name in names:
        assert importlib.import_module(name).__name__ == name


def test_import_graph_has_no_cycle_and_points_down():
    g = import_graph()
    assert g.number_of_edges() > 20  # the walk sees the package's imports
    upward = {(a, b) for a, b in g.edges if _layer(b) > _layer(a)} - KNOWN
    assert not upward, f"imports against the layer order: {sorted(upward)}"
    acyclic = g.copy()
    acyclic.remove_edges_from(KNOWN)
    assert nx.is_directed_acyclic_graph(acyclic), f"import cycle: {nx.find_cycle(acyclic)}"


def test_import_graph_sees_a_cycle():
    """The check can fail: a planner module importing kernels is both upward and a cycle."""
    g = import_graph()
    g.add_edge("runlora_fx.planner.expr", "runlora_fx.kernels.dense")
    assert not nx.is_directed_acyclic_graph(g)
    assert _layer("runlora_fx.kernels.dense") > _layer("runlora_fx.planner.expr")


def _site_call():
    torch.manual_seed(0)
    x = torch.randn(16, 12, requires_grad=True)
    w, b = torch.randn(10, 12), torch.randn(10)
    a = torch.randn(4, 12, requires_grad=True)
    bb = torch.randn(10, 4, requires_grad=True)
    return x, w, b, [(a, bb, None)]


def test_eager_node_runs_the_plans_generated_code(monkeypatch):
    """The node calls the Plan's forward and backward GraphModules (generated straight-line Python), and they
    compute what the step list says."""
    x, w, b, adapters = _site_call()
    spec = SiteSpec(16, 12, 10, (AdapterSpec(4, scale=2.0),), bias=True)
    plan = search(spec)
    calls = []
    for name in ("forward_graph", "backward_graph"):
        gm = getattr(plan, name)
        assert isinstance(gm, torch.fx.GraphModule) and "def forward" in gm.code
        assert gm is getattr(plan, name)  # built once per Plan
        original = gm.forward
        monkeypatch.setattr(gm, "forward", lambda *a, _o=original, _n=name: calls.append(_n) or _o(*a))
    y = run_plan(plan, x, w, b, adapters)
    y.sum().backward()
    assert calls == ["forward_graph", "backward_graph"]
    ref_x = x.detach().clone().requires_grad_()
    a, bb = (t.detach().clone().requires_grad_() for t in adapters[0][:2])
    ref = torch.nn.functional.linear(ref_x, w, b) + 2.0 * (ref_x @ a.T @ bb.T)
    ref.sum().backward()
    torch.testing.assert_close(y, ref)
    for got, want in ((x.grad, ref_x.grad), (adapters[0][0].grad, a.grad), (adapters[0][1].grad, bb.grad)):
        torch.testing.assert_close(got, want)


def test_compiled_graph_frees_its_runners():
    """The custom ops' site registry holds runners weakly: once the compiled model is gone, so are its runners
    (and with them any 4-bit quant state)."""
    from runlora_fx.backend import runlora_backend
    from runlora_fx.kernels import ops

    class Site(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = torch.nn.Linear(12, 10)
            self.base.requires_grad_(False)
            self.lora_A = torch.nn.Linear(12, 4, bias=False)
            self.lora_B = torch.nn.Linear(4, 10, bias=False)

        def forward(self, x):
            return self.base(x) + 2.0 * self.lora_B(self.lora_A(x))

    def run_once():
        torch._dynamo.reset()
        before = set(ops._SITES.keys())
        cm = torch.compile(Site(), backend=runlora_backend, options={"inner": "aot_eager", "lowering": "opaque"},
                           fullgraph=True)
        cm(torch.randn(3, 12)).sum().backward()
        new = [ops._SITES[k] for k in set(ops._SITES.keys()) - before]
        assert new, "the site was not rewritten"
        return [weakref.ref(r) for r in new]

    refs = run_once()
    torch._dynamo.reset()
    gc.collect()
    assert all(r() is None for r in refs)


def test_plans_share_graphs_across_n_unless_the_code_bakes_in_a_shape():
    """Steps do not depend on N, so one site's plans at many N share their graphs -- except where the code holds
    a shape (unpacking a bit-packed mask needs the mask's shape)."""
    from runlora_fx.planner.expr import Program, build_steps
    from runlora_fx.planner.graphs import backward_graph, forward_graph

    def lows(program, n):
        spec = SiteSpec(n, 12, 10, (AdapterSpec(4, dropout=0.2),), grad_x=True)
        return build_steps(spec, program)

    plain, bits = Program(mask="bool"), Program(mask="bits", keep_xd=False)
    assert forward_graph(lows(plain, 5)) is forward_graph(lows(plain, 7))
    assert backward_graph(lows(plain, 5)) is backward_graph(lows(plain, 7))
    assert backward_graph(lows(bits, 5)) is not backward_graph(lows(bits, 7))
    assert backward_graph(lows(bits, 5)) is backward_graph(lows(bits, 5))
    assert "(5, 12)" in backward_graph(lows(bits, 5)).code
