"""A self-contained HTML page for a before/after diff: both diagrams inline, the tables."""

from __future__ import annotations

import html
import re
from string import Template

from visualize.dot import format_shape
from visualize.report import DiffReport

__all__ = ["diff_html", "inline_svg"]

_PAGE = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>$title</title>
<style>
body { font-family: Helvetica, Arial, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.5em; }
.summary { color: #444; }
.diagrams { display: flex; gap: 1.5em; align-items: flex-start; flex-wrap: wrap; }
.diagram { flex: 1 1 45%; min-width: 320px; border: 1px solid #ddd; border-radius: 6px;
           padding: 0.5em; overflow: auto; max-height: 90vh; }
.diagram svg { max-width: 100%; height: auto; }
.missing { color: #a00; }
table { border-collapse: collapse; margin-top: 0.5em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; font-size: 0.9em; }
th { background: #f4f4f4; } td.num { text-align: right; }
code { font-size: 0.95em; }
tr.added td:first-child { color: #1b7837; } tr.removed td:first-child { color: #b2182b; }
tr.frozen td:first-child { color: #2166ac; } tr.rewritten td:first-child { color: #d95f02; }
</style>
</head>
<body>
<h1>$title</h1>
<p class="summary">$summary</p>
<table>
<tr><th></th><th>before</th><th>after</th></tr>
<tr><td>parameters</td><td class="num">$before_total</td><td class="num">$after_total</td></tr>
<tr><td>trainable</td><td class="num">$before_trainable</td><td class="num">$after_trainable</td></tr>
</table>
<div class="diagrams">
<div class="diagram"><h2>before</h2>
$before_svg
</div>
<div class="diagram"><h2>after</h2>
$after_svg
</div>
</div>
<h2>Parameters ($param_count changes)</h2>
$param_table
<h2>Graph nodes ($nodes_added added, $nodes_removed removed)</h2>
$node_table
</body>
</html>
""")

_PROLOG = re.compile(r"^\s*(<\?xml[^>]*\?>\s*)?(<!DOCTYPE[^>]*>\s*)?(<!--.*?-->\s*)*", re.S)


def inline_svg(svg: str) -> str:
    """An SVG document made embeddable in HTML (XML prolog, doctype and comments dropped)."""
    return _PROLOG.sub("", svg, count=1).strip()


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _table(headers: tuple[str, ...], rows: list[tuple[str, list[str]]]) -> str:
    """An HTML table; each row is ``(css class, already-escaped cells)``."""
    out = ["<table>", "<tr>" + "".join(f"<th>{h}</th>" for h in headers) + "</tr>"]
    for css, cells in rows:
        out.append(f'<tr class="{_e(css)}">' + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _param_table(report: DiffReport) -> str:
    if not report.params:
        return "<p>No parameter changed.</p>"
    return _table(("change", "parameter", "shape", "numel", "trainable", "pass"), [
        (r.kind, [f"<td>{_e(r.kind)}</td>", f"<td><code>{_e(r.name)}</code></td>",
                  f"<td>{_e(format_shape(r.shape))}</td>", f'<td class="num">{r.numel:,}</td>',
                  f"<td>{'yes' if r.trainable else 'no'}</td>", f"<td>{_e(r.pass_name or '—')}</td>"])
        for r in report.params])


def _node_table(report: DiffReport) -> str:
    if not report.nodes:
        return "<p>No graph node changed.</p>"
    return _table(("change", "node", "op", "label", "pass", "site"), [
        (n.kind, [f"<td>{_e(n.kind)}</td>", f"<td><code>{_e(n.id)}</code></td>",
                  f"<td>{_e(n.op)}</td>", f"<td>{_e(n.label)}</td>",
                  f"<td>{_e(n.pass_name or '—')}</td>", f"<td>{_e(n.site or '—')}</td>"])
        for n in report.nodes])


def _diagram(svg: str | None, dot_name: str, notes: tuple[str, ...] = ()) -> str:
    if svg is None:
        stem = dot_name.rpartition(".")[0]
        why = next((n for n in notes if n.startswith(stem + ".")), None)
        if why is not None:
            return f'<p class="missing">{_e(why)}</p>'
        return (f'<p class="missing">No Graphviz renderer was available; the diagram is in '
                f"<code>{_e(dot_name)}</code>.</p>")
    return inline_svg(svg)


def diff_html(report: DiffReport, before_svg: str | None, after_svg: str | None) -> str:
    """Render ``report`` as one self-contained HTML page.

    Args:
        report: the diff.
        before_svg, after_svg: SVG documents from Graphviz (inlined as they are), or
            ``None`` when none could be drawn (the page then says why, from
            ``report.notes``, or points at the ``.dot`` files).

    Returns:
        The HTML text. Every value taken from the models is HTML-escaped; the SVGs are
        Graphviz output, whose text Graphviz has already escaped.
    """
    return _PAGE.substitute(
        title=_e(f"Diff: {report.before_name} → {report.after_name}"),
        summary=_e(report.summary()),
        before_total=f"{report.before_total:,}",
        after_total=f"{report.after_total:,}",
        before_trainable=f"{report.before_trainable:,}",
        after_trainable=f"{report.after_trainable:,}",
        before_svg=_diagram(before_svg, "before.dot", report.notes),
        after_svg=_diagram(after_svg, "after.dot", report.notes),
        param_count=len(report.params),
        param_table=_param_table(report),
        nodes_added=len(report.nodes_added),
        nodes_removed=len(report.nodes_removed),
        node_table=_node_table(report),
    )
