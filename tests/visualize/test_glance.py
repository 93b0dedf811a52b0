"""Every pass is drawn the way a teacher would draw it, and the colours mean one thing.

On the built-in transformer (2 blocks, width 64, 4 heads, ``(2, 16)`` token ids), one model
per pass, these checks read the pictures as a reader would:

- one colour scheme: each pass's nodes in its hue, frozen / trainable / rewritten / removed
  in theirs, the same in every picture, and the meanings told apart;
- a legend on every kind of picture (``render`` of a plain and an adapted model, both sides
  of ``render_diff``), listing the colours the picture uses;
- LoRA as a side path beside its layer, bottleneck adapters as down → act → up with their
  residual, a prefix as extra keys and values entering attention, IA³ as a scaling node;
- tensor shapes on the edges, and the pass that inserted a node named in its SVG tooltip.

The structure is checked on :func:`visualize.to_networkx` graphs with networkx, the colours
and tooltips on SVG drawn by Graphviz and parsed with ``xml.etree``.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from xml.etree import ElementTree

import networkx as nx
import pytest
import torch
from torch import nn

import surgery
from surgery import (
    IA3Pass,
    LoRAPass,
    MergeLoRAPass,
    ParallelAdapterPass,
    PrefixPass,
    SerialAdapterPass,
)
from visualize import Palette, RenderOptions, render, render_diff, to_networkx
from visualize.dot import REMOVED_BORDER, to_dot

pytestmark = pytest.mark.skipif(shutil.which("dot") is None,
                                reason="the Graphviz dot program is not installed")

SVG = "{http://www.w3.org/2000/svg}"
XLINK_TITLE = "{http://www.w3.org/1999/xlink}title"
PALETTE = Palette()
BOTTLENECK = 8
PREFIX = 4

# What a reader is told each colour means; written out, not read from the palette code.
HUES = {  # pass -> (fill, border) of the nodes it inserts
    "lora": ("#f9c6df", "#c2185b"),
    "ia3": ("#d9c8f0", "#6a3d9a"),
    "serial_adapter": ("#b9e6ec", "#0e7c86"),
    "parallel_adapter": ("#b9e6ec", "#0e7c86"),
    "prefix": ("#f6eaa0", "#9a8500"),
}
FROZEN, TRAINABLE, REWRITTEN = "#c6d4e6", "#b5e3a5", "#fdc086"

PASSES = {
    "lora": LoRAPass(pattern="layers.0.attn.q_proj", rank=4, alpha=8),
    "ia3": IA3Pass(pattern="layers.0.attn.k_proj"),
    "serial_adapter": SerialAdapterPass(pattern="layers.0.mlp", bottleneck=BOTTLENECK),
    "parallel_adapter": ParallelAdapterPass(pattern="layers.0.mlp", bottleneck=BOTTLENECK),
    "prefix": PrefixPass(length=PREFIX, pattern="layers.0.attn"),
}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def spec() -> surgery.zoo.ModelSpec:
    torch.manual_seed(0)
    return surgery.load_model("builtin")


@pytest.fixture(scope="module")
def adapted(spec) -> dict[str, nn.Module]:
    """The built-in model adapted by each pass alone, keyed by pass name."""
    return {name: surgery.apply_passes(spec.model, [step], example_inputs=spec.example_inputs)
            for name, step in PASSES.items()}


@pytest.fixture(scope="module")
def graphs(adapted) -> dict[str, nx.DiGraph]:
    return {name: to_networkx(model) for name, model in adapted.items()}


@pytest.fixture(scope="module")
def svgs(adapted, tmp_path_factory) -> dict[str, ElementTree.Element]:
    """Each adapted model drawn whole (no depth: every inserted node in place), parsed."""
    folder = tmp_path_factory.mktemp("glance")
    return {name: ElementTree.parse(render(model, folder / f"{name}.svg")).getroot()
            for name, model in adapted.items()}


@pytest.fixture(scope="module")
def lora_trained(spec) -> nn.Module:
    """LoRA on ``layers.0.attn.q_proj`` with ``B`` moved off zero, as after training."""
    model = surgery.apply_passes(spec.model, [PASSES["lora"]], example_inputs=spec.example_inputs)
    with torch.no_grad():
        for p in surgery.trainable_parameters(model):
            p.add_(0.01)
    return model


@pytest.fixture(scope="module")
def merged(lora_trained) -> nn.Module:
    return surgery.apply_passes(lora_trained, [MergeLoRAPass()])


# ----------------------------------------------------------------------------- helpers


def svg_nodes(root: ElementTree.Element) -> dict[str, dict[str, str]]:
    """``{node id: {"fill", "stroke", "tooltip", "text"}}`` of the nodes of a Graphviz SVG."""
    found = {}
    for group in root.iter(f"{SVG}g"):
        if group.get("class") != "node":
            continue
        title = group.findtext(f"{SVG}title")
        link = next(group.iter(f"{SVG}a"), None)
        shape = next(el for el in group.iter() if el.tag in (f"{SVG}path", f"{SVG}polygon",
                                                            f"{SVG}ellipse"))
        found[title] = {
            "fill": shape.get("fill"),
            "stroke": shape.get("stroke"),
            "tooltip": link.get(XLINK_TITLE) if link is not None else "",
            "text": "\n".join(t.text or "" for t in group.iter(f"{SVG}text")),
        }
    return found


def svg_edge_labels(root: ElementTree.Element) -> list[str]:
    return [t.text or "" for g in root.iter(f"{SVG}g") if g.get("class") == "edge"
            for t in g.iter(f"{SVG}text")]


def legend(root: ElementTree.Element) -> dict[str, str]:
    """``{legend text: fill}`` of a picture's legend entries."""
    return {attrs["text"]: attrs["fill"] for nid, attrs in svg_nodes(root).items()
            if nid.startswith("legend:")}


def inserted(graph: nx.DiGraph, pass_name: str) -> dict[str, str]:
    """``{part: node id}`` of the nodes ``pass_name`` inserted (one call of each part)."""
    parts: dict[str, str] = {}
    for nid, attrs in sorted(graph.nodes(data=True), key=lambda n: n[1]["order"]):
        if attrs.get("pass_name") == pass_name:
            parts.setdefault(attrs["provenance"]["part"], nid)
    return parts


def call_of(graph: nx.DiGraph, module: str) -> str:
    (nid,) = [n for n, a in graph.nodes(data=True)
              if a["op"] == "call_module" and a.get("module") == module]
    return nid


def dot_edges(source: str) -> set[tuple[str, str]]:
    return set(re.findall(r'^\s*"([^"]+)" -> "([^"]+)"', source, re.MULTILINE))


# ----------------------------------------------------------------------------- colours


@pytest.mark.parametrize("pass_name", list(PASSES))
def test_inserted_nodes_take_their_pass_hue_and_base_layers_stay_frozen_blue(
        svgs, graphs, pass_name: str) -> None:
    nodes = svg_nodes(svgs[pass_name])
    ours = [n for n, a in graphs[pass_name].nodes(data=True) if a.get("pass_name") == pass_name]
    assert ours
    for nid in ours:
        assert (nodes[nid]["fill"], nodes[nid]["stroke"]) == HUES[pass_name], nid
    # the layer the pass adapted is still drawn frozen
    assert nodes[call_of(graphs[pass_name], "layers.0.mlp.down_proj")]["fill"] == FROZEN
    assert nodes[call_of(graphs[pass_name], "lm_head")]["fill"] == FROZEN


def test_each_meaning_has_its_own_colour() -> None:
    pass_fills = {name: PALETTE.for_pass(name)[0] for name in HUES}
    assert pass_fills == {name: fill for name, (fill, _) in HUES.items()}
    # both adapter placements share the adapter hue; merging is drawn as rewriting
    assert PALETTE.for_pass("serial_adapter") == PALETTE.for_pass("parallel_adapter") \
        == PALETTE.for_pass("adapter")
    assert PALETTE.for_pass("merge_lora")[0] == PALETTE.for_pass("merge")[0] == REWRITTEN
    meanings = [FROZEN, TRAINABLE, REWRITTEN, REMOVED_BORDER,
                *{fill for fill, _ in HUES.values()}]
    assert len(set(meanings)) == len(meanings) == 8
    assert (PALETTE.frozen, PALETTE.trainable, PALETTE.rewritten) == (FROZEN, TRAINABLE, REWRITTEN)


def test_trainable_base_layer_is_drawn_green(spec, tmp_path: Path) -> None:
    model = surgery.apply_passes(spec.model, [surgery.TrainModulePass(pattern="lm_head")])
    nodes = svg_nodes(ElementTree.parse(render(model, tmp_path / "m.svg")).getroot())
    graph = to_networkx(model)
    assert nodes[call_of(graph, "lm_head")]["fill"] == TRAINABLE
    assert nodes[call_of(graph, "layers.0.mlp.down_proj")]["fill"] == FROZEN


def test_merged_weights_are_drawn_rewritten_and_the_branch_removed(lora_trained, merged,
                                                                   tmp_path: Path) -> None:
    root = ElementTree.parse(render(merged, tmp_path / "merged.svg")).getroot()
    nodes = svg_nodes(root)
    q_proj = call_of(to_networkx(merged), "layers.0.attn.q_proj")
    assert nodes[q_proj]["fill"] == REWRITTEN
    assert "rewritten by merge_lora" in nodes[q_proj]["text"]
    assert "rewritten by merge_lora" in nodes[q_proj]["tooltip"]
    assert legend(root)["rewritten weights"] == REWRITTEN
    assert not any(a.get("pass_name") == "lora" for _, a in to_networkx(merged).nodes(data=True))

    render_diff(lora_trained, merged, tmp_path / "diff")
    before = ElementTree.parse(tmp_path / "diff" / "before.svg").getroot()
    before_nodes = svg_nodes(before)
    lora_ids = list(inserted(to_networkx(lora_trained), "lora").values())
    for nid in lora_ids:  # the merged branch: gone from after, drawn removed in before
        assert before_nodes[nid]["stroke"] == REMOVED_BORDER, nid
    assert "removed (diff)" in legend(before)


# ----------------------------------------------------------------------------- legends


def test_a_legend_on_every_kind_of_picture(spec, adapted, svgs, tmp_path: Path) -> None:
    plain = ElementTree.parse(render(spec.model, tmp_path / "plain.svg")).getroot()
    render_diff(spec.model, adapted["lora"], tmp_path / "diff")
    pictures = {
        "plain": plain,
        "before": ElementTree.parse(tmp_path / "diff" / "before.svg").getroot(),
        "after": ElementTree.parse(tmp_path / "diff" / "after.svg").getroot(),
        **svgs,
    }
    for kind, root in pictures.items():
        entries = legend(root)
        assert {"frozen parameters": FROZEN, "trainable parameters": TRAINABLE,
                "rewritten weights": REWRITTEN}.items() <= entries.items(), kind
    assert not any(text.startswith("added by") for text in legend(plain))
    assert legend(pictures["after"])["added by lora"] == HUES["lora"][0]
    for name in PASSES:  # the legend names the pass whose nodes are drawn, in their hue
        assert legend(svgs[name])[f"added by {name}"] == HUES[name][0]


def test_no_legend_when_switched_off(adapted) -> None:
    graph = to_networkx(adapted["lora"])
    assert "cluster_legend" in to_dot(graph)
    assert "cluster_legend" not in to_dot(graph, RenderOptions(legend=False))


# ----------------------------------------------------------------------------- structure


def test_lora_is_a_side_path_beside_its_layer(graphs, adapted) -> None:
    graph = graphs["lora"]
    parts = inserted(graph, "lora")
    assert list(parts) == ["lora_dropout", "lora_A", "lora_B", "scale", "add"]
    base = call_of(graph, "layers.0.attn.q_proj")
    (layer_input,) = graph.predecessors(base)
    # one path from the layer's input, through A, B and the scale, to the add ...
    assert nx.shortest_path(graph, layer_input, parts["add"]) in (
        [layer_input, base, parts["add"]],
        [layer_input, parts["lora_dropout"], parts["lora_A"], parts["lora_B"], parts["scale"],
         parts["add"]])
    chain = [layer_input, parts["lora_dropout"], parts["lora_A"], parts["lora_B"],
             parts["scale"], parts["add"]]
    assert all(graph.has_edge(u, v) for u, v in zip(chain, chain[1:]))
    # ... which also receives the base layer's output, and feeds what the layer fed
    assert set(graph.predecessors(parts["add"])) == {base, parts["scale"]}
    assert set(graph.successors(base)) == {parts["add"]}
    assert graph.edges[parts["lora_A"], parts["lora_B"]]["shape"] == (2, 16, 4)  # rank 4
    # the DOT of the adapted layer draws the same edges
    edges = dot_edges(to_dot(graph))
    assert {(u, v) for u, v in zip(chain, chain[1:])} | {(base, parts["add"])} <= edges


@pytest.mark.parametrize("kind", ["serial_adapter", "parallel_adapter"])
def test_adapter_is_a_bottleneck_with_its_residual(graphs, kind: str) -> None:
    graph = graphs[kind]
    parts = inserted(graph, kind)
    block_out = call_of(graph, "layers.0.mlp.down_proj")  # the feed-forward block's output
    (block_in,) = graph.predecessors(call_of(graph, "layers.0.mlp.up_proj"))
    chain = [parts["down"], parts["act"], parts["up"]]
    assert all(graph.has_edge(u, v) for u, v in zip(chain, chain[1:]))
    assert graph.edges[parts["down"], parts["act"]]["shape"] == (2, 16, BOTTLENECK)
    (after_up,) = graph.successors(parts["up"])
    assert graph.edges[parts["up"], after_up]["shape"] == (2, 16, 64)
    # the residual: an add of the adapter's branch and the block's output
    branch_end = parts.get("scale", parts["up"])
    assert set(graph.predecessors(parts["add"])) == {block_out, branch_end}
    # serial reads the block's output; parallel reads the block's input
    reads = block_out if kind == "serial_adapter" else block_in
    assert list(graph.predecessors(parts["down"])) == [reads]


def test_prefix_enters_attention_as_extra_keys_and_values(graphs) -> None:
    graph = graphs["prefix"]
    parts = inserted(graph, "prefix")
    (attention,) = [n for n, a in graph.nodes(data=True)
                    if a["label"] == "scaled_dot_product_attention"
                    and a.get("cluster") == "layers.0.attn"]
    for which in ("key", "value"):
        cat, prefix = parts[f"cat_{which}"], parts[f"prefix_{which}"]
        assert graph.has_edge(cat, attention)
        assert graph.has_edge(prefix, cat)
        assert any(p["name"] == f"layers.0.attn.prefix.default.{which}"
                   and p["shape"] == (4, PREFIX, 16) for p in graph.nodes[prefix]["params"])
        (model_side,) = [p for p in graph.predecessors(cat) if p != prefix]
        assert graph.edges[model_side, cat]["shape"] == (2, 4, 16, 16)
        assert graph.edges[cat, attention]["shape"] == (2, 4, 16 + PREFIX, 16)
    # the attention op now reads the extended keys and values, not the model's own
    sources = set(graph.predecessors(attention))
    assert {parts["cat_key"], parts["cat_value"]} <= sources


def test_ia3_is_a_scaling_node_on_the_layer_output(graphs, svgs) -> None:
    graph = graphs["ia3"]
    parts = inserted(graph, "ia3")
    assert list(parts) == ["ia3_l", "ia3"]  # the vector l (a parameter), then the scaling
    vector, scale = parts["ia3_l"], parts["ia3"]
    k_proj = call_of(graph, "layers.0.attn.k_proj")
    assert list(graph.predecessors(scale)) == [k_proj, vector]
    assert list(graph.successors(k_proj)) == [scale]  # every use of k_proj is scaled
    assert graph.nodes[scale]["params"] == ()  # the scaling module owns no parameter
    (param,) = graph.nodes[vector]["params"]  # PEFT's name and (out, 1) shape
    assert (param["name"], param["shape"], param["trainable"]) == (
        "layers.0.attn.k_proj.ia3_l.default", (64, 1), True)
    assert graph.nodes[vector]["label"] == "ia3_l.default"
    (after,) = graph.successors(scale)
    assert graph.edges[k_proj, scale]["shape"] == graph.edges[scale, after]["shape"] == (2, 16, 64)
    assert graph.nodes[scale]["scaling"] == "output"
    assert "× l (output scaling)" in svg_nodes(svgs["ia3"])[scale]["text"]


# ----------------------------------------------------------------------------- shapes, tooltips


@pytest.mark.parametrize("pass_name", list(PASSES))
def test_shapes_on_edges(svgs, pass_name: str) -> None:
    labels = svg_edge_labels(svgs[pass_name])
    assert "2×16×64" in labels
    assert "2×16×256" in labels  # the logits
    assert all(re.fullmatch(r"(\d+(×\d+)*|scalar)( \w+)?|repeated ×\d+", t) for t in labels), labels


@pytest.mark.parametrize("pass_name", list(PASSES))
def test_tooltip_names_the_pass_that_made_each_node(svgs, graphs, pass_name: str) -> None:
    nodes = svg_nodes(svgs[pass_name])
    for nid, attrs in graphs[pass_name].nodes(data=True):
        tooltip = nodes[nid]["tooltip"]
        if attrs.get("pass_name"):
            inserted_line = next(line for line in tooltip.splitlines()
                                 if line.startswith("inserted: "))
            assert f"pass={pass_name}" in inserted_line.split(", "), (nid, tooltip)
            assert f"site={attrs['provenance']['site']}" in inserted_line
        else:
            assert "inserted: " not in tooltip, (nid, tooltip)


def test_dora_reads_of_existing_weights_add_no_parameters() -> None:
    """DoRA's norm reads the layer's weight and its own factors through inserted ``get_attr``
    nodes: they are drawn as reads (``reads weight``), with no parameter count, so the
    picture does not show the frozen weight as something LoRA added."""
    spec = surgery.load_model("builtin")
    adapted = surgery.apply_passes(spec.model, [LoRAPass(pattern="layers.0.attn.q_proj",
                                                         use_dora=True)])
    graph = to_networkx(adapted)
    reads = {attrs["label"]: attrs for _, attrs in graph.nodes(data=True)
             if attrs.get("pass_name") and attrs["op"] == "get_attr"}
    assert set(reads) == {"reads weight", "reads bias", "reads lora_A.default.weight",
                          "reads lora_B.default.weight"}
    assert all(not attrs.get("params") for attrs in reads.values())
    added = sum(p["numel"] for _, a in graph.nodes(data=True) if a.get("pass_name")
                for p in a.get("params", ()))
    lora = {n: p.numel() for n, p in adapted.named_parameters() if ".lora_" in n}
    assert added == sum(lora.values())  # A, B and the magnitude, each once
