"""Structural matching of LoRA layers in dynamo graphs: what must match (with the right record), and what must
be left untouched and reported with a reason."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_models import TorchtuneLoRALinear

from runlora_fx.passes.capture import capture
from runlora_fx.passes.match import (FailedMatch, find_lora_params, match_model, match_site, match_sites,
                                     normalise_source)
from runlora_fx.passes.site import LoraSite

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------- models


def tiny_llama_peft(**lora):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config = dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=LLAMA_TARGETS)
    config.update(lora)
    return get_peft_model(LlamaForCausalLM(cfg), LoraConfig(**config))


LLAMA_IDS = {"input_ids": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))}


class Small(nn.Module):
    """One projection worth adapting (with a bias) and one plain linear after it."""

    def __init__(self, bias=True):
        super().__init__()
        self.proj = nn.Linear(16, 24, bias=bias)
        self.out = nn.Linear(24, 8, bias=False)

    def forward(self, x):
        return self.out(torch.relu(self.proj(x)))


def small_peft(dtype=torch.float32, **lora):
    torch.manual_seed(0)
    config = dict(r=4, lora_alpha=8, target_modules=["proj"])
    config.update(lora)
    return get_peft_model(Small().to(dtype), LoraConfig(**config))


class LoralibLinear(nn.Module):
    """loralib's Linear forward (unmerged, r > 0)."""

    def __init__(self, i=16, o=24, r=4, lora_alpha=8, lora_dropout=0.1):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i), requires_grad=False)
        self.bias = nn.Parameter(torch.randn(o), requires_grad=False)
        self.lora_A = nn.Parameter(torch.randn(r, i))
        self.lora_B = nn.Parameter(torch.randn(o, r))
        self.scaling = lora_alpha / r
        self.lora_dropout = nn.Dropout(lora_dropout)

    def forward(self, x):
        result = F.linear(x, self.weight, bias=self.bias)
        result += (self.lora_dropout(x) @ self.lora_A.transpose(0, 1) @ self.lora_B.transpose(0, 1)) * self.scaling
        return result


class Bare(nn.Module):
    """Bare parameters W (o x i), A (r x i), B (o x r); `body` is the forward under test."""

    def __init__(self, body, i=16, o=24, r=4, weight_grad=False):
        super().__init__()
        torch.manual_seed(1)
        self.W = nn.Parameter(torch.randn(o, i), requires_grad=weight_grad)
        self.A = nn.Parameter(torch.randn(r, i))
        self.B = nn.Parameter(torch.randn(o, r))
        self.register_buffer("s_tensor", torch.tensor(0.5))
        self.body = body

    def forward(self, x):
        return self.body(self, x)


HAND_WRITTEN = {
    "dotT_t_permute": lambda m, x: x @ m.W.T + (x @ m.A.t()) @ m.B.permute(1, 0) * 0.5,
    "matmul_mT_transpose": lambda m, x: torch.matmul(x, m.W.mT) + 0.5 * torch.matmul(torch.matmul(x, torch.t(m.A)),
                                                                                  m.B.transpose(-1, -2)),
    "linear_mixed": lambda m, x: F.linear(x, m.W) + (x @ m.A.transpose(1, 0)).matmul(m.B.T) / 2,
}


def only_graph(model, *args, **kwargs):
    cap = capture(model, args, kwargs)
    assert cap.fullgraph, cap.fullgraph_error
    (graph,) = cap.graphs
    return graph


def real(graph, node):
    return graph.value_of(node)


def check_site_shape(site: LoraSite):
    """Invariants every site must satisfy, whatever the source."""
    nodes = set(site.nodes)
    assert site.base_node in nodes and site.output in nodes
    assert site.x not in nodes and site.weight not in nodes
    for n in site.nodes:  # nothing but the output escapes
        if n is not site.output:
            assert set(n.users) <= nodes, n
    for adapter in site.adapters:
        assert set(adapter.nodes) <= nodes
        assert isinstance(adapter.scale, float)


# ----------------------------------------------------------------------------------------------- peft LLaMA


@pytest.fixture(scope="module")
def llama_train_graph():
    """One capture shared by the tests that only read it (capturing the LLaMA is the slow part)."""
    torch._dynamo.reset()
    model = tiny_llama_peft().train()
    return model, only_graph(model, **LLAMA_IDS)


@pytest.mark.parametrize("train", [True, False])
def test_peft_llama_all_seven_projections(train, llama_train_graph):
    if train:
        model, graph = llama_train_graph
    else:
        model = tiny_llama_peft().eval()
        graph = only_graph(model, **LLAMA_IDS)
    result = match_sites(graph.gm, graph.example_inputs, model=model)
    expected = {f"base_model.model.model.layers.0.{part}.{name}"
                for name in LLAMA_TARGETS for part in ("self_attn", "mlp") if (name in ("q_proj", "k_proj",
                "v_proj", "o_proj")) == (part == "self_attn")}
    assert {s.module_path for s in result.sites} == expected
    assert result.skipped == []
    for site in result.sites:
        check_site_shape(site)
        module = model.get_submodule(site.module_path)
        (adapter,) = site.adapters
        assert adapter.name == "default"
        assert adapter.scale == module.scaling["default"] == 2.0
        assert (adapter.dropout_p, adapter.dropout_train) == (0.1, train)
        assert real(graph, site.weight) is module.base_layer.weight and site.bias is None
        assert real(graph, adapter.lora_a) is module.lora_A["default"].weight
        assert real(graph, adapter.lora_b) is module.lora_B["default"].weight
        assert site.output_cast == torch.float32 and site.output.target == "to"  # peft's result.to(dtype)
        assert site.base_node.target is F.linear and site.nodes[0] is site.base_node and site.nodes[-1] is site.output
        assert (site.weight_requires_grad, adapter.a_requires_grad, adapter.b_requires_grad) == (False, True, True)
    by_name = {s.module_path.rsplit(".", 1)[-1]: s for s in result.sites}
    # the first layer's q/k/v read the (frozen) embedding path; o_proj reads what q/k/v adapters produced
    assert not by_name["q_proj"].x_requires_grad and by_name["o_proj"].x_requires_grad
    assert by_name["q_proj"].x is by_name["k_proj"].x is by_name["v_proj"].x


def test_peft_llama_paths_without_model_come_from_dynamo_sources(llama_train_graph):
    model, graph = llama_train_graph
    with_model = match_sites(graph.gm, graph.example_inputs, model=model)
    without = match_sites(graph.gm)
    assert [s.module_path for s in without.sites] == [s.module_path for s in with_model.sites]
    assert [a.name for s in without.sites for a in s.adapters] == ["default"] * 7
    assert [s.x_requires_grad for s in without.sites] == [s.x_requires_grad for s in with_model.sites]
    assert all(s.x_requires_grad is not None for s in without.sites)  # from node meta alone


def test_peft_two_active_adapters_chain_their_adds():
    model = tiny_llama_peft()
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=6, lora_dropout=0.0, target_modules=LLAMA_TARGETS))
    model.base_model.set_adapter(["default", "other"])
    graph = only_graph(model.train(), **LLAMA_IDS)
    result = match_sites(graph.gm, graph.example_inputs, model=model)
    assert len(result.sites) == 7 and not result.skipped
    for site in result.sites:
        check_site_shape(site)
        assert [a.name for a in site.adapters] == ["default", "other"]
        assert [a.scale for a in site.adapters] == [2.0, 3.0]
        assert [a.dropout_p for a in site.adapters] == [0.1, 0.0]
        adds = [n for n in site.nodes if n.target in (__import__("operator").add,)]
        assert len(adds) == 2 and adds[0] in adds[1].args  # chained: (base + d0) + d1
        module = model.get_submodule(site.module_path)
        assert real(graph, site.adapters[1].lora_b) is module.lora_B["other"].weight


# ----------------------------------------------------------------------------------------------- peft on a small module


def test_peft_base_bias_lora_bias_and_rslora_scale():
    model = small_peft(lora_bias=True, use_rslora=True, lora_dropout=0.2)
    graph = only_graph(model, torch.randn(3, 16))
    (site,) = match_sites(graph.gm, graph.example_inputs, model=model).sites
    check_site_shape(site)
    module = model.base_model.model.proj
    (adapter,) = site.adapters
    assert site.module_path == "base_model.model.proj"
    assert real(graph, site.bias) is module.base_layer.bias
    assert real(graph, adapter.lora_bias) is module.lora_B["default"].bias
    assert adapter.scale == module.scaling["default"] == pytest.approx(8 / math.sqrt(4))
    assert adapter.lora_bias_requires_grad is True and site.bias_requires_grad is False


def test_fp32_adapters_over_bf16_base_record_the_casts():
    model = small_peft(dtype=torch.bfloat16)  # peft's autocast_adapter_dtype keeps the adapters in fp32
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["proj"]))
    model.base_model.set_adapter(["default", "other"])
    assert model.base_model.model.proj.lora_A["default"].weight.dtype == torch.float32
    graph = only_graph(model, torch.randn(3, 16, dtype=torch.bfloat16))
    (site,) = match_sites(graph.gm, graph.example_inputs, model=model).sites
    check_site_shape(site)
    assert [a.input_cast for a in site.adapters] == [torch.float32, torch.float32]
    assert all(a.dropout_p == 0.0 for a in site.adapters)  # lora_dropout=0: peft uses nn.Identity, no node
    assert not any(n.target is F.dropout for n in graph.gm.graph.nodes)
    assert site.output_cast == torch.bfloat16
    (cast,) = [n for n in site.nodes if n.target == "to" and n is not site.output]
    assert cast.args[0] is site.x  # peft casts x once; the second adapter reuses the cast
    assert all(cast in a.nodes for a in site.adapters)


# ----------------------------------------------------------------------------------------------- other libraries


def test_torchtune_style_lora_linear():
    model = TorchtuneLoRALinear()
    graph = only_graph(model, torch.randn(2, 3, 16))
    (site,) = match_sites(graph.gm, graph.example_inputs, model=model).sites
    check_site_shape(site)
    (adapter,) = site.adapters
    assert site.module_path == "" and adapter.name == "lora_a"
    assert adapter.scale == 2.0 and (adapter.dropout_p, adapter.dropout_train) == (0.1, True)
    assert real(graph, site.weight) is model.weight and real(graph, site.bias) is model.bias
    assert real(graph, adapter.lora_a) is model.lora_a.weight and site.output_cast is None


def test_torchtune_style_inside_a_model_gets_its_module_path():
    model = nn.Sequential(nn.Linear(16, 16), nn.Sequential(TorchtuneLoRALinear(dropout=0.0)))
    graph = only_graph(model, torch.randn(2, 16))
    (site,) = match_sites(graph.gm, graph.example_inputs, model=model).sites
    assert site.module_path == "1.0"
    assert match_sites(graph.gm).sites[0].module_path == "1.0"


def test_loralib_style_matmul_chain_with_inplace_add():
    model = LoralibLinear()
    graph = only_graph(model, torch.randn(2, 3, 16))
    (site,) = match_sites(graph.gm, graph.example_inputs, model=model).sites
    check_site_shape(site)
    (adapter,) = site.adapters
    assert adapter.name == "lora_A" and adapter.scale == 2.0 and adapter.dropout_p == 0.1
    assert real(graph, adapter.lora_a) is model.lora_A and real(graph, adapter.lora_b) is model.lora_B
    assert site.output.target is __import__("operator").iadd


@pytest.mark.parametrize("spelling", sorted(HAND_WRITTEN))
def test_hand_written_matmul_forms_are_normalised(spelling):
    model = Bare(HAND_WRITTEN[spelling])
    graph = only_graph(model, torch.randn(5, 16))
    result = match_sites(graph.gm, graph.example_inputs, model=model)
    (site,) = result.sites
    check_site_shape(site)
    (adapter,) = site.adapters
    assert adapter.scale == 0.5 and adapter.name == "A"
    assert real(graph, site.weight) is model.W
    assert real(graph, adapter.lora_a) is model.A and real(graph, adapter.lora_b) is model.B
    transposes = [n for n in graph.gm.graph.nodes if n.op != "placeholder" and n.all_input_nodes
                  and n.all_input_nodes[0] in (site.weight, adapter.lora_a, adapter.lora_b)
                  and n is not site.base_node]
    assert transposes and all(t in site.nodes for t in transposes)  # the weight transposes are replaced too


def test_separately_added_bias_and_listed_adapters():
    """`y = x @ W.T; y = y + b; y = y + s * ...` per adapter kept in ParameterLists (bias before or after)."""

    class Listed(nn.Module):
        def __init__(self, bias_first):
            super().__init__()
            self.bias_first = bias_first
            self.w = nn.Parameter(torch.randn(24, 16), requires_grad=False)
            self.b = nn.Parameter(torch.randn(24), requires_grad=False)
            self.a = nn.ParameterList(nn.Parameter(torch.randn(r, 16)) for r in (2, 3))
            self.bb = nn.ParameterList(nn.Parameter(torch.randn(24, r)) for r in (2, 3))

        def forward(self, x):
            y = x @ self.w.T
            y = y + self.b if self.bias_first else y
            for a, b, s in zip(self.a, self.bb, (0.5, 2.0)):
                y = y + s * ((x @ a.T) @ b.T)
            return y if self.bias_first else y + self.b

    for bias_first in (True, False):
        model = Listed(bias_first)
        graph = only_graph(model, torch.randn(5, 16))
        (site,) = match_sites(graph.gm, graph.example_inputs, model=model).sites
        check_site_shape(site)
        assert real(graph, site.bias) is model.b
        assert [(a.name, a.scale) for a in site.adapters] == [("a.0", 0.5), ("a.1", 2.0)]
        assert [real(graph, a.lora_b) for a in site.adapters] == list(model.bb)
        assert site.output is list(graph.gm.graph.nodes)[-2]  # the last add, bias or adapter


def test_optional_nodes_in_new_places_need_no_new_pattern():
    """Scales on both sides of A and after B, a cast of the delta and `torch.add(alpha=)`: one walk reads them."""

    def body(m, x):
        h = F.dropout(x * 2.0, 0.25, True) @ m.A.T
        delta = ((h / 4.0) @ m.B.T * 3.0).to(torch.float32)
        return torch.add(x @ m.W.T, delta, alpha=0.5)

    model = Bare(body)
    graph = only_graph(model, torch.randn(4, 16))
    (site,) = match_sites(graph.gm, graph.example_inputs).sites
    (adapter,) = site.adapters
    assert adapter.scale == pytest.approx(2.0 / 4.0 * 3.0 * 0.5)
    assert (adapter.dropout_p, adapter.dropout_train) == (0.25, True)
    assert adapter.delta_cast == torch.float32  # the outermost cast is the one the add sees


def test_grad_flags_come_from_example_inputs_and_node_meta():
    model = Bare(HAND_WRITTEN["dotT_t_permute"], weight_grad=True)  # a trainable base still matches, flagged
    graph = only_graph(model, torch.randn(5, 16, requires_grad=True))
    (site,) = match_sites(graph.gm, graph.example_inputs).sites
    assert site.weight_requires_grad is True and site.x_requires_grad is True
    model.A.requires_grad_(False)  # LoRA-FA: frozen A
    graph = only_graph(model, torch.randn(5, 16))
    (site,) = match_sites(graph.gm, graph.example_inputs).sites
    assert site.x_requires_grad is False and site.adapters[0].a_requires_grad is False
    assert site.adapters[0].b_requires_grad is True


# ----------------------------------------------------------------------------------------------- must not match


def assert_untouched_and_reported(graph, result, *, reason, path=None):
    assert result.sites == [], [s.module_path for s in result.sites]
    assert result.skipped, "nothing was reported"
    (row,) = [s for s in result.skipped if reason in s.reason] or [None]
    assert row is not None, [s.reason for s in result.skipped]
    if path is not None:
        assert row.module_path == path
    return row


def matched_and_code(graph, **kw):
    code = graph.gm.code
    result = match_sites(graph.gm, graph.example_inputs, **kw)
    assert graph.gm.code == code  # matching never mutates
    return result


def test_peft_dora_is_reported_not_matched():
    model = small_peft(use_dora=True)
    found = match_model(model, (torch.randn(3, 16),))
    assert found.sites == []
    (row,) = found.skipped
    assert row.module_path == "base_model.model.proj" and "DoraLinearVariant" in row.reason
    for graph in found.captured:  # without the model, the graph alone still tells
        result = matched_and_code(graph)
        assert result.sites == []
    assert any("rank-4 product" in s.reason for g in found.captured for s in match_sites(g.gm).skipped)


@pytest.mark.parametrize("variant", ["mica", "kasa"])
def test_other_peft_variants_on_linear_are_reported(variant):
    from peft.tuners.lora.config import KasaConfig

    extra = {"mica": dict(init_lora_weights="mica"), "kasa": dict(kasa_config=KasaConfig())}[variant]
    model = small_peft(**extra)
    graph = only_graph(model, torch.randn(3, 16))
    result = matched_and_code(graph, model=model)
    cls = type(model.base_model.model.proj.lora_variant["default"]).__name__
    assert_untouched_and_reported(graph, result, reason=cls, path="base_model.model.proj")


def test_kasa_graph_alone_reports_the_tensor_scale():
    from peft.tuners.lora.config import KasaConfig

    graph = only_graph(small_peft(kasa_config=KasaConfig()), torch.randn(3, 16))
    assert_untouched_and_reported(graph, matched_and_code(graph), reason="a tensor and not a Python constant")


def test_intermediate_used_outside_the_site():
    def body(m, x):
        h = x @ m.A.T
        return x @ m.W.T + (h @ m.B.T) * 0.5 + h.sum()

    graph = only_graph(Bare(body), torch.randn(5, 16))
    row = assert_untouched_and_reported(graph, matched_and_code(graph), reason="also used outside the site")
    assert "sum" in row.reason


def test_unknown_op_between_the_pieces():
    graph = only_graph(Bare(lambda m, x: x @ m.W.T + torch.tanh(x @ m.A.T) @ m.B.T * 0.5), torch.randn(5, 16))
    assert_untouched_and_reported(graph, matched_and_code(graph), reason="unsupported op tanh")


def test_tensor_scale_is_skipped():
    graph = only_graph(Bare(lambda m, x: x @ m.W.T + (x @ m.A.T) @ m.B.T * m.s_tensor), torch.randn(5, 16))
    row = assert_untouched_and_reported(graph, matched_and_code(graph), reason="a tensor and not a Python constant")
    assert "s_tensor" in row.reason


def test_untransposed_adapter_weights_are_reported():
    """x @ M with M stored (in, out) has no (out, in) weight node for the site record: reported, not guessed."""

    class InOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(torch.randn(24, 16), requires_grad=False)
            self.A = nn.Parameter(torch.randn(16, 4))  # (in, r)
            self.B = nn.Parameter(torch.randn(4, 24))  # (r, out)

        def forward(self, x):
            return x @ self.W.T + (x @ self.A) @ self.B * 0.5

    graph = only_graph(InOut(), torch.randn(5, 16))
    assert_untouched_and_reported(graph, matched_and_code(graph), reason="untransposed")


def test_weights_computed_in_the_graph_are_reported():
    graph = only_graph(Bare(lambda m, x: F.linear(x, m.W * 2.0) + (x @ m.A.T) @ m.B.T * 0.5), torch.randn(5, 16))
    row = assert_untouched_and_reported(graph, matched_and_code(graph), reason="computed in the graph")
    assert "base weight" in row.reason


def test_symbolic_scale_is_skipped():
    model = Bare(lambda m, x: x @ m.W.T + (x @ m.A.T) @ m.B.T * (1.0 / x.shape[0]))
    graphs = []
    torch.compile(model, backend=lambda gm, ex: graphs.append((gm, ex)) or gm.forward, dynamic=True,
                  fullgraph=True)(torch.randn(5, 16))
    gm, example_inputs = graphs[-1]
    result = match_sites(gm, example_inputs)
    assert result.sites == [] and any("symbolic value" in s.reason for s in result.skipped)


def test_plain_layers_are_neither_matched_nor_reported():
    """No false positives: MLPs, residual adds, a low-rank projection of another input."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(16, 64), nn.Linear(64, 16)
            self.cond = nn.Linear(4, 16)
            self.q = nn.Linear(16, 16)

        def forward(self, x, c):
            h = x + self.down(F.gelu(self.up(x)))
            return self.q(h) + self.cond(c)

    graph = only_graph(Block(), torch.randn(3, 16), torch.randn(3, 4))
    result = matched_and_code(graph)
    assert result.sites == [] and result.skipped == []


def test_failed_match_is_falsy_and_formats_lazily():
    class Loud:
        formatted = 0

        def __format__(self, spec):
            Loud.formatted += 1
            return "loud"

    failure = FailedMatch("because {}", Loud())
    assert not failure and Loud.formatted == 0
    assert str(failure) == "because loud" and Loud.formatted == 1
    graph = only_graph(Small(), torch.randn(3, 16))
    relu = next(n for n in graph.gm.graph.nodes if n.target is torch.relu)
    attempt = match_site(relu)
    assert isinstance(attempt, FailedMatch) and not attempt and "is not a linear" in str(attempt)
    linear = next(n for n in graph.gm.graph.nodes if n.target is F.linear)
    assert "not added to a low-rank product" in str(match_site(linear))


# ----------------------------------------------------------------------------------------------- find_lora_params


def test_find_lora_params_returns_the_real_parameters():
    model = tiny_llama_peft()
    params = find_lora_params(model, (), LLAMA_IDS)
    assert len(params) == 7
    for p in params:
        module = model.get_submodule(p.module_path)
        assert p.module is module
        assert p.weight is module.base_layer.weight and isinstance(p.weight, nn.Parameter)
        (adapter,) = p.adapters
        assert adapter.name == "default" and type(adapter.scale) is float and adapter.scale == 2.0
        assert adapter.lora_a is module.lora_A["default"].weight and adapter.lora_b is module.lora_B["default"].weight
        assert adapter.lora_bias is None


def test_find_lora_params_scale_rslora_and_biases():
    model = small_peft(use_rslora=True, lora_bias=True, r=8, lora_alpha=4)
    (p,) = find_lora_params(model, (torch.randn(3, 16),))
    module = model.base_model.model.proj
    assert p.bias is module.base_layer.bias and p.adapters[0].lora_bias is module.lora_B["default"].bias
    assert p.adapters[0].scale == pytest.approx(4 / math.sqrt(8))


def test_find_lora_params_skips_variants():
    assert find_lora_params(small_peft(use_dora=True), (torch.randn(3, 16),)) == []


# ----------------------------------------------------------------------------------------------- small pieces


def test_normalise_source():
    assert normalise_source("L['self'].__dict__['_modules']['base_model'].model.layers[0]._modules['q']") == \
        "base_model.model.layers.0.q"
    assert normalise_source("L['self']") == ""


def test_bad_arguments():
    with pytest.raises(TypeError, match="GraphModule"):
        match_sites(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="fx.Node"):
        match_site("linear")
    graph = only_graph(Small(), torch.randn(3, 16))
    with pytest.raises(TypeError, match="example_inputs"):
        match_sites(graph.gm, torch.randn(3))
    with pytest.raises(TypeError, match="model"):
        match_sites(graph.gm, model="Small")
