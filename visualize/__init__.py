"""Drawing models: networkx graphs, graphviz DOT, SVG/PNG, before/after diffs.

The whole-model picture is the model's map (its graph tree, traced for analysis) with every
adapted call expanded into its site graph, so the nodes a pass inserted appear in place.

::

    from visualize import render, render_diff, to_networkx, RenderOptions

    graph = to_networkx(adapted)                      # one dataflow graph, site graphs in place
    render(model, "out/model.svg", options=RenderOptions(depth=2))
    diff = render_diff(model, adapted, "out/")        # before/after SVG, diff.md, diff.html
    print(diff.to_markdown())
    report(model, adapted, "out/report.html", site="layers.0.attn.q_proj")  # one HTML page

Colours are the same in every diagram: nodes a pass inserted take the pass's hue, modules
with frozen parameters are grey-blue, trainable ones green, rewritten (merged) weights orange.

Large models stay drawable: runs of identical layers are drawn once (``model.layers 0–23
×24``, :mod:`visualize.repeats`; ``RenderOptions(repeats=False)`` draws every layer), deep
modules collapse to ``RenderOptions(depth=...)`` while what a pass changed stays open, and a
diagram of more than ``RenderOptions.max_layout_nodes`` nodes is written as DOT only, with a
:class:`LayoutSkippedWarning` saying how to get the image.
"""

from visualize.diff import node_diff, param_diff, render_diff, report
from visualize.diff_report import DiffReport, NodeChange, ParamChange
from visualize.dot import to_dot
from visualize.graph import to_networkx
from visualize.options import Palette, RenderOptions
from visualize.render import LayoutSkippedWarning, MissingRendererWarning, render
from visualize.repeats import collapse_repeats

__all__ = [
    "DiffReport",
    "LayoutSkippedWarning",
    "MissingRendererWarning",
    "NodeChange",
    "Palette",
    "ParamChange",
    "RenderOptions",
    "collapse_repeats",
    "node_diff",
    "param_diff",
    "render",
    "render_diff",
    "report",
    "to_dot",
    "to_networkx",
]
