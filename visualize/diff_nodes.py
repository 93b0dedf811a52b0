"""Nodes added and removed between two drawn graphs (the graph half of a before/after diff)."""

from __future__ import annotations

import re

import networkx as nx

from visualize.diff_report import NodeChange

__all__ = ["node_diff"]


_SUFFIX = re.compile(r"_\d+$")


def _order(graph: nx.DiGraph, nid: str) -> tuple[int, str]:
    return (int(graph.nodes[nid].get("order", 0)), nid)


def _local_names(graph: nx.DiGraph) -> dict[str, tuple[str, str, int]]:
    """Node id → ``(module path, name without the graph-wide counter, occurrence within
    that module)``: ``model.layers.3.mlp/mul_41`` → ``("model.layers.3.mlp", "mul", 1)``
    when it is the second ``mul`` drawn in that module. Graph-wide counters shift when a
    model traced again has nodes inserted earlier (a prefix in an attention interface), so
    two traces are matched by these local names instead."""
    seen: dict[tuple[str, str], int] = {}
    out = {}
    for nid in sorted(graph.nodes, key=lambda n: _order(graph, n)):
        scope, slash, name = str(nid).rpartition("/")
        base = _SUFFIX.sub("", name) if slash else str(nid)
        k = seen.get((scope, base), 0)
        seen[(scope, base)] = k + 1
        out[nid] = (scope, base, k)
    return out


def node_diff(before: nx.DiGraph, after: nx.DiGraph) -> tuple[NodeChange, ...]:
    """Nodes added and removed between two graphs of :func:`visualize.to_networkx`.

    Nodes are matched by id, else by their local name (module, name without the graph-wide
    counter, occurrence there: see :func:`_local_names`), so that a model traced again
    with nodes inserted early does not show every later node as changed. A node is
    *added* when it has no match in ``before``, or when a pass marked it (``pass_name``)
    and its match carries no such mark; *removed*, the other way round, when it has no
    match in ``after``, or when a pass marked it and its match in ``after`` carries no such
    mark (a merge takes a branch out; a re-traced plain model may reuse its node names).

    Returns:
        Added nodes (in after's graph order), then removed ones (in before's).
    """
    local_b, local_a = _local_names(before), _local_names(after)
    by_local_b = {v: k for k, v in local_b.items()}
    by_local_a = {v: k for k, v in local_a.items()}

    def match(nid: str, other: nx.DiGraph, local: dict, by_local: dict) -> str | None:
        return nid if nid in other else by_local.get(local[nid])

    out = []
    for nid in sorted(after.nodes, key=lambda n: _order(after, n)):
        attrs = after.nodes[nid]
        twin = match(nid, before, local_a, by_local_b)
        marked = bool(attrs.get("pass_name")) and (
            twin is None or not before.nodes[twin].get("pass_name"))
        if twin is None or marked:
            prov = attrs.get("provenance") or {}
            out.append(NodeChange("added", nid, attrs["op"], str(attrs["label"]),
                                  attrs.get("pass_name"), prov.get("site")))
    for nid in sorted(before.nodes, key=lambda n: _order(before, n)):
        attrs = before.nodes[nid]
        twin = match(nid, after, local_b, by_local_a)
        if twin is None or (attrs.get("pass_name") and not after.nodes[twin].get("pass_name")):
            prov = attrs.get("provenance") or {}
            out.append(NodeChange("removed", nid, attrs["op"], str(attrs["label"]),
                                  attrs.get("pass_name"), prov.get("site")))
    return tuple(out)
