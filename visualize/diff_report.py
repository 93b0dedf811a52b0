"""The record a before/after diff returns, and its Markdown form."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from visualize.dot import format_count, format_shape

__all__ = ["ParamChange", "NodeChange", "DiffReport", "PARAM_KINDS"]

ParamKind = Literal["added", "removed", "frozen", "unfrozen", "rewritten"]
PARAM_KINDS: tuple[str, ...] = ("added", "removed", "frozen", "unfrozen", "rewritten")


@dataclass(frozen=True)
class ParamChange:
    """One row of the parameter diff.

    Attributes:
        kind: ``"added"`` (in after, not before), ``"removed"``, ``"frozen"``
            (``requires_grad`` True → False), ``"unfrozen"``, ``"rewritten"`` (same name,
            new values or new storage recorded by a pass: merged weights).
        name: qualified parameter name (``layers.0.attn.q_proj.lora_A.default.weight``).
        shape: its shape (in after; in before for removed ones).
        numel: its number of elements.
        trainable: ``requires_grad`` in after (in before for removed ones).
        pass_name: the pass responsible, or ``None`` when nothing records one.
    """

    kind: ParamKind
    name: str
    shape: tuple[int, ...]
    numel: int
    trainable: bool
    pass_name: str | None


@dataclass(frozen=True)
class NodeChange:
    """One node of the graph diff.

    Attributes:
        kind: ``"added"`` or ``"removed"``.
        id: node id in the graph of :func:`visualize.to_networkx`.
        op: fx op of the node.
        label: its short label.
        pass_name: the pass that inserted it (from ``node.meta["surgery"]``), if any.
        site: the module the pass adapted there, if any.
    """

    kind: Literal["added", "removed"]
    id: str
    op: str
    label: str
    pass_name: str | None
    site: str | None


def _code(text: str) -> str:
    """Markdown code span that survives tables (pipes escaped, backticks fenced)."""
    text = text.replace("|", "\\|").replace("\n", " ")
    fence = "``" if "`" in text else "`"
    pad = " " if "`" in text else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _plain(text: str) -> str:
    """Markdown table cell text with the characters Markdown would interpret escaped."""
    out = []
    for ch in text.replace("\n", " "):
        out.append("\\" + ch if ch in "\\`*_[]|<>" else ch)
    return "".join(out)


@dataclass(frozen=True)
class DiffReport:
    """What changed between two models, and where the diagrams were written.

    Attributes:
        out_dir: folder holding the files.
        files: every file written (``before.dot``, ``after.dot``, the SVGs when a renderer
            exists, ``diff.md``, ``diff.html``).
        params: parameter changes, grouped by kind in :data:`PARAM_KINDS` order, in model
            order within a kind.
        nodes: graph nodes added (by id or by pass provenance) and removed (by id).
        before_name, after_name: the models' class names.
        before_total, before_trainable, after_total, after_trainable: parameter counts.
        notes: why a diagram was not drawn and how to get it (one sentence each, starting
            with the image's file name: ``"after.svg not drawn: ..."``).
    """

    out_dir: Path
    files: tuple[Path, ...]
    params: tuple[ParamChange, ...]
    nodes: tuple[NodeChange, ...]
    before_name: str
    after_name: str
    before_total: int
    before_trainable: int
    after_total: int
    after_trainable: int
    notes: tuple[str, ...] = ()

    def rows(self, kind: str) -> tuple[ParamChange, ...]:
        """The parameter rows of one kind (``"added"``, ``"frozen"``, ...)."""
        return tuple(r for r in self.params if r.kind == kind)

    @property
    def added(self) -> tuple[ParamChange, ...]:
        """Parameters in after and not in before."""
        return self.rows("added")

    @property
    def removed(self) -> tuple[ParamChange, ...]:
        """Parameters in before and not in after."""
        return self.rows("removed")

    @property
    def frozen(self) -> tuple[ParamChange, ...]:
        """Parameters whose ``requires_grad`` went from True to False."""
        return self.rows("frozen")

    @property
    def unfrozen(self) -> tuple[ParamChange, ...]:
        """Parameters whose ``requires_grad`` went from False to True."""
        return self.rows("unfrozen")

    @property
    def rewritten(self) -> tuple[ParamChange, ...]:
        """Parameters whose values or storage a pass replaced (merge)."""
        return self.rows("rewritten")

    @property
    def nodes_added(self) -> tuple[NodeChange, ...]:
        """Graph nodes present only in after, or inserted by a pass."""
        return tuple(n for n in self.nodes if n.kind == "added")

    @property
    def nodes_removed(self) -> tuple[NodeChange, ...]:
        """Graph nodes present only in before."""
        return tuple(n for n in self.nodes if n.kind == "removed")

    def summary(self) -> str:
        """One line: counts of each kind of change and the trainable parameters after."""
        parts = [f"{len(self.rows(k))} {k}" for k in PARAM_KINDS if self.rows(k)]
        nodes = f"{len(self.nodes_added)} nodes added, {len(self.nodes_removed)} removed"
        params = ", ".join(parts) if parts else "no parameter changes"
        return (f"{params}; {nodes}; trainable {format_count(self.before_trainable)} → "
                f"{format_count(self.after_trainable)} of {format_count(self.after_total)}")

    def to_markdown(self) -> str:
        """The report as GitHub-flavoured Markdown (totals, parameter table, node table)."""
        lines = [
            f"# Diff: {_plain(self.before_name)} → {_plain(self.after_name)}",
            "",
            _plain(self.summary()),
            "",
            "| | before | after |",
            "|---|---:|---:|",
            f"| parameters | {self.before_total:,} | {self.after_total:,} |",
            f"| trainable | {self.before_trainable:,} | {self.after_trainable:,} |",
            "",
            f"## Parameters ({len(self.params)} changes)",
            "",
        ]
        if self.params:
            lines += ["| change | parameter | shape | numel | trainable | pass |",
                      "|---|---|---|---:|---|---|"]
            for r in self.params:
                lines.append(f"| {r.kind} | {_code(r.name)} | {format_shape(r.shape)} | "
                             f"{r.numel:,} | {'yes' if r.trainable else 'no'} | "
                             f"{_plain(r.pass_name) if r.pass_name else '—'} |")
        else:
            lines.append("No parameter changed.")
        lines += ["", f"## Graph nodes ({len(self.nodes_added)} added, "
                      f"{len(self.nodes_removed)} removed)", ""]
        if self.nodes:
            lines += ["| change | node | op | label | pass | site |", "|---|---|---|---|---|---|"]
            for n in self.nodes:
                lines.append(f"| {n.kind} | {_code(n.id)} | {_plain(n.op)} | {_plain(n.label)} | "
                             f"{_plain(n.pass_name) if n.pass_name else '—'} | "
                             f"{_code(n.site) if n.site else '—'} |")
        else:
            lines.append("No graph node changed.")
        files = ", ".join(_code(p.name) for p in self.files)
        lines += ["", f"Files: {files}", ""]
        for note in self.notes:
            lines += [f"Note: {_plain(note)}", ""]
        return "\n".join(lines)
