"""capture(): dynamo graphs with the real tensors behind placeholders, and nothing left behind for later."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.eval_frame import _get_total_cache_entry_count

from runlora_fx.passes.capture import Captured, capture, placeholder_value


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Lora(nn.Module):
    def __init__(self, i=16, o=24, r=4, p=0.0):
        super().__init__()
        self.base = nn.Linear(i, o)
        self.base.requires_grad_(False)
        self.a = nn.Linear(i, r, bias=False)
        self.b = nn.Linear(r, o, bias=False)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        return self.base(x) + self.b(self.a(self.drop(x))) * 0.5


class Breaks(Lora):
    def forward(self, x):
        y = self.base(x)
        torch._dynamo.graph_break()
        return y + self.b(self.a(x)) * 0.5


def test_placeholders_map_to_the_real_parameters():
    model = Lora()
    x = torch.randn(3, 16)
    cap = capture(model, (x,))
    assert isinstance(cap, Captured) and cap.fullgraph and cap.fullgraph_error is None
    (graph,) = cap.graphs
    values = [graph.value_of(n) for n in graph.placeholders]
    assert {id(p) for p in model.parameters()} <= {id(v) for v in values}
    assert any(v is x for v in values)
    for node, value in zip(graph.placeholders, values):
        assert placeholder_value(graph.gm, graph.example_inputs, node) is value
        assert cap.value_of(node) is value
    linear = next(n for n in graph.gm.graph.nodes if n.op == "call_function")
    with pytest.raises(ValueError, match="computed by the graph"):
        graph.value_of(linear)


def test_graph_breaks_fall_back_and_return_every_graph():
    cap = capture(Breaks(), (torch.randn(3, 16),))
    assert not cap.fullgraph
    assert cap.fullgraph_error and "graph_break" in cap.fullgraph_error.lower().replace(" ", "_")
    assert len(cap) >= 2
    with pytest.raises(Exception):
        capture(Breaks(), (torch.randn(3, 16),), allow_graph_breaks=False)


def test_model_is_not_left_compiled_and_code_caches_are_reset():
    model = Lora()
    before = dict(model.__dict__)
    capture(model, (torch.randn(3, 16),))
    assert type(model) is Lora and model.__dict__.keys() == before.keys()
    assert _get_total_cache_entry_count(Lora.forward) == 0
    assert _get_total_cache_entry_count(nn.Linear.forward) == 0


def test_user_compiled_code_keeps_its_entries_and_does_not_recompile():
    calls = []

    def counting(gm, example_inputs):
        calls.append(gm)
        return gm.forward

    model = Lora()
    compiled = torch.compile(model, backend=counting)
    x = torch.randn(3, 16)
    compiled(x)
    assert len(calls) == 1
    capture(model, (x,))
    compiled(x)
    assert len(calls) == 1  # the user's entry survived and still hits


def test_rng_stream_is_not_shifted_by_the_capture():
    model = Lora(p=0.5).train()
    x = torch.randn(3, 16)
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    capture(model, (x,))
    assert torch.equal(torch.rand(5), expected)


def test_automatic_dynamic_shape_memory_is_restored():
    from torch._dynamo import pgo

    model = Lora()
    state_before = pgo._CODE_STATE
    capture(model, (torch.randn(3, 16),))
    assert pgo._CODE_STATE is None or pgo._CODE_STATE == state_before
    # a later compile on another shape is not made dynamic by the capture's shape
    graphs = []
    torch.compile(model, backend=lambda gm, ex: graphs.append(gm) or gm.forward)(torch.randn(5, 16))
    ph = [n for n in graphs[0].graph.nodes if n.op == "placeholder"]
    assert all(not isinstance(s, torch.SymInt) for n in ph for s in n.meta["example_value"].shape)


def test_outputs_only_on_request_and_compiled_modules_are_unwrapped():
    model = Lora()
    x = torch.randn(3, 16)
    assert capture(model, (x,)).outputs is None
    cap = capture(torch.compile(model), (x,), keep_outputs=True)
    torch.testing.assert_close(cap.outputs, model(x))
    values = [cap.graphs[0].value_of(n) for n in cap.graphs[0].placeholders]
    assert any(v is model.base.weight for v in values)


def test_bad_arguments_get_clear_errors():
    x = torch.randn(3, 16)
    with pytest.raises(TypeError, match=r"wrap a single tensor"):
        capture(Lora(), x)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        capture(lambda t: t, (x,))
    with pytest.raises(TypeError, match="example_kwargs"):
        capture(Lora(), (x,), example_kwargs=[1])
    with pytest.raises(ValueError, match="inputs of one forward"):
        capture(Lora())
