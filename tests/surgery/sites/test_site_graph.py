"""Tests of surgery/sites/site_graph.py: a module's own forward as a small fx graph that
computes exactly what the module computes, keeps every key, and survives copies."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from surgery import UnsupportedSiteError
from surgery.sites.site_graph import (
    SiteGraph,
    base_module,
    make_site_graph,
    plain_module,
    plain_weight_free,
    site_graph_at,
    site_graphs,
)

tf = pytest.importorskip("transformers")


def _layers() -> list[tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    return [
        (nn.Linear(8, 5), torch.randn(2, 3, 8)),
        (nn.Linear(8, 5, bias=False), torch.randn(4, 8)),
        (tf.pytorch_utils.Conv1D(5, 8), torch.randn(2, 3, 8)),
        (nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), torch.randn(2, 3, 6, 6)),
        (nn.Embedding(10, 4, padding_idx=0), torch.tensor([[0, 3, 9]])),
    ]


@pytest.mark.parametrize("index", range(5))
def test_a_site_graph_computes_exactly_what_its_module_computes(index: int) -> None:
    module, x = _layers()[index]
    sg = make_site_graph(module, "layer", who="test")
    assert isinstance(sg, SiteGraph) and type(base_module(sg)) is type(module)
    assert torch.equal(sg(x), module(x))
    assert dict(sg.named_parameters()).keys() == dict(module.named_parameters()).keys()
    for name, param in module.named_parameters():
        assert sg.get_parameter(name) is param, "the very same Parameter objects"
    assert all(t.device.type == "meta" for t in sg.template.parameters())


def test_plain_attributes_hooks_and_unused_children_are_kept() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 2)  # forward never calls it
            self.register_buffer("scale", torch.tensor(2.0))
            self.register_buffer("cache", torch.zeros(1), persistent=False)
            self.width = 4

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * self.scale

    block = Block()
    calls = []
    block.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    sg = make_site_graph(block, "block", who="test")
    assert set(sg.state_dict()) == set(block.state_dict()) == {
        "fc.weight", "fc.bias", "unused.weight", "unused.bias", "scale"}
    assert sg.unused is block.unused and sg.width == 4
    x = torch.randn(3, 4)
    assert torch.equal(sg(x), block(x))
    assert len(calls) == 2, "the module's forward hooks run on the site graph too"


def test_a_module_that_does_not_return_one_tensor_is_refused() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.fc(x), x

    with pytest.raises(UnsupportedSiteError, match=r"test: pair \(Pair\) returns tuple, not one "
                                                   r"tensor.*Way out: select the layers inside"):
        make_site_graph(Pair(), "pair", who="test")


def test_an_untraceable_module_is_refused_with_the_way_out() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(UnsupportedSiteError, match=r"cannot be turned into a site graph: torch.fx "
                                                   r"cannot trace its forward.*pattern='b\.\*'"):
        make_site_graph(Branchy(), "b", who="test")


def _mlp_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6), nn.Linear(6, 6))


def test_site_graph_at_installs_under_every_name_and_returns_the_root() -> None:
    model = _mlp_model()
    model.alias = model[0]
    x = torch.randn(2, 6)
    want = model(x)
    root, sg = site_graph_at(model, "0", who="test")
    assert root is model and model[0] is sg and model.alias is sg
    assert torch.equal(model(x), want)
    again = site_graph_at(model, "alias", who="test")[1]
    assert again is sg, "a site graph already there is reused"
    lin = nn.Linear(3, 3)
    root, sg = site_graph_at(lin, "", who="test")
    assert root is sg and isinstance(root, SiteGraph), "a model that is one layer is replaced"


def test_copies_keep_graph_tags_template_and_outputs() -> None:
    model = _mlp_model()
    _, sg = site_graph_at(model, "2", who="test")
    sg.base_node.meta["surgery_test"] = {"kept": True}
    sg.base_node.meta["other"] = object()  # not a surgery tag: may be dropped by pickle
    x = torch.randn(2, 6)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)),
                   torch.load(buf, weights_only=False)):
        csg = copied[2]
        assert isinstance(csg, SiteGraph) and csg.site == "2"
        assert csg.base_node.meta["surgery_test"] == {"kept": True}
        assert type(csg.template) is nn.Linear and csg.template.weight.device.type == "meta"
        assert torch.equal(copied(x), model(x))
        assert csg.weight is not sg.weight


def test_plain_module_and_plain_weight_free_read_site_graphs_as_their_modules() -> None:
    model = _mlp_model()
    site_graph_at(model, "0", who="test")
    plain = plain_module(model[0])
    assert type(plain) is nn.Linear and plain.weight is model[0].weight
    view = plain_weight_free(model)
    assert [type(m) for m in view] == [nn.Linear, nn.GELU, nn.Linear, nn.Linear]
    assert all(p.device.type == "meta" for p in view.parameters())
    assert [q for q, _ in site_graphs(model)] == ["0"]


def test_a_sub_layer_site_graph_keeps_its_layers_as_calls() -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    mlp = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                   num_key_value_heads=2, hidden_act="silu"))
    sg = make_site_graph(mlp, "mlp", who="test")
    calls = [n.target for n in sg.graph.nodes if n.op == "call_module"]
    assert calls == ["gate_proj", "up_proj", "down_proj"]
    x = torch.randn(2, 5, 16)
    assert torch.equal(sg(x), mlp(x))
    assert plain_module(sg).down_proj is mlp.down_proj


class DropAttention(nn.Module):
    """Attention whose own forward picks dropout values by ``self.training``."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.p = 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split(16, dim=-1)
        y = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=self.p if self.training else 0.0, is_causal=True)
        return torch.nn.functional.dropout(y, 0.3, self.training)


def test_values_picked_by_training_mode_are_read_at_run_time() -> None:
    torch.manual_seed(0)
    attn = DropAttention()
    x = torch.randn(2, 5, 16)
    for traced_in in (True, False):
        sg = make_site_graph(attn.train(traced_in), "attn", who="test")
        for mode in (True, False):
            sg.train(mode)
            attn.train(mode)
            torch.manual_seed(1)
            got = sg(x)
            torch.manual_seed(1)
            assert torch.equal(got, attn(x)), f"traced in train={traced_in}, run in train={mode}"
    copied = pickle.loads(pickle.dumps(sg)).train()
    torch.manual_seed(1)
    got = copied(x)
    torch.manual_seed(1)
    assert torch.equal(got, attn.train()(x))
