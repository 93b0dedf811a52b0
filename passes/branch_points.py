"""Where a bottleneck branch attaches inside a site graph: the node it reads, the node it
joins, and the widths of both (Houlsby et al. 2019; He et al. 2022).

For a sub-layer from :func:`passes.sublayers.find_sublayers`, the branch reads what the up
(or query) projection reads and joins what the down (or output) projection returns; for a
module named by pattern, its first argument and its output. Widths come from the linear
layers the site graph calls: a module's output width is the ``out_features`` of the layer
that makes its output through width-keeping operations (elementwise ops, norms, dropout).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from torch import fx, nn

from passes.sublayers import SubLayer, is_linear_layer, use_signature
from surgery.errors import UnsupportedSiteError
from surgery.map.dataflow import op_name
from surgery.map.roles import ELEMENTWISE
from surgery.sites.features import layer_features
from surgery.sites.rewrite import (
    BRANCH_PARTS,
    follow_main_path,
    site_input,
    site_output,
)
from surgery.sites.site_graph import SiteGraph, base_module

__all__ = ["Branch", "branch_points", "input_layer", "output_layer"]


@dataclass(frozen=True)
class Branch:
    """Where a bottleneck branch attaches in a site graph.

    Attributes:
        reads: the node whose value the branch reads (``down``'s input).
        joins: the node whose value the branch is added to (after nodes earlier passes
            inserted on the main path).
        in_features: width of ``reads``.
        out_features: width of ``joins``.
        weight: a weight of the sub-layer, whose dtype and device the adapter takes.
    """

    reads: fx.Node
    joins: fx.Node
    in_features: int
    out_features: int
    weight: torch.Tensor


def _on_branch(node: fx.Node) -> bool:
    meta = node.meta.get("surgery")
    return meta is not None and meta.get("part") in BRANCH_PARTS


def _passes_width(sg: SiteGraph, node: fx.Node) -> bool:
    """Whether ``node`` keeps the width of its input: an elementwise op, or a call of a
    module without matrices (a norm, dropout, activation)."""
    if node.op == "call_module":
        mod = base_module(sg.get_submodule(str(node.target)))
        return not isinstance(mod, nn.MultiheadAttention) and all(
            p.dim() < 2 for p in mod.parameters())
    return node.op in ("call_function", "call_method") and op_name(node) in ELEMENTWISE


def _nearest_layer(sg: SiteGraph, start: fx.Node, *, forward: bool) -> nn.Module | None:
    """The first linear layer called on the way from ``start`` (to its users when
    ``forward``, else to its inputs) through width-keeping nodes."""
    queue, seen = deque([start]), {start}
    while queue:
        node = queue.popleft()
        if node.op == "call_module":
            mod = sg.get_submodule(str(node.target))
            if is_linear_layer(base_module(mod)):
                return mod
        if node.op != "placeholder" and not _passes_width(sg, node):
            continue
        for other in (list(node.users) if forward else node.all_input_nodes):
            if other not in seen and not _on_branch(other):
                seen.add(other)
                queue.append(other)
    return None


def output_layer(sg: SiteGraph, *, who: str) -> nn.Module:
    """The linear layer that makes a sub-layer's output, through width-keeping operations
    (a norm, dropout, a residual add): ``down_proj`` of an ``mlp``, ``o_proj`` of an
    attention module. Its ``out_features`` is the sub-layer's output width.

    Raises:
        UnsupportedSiteError: there is none.
    """
    layer = _nearest_layer(sg, sg.base_node, forward=False)
    if layer is None:
        raise UnsupportedSiteError(_no_width(sg, "output", who))
    return layer


def input_layer(sg: SiteGraph, *, who: str) -> nn.Module:
    """The first linear layer that reads a sub-layer's first argument through
    width-keeping operations; its ``in_features`` is the sub-layer's input width.

    Raises:
        UnsupportedSiteError: there is none.
    """
    layer = _nearest_layer(sg, sg.input_node, forward=True)
    if layer is None:
        raise UnsupportedSiteError(_no_width(sg, "input", who))
    return layer


def _no_width(sg: SiteGraph, what: str, who: str) -> str:
    site = sg.site
    return (f"{who}: cannot tell the width of the {what} of {site or 'the model'} "
            f"({type(sg.template).__name__}): no linear layer "
            f"{'reads its first argument' if what == 'input' else 'makes its output'} through "
            f"width-keeping operations (elementwise ops, norms, dropout). Way out: select the "
            f"layers inside it (pattern='{site + '.' if site else ''}*').")


def _call_of(sg: SiteGraph, qname: str, who: str) -> fx.Node:
    site = sg.site
    target = qname[len(site) + 1:] if site else qname
    hits = [n for n in sg.graph.nodes if n.op == "call_module" and n.target == target]
    if len(hits) != 1:
        raise UnsupportedSiteError(
            f"{who}: {site or 'the model'} ({type(sg.template).__name__}) calls {qname} "
            f"{len(hits)} times in its forward; a parallel adapter needs exactly one call to "
            f"read or join. Way out: select single layers with pattern=....")
    return hits[0]


def branch_points(root: nn.Module, sg: SiteGraph, sub: SubLayer, *, who: str) -> Branch:
    """Find what a parallel adapter on ``sub`` reads and joins in ``sg``, its site graph.

    ``"layer"`` and ``"module"``: the site's input (:func:`surgery.sites.rewrite.site_input`)
    and output (:func:`surgery.sites.rewrite.site_output`). ``"ffn"`` and ``"attention"``:
    the input of the first of ``sub.inputs`` (or the argument carrying it) and the output
    of ``sub.output``, each after the nodes earlier passes inserted on its main path.

    Args:
        root: the model root (``sub.inputs`` may sit outside the site).
        sg: the site graph at ``sub.module``.
        sub: the span, from :func:`find_sublayers` or a selection by name.
        who: the pass asking, named in errors.

    Raises:
        UnsupportedSiteError: a layer of the span is not called exactly once in the site
            graph; the argument carrying the input cannot be told apart; or (a module named
            by pattern) no linear layer shows the width of its input or output.
    """
    if sub.kind == "layer":
        d_in, d_out = layer_features(sg)
        return Branch(site_input(sg), site_output(sg), d_in, d_out, sg.weight)
    if sub.kind == "module":
        first, last = input_layer(sg, who=who), output_layer(sg, who=who)
        return Branch(site_input(sg), site_output(sg), layer_features(first)[0],
                      layer_features(last)[1], last.weight)
    out_call = _call_of(sg, sub.output or "", who)
    if sub.carried:
        hits = [p for p in sg.graph.nodes
                if p.op == "placeholder" and use_signature(sg, p) == sub.carrier]
        if len(hits) != 1:
            raise UnsupportedSiteError(
                f"{who}: cannot tell which argument of {sub.module} "
                f"({type(sg.template).__name__}) carries the input of {sub.inputs[0]}. Way "
                f"out: select single layers with pattern=....")
        reads = follow_main_path(hits[0])
    else:
        reads = _call_of(sg, sub.inputs[0], who).args[0]
        if not isinstance(reads, fx.Node):
            raise UnsupportedSiteError(f"{who}: the input of {sub.inputs[0]} is a constant, not "
                                       f"a graph value.")
    first = root.get_submodule(sub.inputs[0])
    last = root.get_submodule(sub.output or "")
    return Branch(reads, follow_main_path(out_call), layer_features(first)[0],
                  layer_features(last)[1], last.weight)
