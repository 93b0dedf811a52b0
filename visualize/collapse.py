"""Collapsing module subtrees below a depth into one node each, keeping what a pass changed open."""

from __future__ import annotations

from typing import Any

import networkx as nx

from visualize.nodeinfo import param_state, parent_path

__all__ = ["collapse", "group_of", "changed_paths"]


def _ancestors(path: str) -> list[str]:
    """``"a.b.c"`` → ``["a", "a.b", "a.b.c"]``; ``[]`` for the root."""
    parts = path.split(".") if path else []
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def changed_paths(graph: nx.DiGraph) -> frozenset[str]:
    """Module paths that hold something a pass changed, with all their ancestors.

    A node is a change when a pass inserted it (``adapter``), when a pass rewrote one of
    its weights (``rewritten``, a merge), or when a diff found it removed
    (``diff="removed"``). The module it is drawn in (``cluster``) and, for inserted nodes,
    the site they adapt are kept open by :func:`collapse` given these paths.
    """
    out: set[str] = set()
    for _, attrs in graph.nodes(data=True):
        if not (attrs.get("adapter") or attrs.get("rewritten") or attrs.get("diff") == "removed"):
            continue
        site = (attrs.get("provenance") or {}).get("site")
        for path in (attrs.get("cluster") or "", str(site or "")):
            out.update(_ancestors(path))
    return frozenset(out)


def group_of(attrs: dict[str, Any], depth: int,
             open_paths: frozenset[str] = frozenset()) -> str | None:
    """The module path a node collapses into at ``depth``, or ``None`` if it stays.

    A call to module ``a.b.c`` sits at level 3; any other node inside module ``a.b`` sits at
    level 3 too (one below the module). Nodes above ``depth`` stay; the model's own inputs
    and output always stay. A module in ``open_paths`` is not collapsed: a node inside it
    collapses into its shallowest enclosing module at ``depth`` or deeper that is not open,
    and stays if there is none (a call of a module inside an open one stays one node).
    """
    if attrs["op"] in ("placeholder", "output") and not attrs["graph"]:
        return None
    if attrs["op"] == "call_module" and attrs["module"]:
        parts = attrs["module"].split(".")
        level = len(parts)
        deepest = level - 1  # a module call is never collapsed into itself
    else:
        parts = attrs["cluster"].split(".") if attrs["cluster"] else []
        level = len(parts) + 1
        deepest = len(parts)
    if level <= depth:
        return None
    for k in range(depth, deepest + 1):
        path = ".".join(parts[:k])
        if path not in open_paths:
            return path
    return None


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


def collapse(graph: nx.DiGraph, depth: int, *,
             open_paths: frozenset[str] = frozenset()) -> nx.DiGraph:
    """Return a copy of ``graph`` with every module deeper than ``depth`` drawn as one node.

    Args:
        graph: a graph from :func:`visualize.graph.to_networkx` (uncollapsed).
        depth: the deepest module level kept open, ``>= 1``.
        open_paths: modules never collapsed, whatever their depth (:func:`changed_paths`
            keeps what a pass changed in view); see :func:`group_of`.

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
        group = group_of(attrs, depth, open_paths)
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
            site = (attrs.get("provenance") or {}).get("site")
            natural = (group_of(attrs, depth, open_paths)
                       if attrs["adapter"] and str(site or "") not in open_paths else None)
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
