"""The diff diagram: only what changed between two pictures, with its direct neighbours."""

from __future__ import annotations

from collections.abc import Collection

import networkx as nx

__all__ = ["diff_graph"]


def _around(graph: nx.DiGraph, core: Collection[str]) -> set[str]:
    keep = set(core)
    for nid in core:
        keep.update(graph.predecessors(nid))
        keep.update(graph.successors(nid))
    return keep


def diff_graph(before: nx.DiGraph, after: nx.DiGraph, added: Collection[str],
               removed: Collection[str]) -> nx.DiGraph:
    """The changed part of a before/after pair, as one graph to draw.

    The nodes of ``after`` in ``added`` and those of ``before`` in ``removed``, each with
    the nodes it reads from and feeds (its direct neighbours, drawn plainly for context),
    and the edges among them. Where a node is in both pictures, ``after``'s attributes
    win; removed nodes keep ``diff="removed"`` (drawn dashed by :func:`visualize.to_dot`).

    Args:
        before, after: the pictures of :func:`visualize.render_diff` (only read).
        added: node ids of ``after`` a diff found added (the highlighted ones).
        removed: node ids of ``before`` a diff found removed.

    Returns:
        A new ``networkx.DiGraph`` with ``after``'s graph attributes; empty when nothing
        changed.
    """
    added = [n for n in added if n in after]
    removed = [n for n in removed if n in before]
    old = before.subgraph(_around(before, removed)).copy() if removed else nx.DiGraph()
    new = after.subgraph(_around(after, added)).copy() if added else nx.DiGraph()
    out = nx.compose(old, new)
    out.graph.update(after.graph)
    return out
