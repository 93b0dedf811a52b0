"""Tests of visualize/graph.py (and collapse.py): the whole-model networkx graph."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
from torch import nn

from viz_models import D, IDS_SHAPE, TinyNet, example_ids
from surgery.pass_base import Change, PassResult
from surgery.map.trace import trace
from visualize import to_networkx

FX_IDS = [
    "/ids", "/embed",
    "/blocks_0_ln", "/blocks_0_attn_q_proj", "/softmax", "/blocks_0_attn_v_proj", "/mul",
    "/view", "/blocks_0_attn_o_proj", "/add", "/blocks_0_mlp_0", "/blocks_0_mlp_1",
    "/blocks_0_mlp_2", "/add_1",
    "/blocks_1_ln", "/blocks_1_attn_q_proj", "/softmax_1", "/blocks_1_attn_v_proj", "/mul_1",
    "/view_1", "/blocks_1_attn_o_proj", "/add_2", "/blocks_1_mlp_0", "/blocks_1_mlp_1",
    "/blocks_1_mlp_2", "/add_3",
    "/head", "/output",
]


def test_fx_graph_has_one_node_per_meaningful_fx_node(tiny: TinyNet) -> None:
    g = to_networkx(tiny, (example_ids(),))
    assert g.graph["frontend"] == "fx"
    assert g.graph["name"] == "TinyNet"
    # x.shape and its getitems (plumbing for the view) are gone; everything else is there.
    assert list(g.nodes) == FX_IDS
    assert g.number_of_edges() == 33
    assert nx.is_directed_acyclic_graph(g)
    assert nx.has_path(g, "/ids", "/output")
    assert set(g.predecessors("/view")) == {"/mul"}
    assert set(g.predecessors("/add")) == {"/embed", "/blocks_0_attn_o_proj"}


def test_fx_node_attributes(tiny: TinyNet) -> None:
    g = to_networkx(tiny, (example_ids(),))
    q = g.nodes["/blocks_0_attn_q_proj"]
    assert q["op"] == "call_module"
    assert q["module"] == "blocks.0.attn.q_proj"
    assert q["module_type"] == "Linear"
    assert q["target"] == "blocks.0.attn.q_proj"
    assert q["label"] == "q_proj"
    assert q["cluster"] == "blocks.0.attn"
    assert q["shape"] == (*IDS_SHAPE, D)
    assert q["dtype"] == "float32"
    assert q["params"] == (
        {"name": "blocks.0.attn.q_proj.weight", "shape": (D, D), "numel": 64, "trainable": True,
         "rewritten": None},
        {"name": "blocks.0.attn.q_proj.bias", "shape": (D,), "numel": 8, "trainable": True,
         "rewritten": None},
    )
    assert (q["numel"], q["trainable_numel"], q["param_state"]) == (72, 72, "trainable")
    assert q["provenance"] is None and q["pass_name"] is None and q["adapter"] is False
    soft = g.nodes["/softmax"]
    assert (soft["op"], soft["target"], soft["label"]) == ("call_function", "torch.softmax", "softmax")
    assert soft["params"] == () and soft["param_state"] == "none"
    assert g.nodes["/add"]["cluster"] == "blocks.0"
    assert g.nodes["/ids"]["dtype"] == "int64"
    assert g.nodes["/blocks_0_mlp_0"]["shape"] == (*IDS_SHAPE, 2 * D)
    assert g.edges["/blocks_0_mlp_0", "/blocks_0_mlp_1"] == {"shape": (*IDS_SHAPE, 2 * D),
                                                            "dtype": "float32"}
    assert g.graph["module_types"]["blocks.0"] == "Block"
    assert g.graph["module_types"]["blocks.0.attn"] == "Attention"


def test_fx_without_inputs_has_no_shapes(tiny: TinyNet) -> None:
    g = to_networkx(tiny)
    assert list(g.nodes) == FX_IDS
    assert all(attrs["shape"] is None for _, attrs in g.nodes(data=True))


def test_caller_model_is_not_changed(tiny: TinyNet, tiny_adapted: nn.Module, snapshot) -> None:
    tiny.eval()
    plain, traced = snapshot(tiny), snapshot(tiny_adapted)
    to_networkx(tiny, (example_ids(),), depth=2)
    to_networkx(tiny_adapted, depth=2)
    plain.assert_unchanged(tiny)
    traced.assert_unchanged(tiny_adapted)
    assert not hasattr(tiny, "_surgery")


def test_traced_model_is_used_as_is(tiny: TinyNet) -> None:
    traced = trace(tiny, (example_ids(),))
    nodes_before = [n.name for n in traced.graph.nodes]
    g = to_networkx(traced)
    assert list(g.nodes) == FX_IDS
    assert [n.name for n in traced.graph.nodes] == nodes_before


def test_export_front_end_is_inlined_across_module_boundaries(branchy_traced: nn.Module) -> None:
    g = to_networkx(branchy_traced)
    assert g.graph["frontend"] == "export"
    linears = sorted(a["module"] for _, a in g.nodes(data=True)
                     if a["op"] == "call_module" and a["module_type"] == "Linear")
    assert linears == sorted(f"blocks.{i}.{name}" for i in (0, 1)
                             for name in ("attn.q_proj", "attn.v_proj", "attn.o_proj",
                                          "mlp.0", "mlp.2")) + ["head"]
    # every inner linear is reachable from the model input and reaches the output
    for nid, attrs in g.nodes(data=True):
        if attrs["op"] == "call_module":
            assert nx.has_path(g, "/ids", nid) and nx.has_path(g, nid, "/output"), nid
    # caller argument -> callee placeholder, callee result -> caller's user
    assert g.has_edge("/embed", "blocks.0/embedding")
    assert g.has_edge("blocks.0/ln", "blocks.0.attn/layer_norm")
    assert g.has_edge("blocks.0.attn/o_proj", "blocks.0/add")
    assert g.has_edge("blocks.1/add_3", "/head")
    crossing = [(u, v) for u, v in g.edges if g.nodes[u]["graph"] != g.nodes[v]["graph"]]
    assert len(crossing) == 15  # 6 per block, 3 between root and blocks
    # no shape plumbing and no inlined call nodes survive
    assert not [n for n, a in g.nodes(data=True) if "sym_size" in a["target"]]
    assert "blocks.0" not in {a.get("module") for _, a in g.nodes(data=True)}
    q = g.nodes["blocks.1.attn/q_proj"]
    assert (q["module"], q["cluster"], q["graph"]) == ("blocks.1.attn.q_proj", "blocks.1.attn",
                                                      "blocks.1.attn")
    assert len(q["shape"]) == 3 and q["shape"][2] == D  # batch and sequence are symbolic
    assert g.graph["module_types"]["blocks.0.attn"] == "Attention"


def test_export_plain_model_gets_traced(branchy: TinyNet) -> None:
    g = to_networkx(branchy, (example_ids(),))
    assert g.graph["frontend"] == "export"
    assert g.number_of_nodes() == 36


def test_tuple_outputs_are_bypassed_with_the_element_shape() -> None:
    class WithMHA(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(D, 2, batch_first=True)
            self.out = nn.Linear(D, D)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y, _ = self.mha(x, x, x)
            return self.out(y)

    g = to_networkx(WithMHA(), (torch.randn(2, 3, D),))
    assert list(g.nodes) == ["/x", "/mha", "/out", "/output"]
    assert g.edges["/mha", "/out"]["shape"] == (2, 3, D)


def test_export_pytree_plumbing_around_attention_is_resolved() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(D, 2, batch_first=True)
            self.out = nn.Linear(D, D)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] > 0:
                x = x + self.mha(x, x, x, need_weights=False)[0]
            return self.out(x)

    g = to_networkx(Branchy(), (torch.randn(2, 3, D),))
    assert g.graph["frontend"] == "export"
    # tree_unflatten / tree_flatten_spec and their getitems (None masks, flags) are gone
    assert list(g.nodes) == ["/x", "/mha", "/add", "/out", "/output"]
    assert sorted(g.edges) == [("/add", "/out"), ("/mha", "/add"), ("/out", "/output"),
                               ("/x", "/add"), ("/x", "/mha")]
    assert g.nodes["/mha"]["module_type"] == "MultiheadAttention"
    assert g.edges["/mha", "/add"]["shape"][2] == D


def test_adapted_model_provenance_and_trainable(tiny_adapted: nn.Module) -> None:
    g = to_networkx(tiny_adapted)
    inserted = {n: a for n, a in g.nodes(data=True) if a["pass_name"]}
    assert set(inserted) == {"/blocks_0_attn_q_proj_lora_default", "/add_4"}
    lora = inserted["/blocks_0_attn_q_proj_lora_default"]
    assert lora["adapter"] is True
    assert lora["label"] == "lora.default"
    assert lora["module_type"] == "FakeLoRA"
    assert lora["provenance"] == {"pass": "lora", "site": "blocks.0.attn.q_proj", "role": "query",
                                  "adapter": "default"}
    assert [(p["name"], p["shape"], p["numel"], p["trainable"]) for p in lora["params"]] == [
        ("blocks.0.attn.q_proj.lora.default.A", (2, D), 16, True),
        ("blocks.0.attn.q_proj.lora.default.B", (D, 2), 16, True),
    ]
    assert lora["param_state"] == "trainable"
    assert lora["cluster"] == "blocks.0.attn"
    base = g.nodes["/blocks_0_attn_q_proj"]
    assert [p["name"] for p in base["params"]] == ["blocks.0.attn.q_proj.weight",
                                                 "blocks.0.attn.q_proj.bias"]
    assert base["param_state"] == "frozen"
    assert set(g.successors("/blocks_0_attn_q_proj")) == {"/add_4"}
    assert set(g.predecessors("/add_4")) == {"/blocks_0_attn_q_proj",
                                             "/blocks_0_attn_q_proj_lora_default"}
    assert set(g.successors("/add_4")) == {"/softmax"}


def test_rewritten_weights_come_from_history(tiny_adapted: nn.Module) -> None:
    name = "blocks.1.attn.o_proj.weight"
    change = Change("param_rewritten", "merge", "blocks.1.attn.o_proj", name)
    tiny_adapted._surgery.history.append(PassResult(tiny_adapted, True, (change,), "merge"))
    g = to_networkx(tiny_adapted)
    node = g.nodes["/blocks_1_attn_o_proj"]
    assert node["rewritten"] == ("merge",)
    assert [p["rewritten"] for p in node["params"]] == ["merge", None]
    assert g.graph["rewritten"] == {name: "merge"}


def test_depth_collapses_module_subtrees(tiny: TinyNet) -> None:
    g = to_networkx(tiny, (example_ids(),), depth=2)
    assert list(g.nodes) == ["/ids", "/embed", "blocks.0/*", "blocks.1/*", "/head", "/output"]
    assert sorted(g.edges) == [("/embed", "blocks.0/*"), ("/head", "/output"), ("/ids", "/embed"),
                               ("blocks.0/*", "blocks.1/*"), ("blocks.1/*", "/head")]
    block = g.nodes["blocks.0/*"]
    assert block["op"] == "module" and block["module_type"] == "Block"
    assert block["collapsed"] == 12
    assert block["numel"] == sum(p.numel() for p in tiny.blocks[0].parameters())
    assert block["cluster"] == "blocks" and block["adapted"] == ()
    assert g.edges["blocks.0/*", "blocks.1/*"]["shape"] == (*IDS_SHAPE, D)
    assert g.graph["depth"] == 2
    g1 = to_networkx(tiny, depth=1)
    assert list(g1.nodes) == ["/ids", "/embed", "blocks/*", "/head", "/output"]
    assert g1.nodes["blocks/*"]["collapsed"] == 24


def test_depth_keeps_inserted_nodes_visible(tiny_adapted: nn.Module) -> None:
    g = to_networkx(tiny_adapted, depth=2)
    assert list(g.nodes) == ["/ids", "/embed", "blocks.0/*", "/blocks_0_attn_q_proj_lora_default",
                             "/add_4", "blocks.1/*", "/head", "/output"]
    assert g.nodes["blocks.0/*"]["adapted"] == ("lora",)
    assert g.nodes["blocks.0/*"]["cluster"] == "blocks.0"
    assert g.nodes["/add_4"]["cluster"] == "blocks.0"
    assert g.nodes["blocks.1/*"]["adapted"] == ()
    assert g.has_edge("blocks.0/*", "/blocks_0_attn_q_proj_lora_default")
    assert g.has_edge("/add_4", "blocks.0/*")
    # the frozen base weights are summed, the adapter's own stay on the adapter node
    assert g.nodes["blocks.0/*"]["param_state"] == "frozen"


def test_depth_on_export_front_end(branchy_traced: nn.Module) -> None:
    g = to_networkx(branchy_traced, depth=2)
    assert list(g.nodes) == ["/ids", "/embed", "blocks.0/*", "blocks.1/*", "/head", "/output"]
    assert g.nodes["blocks.0/*"]["module_type"] == "Block"


@pytest.mark.parametrize("depth", [0, -1, 1.5, True])
def test_depth_must_be_positive_int(tiny: TinyNet, depth: object) -> None:
    with pytest.raises(ValueError, match="depth must be a positive int"):
        to_networkx(tiny, depth=depth)  # type: ignore[arg-type]


def test_rejects_non_modules() -> None:
    with pytest.raises(TypeError, match="takes an nn.Module"):
        to_networkx("model")  # type: ignore[arg-type]
