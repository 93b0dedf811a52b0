"""Drawing traced models: networkx graphs, graphviz DOT, SVG/PNG, before/after diffs.

::

    from visualize import render, render_diff, to_networkx, RenderOptions

    graph = to_networkx(model)                        # one dataflow graph, calls inlined
    render(model, "out/model.svg", options=RenderOptions(depth=2))
    report = render_diff(model, adapted, "out/")      # before/after SVG, diff.md, diff.html
    print(report.to_markdown())

Colours are the same in every diagram: nodes a pass inserted take the pass's hue, modules
with frozen parameters are grey-blue, trainable ones green, rewritten (merged) weights orange.
"""

from visualize.diff import node_diff, param_diff, render_diff
from visualize.dot import to_dot
from visualize.graph import to_networkx, traced_to_networkx
from visualize.options import Palette, RenderOptions
from visualize.render import MissingRendererWarning, render
from visualize.report import DiffReport, NodeChange, ParamChange

__all__ = [
    "DiffReport",
    "MissingRendererWarning",
    "NodeChange",
    "Palette",
    "ParamChange",
    "RenderOptions",
    "node_diff",
    "param_diff",
    "render",
    "render_diff",
    "to_dot",
    "to_networkx",
    "traced_to_networkx",
]
