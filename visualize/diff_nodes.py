"""Nodes added and removed between two drawn graphs (the graph half of a before/after diff)."""

from __future__ import annotations

import networkx as nx

from visualize.diff_report import NodeChange

__all__ = ["node_diff"]


def node_diff(before: nx.DiGraph, after: nx.DiGraph) -> tuple[NodeChange, ...]:
    """Nodes added and removed between two graphs of :func:`visualize.to_networkx`.

    A node is *added* when its id is new, or when a pass marked it (``pass_name``) and the
    node of that id in ``before`` carries no such mark; *removed*, the other way round, when
    its id is gone, or when a pass marked it and the node of that id in ``after`` carries no
    such mark (a merge takes a branch out; a re-traced plain model may reuse its node names).

    Returns:
        Added nodes (in after's graph order), then removed ones (in before's).
    """
    def key(graph: nx.DiGraph, nid: str) -> tuple[int, str]:
        return (int(graph.nodes[nid].get("order", 0)), nid)

    out = []
    for nid in sorted(after.nodes, key=lambda n: key(after, n)):
        attrs = after.nodes[nid]
        new_id = nid not in before
        marked = bool(attrs.get("pass_name")) and (new_id or not before.nodes[nid].get("pass_name"))
        if new_id or marked:
            prov = attrs.get("provenance") or {}
            out.append(NodeChange("added", nid, attrs["op"], str(attrs["label"]),
                                  attrs.get("pass_name"), prov.get("site")))
    for nid in sorted(before.nodes, key=lambda n: key(before, n)):
        attrs = before.nodes[nid]
        gone = nid not in after
        if gone or (attrs.get("pass_name") and not after.nodes[nid].get("pass_name")):
            prov = attrs.get("provenance") or {}
            out.append(NodeChange("removed", nid, attrs["op"], str(attrs["label"]),
                                  attrs.get("pass_name"), prov.get("site")))
    return tuple(out)
