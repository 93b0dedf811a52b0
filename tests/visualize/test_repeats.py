"""Tests of visualize/repeats.py, shell.py and pictures.py, and of the layout budget in
render.py: repeated blocks drawn once, ranges where a pass covers some layers, diffs that
count every layer, and no Graphviz layout beyond ``RenderOptions.max_layout_nodes``.

Golden files: ``tests/visualize/golden/repeats_*.dot``; regenerate them when a change to
the drawing is intended with::

    SURGERY_UPDATE_GOLDEN=1 python -m pytest tests/visualize/test_repeats.py
"""

from __future__ import annotations

import importlib
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from viz_models import renderer_works

import visualize.pictures
from surgery import LoRAPass, apply_passes
from surgery.errors import ConfigError
from visualize import (
    LayoutSkippedWarning,
    MissingRendererWarning,
    RenderOptions,
    collapse_repeats,
    render,
    render_diff,
    to_networkx,
)
from visualize.options import DEFAULT_MAX_LAYOUT_NODES
from visualize.repeats import display_path, format_indices

GOLDEN = Path(__file__).parent / "golden"
RENDER = importlib.import_module("visualize.render")  # ``visualize.render`` is the function
W = 4  # width of the toy blocks


class TinyBlock(nn.Module):
    """``x + relu(fc(x))``, ``(B, T, W) -> (B, T, W)``.

    With ``guard``, a branch on the input's shape that torch.fx cannot trace (the model
    then goes through torch.export). The layer whose ``layer_idx`` equals ``special``
    doubles its output: a forward that branches on the layer index.
    """

    def __init__(self, index: int, *, guard: bool = False, special: int | None = None) -> None:
        super().__init__()
        self.fc = nn.Linear(W, W)
        self.layer_idx = index
        self.guard = guard
        self.special = special

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.guard and x.shape[0] == 0:
            return x
        h = x + torch.relu(self.fc(x))
        if self.layer_idx == self.special:
            h = h * 2
        return h


class Stack(nn.Module):
    """``blocks.0 … blocks.{n-1} -> head``: ``(B, T, W) -> (B, T, 2)``."""

    def __init__(self, n: int, *, guard: bool = False, special: int | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TinyBlock(i, guard=guard, special=special) for i in range(n))
        self.head = nn.Linear(W, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _stack(n: int, **kw: object) -> Stack:
    torch.manual_seed(0)
    return Stack(n, **kw)


def _x() -> torch.Tensor:
    return torch.ones(2, 3, W)


def _fcs(indices: range | list[int]) -> list[str]:
    return [f"blocks.{i}.fc" for i in indices]


def _diff(before: nn.Module, after: nn.Module, out: Path, **options: object):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingRendererWarning)
        return render_diff(before, after, out, example_inputs=(_x(),),
                           options=RenderOptions(**options))


def _cluster_labels(dot: str) -> list[str]:
    return re.findall(r'graph \[label="([^"]*)", style="rounded,dashed"', dot)


def _node_ids(dot: str) -> list[str]:
    """Ids of the drawn nodes of DOT text, the legend left out."""
    return [nid for nid in re.findall(r'^\s*"((?:[^"\\]|\\.)*)" \[label=', dot, re.M)
            if not nid.startswith("legend:")]


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("SURGERY_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"{path.name} is missing; create it with SURGERY_UPDATE_GOLDEN=1"
    assert text == path.read_text(encoding="utf-8"), (
        f"DOT output differs from {path.name}; if the change is intended, regenerate with "
        f"SURGERY_UPDATE_GOLDEN=1 and review the diff")


# -- drawing identical blocks once ------------------------------------------------------------


def test_identical_blocks_are_drawn_once() -> None:
    full = to_networkx(_stack(6), (_x(),))
    (g,), runs = collapse_repeats([full])
    assert [(r.parent, r.indices, r.members, r.label) for r in runs] == [
        ("blocks", tuple(range(6)), tuple(range(6)), "blocks 0–5")]
    assert g.graph["repeats"] == {"blocks.0": {"parent": "blocks", "indices": tuple(range(6)),
                                               "count": 6, "label": "blocks 0–5"}}
    assert list(g.nodes) == ["/x", "/blocks_0_fc", "/relu", "/add", "/head", "/output"]
    fc = g.nodes["/blocks_0_fc"]
    assert fc["repeat"] == 6
    assert fc["copies"] == tuple(f"/blocks_{i}_fc" for i in range(6))
    assert g.nodes["/add"]["copies"] == ("/add", "/add_1", "/add_2", "/add_3", "/add_4", "/add_5")
    # the last copy feeds the head; one copy feeding the next is one dashed edge
    assert g.edges["/add", "/head"] == full.edges["/add_5", "/head"]
    assert g.edges["/add", "/blocks_0_fc"]["repeat"] == 6
    assert g.edges["/x", "/blocks_0_fc"].get("repeat") is None
    assert "repeats" not in full.graph and full.number_of_nodes() == 3 + 6 * 3  # not changed


def test_golden_single_model(tmp_path: Path) -> None:
    out = render(_stack(6), tmp_path / "stack.dot", (_x(),))
    text = out.read_text(encoding="utf-8")
    assert 'label="blocks.0–5 ×6 · TinyBlock"' in text
    assert '"/add" -> "/blocks_0_fc" [label="repeated ×6", style=dashed, constraint=false];' in text
    _check_golden("repeats_stack.dot", text)


def test_pass_on_some_layers_gives_ranges_in_both_pictures(tmp_path: Path) -> None:
    model = _stack(6)
    adapted = apply_passes(model, [LoRAPass(pattern=_fcs(range(3)), rank=2)])
    rep = _diff(model, adapted, tmp_path)
    before = (tmp_path / "before.dot").read_text(encoding="utf-8")
    after = (tmp_path / "after.dot").read_text(encoding="utf-8")
    for text in (before, after):  # the plain model is drawn with the same ranges
        assert _cluster_labels(text) == ["blocks · ModuleList", "blocks.0–2 ×3 · TinyBlock",
                                         "blocks.3–5 ×3 · TinyBlock"]
    assert "blocks.0.fc:lora_a_default" in _node_ids(after)
    assert not any(i.startswith(("blocks.1.", "blocks.2.")) for i in _node_ids(after))
    assert "+ lora · lora_A ×3" in after
    assert len(rep.added) == 6 and len(rep.nodes_added) == 15
    _check_golden("repeats_ranges_before.dot", before)
    _check_golden("repeats_ranges_after.dot", after)


def test_collapsing_keeps_the_diff_exact(tmp_path: Path) -> None:
    model = _stack(5)
    adapted = apply_passes(model, [LoRAPass(pattern=_fcs([0, 1, 2, 4]), rank=2)])
    drawn = _diff(model, adapted, tmp_path / "once")
    every = _diff(model, adapted, tmp_path / "all", repeats=False)
    assert drawn.params == every.params and drawn.nodes == every.nodes
    assert (len(drawn.added), len(drawn.frozen), len(drawn.nodes_added)) == (8, 12, 20)
    assert (drawn.after_total, drawn.after_trainable) == (every.after_total, every.after_trainable)
    assert _cluster_labels((tmp_path / "once" / "after.dot").read_text("utf-8"))[1:] == [
        "blocks.0–2 ×3 · TinyBlock", "blocks.3 · TinyBlock", "blocks.4 · TinyBlock"]
    assert len(_node_ids((tmp_path / "all" / "after.dot").read_text("utf-8"))) > \
        len(_node_ids((tmp_path / "once" / "after.dot").read_text("utf-8")))


# -- the export front end: the ends of each run traced ---------------------------------------


def test_export_model_traces_only_the_ends_of_each_run(tmp_path: Path, snapshot,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    model = _stack(6, guard=True)
    adapted = apply_passes(model, [LoRAPass(pattern=_fcs(range(3)), rank=2)])
    model_was, adapted_was = snapshot(model), snapshot(adapted)
    traced: list[list[str]] = []
    real = visualize.pictures.shell_map

    def spy(*args, **kwargs):
        small = real(*args, **kwargs)
        traced.append(sorted(n for n, _ in small.named_modules()
                             if re.fullmatch(r"blocks\.\d+", n)))
        return small

    monkeypatch.setattr(visualize.pictures, "shell_map", spy)
    drawn = _diff(model, adapted, tmp_path / "once")
    assert traced == [["blocks.0", "blocks.2", "blocks.3", "blocks.5"]]
    model_was.assert_unchanged(model)
    adapted_was.assert_unchanged(adapted)
    monkeypatch.setattr(visualize.pictures, "shell_map", real)
    every = _diff(model, adapted, tmp_path / "all", repeats=False)
    assert drawn.params == every.params and drawn.nodes == every.nodes  # every layer counted
    assert [n.site for n in drawn.nodes_added[::5]] == _fcs(range(3))
    after = (tmp_path / "once" / "after.dot").read_text(encoding="utf-8")
    assert "traced by export" in after
    assert _cluster_labels(after)[1:] == ["blocks.0–2 ×3 · TinyBlock", "blocks.3–5 ×3 · TinyBlock"]
    _check_golden("repeats_export_after.dot", after)


def test_layers_that_branch_on_their_index_are_drawn_apart(tmp_path: Path) -> None:
    model = _stack(5, guard=True, special=4)  # the last layer doubles its output
    adapted = apply_passes(model, [LoRAPass(pattern=_fcs(range(5)), rank=2)])
    drawn = _diff(model, adapted, tmp_path)
    after = (tmp_path / "after.dot").read_text(encoding="utf-8")
    assert [label for label in _cluster_labels(after) if "TinyBlock" in label] == [
        "blocks.0–3 ×4 · TinyBlock", "blocks.4 · TinyBlock"]
    assert len(drawn.nodes_added) == 25


# -- depth: what a pass changed stays open ---------------------------------------------------


def test_depth_keeps_changed_blocks_open(tmp_path: Path) -> None:
    model = _stack(6)
    adapted = apply_passes(model, [LoRAPass(pattern="blocks.3.fc", rank=2)])
    out = render(adapted, tmp_path / "a.dot", options=RenderOptions(depth=1))
    text = out.read_text(encoding="utf-8")
    ids = _node_ids(text)
    assert ids[:5] == ["/x", "/head", "/output", "blocks.0/*", "blocks.4/*"]  # root, then clusters
    assert set(ids[5:]) == {"/blocks_3_fc", "/relu_3", "/add_3"} | {
        f"blocks.3.fc:{n}" for n in ("lora_dropout_default", "lora_a_default", "lora_b_default",
                                     "mul", "add")}
    assert _cluster_labels(text) == ["blocks · ModuleList", "blocks.3 · TinyBlock"]
    assert '"blocks.0/*" [label="blocks.0–2\\nTinyBlock · 3 nodes\\n×3' in text
    closed = render(adapted, tmp_path / "b.dot",
                    options=RenderOptions(depth=1, expand_changed=False)).read_text("utf-8")
    assert "/blocks_3_fc" not in _node_ids(closed) and "adapted: lora" in closed


def test_depth_on_the_export_front_end_counts_every_layer(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    model = _stack(6, guard=True)
    adapted = apply_passes(model, [LoRAPass(pattern=_fcs(range(3)), rank=2)])
    traced: list[int] = []
    real = visualize.pictures.shell_map
    monkeypatch.setattr(visualize.pictures, "shell_map",
                        lambda *a, **k: traced.append(1) or real(*a, **k))
    _diff(model, adapted, tmp_path / "open", depth=1)  # the changed blocks keep "blocks" open
    after = (tmp_path / "open" / "after.dot").read_text(encoding="utf-8")
    assert traced == [1]
    assert '"blocks.3/*" [label="blocks.3–5\\nTinyBlock · 4 nodes\\n×3\\n20 params"' in after
    _diff(model, adapted, tmp_path / "shut", depth=1, expand_changed=False)
    after = (tmp_path / "shut" / "after.dot").read_text(encoding="utf-8")
    assert traced == [1]  # one node for all six blocks: their sum needs every block traced
    assert '"blocks/*" [label="blocks\\nModuleList · 24 nodes\\n120 params' in after


# -- the layout budget -----------------------------------------------------------------------


class _FakeLayout:
    """Stands in for Graphviz: records how many nodes it was asked to lay out."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, source: str, dot_path: Path, image: Path, fmt: str) -> bool:
        self.sizes.append(len(_node_ids(source)))
        image.write_text("<svg></svg>", encoding="utf-8")
        return True


@pytest.fixture
def layout(monkeypatch: pytest.MonkeyPatch) -> _FakeLayout:
    fake = _FakeLayout()
    monkeypatch.setattr(RENDER, "render_source", fake)
    return fake


@pytest.fixture(scope="module")
def deep() -> tuple[Stack, nn.Module]:
    """200 blocks, and a copy with LoRA on every other one (no two neighbours alike)."""
    model = _stack(200)
    return model, apply_passes(model, [LoRAPass(pattern=_fcs(range(0, 200, 2)), rank=1)])


def test_200_identical_blocks_are_laid_out_within_budget(deep, layout: _FakeLayout,
                                                         tmp_path: Path) -> None:
    out = render(deep[0], tmp_path / "m.svg", (_x(),))
    assert out == tmp_path / "m.svg"
    assert len(layout.sizes) == 1 and layout.sizes[0] <= DEFAULT_MAX_LAYOUT_NODES
    assert 'label="blocks.0–199 ×200 · TinyBlock"' in (tmp_path / "m.dot").read_text("utf-8")


def test_200_distinct_blocks_are_not_laid_out_by_default(deep, layout: _FakeLayout,
                                                         tmp_path: Path) -> None:
    with pytest.warns(LayoutSkippedWarning) as record:
        out = render(deep[1], tmp_path / "m.svg")
    assert layout.sizes == [] and out == tmp_path / "m.dot" and not (tmp_path / "m.svg").exists()
    size = len(_node_ids(out.read_text(encoding="utf-8")))
    assert size > DEFAULT_MAX_LAYOUT_NODES
    message = str(record[0].message)
    assert message.startswith(f"m.svg not drawn: the diagram has {size} nodes, more than "
                              f"RenderOptions.max_layout_nodes={DEFAULT_MAX_LAYOUT_NODES}")
    assert "RenderOptions(max_layout_nodes=None)" in message
    assert f"dot -Tsvg {tmp_path / 'm.dot'} -o {tmp_path / 'm.svg'}" in message
    forced = render(deep[1], tmp_path / "f.svg", options=RenderOptions(max_layout_nodes=None))
    assert forced == tmp_path / "f.svg" and layout.sizes == [size]


def test_diff_report_says_why_no_image(deep, layout: _FakeLayout, tmp_path: Path) -> None:
    with pytest.warns(LayoutSkippedWarning):
        rep = render_diff(deep[0], deep[1], tmp_path, example_inputs=(_x(),))
    # no block is alike in both models: the plain one draws its own repeats (×200) and is
    # laid out; the adapted one, every block apart, is over the budget
    assert len(layout.sizes) == 1 and layout.sizes[0] <= DEFAULT_MAX_LAYOUT_NODES
    assert 'blocks.0–199 ×200' in (tmp_path / "before.dot").read_text(encoding="utf-8")
    assert [n.split(" not drawn")[0] for n in rep.notes] == ["after.svg"]
    assert sorted(p.name for p in rep.files) == ["after.dot", "before.dot", "before.svg",
                                                 "diff.html", "diff.md"]
    page = (tmp_path / "diff.html").read_text(encoding="utf-8")
    assert "after.svg not drawn: the diagram has" in page and "max_layout_nodes=None" in page
    assert "Note: after.svg not drawn" in rep.to_markdown()
    assert len(rep.added) == 200 and len(rep.nodes_added) == 500


# -- small pieces ----------------------------------------------------------------------------


def test_format_indices_and_display_path() -> None:
    assert format_indices((0, 1, 2, 5, 7, 8)) == "0–2, 5, 7–8"
    assert format_indices((3,)) == "3"
    repeats = {"layers.0": {"parent": "layers", "indices": (0, 1, 2), "count": 3},
               "layers.0.experts.4": {"parent": "layers.0.experts", "indices": (4, 5), "count": 2}}
    assert display_path("layers.0.attn", repeats) == "layers.0–2.attn"
    assert display_path("layers.0.experts.4.w1", repeats) == "layers.0–2.experts.4–5.w1"
    assert display_path("layers.10.attn", repeats) == "layers.10.attn"
    assert display_path("head", {"0": {"parent": "", "indices": (0, 1), "count": 2}}) == "head"


def test_new_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="RenderOptions.max_layout_nodes must be a positive "
                                          "int or None, got 0"):
        RenderOptions(max_layout_nodes=0)
    with pytest.raises(ConfigError, match="RenderOptions.repeats must be True or False, got 1"):
        RenderOptions(repeats=1)  # type: ignore[arg-type]
    assert RenderOptions().max_layout_nodes == DEFAULT_MAX_LAYOUT_NODES
    assert RenderOptions(max_layout_nodes=None).max_layout_nodes is None


@pytest.mark.skipif(not renderer_works(), reason="no Graphviz renderer is installed")
def test_collapsed_diagram_renders(tmp_path: Path) -> None:
    out = render(_stack(6), tmp_path / "m.svg", (_x(),))
    assert out.suffix == ".svg" and "blocks.0–5 ×6" in out.read_text(encoding="utf-8")


def test_a_transformers_prefix_collapses_and_changes_no_other_node(tmp_path: Path) -> None:
    """A prefix read through transformers' attention interface has no site graph, so the
    adapted model is traced again: its node names carry graph-wide counters that the
    inserted nodes shift. Matched by local names, nothing of the base shows as removed, the
    same nodes are added in every layer, and both pictures draw the layers once."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from surgery import PrefixPass

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64)).eval()
    ids = torch.randint(0, 64, (1, 6))
    adapted = apply_passes(llama, [PrefixPass(length=2, gate="zero")])
    drawn = render_diff(llama, adapted, tmp_path, example_inputs=(ids,),
                        options=RenderOptions(max_layout_nodes=None))
    assert drawn.nodes_removed == ()
    per_layer = [sum(n.id.startswith(f"model.layers.{i}.") for n in drawn.nodes_added)
                 for i in range(4)]
    assert per_layer[0] > 0 and len(set(per_layer)) == 1
    for name in ("before.dot", "after.dot"):
        assert "model.layers.0–3 ×4" in (tmp_path / name).read_text(encoding="utf-8")
