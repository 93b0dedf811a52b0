"""Which colour and shape a node gets: one rule, used by every diagram and the legend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from visualize.options import Palette

__all__ = ["NodeStyle", "node_category", "node_style", "LEGEND_BASE", "INACTIVE_FILL",
           "INACTIVE_BORDER"]

# Nodes of an adapter switched off (surgery.set_active): greyed out, dashed border.
INACTIVE_FILL = "#eeeeee"
INACTIVE_BORDER = "#9e9e9e"

# (category, legend text), in the order the legend lists them.
LEGEND_BASE: tuple[tuple[str, str], ...] = (
    ("frozen", "frozen parameters"),
    ("trainable", "trainable parameters"),
    ("mixed", "frozen + trainable"),
    ("rewritten", "rewritten weights"),
    ("op", "operation"),
    ("io", "input / output"),
)


@dataclass(frozen=True)
class NodeStyle:
    """Graphviz attributes of one node.

    Attributes:
        category: ``"pass:<name>"``, ``"rewritten"``, ``"trainable"``, ``"frozen"``,
            ``"mixed"``, ``"io"``, ``"constant"`` or ``"op"``.
        fill, border: ``#rrggbb`` colours.
        shape: graphviz node shape.
        style: graphviz style list (``"rounded,filled"``).
        penwidth: border width.
    """

    category: str
    fill: str
    border: str
    shape: str
    style: str
    penwidth: float


def node_category(attrs: dict[str, Any]) -> str:
    """The colour category of a node, by precedence: inserted by a pass, rewritten weights,
    input/output, trainable/frozen/mixed parameters, constant, plain operation."""
    if attrs.get("pass_name"):
        return f"pass:{attrs['pass_name']}"
    if attrs.get("rewritten"):
        return "rewritten"
    if attrs["op"] in ("placeholder", "output"):
        return "io"
    state = attrs.get("param_state", "none")
    if state != "none":
        return state
    if attrs.get("constant"):
        return "constant"
    return "op"


def _shape(attrs: dict[str, Any]) -> tuple[str, str]:
    op = attrs["op"]
    if op == "module":
        return "box3d", "filled"
    if op == "call_module":
        return "box", "rounded,filled"
    if op == "placeholder":
        return ("invhouse", "filled") if not attrs.get("graph") else ("ellipse", "dashed,filled")
    if op == "output":
        return "house", "filled"
    if op == "get_attr":
        return "note", "filled"
    return "ellipse", "filled"


def node_style(attrs: dict[str, Any], palette: Palette, *, highlighted: bool = False) -> NodeStyle:
    """Decide how a node of a :func:`visualize.to_networkx` graph is drawn.

    Nodes of a switched-off adapter (``provenance["active"] is False``) keep their
    category but are drawn greyed out with a dashed border.

    Args:
        attrs: the node's attributes.
        palette: the colours.
        highlighted: draw a thick border in the pass colour (or ``palette.added``).
    """
    category = node_category(attrs)
    border = palette.border
    penwidth = 1.0
    if category.startswith("pass:"):
        fill, border = palette.for_pass(category[5:])
        penwidth = 1.5
    else:
        fill = {
            "rewritten": palette.rewritten,
            "io": palette.io,
            "trainable": palette.trainable,
            "frozen": palette.frozen,
            "mixed": palette.mixed,
            "constant": palette.constant,
        }.get(category, palette.op)
    shape, style = _shape(attrs)
    if (attrs.get("provenance") or {}).get("active") is False:  # a switched-off adapter
        fill, border, style = INACTIVE_FILL, INACTIVE_BORDER, f"{style},dashed"
    adapted = attrs.get("adapted") or ()
    if adapted:  # a collapsed module with adapters inside
        border = palette.for_pass(adapted[0])[1]
        penwidth = 2.5
    if highlighted:
        border = palette.for_pass(attrs["pass_name"])[1] if attrs.get("pass_name") else palette.added
        penwidth = 3.0
        style = f"{style},bold"
    return NodeStyle(category, fill, border, shape, style, penwidth)
