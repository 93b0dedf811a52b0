"""Tests of visualize/dot.py, style.py and options.py: DOT text, colours, determinism.

Golden files: ``tests/visualize/golden/*.dot`` hold the DOT text of the built-in
``TinyTransformer`` (small config) as drawn now. When a change to the drawing is intended,
regenerate them with::

    SURGERY_UPDATE_GOLDEN=1 python -m pytest tests/visualize/test_dot.py

and review the diff of the golden files like any other change.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import networkx as nx
import pytest
import torch
from torch import nn
from viz_models import IDS_SHAPE, SITE, TinyNet, example_ids

from surgery import LoRAPass, apply_passes
from surgery.errors import ConfigError
from surgery.zoo import TinyConfig, TinyTransformer
from visualize import Palette, RenderOptions, to_dot, to_networkx
from visualize.dot import format_count, format_shape, quote

GOLDEN = Path(__file__).parent / "golden"
PALETTE = Palette()


def _attrs_of(dot: str, node_id: str) -> str:
    """The attribute list of one node statement in DOT text."""
    match = re.search(rf"^\s*{re.escape(quote(node_id))} \[(.*)\];$", dot, re.M)
    assert match, f"no node {node_id} in DOT"
    return match.group(1)


def test_same_model_gives_byte_identical_text(tiny: TinyNet) -> None:
    first = to_dot(to_networkx(tiny, (example_ids(),)))
    second = to_dot(to_networkx(tiny, (example_ids(),)))  # traced again from scratch
    assert first == second
    assert first.startswith('digraph "TinyNet" {\n') and first.endswith("}\n")


def test_text_does_not_depend_on_insertion_order(tiny: TinyNet) -> None:
    g = to_networkx(tiny, (example_ids(),))
    shuffled = nx.DiGraph()
    shuffled.graph.update(g.graph)
    for nid in reversed(list(g.nodes)):
        shuffled.add_node(nid, **g.nodes[nid])
    for u, v, data in reversed(list(g.edges(data=True))):
        shuffled.add_edge(u, v, **data)
    assert to_dot(shuffled) == to_dot(g)


def test_quote_escapes_for_dot() -> None:
    assert quote('a"b\\c\nd') == '"a\\"b\\\\c\\nd"'
    assert quote("trailing\\") == '"trailing\\\\"'
    assert quote("\\N <&>") == '"\\\\N <&>"'
    assert quote("a\r\nb") == '"a\\nb"'


def _odd_graph() -> nx.DiGraph:
    g = nx.DiGraph(name='we"ird {model}')
    odd = 'x"<y>&z\\ {a|b}\nline2 \\N'
    g.add_node("odd/\"node\\", op="call_function", label=odd, target=odd, order=1)
    g.add_node("plain", op="output", label="out", target="output", order=2)
    g.add_edge("odd/\"node\\", "plain", shape=(2, "s0"), dtype="int64")
    return g


def test_odd_labels_are_escaped() -> None:
    dot = to_dot(_odd_graph())
    assert dot.startswith('digraph "we\\"ird {model}" {')
    assert '"odd/\\"node\\\\" [label="x\\"<y>&z\\\\ {a|b}\\nline2 \\\\N", shape=ellipse' in dot
    assert '"odd/\\"node\\\\" -> "plain" [label="2×s0 int64"];' in dot


@pytest.mark.skipif(shutil.which("dot") is None, reason="the Graphviz dot program is not installed")
def test_odd_labels_parse_with_graphviz(tmp_path: Path) -> None:
    path = tmp_path / "odd.dot"
    path.write_text(to_dot(_odd_graph()), encoding="utf-8")
    result = subprocess.run(["dot", "-Tsvg", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    texts = re.findall(r"<text[^>]*>([^<]*)</text>", result.stdout)
    assert "x&quot;&lt;y&gt;&amp;z\\ {a|b}" in texts
    assert "line2 \\N" in texts


def test_colours_of_inserted_frozen_and_trainable_nodes(tiny: TinyNet,
                                                        tiny_adapted: nn.Module) -> None:
    plain = to_dot(to_networkx(tiny))
    assert f'fillcolor="{PALETTE.trainable}"' in _attrs_of(plain, "/blocks_0_attn_q_proj")
    assert f'fillcolor="{PALETTE.op}"' in _attrs_of(plain, "/softmax")
    assert f'fillcolor="{PALETTE.io}"' in _attrs_of(plain, "/ids")

    dot = to_dot(to_networkx(tiny_adapted))
    lora_fill, lora_border = PALETTE.for_pass("lora")
    assert (lora_fill, lora_border) == ("#f9c6df", "#c2185b")
    for nid in (f"{SITE}:lora_a_default", f"{SITE}:add"):
        attrs = _attrs_of(dot, nid)
        assert f'fillcolor="{lora_fill}"' in attrs and f'color="{lora_border}"' in attrs
    assert f'fillcolor="{PALETTE.frozen}"' in _attrs_of(dot, "/blocks_0_attn_q_proj")
    assert f'fillcolor="{PALETTE.frozen}"' in _attrs_of(dot, "/head")
    # edges into inserted nodes take the pass colour
    assert re.search(rf'"/blocks_0_ln" -> "{SITE}:lora_dropout_default" \[.*color="#c2185b"', dot)
    assert re.search(rf'"{SITE}:add" -> "/softmax" \[.*color="#c2185b"', dot)
    assert "+ lora · lora_A" in _attrs_of(dot, f"{SITE}:lora_a_default")
    assert '"legend:pass:lora" [label="added by lora"' in dot


def test_each_pass_has_its_own_hue_and_unknown_passes_a_stable_one() -> None:
    fills = {name: PALETTE.for_pass(name)[0] for name in ("lora", "ia3", "adapter", "prefix")}
    assert len(set(fills.values())) == 4
    assert PALETTE.for_pass("merge")[0] == PALETTE.rewritten
    # hashed with sha256, so the same in every process
    assert PALETTE.for_pass("my_pass") == PALETTE.for_pass("my_pass") == ("#decbe4", "#762a83")


def test_rewritten_weights_are_orange(tiny_adapted: nn.Module) -> None:
    from surgery.pass_base import Change, PassResult

    change = Change("param_rewritten", "merge", "head", "head.weight")
    tiny_adapted._surgery.history.append(PassResult(tiny_adapted, True, (change,), "merge"))
    dot = to_dot(to_networkx(tiny_adapted))
    attrs = _attrs_of(dot, "/head")
    assert f'fillcolor="{PALETTE.rewritten}"' in attrs
    assert "rewritten by merge" in attrs


def test_collapsed_adapted_module_is_marked(tiny_adapted: nn.Module) -> None:
    dot = to_dot(to_networkx(tiny_adapted, depth=2))
    attrs = _attrs_of(dot, "blocks.0/*")
    assert "shape=box3d" in attrs and "adapted: lora" in attrs
    assert 'color="#c2185b", penwidth=2.5' in attrs
    assert "adapted" not in _attrs_of(dot, "blocks.1/*").split("tooltip")[0]


def test_clusters_nest_by_module_path(tiny: TinyNet) -> None:
    dot = to_dot(to_networkx(tiny))
    outer = dot.index('subgraph "cluster_blocks" {')
    block = dot.index('subgraph "cluster_blocks.0" {')
    attn = dot.index('subgraph "cluster_blocks.0.attn" {')
    assert outer < block < attn < dot.index('"/blocks_0_attn_q_proj" [')
    assert 'graph [label="blocks.0 · Block"' in dot
    flat = to_dot(to_networkx(tiny), RenderOptions(clusters=False, legend=False))
    assert "subgraph" not in flat


def test_shapes_label_edges(tiny: TinyNet) -> None:
    g = to_networkx(tiny, (example_ids(),))
    dot = to_dot(g)
    assert '"/blocks_0_mlp_0" -> "/blocks_0_mlp_1" [label="2×5×16"];' in dot
    assert '"/ids" -> "/embed" [label="2×5 int64"];' in dot
    bare = to_dot(g, RenderOptions(show_shapes=False))
    assert '"/blocks_0_mlp_0" -> "/blocks_0_mlp_1";' in bare


def test_highlight_and_title_and_legend_options(tiny_adapted: nn.Module) -> None:
    g = to_networkx(tiny_adapted)
    add = f"{SITE}:add"
    dot = to_dot(g, RenderOptions(highlight=frozenset({add, "/head"}), title="T", legend=False,
                                  rankdir="LR"))
    assert "penwidth=3" in _attrs_of(dot, add)
    assert 'color="#c2185b"' in _attrs_of(dot, add)
    assert f'color="{PALETTE.added}", penwidth=3' in _attrs_of(dot, "/head")
    assert 'label="T"' in dot and "rankdir=LR" in dot and "cluster_legend" not in dot
    default = to_dot(g)
    assert 'label="TinyNet · traced by fx · 1.2K params, 32 trainable"' in default


def test_removed_nodes_and_title_counts_of_the_whole_model(tiny: TinyNet) -> None:
    g = to_networkx(tiny, (example_ids(),))
    params = list(tiny.parameters())
    assert (g.graph["param_total"], g.graph["param_trainable"]) == (1184, 1184)
    assert sum(p.numel() for p in params) == 1184
    g.graph["param_trainable"] = 12_345  # the title reads the model's totals, not the nodes'
    g.nodes["/head"]["diff"] = "removed"
    dot = to_dot(g)
    assert 'label="TinyNet · traced by fx · 1.2K params, 12.3K trainable"' in dot
    head = _attrs_of(dot, "/head")
    assert 'style="rounded,filled,dashed,bold"' in head and 'color="#333333"' in head
    assert "penwidth=3" in head and "\\n− removed" in head
    assert '"legend:removed" [label="removed (diff)"' in dot
    del g.nodes["/head"]["diff"]
    assert "removed" not in to_dot(g)


def test_formatting_helpers() -> None:
    assert [format_count(n) for n in (999, 1000, 141_312, 7_000_000, 1_240_000_000)] == [
        "999", "1.0K", "141.3K", "7.0M", "1.24B"]
    assert format_shape((2, 16, 64)) == "2×16×64"
    assert format_shape(()) == "scalar"
    assert format_shape((3,), "bool") == "3 bool"
    assert format_shape(None) == ""


@pytest.mark.parametrize("kwargs, match", [
    ({"rankdir": "XY"}, "rankdir must be one of"),
    ({"depth": 0}, "depth must be a positive int"),
    ({"fontsize": 1}, "fontsize must be an int"),
    ({"fontname": 'a"b'}, "fontname must be a plain font name"),
])
def test_options_are_validated(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RenderOptions(**kwargs)


def test_palette_is_validated() -> None:
    with pytest.raises(ConfigError, match="Palette.frozen must be a colour like '#1f77b4', got 'blue'"):
        Palette(frozen="blue")
    with pytest.raises(ConfigError, match=r"Palette.passes\['lora'\] border"):
        Palette(passes=(("lora", "#ffffff", "red"),))
    custom = Palette(passes=(("lora", "#000000", "#111111"),))
    assert custom.for_pass("lora") == ("#000000", "#111111")


# -- golden files ----------------------------------------------------------------------------

_TINY = TinyConfig(vocab_size=32, d_model=16, n_heads=2, n_layers=2, d_ff=32, max_len=16)


def _tiny_transformer_graph(depth: int | None = None, adapted: bool = False) -> nx.DiGraph:
    torch.manual_seed(0)
    model = TinyTransformer(_TINY)
    ids = torch.arange(IDS_SHAPE[0] * 4).reshape(IDS_SHAPE[0], 4) % _TINY.vocab_size
    if adapted:
        model = apply_passes(model, [LoRAPass(pattern="layers.0.attn.q_proj", rank=2)],
                             example_inputs=(ids,))
    return to_networkx(model, (ids,), depth=depth)


@pytest.mark.parametrize("name, depth, adapted", [
    ("tiny_transformer", None, False),
    ("tiny_transformer_depth2", 2, False),
    ("tiny_transformer_lora", None, True),
])
def test_golden_dot(name: str, depth: int | None, adapted: bool) -> None:
    text = to_dot(_tiny_transformer_graph(depth, adapted))
    path = GOLDEN / f"{name}.dot"
    if os.environ.get("SURGERY_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"{path.name} is missing; create it with SURGERY_UPDATE_GOLDEN=1"
    assert text == path.read_text(encoding="utf-8"), (
        f"DOT output differs from {path.name}; if the change is intended, regenerate with "
        f"SURGERY_UPDATE_GOLDEN=1 and review the diff")
