"""Text, markdown, JSON and rich renderings of an :class:`surgery.audit.Audit`.

The :class:`~surgery.audit.Audit` methods (``str()``, ``to_markdown``, ``to_dict``,
``to_json``, ``__rich__``) call these functions; the counting lives in
:mod:`surgery.audit`.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.table import Table

    from surgery.audit.count import Audit

__all__ = ["to_dict", "to_json", "to_markdown", "to_text", "to_rich"]


def to_dict(report: Audit) -> dict[str, Any]:
    """A JSON-ready dict with stable keys: what :func:`to_json` serialises.

    Args:
        report: the audit to convert.

    Returns:
        ``{"model", "frontend", "passes", "totals", "adapters", "rows", "notes"}`` with
        lists in place of tuples; ``totals`` is ``{"trainable", "total", "percent"}``.
    """
    return {
        "model": report.model,
        "frontend": report.frontend,
        "passes": list(report.passes),
        "totals": {"trainable": report.totals.trainable, "total": report.totals.total,
                   "percent": report.totals.percent},
        "adapters": [{**asdict(a), "sites": list(a.sites), "ranks": list(a.ranks)}
                     for a in report.adapters],
        "rows": [{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(r).items()}
                 for r in report.rows],
        "notes": list(report.notes),
    }


def to_json(report: Audit, indent: int | None = 2) -> str:
    """The audit as JSON, keys sorted, so equal audits give equal text.

    Args:
        report: the audit to serialise.
        indent: as for :func:`json.dumps`; ``None`` gives one line.
    """
    return json.dumps(to_dict(report), indent=indent, sort_keys=True)


def to_markdown(report: Audit) -> str:
    """The audit as GitHub-flavoured markdown: totals, adapters table, module table.

    Args:
        report: the audit to render.

    Returns:
        The markdown text, ending with a newline; ``|`` in the provenance is escaped. Notes
        follow the adapters table as a list.
    """
    lines = [f"**{report.totals}**", ""]
    if report.adapters:
        lines += ["| adapter | pass | sites | params | trainable | active | rank |",
                  "|---|---|---:|---:|---|---|---|"]
        for a in report.adapters:
            rank = a.rank_text.removeprefix("ranks ").removeprefix("rank ")
            lines.append(f"| {a.name} | {a.pass_name} | {len(a.sites)} | {a.params:,d} | "
                         f"{a.trainable} | {a.active} | {rank} |")
        lines.append("")
    if report.notes:
        lines += [f"- note: {_md(n)}" for n in report.notes] + [""]
    lines += ["| module | type | role | params | trainable | dtype | device | changed by |",
              "|---|---|---|---:|---|---|---|---|"]
    for r in report.rows:
        lines.append(f"| `{r.name or '(root)'}` | {r.type} | {r.role} | {r.params:,d} | "
                     f"{r.trainable} | {r.dtype} | {r.device} | {_md(r.provenance)} |")
    return "\n".join(lines) + "\n"


def to_text(report: Audit) -> str:
    """The totals line, one line per adapter, one per note, then a plain-text table of the
    rows.

    Args:
        report: the audit to render.

    Returns:
        The text, columns padded with spaces (``params`` right-aligned), no trailing newline.
    """
    head = ["name", "type", "role", "params", "trainable", "dtype", "device", "changed by"]
    cells = _cells(report)
    widths = [max([len(head[i])] + [len(c[i]) for c in cells]) for i in range(len(head))]
    right = {3}

    def fmt(row: list[str]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w)
               for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(out).rstrip()

    lines = [str(report.totals)]
    for a in report.adapters:
        rank = f", {a.rank_text}" if a.ranks else ""
        lines.append(f"adapter {a.key}: {len(a.sites)} site(s), {a.params:,d} params, "
                     f"trainable: {a.trainable}, active: {a.active}{rank}")
    lines += [f"note: {n}" for n in report.notes]
    lines += ["", fmt(head), fmt(["-" * w for w in widths])]
    lines += [fmt(c) for c in cells]
    return "\n".join(lines)


def to_rich(report: Audit) -> Table:
    """A ``rich.table.Table``: totals as the title, adapters and notes in the caption.

    Rows are green when they train, yellow when partly, dim when frozen.

    Args:
        report: the audit to render.

    Raises:
        ImportError: rich is not installed.
    """
    from rich.table import Table

    caption = "; ".join(f"{a.key}: {len(a.sites)} site(s), {a.params:,d} params"
                        + (f", {a.rank_text}" if a.ranks else "")
                        + ("" if a.active == "yes" else f", active: {a.active}")
                        for a in report.adapters)
    caption = "\n".join([caption] * bool(caption) + [f"note: {n}" for n in report.notes]) or None
    table = Table(title=str(report.totals), caption=caption, title_justify="left")
    for col in ("name", "type", "role"):
        table.add_column(col, no_wrap=True)
    table.add_column("params", justify="right", no_wrap=True)
    for col in ("trainable", "dtype", "device"):
        table.add_column(col, no_wrap=True)
    table.add_column("changed by")
    colours = {"yes": "green", "partial": "yellow", "no": "dim"}
    for r, cells in zip(report.rows, _cells(report)):
        table.add_row(*cells, style=colours.get(r.trainable))
    return table


def _cells(report: Audit) -> list[list[str]]:
    return [[r.name or "(root)", r.type, r.role, f"{r.params:,d}", r.trainable, r.dtype,
             r.device, r.provenance] for r in report.rows]


def _md(text: str) -> str:
    return text.replace("|", "\\|")
