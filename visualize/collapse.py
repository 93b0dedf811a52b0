"""Collapsing module subtrees below a depth into one node each."""

from __future__ import annotations

from typing import Any

import networkx as nx

from visualize.nodeinfo import param_state, parent_path

__all__ = ["collapse", "group_of"]


def group_of(attrs: dict[str, Any], depth: int) -> str | None:
    """The module path a node collapses into at ``depth``, or ``None`` if it stays.

    A call to module ``a.b.c`` sits at level 3; any other node inside module ``a.b`` sits at
    level 3 too (one below the module). Nodes above ``depth`` stay; the model's own inputs
    and output always stay.
    """
    if attrs["op"] in ("placeholder", "output") and not attrs["graph"]:
        return None
    if attrs["op"] == "call_module" and attrs["module"]:
        parts = attrs["module"].split(".")
        level = len(parts)
    else:
        parts = attrs["cluster"].split(".") if attrs["cluster"] else []
        level = len(parts) + 1
    if level <= depth:
        return None
    return ".".join(parts[:depth])


def _group_attrs(path: str, members: list[dict[str, Any]], module_type: str | None,
                 adapted: tuple[str, ...]) -> dict[str, Any]:
    params: dict[str, dict] = {}
    for member in members:
        for p in member["params"]:
            params.setdefault(p["name"], p)
    plist = tuple(params.values())
    return {
        "op": "module",
        "name": "*",
        "graph": path,
        "target": path,
        "label": path,
        "module": path,
        "module_type": module_type,
        "shape": None,
        "dtype": None,
        "params": plist,
        "numel": sum(p["numel"] for p in plist),
        "trainable_numel": sum(p["numel"] for p in plist if p["trainable"]),
        "param_state": param_state(plist),
        "rewritten": tuple(sorted({r for m in members for r in m["rewritten"]})),
        "constant": False,
        "provenance": None,
        "pass_name": None,
        "adapter": False,
        "adapted": adapted,
        "collapsed": len(members),
        "cluster": path if adapted else parent_path(path),
        "order": min(m["order"] for m in members),
    }


def collapse(graph: nx.DiGraph, depth: int) -> nx.DiGraph:
    """Return a copy of ``graph`` with every module deeper than ``depth`` drawn as one node.

    Args:
        graph: a graph from :func:`visualize.graph.to_networkx` (uncollapsed).
        depth: the deepest module level kept open, ``>= 1``.

    Returns:
        A new graph. A collapsed module's id is ``"<module path>/*"``; its attributes sum the
        parameters of the nodes it stands for, and ``adapted`` names the passes whose
        inserted nodes it contains. Those inserted nodes stay as nodes of their own, drawn
        beside the collapsed module (``cluster`` = its path). Edges inside a collapsed module
        disappear; edges across its boundary attach to it.
    """
    groups: dict[str, str] = {}
    adapted: dict[str, set[str]] = {}
    for nid, attrs in graph.nodes(data=True):
        group = group_of(attrs, depth)
        if group is None:
            continue
        if attrs["adapter"]:
            adapted.setdefault(group, set()).add(attrs["pass_name"] or "adapter")
        else:
            groups[nid] = group
    members: dict[str, list[dict[str, Any]]] = {}
    out = nx.DiGraph()
    out.graph.update(graph.graph)
    out.graph["depth"] = depth
    types = graph.graph.get("module_types", {})
    for nid, attrs in sorted(graph.nodes(data=True), key=lambda item: (item[1]["order"], item[0])):
        group = groups.get(nid)
        if group is None:
            kept = dict(attrs)
            natural = group_of(attrs, depth) if attrs["adapter"] else None
            if natural is not None:
                kept["cluster"] = natural
            out.add_node(nid, **kept)
            continue
        if group not in members:
            members[group] = []
            out.add_node(f"{group}/*")
        members[group].append(attrs)
    for group, items in members.items():
        out.nodes[f"{group}/*"].update(
            _group_attrs(group, items, types.get(group), tuple(sorted(adapted.get(group, ())))))
    for u, v, data in graph.edges(data=True):
        src = f"{groups[u]}/*" if u in groups else u
        dst = f"{groups[v]}/*" if v in groups else v
        if src != dst and not out.has_edge(src, dst):
            out.add_edge(src, dst, **data)
    return out
