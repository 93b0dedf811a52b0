"""Tests of visualize/graph.py, walk.py, expand.py and collapse.py: the whole-model graph,
the map with every adapted call expanded into its site graph."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
from torch import nn
from viz_models import IDS_SHAPE, SITE, D, TinyNet, example_ids, wrap_by_hand

from surgery import IA3Pass, LoRAPass, apply_passes
from surgery.map.trace import trace
from surgery.pass_base import Change, PassResult
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
LORA_PARTS = ("lora_dropout_default", "lora_a_default", "lora_b_default", "mul", "add")


def lora_ids(site: str) -> list[str]:
    """Ids of the nodes LoRA inserts at ``site``: dropout, A, B, scale, add."""
    return [f"{site}:{name}" for name in LORA_PARTS]


def _inserted(graph: nx.DiGraph) -> list[str]:
    return [n for n, a in graph.nodes(data=True) if a["pass_name"]]


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


def test_models_are_not_changed(tiny: TinyNet, tiny_adapted: nn.Module, snapshot) -> None:
    tiny.eval()
    plain, adapted = snapshot(tiny), snapshot(tiny_adapted)
    to_networkx(tiny, (example_ids(),), depth=2)
    to_networkx(tiny_adapted, depth=2)
    plain.assert_unchanged(tiny)
    adapted.assert_unchanged(tiny_adapted)
    assert not hasattr(tiny, "_surgery")
    x = example_ids()
    assert torch.equal(tiny_adapted(x), tiny(x))  # LoRA's B is zero at init


def test_a_map_is_drawn_as_it_is(tiny: TinyNet) -> None:
    graph_map = trace(tiny, (example_ids(),))
    nodes_before = [n.name for n in graph_map.graph.nodes]
    g = to_networkx(graph_map)
    assert list(g.nodes) == FX_IDS
    assert [n.name for n in graph_map.graph.nodes] == nodes_before
    # the map's tensors are on the meta device: shapes and flags, counted all the same
    assert g.nodes["/blocks_0_attn_q_proj"]["params"][0] == {
        "name": "blocks.0.attn.q_proj.weight", "shape": (D, D), "numel": 64, "trainable": True,
        "rewritten": None}
    assert (g.graph["name"], g.graph["param_total"], g.graph["param_trainable"]) == (
        "TinyNet", 1184, 1184)


def test_export_front_end_is_inlined_across_module_boundaries(branchy_map: nn.Module) -> None:
    g = to_networkx(branchy_map)
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


def test_lora_site_graph_is_expanded_in_place(tiny_adapted: nn.Module) -> None:
    g = to_networkx(tiny_adapted)
    lora = lora_ids(SITE)
    at = FX_IDS.index("/blocks_0_attn_q_proj")
    # the map's nodes keep their ids; the branch is drawn before the base call, the add after
    assert list(g.nodes) == FX_IDS[:at] + lora[:4] + [FX_IDS[at], lora[4]] + FX_IDS[at + 1:]
    assert _inserted(g) == lora
    a = g.nodes[f"{SITE}:lora_a_default"]
    assert (a["op"], a["label"], a["module"], a["module_type"]) == (
        "call_module", "lora_A.default", f"{SITE}.lora_A.default", "LoRAProjection")
    assert a["provenance"] == {"pass": "lora", "site": SITE, "role": None, "adapter": "default",
                               "part": "lora_A"}
    assert a["params"] == ({"name": f"{SITE}.lora_A.default.weight", "shape": (2, D), "numel": 16,
                            "trainable": True, "rewritten": None},)
    assert (a["param_state"], a["cluster"], a["graph"], a["adapter"]) == (
        "trainable", "blocks.0.attn", SITE, True)
    assert a["shape"] == (*IDS_SHAPE, 2) and a["dtype"] == "float32"
    add = g.nodes[f"{SITE}:add"]
    assert (add["op"], add["label"], add["pass_name"], add["provenance"]["part"]) == (
        "call_function", "add", "lora", "add")
    base = g.nodes["/blocks_0_attn_q_proj"]  # the site graph reads as the Linear it replaced
    assert (base["module_type"], base["param_state"], base["pass_name"]) == (
        "Linear", "frozen", None)
    assert [p["name"] for p in base["params"]] == [f"{SITE}.weight", f"{SITE}.bias"]
    # wiring: input -> dropout -> A -> B -> scale -> add <- base; the add feeds the softmax
    chain = ["/blocks_0_ln", *lora]
    assert all(g.has_edge(u, v) for u, v in zip(chain, chain[1:]))
    assert set(g.predecessors(f"{SITE}:add")) == {"/blocks_0_attn_q_proj", f"{SITE}:mul"}
    assert set(g.successors("/blocks_0_attn_q_proj")) == {f"{SITE}:add"}
    assert set(g.predecessors("/softmax")) == {f"{SITE}:add"}
    assert g.edges[f"{SITE}:lora_a_default", f"{SITE}:lora_b_default"]["shape"] == (*IDS_SHAPE, 2)
    # every parameter counted once, from the adapted model's own tensors
    assert (g.graph["param_total"], g.graph["param_trainable"]) == (1184 + 32, 32)
    assert g.graph["name"] == "TinyNet"
    assert g.graph["module_types"][SITE] == "Linear"
    assert not any(".lora_" in path for path in g.graph["module_types"])


def test_passes_composed_on_one_site_and_an_input_scaling(tiny: TinyNet) -> None:
    adapted = apply_passes(tiny, [
        LoRAPass(pattern=SITE, rank=2),
        IA3Pass(pattern=[SITE, "blocks.0.mlp.2"], feedforward="blocks.0.mlp.2"),
    ], example_inputs=(example_ids(),))
    g = to_networkx(adapted)
    q_ia3, ff_ia3 = f"{SITE}:ia3_default", "blocks.0.mlp.2:ia3_default"
    q_l, ff_l = f"{SITE}:ia3_l_default", "blocks.0.mlp.2:ia3_l_default"  # the vectors l
    assert sorted(_inserted(g)) == sorted([*lora_ids(SITE), q_l, q_ia3, ff_l, ff_ia3])
    # IA3 scales the output of the layer as LoRA adapted it
    assert set(g.predecessors(q_ia3)) == {f"{SITE}:add", q_l}
    assert set(g.predecessors("/softmax")) == {q_ia3}
    # on a feed-forward output layer it scales the input: the base layer reads the scaled value
    assert set(g.predecessors(ff_ia3)) == {"/blocks_0_mlp_1", ff_l}
    assert set(g.predecessors("/blocks_0_mlp_2")) == {ff_ia3}
    assert set(g.successors("/blocks_0_mlp_2")) == {"/add_1"}
    node = g.nodes[ff_ia3]
    assert node["shape"] == (*IDS_SHAPE, 2 * D) and node["cluster"] == "blocks.0.mlp"
    assert node["params"] == ()  # the scaling module owns no parameter: l is read beside it
    vector = g.nodes[ff_l]
    assert (vector["op"], vector["label"], vector["cluster"]) == (
        "get_attr", "ia3_l.default", "blocks.0.mlp")
    assert [(p["name"], p["shape"], p["trainable"]) for p in vector["params"]] == [
        ("blocks.0.mlp.2.ia3_l.default", (1, 2 * D), True)]  # PEFT's name and (1, in) shape


def test_sub_layer_site_with_a_site_inside_fx(tiny: TinyNet) -> None:
    adapted = apply_passes(tiny, [LoRAPass(pattern="blocks.0.mlp.0", rank=2)],
                           example_inputs=(example_ids(),))
    wrap_by_hand(adapted, "blocks.0.mlp", D)
    x = example_ids()
    assert torch.equal(adapted(x), tiny(x))  # both branches are zero at init
    g = to_networkx(adapted)
    bottleneck, add = "blocks.0.mlp:bottleneck_default", "blocks.0.mlp:add"
    assert _inserted(g) == [*lora_ids("blocks.0.mlp.0"), bottleneck, add]
    assert [n for n in g.nodes if n not in _inserted(g)] == FX_IDS  # torch.fx inlined mlp
    # the nested LoRA site sits at its own call, inside the sub-layer
    assert set(g.predecessors("/blocks_0_mlp_1")) == {"blocks.0.mlp.0:add"}
    # the sub-layer's result feeds the bottleneck and the residual; the block reads the sum
    assert set(g.predecessors(bottleneck)) == {"/blocks_0_mlp_2"}
    assert set(g.predecessors(add)) == {"/blocks_0_mlp_2", bottleneck}
    assert set(g.predecessors("/add_1")) == {"/add", add}
    node = g.nodes[bottleneck]
    assert (node["pass_name"], node["module_type"], node["cluster"], node["shape"]) == (
        "adapter", "Bottleneck", "blocks.0", (*IDS_SHAPE, D))
    assert [p["name"] for p in node["params"]] == [
        f"blocks.0.mlp.bottleneck.default.{p}" for p in ("down.weight", "down.bias", "up.weight",
                                                         "up.bias")]
    assert g.graph["module_types"]["blocks.0.mlp"] == "Sequential"


def test_sub_layer_site_with_a_site_inside_export(branchy: TinyNet, branchy_map: nn.Module) -> None:
    adapted = apply_passes(branchy, [LoRAPass(pattern="blocks.0.mlp.0", rank=2)],
                           example_inputs=(example_ids(),))
    wrap_by_hand(adapted, "blocks.0.mlp", D)
    g = to_networkx(adapted)
    assert g.graph["frontend"] == "export"
    bottleneck, add = "blocks.0.mlp:bottleneck_default", "blocks.0.mlp:add"
    assert _inserted(g) == [*lora_ids("blocks.0.mlp.0"), bottleneck, add]
    assert [n for n in g.nodes if n not in _inserted(g)] == list(to_networkx(branchy_map).nodes)
    assert set(g.predecessors(bottleneck)) == {"blocks.0.mlp/_2"}
    assert set(g.predecessors(add)) == {"blocks.0.mlp/_2", bottleneck}
    assert set(g.predecessors("blocks.0/add_1")) == {"blocks.0/add", add}
    assert g.nodes[bottleneck]["shape"][2] == D  # batch and sequence stay symbolic
    assert g.nodes["blocks.0.mlp.0:lora_a_default"]["shape"][2] == 2


def test_whole_model_sites() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4)
    linear = nn.Linear(4, 3)
    g = to_networkx(apply_passes(linear, [LoRAPass(pattern="*", rank=2)], example_inputs=(x,)))
    assert list(g.nodes) == ["/input_1", *lora_ids("")[:4], "/weight", "/bias", "/linear",
                             ":add", "/output"]
    assert set(g.predecessors("/output")) == {":add"}
    assert g.nodes[":lora_a_default"]["label"] == "lora_A.default"
    assert g.nodes["/weight"]["params"][0]["trainable"] is False
    assert g.graph["name"] == "Linear" and g.graph["param_trainable"] == 2 * 4 + 3 * 2

    g = to_networkx(apply_passes(linear, [IA3Pass(pattern="*", feedforward="*")],
                                 example_inputs=(x,)))
    assert set(g.predecessors("/linear")) == {":ia3_default", "/weight", "/bias"}
    assert set(g.predecessors(":ia3_default")) == {"/input_1", ":ia3_l_default"}

    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    adapted = apply_passes(mlp, [LoRAPass(pattern=["0", "2"], rank=2)], example_inputs=(x,))
    root = wrap_by_hand(adapted, "", 3)  # the whole model becomes one site graph
    assert torch.equal(root(x), mlp(x))
    g = to_networkx(root, (x,))
    assert _inserted(g) == [*lora_ids("0"), *lora_ids("2"), ":bottleneck_default", ":add"]
    assert set(g.predecessors("/_1")) == {"0:add"}
    assert set(g.predecessors(":bottleneck_default")) == {"2:add"}
    assert set(g.predecessors("/output")) == {":add"}
    assert g.graph["name"] == "Sequential"


def test_a_site_called_twice_is_drawn_at_each_call() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(D, D)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(self.lin(x))

    adapted = apply_passes(Twice(), [LoRAPass(pattern="lin", rank=2)],
                           example_inputs=(torch.randn(2, D),))
    g = to_networkx(adapted)
    assert _inserted(g) == lora_ids("lin") + lora_ids("lin@1")
    assert set(g.predecessors("/lin_1")) == {"lin:add"}
    assert set(g.predecessors("lin@1:lora_dropout_default")) == {"lin:add"}
    assert set(g.predecessors("/output")) == {"lin@1:add"}


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
    lora = lora_ids(SITE)
    assert list(g.nodes) == ["/ids", "/embed", "blocks.0/*", *lora, "blocks.1/*", "/head",
                             "/output"]
    assert g.nodes["blocks.0/*"]["adapted"] == ("lora",)
    assert g.nodes["blocks.0/*"]["cluster"] == "blocks.0"
    assert all(g.nodes[n]["cluster"] == "blocks.0" for n in lora)
    assert g.nodes["blocks.1/*"]["adapted"] == ()
    assert g.has_edge("blocks.0/*", lora[0]) and g.has_edge("blocks.0/*", lora[4])
    assert g.has_edge(lora[4], "blocks.0/*")
    # the frozen base weights are summed, the adapter's own stay on the adapter nodes
    assert g.nodes["blocks.0/*"]["param_state"] == "frozen"
    frozen = [p for p in tiny_adapted.blocks[0].parameters() if not p.requires_grad]
    assert g.nodes["blocks.0/*"]["numel"] == sum(p.numel() for p in frozen) == 512


def test_depth_on_export_front_end(branchy_map: nn.Module) -> None:
    g = to_networkx(branchy_map, depth=2)
    assert list(g.nodes) == ["/ids", "/embed", "blocks.0/*", "blocks.1/*", "/head", "/output"]
    assert g.nodes["blocks.0/*"]["module_type"] == "Block"


@pytest.mark.parametrize("depth", [0, -1, 1.5, True])
def test_depth_must_be_positive_int(tiny: TinyNet, depth: object) -> None:
    with pytest.raises(ValueError, match="depth must be a positive int"):
        to_networkx(tiny, depth=depth)  # type: ignore[arg-type]


def test_rejects_non_modules() -> None:
    with pytest.raises(TypeError, match="takes an nn.Module"):
        to_networkx("model")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["serial", "parallel"])
def test_bottleneck_adapter_passes_on_a_sub_layer(tiny: TinyNet, kind: str) -> None:
    from surgery import ParallelAdapterPass, SerialAdapterPass

    cls = SerialAdapterPass if kind == "serial" else ParallelAdapterPass
    adapted = apply_passes(tiny, [cls(pattern="blocks.0.mlp", bottleneck=2)],
                           example_inputs=(example_ids(),))
    g = to_networkx(adapted)
    assert [n for n in g.nodes if n not in _inserted(g)] == FX_IDS
    slot = "adapter_default" if kind == "serial" else "parallel_adapter_default"
    down, act, up = (f"blocks.0.mlp:{slot}_{part}" for part in ("down", "act", "up"))
    add = "blocks.0.mlp:add"
    # serial reads the sub-layer's result (Houlsby), parallel its input (He et al.)
    assert set(g.predecessors(down)) == ({"/blocks_0_mlp_2"} if kind == "serial" else {"/add"})
    assert set(g.successors(down)) == {act} and set(g.successors(act)) == {up}
    assert set(g.predecessors("/add_1")) == {"/add", add}
    assert "/blocks_0_mlp_2" in set(g.predecessors(add))
    for nid in (down, act, up, add):
        assert (g.nodes[nid]["pass_name"], g.nodes[nid]["cluster"]) == (f"{kind}_adapter",
                                                                       "blocks.0")
    assert g.nodes[down]["shape"] == (*IDS_SHAPE, 2)
    assert g.nodes[up]["param_state"] == "trainable"


def test_prefix_site_graph_feeds_the_attention_op() -> None:
    from surgery import PrefixPass
    from surgery.zoo import load_model

    spec = load_model("builtin")
    adapted = apply_passes(spec.model, [PrefixPass(length=2)], example_inputs=spec.example_inputs,
                           example_kwargs=spec.example_kwargs)
    g = to_networkx(adapted)
    site = "layers.0.attn"
    key, cat_key, cat_value, mask = (f"{site}:{n}" for n in (
        "prefix_default_key", "cat_key", "cat_value", "mask_1"))
    # the attention op reads the concatenated keys and values and the extended mask
    assert set(g.predecessors("/scaled_dot_product_attention")) == {"/transpose", cat_key,
                                                                   cat_value, mask}
    assert set(g.predecessors(cat_key)) == {key, "/transpose_1"}
    assert set(g.predecessors(key)) == {"/transpose_1"}
    assert g.nodes[key]["pass_name"] == "prefix"
    assert g.nodes[cat_key]["shape"][2] == g.nodes["/transpose_1"]["shape"][2] + 2
    plain = to_networkx(spec.model, spec.example_inputs, spec.example_kwargs)
    assert [n for n in g.nodes if n not in _inserted(g)] == list(plain.nodes)


def test_map_nodes_inside_an_adapter_module_take_its_pass() -> None:
    from viz_models import Bottleneck

    class WithAdapter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(D, D)
            self.extra = Bottleneck(D, 2, site="lin")  # called by the model's own forward

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.lin(x)
            return h + self.extra(h)

    g = to_networkx(WithAdapter(), (torch.randn(2, D),))
    assert _inserted(g) == ["/extra_down", "/relu", "/extra_up"]
    assert g.nodes["/relu"]["provenance"] == {"pass": "adapter", "site": "lin", "role": None,
                                              "adapter": "default"}
    assert g.nodes["/lin"]["pass_name"] is None and g.nodes["/add"]["pass_name"] is None
