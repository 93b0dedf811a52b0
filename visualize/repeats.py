"""Identical repeated blocks drawn once: ``model.layers 0–23 ×24``.

A *block* is what a graph of :func:`visualize.to_networkx` draws for one item of a numbered
container (``model.layers.3`` of an ``nn.ModuleList``, ``3`` of an ``nn.Sequential`` at the
root): every node drawn inside that module, and the nodes passes inserted at sites inside
it. Two blocks are the same when their graphs are isomorphic with equal node labels, a
node's label being what the drawing shows about it with the block's own path taken out of
every qualified name: op, target, module class, shape and dtype, parameters (relative name,
shape, trainable, rewritten), what a pass inserted there (pass, role, part, adapter name,
active), and the shapes it reads from outside the block. Candidates are grouped by
:func:`networkx.weisfeiler_lehman_graph_hash` of the relabelled block graph; a node-to-node
correspondence confirms each pair (by graph order, which identical code traces alike,
else by :class:`networkx.algorithms.isomorphism.DiGraphMatcher`).

A *run* is a maximal sequence of consecutive identical blocks. :func:`collapse_repeats`
keeps the first block of each run of two or more and drops the others; the kept nodes
stand for every copy (``repeat`` = how many, ``copies`` = the node ids drawn before), the
edges that crossed the dropped blocks attach to the kept one, and the edges from one copy
to the next become one dashed "repeated" edge. Several graphs (the before and after of a
diff) are collapsed with the same runs, so both pictures show the same blocks: a layer
that differs in either graph is drawn apart in both.

Before a LoRA pass on every layer of a 24-layer model, and after it on layers 0–11 only::

    model.layers 0–23 ×24          model.layers 0–11 ×12   (q_proj + lora branch)
                                   model.layers 12–23 ×12  (q_proj alone)
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
from networkx.algorithms.isomorphism import DiGraphMatcher

__all__ = ["Block", "Run", "RepeatMismatch", "blocks_of", "numbered_lists", "correspondence",
           "collapse_repeats", "format_indices", "item_path", "display_path", "relative"]

_WL_ITERATIONS = 3


class RepeatMismatch(Exception):
    """Blocks that were expected to be identical (one run given by the caller) are not."""


def item_path(parent: str, index: int) -> str:
    """``("model.layers", 3)`` → ``"model.layers.3"``; ``("", 3)`` → ``"3"``."""
    return f"{parent}.{index}" if parent else str(index)


def format_indices(indices: Sequence[int]) -> str:
    """``(0, 1, 2, 5)`` → ``"0–2, 5"``."""
    parts: list[str] = []
    items = sorted(indices)
    start = prev = items[0]
    for i in items[1:] + [None]:  # type: ignore[list-item]
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}–{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(parts)


@dataclass(frozen=True)
class Run:
    """Consecutive identical items of one numbered container, drawn as one block.

    Attributes:
        parent: the container's qualified name (``"model.layers"``; ``""`` at the root).
        indices: every item the drawn block stands for, in order (``0, 1, ..., 23``).
        members: the items present in the graph; the first is the one drawn.
    """

    parent: str
    indices: tuple[int, ...]
    members: tuple[int, ...]

    @property
    def path(self) -> str:
        """Qualified name of the drawn item (``"model.layers.0"``)."""
        return item_path(self.parent, self.members[0])

    @property
    def count(self) -> int:
        """How many items the drawn block stands for."""
        return len(self.indices)

    @property
    def label(self) -> str:
        """``"model.layers 0–23"``."""
        return f"{self.parent} {format_indices(self.indices)}".strip()


def _owner(attrs: Mapping[str, Any]) -> str:
    """The module path a node belongs to: the site of an inserted node, the module of a
    collapsed one, else the module it is drawn in."""
    prov = attrs.get("provenance") or {}
    if attrs.get("adapter") and prov.get("site"):
        return str(prov["site"])
    if attrs.get("op") == "module" and attrs.get("module"):
        return str(attrs["module"])
    return str(attrs.get("cluster") or "")


def _items_in(path: str) -> list[tuple[str, int]]:
    """Every ``(container, index)`` a module path lies in: ``"a.3.b.1"`` →
    ``[("a", 3), ("a.3.b", 1)]``."""
    parts = path.split(".") if path else []
    return [(".".join(parts[:j]), int(p)) for j, p in enumerate(parts) if p.isdigit()]


def numbered_lists(graph: nx.DiGraph) -> dict[str, set[int]]:
    """Containers with at least two numbered items drawn in ``graph``: name → item indices."""
    found: dict[str, set[int]] = {}
    for _, attrs in graph.nodes(data=True):
        for parent, index in _items_in(_owner(attrs)):
            found.setdefault(parent, set()).add(index)
    return {k: v for k, v in found.items() if len(v) >= 2}


@dataclass(frozen=True)
class Block:
    """The nodes of one item, relabelled for comparison.

    Attributes:
        parent, index: the item (``"model.layers"``, 3).
        nodes: its node ids, in graph order.
        sub: its induced subgraph; node and edge attribute ``sig`` is the label compared.
        key: Weisfeiler-Lehman hash of ``sub`` with the classes of the item and of the
            modules inside it (equal for identical blocks).
    """

    parent: str
    index: int
    nodes: tuple[str, ...]
    sub: nx.DiGraph
    key: str

    @property
    def path(self) -> str:
        return item_path(self.parent, self.index)


def relative(path: str) -> Callable[[Any], Any]:
    """A function that writes ``#`` for the qualified name ``path`` wherever it appears as a
    whole name or a dotted prefix in a string (``model.layers.3.mlp`` → ``#.mlp``, while
    ``model.layers.30`` is left alone); other values pass through."""
    pattern = re.compile(rf"(?<![\w.]){re.escape(path)}(?!\w)")

    def rel(value: Any) -> Any:
        return pattern.sub("#", value) if isinstance(value, str) else value

    return rel


def _digest(value: Any) -> str:
    return hashlib.blake2b(repr(value).encode("utf-8"), digest_size=10).hexdigest()


def _node_sig(attrs: Mapping[str, Any], rel: Callable[[Any], Any], outside: list[tuple]) -> str:
    prov = attrs.get("provenance") or {}
    # an inlined graph's placeholders are named after whatever the caller passed
    named = attrs.get("op") != "placeholder" or not attrs.get("graph")
    return _digest((
        attrs.get("op"), rel(attrs.get("target")) if named else None, attrs.get("module_type"),
        attrs.get("shape"), attrs.get("dtype"), attrs.get("pass_name"),
        tuple(sorted((str(k), rel(v) if isinstance(v, str) else repr(v)) for k, v in prov.items())),
        tuple((rel(p["name"]), tuple(p["shape"]), p["trainable"], p.get("rewritten"))
              for p in attrs.get("params", ())),
        tuple(attrs.get("rewritten") or ()), bool(attrs.get("constant")),
        tuple(attrs.get("adapted") or ()), attrs.get("collapsed"), rel(attrs.get("cluster")),
        attrs.get("diff"), attrs.get("repeat", 1), rel(attrs.get("label")) if named else None,
        tuple(sorted(outside)),
    ))


def blocks_of(graph: nx.DiGraph, parent: str) -> dict[int, Block]:
    """The blocks of container ``parent`` drawn in ``graph``, by item index."""
    members: dict[int, list[str]] = {}
    for nid, attrs in graph.nodes(data=True):
        for p, index in _items_in(_owner(attrs)):
            if p == parent:
                members.setdefault(index, []).append(nid)
                break
    out: dict[int, Block] = {}
    types = graph.graph.get("module_types") or {}
    order = {nid: (int(graph.nodes[nid].get("order", 0)), str(nid)) for ids in members.values()
             for nid in ids}
    for index, ids in sorted(members.items()):
        ids.sort(key=order.__getitem__)
        inside = set(ids)
        rel = relative(item_path(parent, index))
        sub = nx.DiGraph()
        for nid in ids:
            outside = [repr((d.get("shape"), d.get("dtype")))
                       for u, _, d in graph.in_edges(nid, data=True) if u not in inside]
            sub.add_node(nid, sig=_node_sig(graph.nodes[nid], rel, outside))
        for nid in ids:
            for _, v, d in graph.out_edges(nid, data=True):
                if v in inside:
                    sig = _digest((d.get("shape"), d.get("dtype"), d.get("repeat")))
                    sub.add_edge(nid, v, sig=sig)
        with warnings.catch_warnings():  # networkx 3.5 says its directed hashes changed:
            warnings.simplefilter("ignore")  # they are only compared within one call here
            key = nx.weisfeiler_lehman_graph_hash(sub, node_attr="sig", edge_attr="sig",
                                                  iterations=_WL_ITERATIONS)
        path = item_path(parent, index)
        kinds = tuple(sorted((rel(p), t) for p, t in types.items()
                             if p == path or p.startswith(path + ".")))
        key = _digest((key, kinds))  # the classes of the item and of its modules
        out[index] = Block(parent, index, tuple(ids), sub, key)
    return out


def _same_sig(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return a["sig"] == b["sig"]


def correspondence(first: Block, other: Block) -> dict[str, str] | None:
    """Node of ``other`` → node of ``first`` when the two blocks are identical, else ``None``."""
    if first.key != other.key or len(first.nodes) != len(other.nodes) \
            or first.sub.number_of_edges() != other.sub.number_of_edges():
        return None
    a, b = first.sub, other.sub
    if all(a.nodes[x]["sig"] == b.nodes[y]["sig"] for x, y in zip(first.nodes, other.nodes)):
        by_order = dict(zip(other.nodes, first.nodes))
        if all(a.has_edge(by_order[u], by_order[v])
               and a.edges[by_order[u], by_order[v]]["sig"] == d["sig"]
               for u, v, d in b.edges(data=True)):
            return by_order
    matcher = DiGraphMatcher(a, b, node_match=_same_sig, edge_match=_same_sig)
    for iso in matcher.isomorphisms_iter():  # node of first -> node of other
        return {v: k for k, v in iso.items()}
    return None


class _BlockPairs:
    """Cached correspondences between blocks of one graph."""

    def __init__(self, blocks: Mapping[int, Block]) -> None:
        self.blocks = blocks
        self.cache: dict[tuple[int, int], dict[str, str] | None] = {}

    def get(self, first: int, other: int) -> dict[str, str] | None:
        if (first, other) not in self.cache:
            self.cache[first, other] = correspondence(self.blocks[first], self.blocks[other])
        return self.cache[first, other]

    def same(self, first: int, other: int) -> bool:
        """Both absent, or both present and identical."""
        a, b = first in self.blocks, other in self.blocks
        if a != b:
            return False
        return not a or self.get(first, other) is not None


def _find_runs(parent: str, pairs: Sequence[_BlockPairs],
              given: Sequence[range] | None = None) -> list[Run]:
    """The runs of container ``parent``, the same in every graph.

    Without ``given``: maximal runs of consecutive items identical in every graph (an item
    absent from a graph is identical there only to items absent too). With ``given`` (runs
    the caller found otherwise, each a range of item indices): one run per range of two or
    more, whose present members must be identical in every graph.

    Raises:
        RepeatMismatch: a given range holds items that differ.
    """
    indices = sorted(set().union(*(p.blocks.keys() for p in pairs)))
    runs: list[Run] = []
    if given is not None:
        for span in given:
            members = tuple(i for i in indices if i in span)
            if len(span) < 2 or not members:
                continue
            for p in pairs:
                for m in members[1:]:
                    if not p.same(members[0], m):
                        raise RepeatMismatch(f"{item_path(parent, m)} is not drawn like "
                                             f"{item_path(parent, members[0])}")
            runs.append(Run(parent, tuple(span), members))
        return runs
    current: list[int] = []
    for i in indices + [None]:  # type: ignore[list-item]
        if (i is not None and current and i == current[-1] + 1
                and all(p.same(current[0], i) for p in pairs)):
            current.append(i)
            continue
        if len(current) >= 2:
            runs.append(Run(parent, tuple(current), tuple(current)))
        current = [i] if i is not None else []
    return runs


def _collapse_runs(graph: nx.DiGraph, pairs: _BlockPairs, runs: Sequence[Run]) -> nx.DiGraph:
    """One graph with the blocks of ``runs`` (all of one container) collapsed."""
    rep: dict[str, str] = {}  # node of a dropped copy -> node of the kept block
    member_of: dict[str, tuple[int, int]] = {}  # node -> (run number, member)
    copies: dict[str, list[str]] = {}
    count: dict[str, int] = {}
    for r, run in enumerate(runs):
        first = pairs.blocks.get(run.members[0])
        if first is None:
            continue
        for nid in first.nodes:
            copies[nid] = list(graph.nodes[nid].get("copies") or (nid,))
            count[nid] = run.count * int(graph.nodes[nid].get("repeat", 1))
            member_of[nid] = (r, run.members[0])
        for m in run.members[1:]:
            mapping = pairs.get(run.members[0], m)
            assert mapping is not None  # _find_runs checked it
            for b, a in mapping.items():
                rep[b] = a
                member_of[b] = (r, m)
                copies[a].extend(graph.nodes[b].get("copies") or (b,))
    out = nx.DiGraph()
    out.graph.update(graph.graph)
    repeats = dict(graph.graph.get("repeats") or {})
    for run in runs:
        if run.members[0] in pairs.blocks:
            repeats[run.path] = {"parent": run.parent, "indices": run.indices, "count": run.count,
                                 "label": run.label}
    out.graph["repeats"] = dict(sorted(repeats.items()))
    for nid, attrs in graph.nodes(data=True):
        if nid in rep:
            continue
        if nid in copies:
            attrs = {**attrs, "copies": tuple(copies[nid]), "repeat": count[nid]}
        out.add_node(nid, **attrs)
    chained: dict[str, tuple[tuple[int, str], str, dict, int]] = {}
    for u, v, data in sorted(graph.edges(data=True), key=lambda e: _edge_order(graph, e)):
        a, b = rep.get(u, u), rep.get(v, v)
        mu, mv = member_of.get(u), member_of.get(v)
        if mu is not None and mv is not None and mu[0] == mv[0] and mu[1] != mv[1]:
            # one copy feeding the next: one dashed "repeated" edge per value, to its first reader
            key = (int(graph.nodes[b].get("order", 0)), b)
            if a not in chained or key < chained[a][0]:
                chained[a] = (key, b, data, runs[mu[0]].count)
        elif not out.has_edge(a, b):
            out.add_edge(a, b, **data)
    for a, (_, b, data, times) in sorted(chained.items()):
        if not out.has_edge(a, b):
            out.add_edge(a, b, **data, repeat=times)
    return out


def _edge_order(graph: nx.DiGraph, edge: tuple) -> tuple:
    u, v = edge[0], edge[1]
    return (int(graph.nodes[u].get("order", 0)), str(u),
            int(graph.nodes[v].get("order", 0)), str(v))


def collapse_repeats(graphs: Sequence[nx.DiGraph],
                     given: Mapping[str, Sequence[range]] | None = None
                     ) -> tuple[list[nx.DiGraph], list[Run]]:
    """Draw each run of identical consecutive blocks once, with the same runs in every graph.

    Containers are taken outermost first (``model.layers`` before the experts inside a
    layer); a container inside a dropped copy is gone with it.

    Args:
        graphs: graphs from :func:`visualize.to_networkx` (possibly depth-collapsed); not
            changed.
        given: runs found by the caller, by container (see :func:`_find_runs`); the other
            containers are searched here.

    Returns:
        ``(new graphs, runs)``. In each new graph the kept nodes of a run carry ``repeat``
        (how many items they stand for) and ``copies`` (the ids of the nodes they replace,
        their own first); edges from one copy to the next carry ``repeat`` too; the graph
        attribute ``repeats`` maps each kept item's path to ``{"parent", "indices",
        "count", "label"}``.

    Raises:
        RepeatMismatch: the items of a ``given`` run are not drawn alike.
    """
    out = list(graphs)
    found: list[Run] = []
    done: set[str] = set()
    given = given or {}
    while True:
        lists = set().union(*(numbered_lists(g).keys() for g in out)) - done
        if not lists:
            return out, found
        parent = min(lists, key=lambda p: (p.count(".") + (1 if p else 0), p))
        done.add(parent)
        pairs = [_BlockPairs(blocks_of(g, parent)) for g in out]
        runs = _find_runs(parent, pairs, given.get(parent))
        if runs:
            out = [_collapse_runs(g, p, runs) for g, p in zip(out, pairs)]
            found.extend(runs)


def display_path(path: str, repeats: Mapping[str, Mapping[str, Any]]) -> str:
    """A module path as a collapsed diagram names it: ``model.layers.0.self_attn`` drawn
    for layers 0–23 reads ``model.layers.0–23.self_attn``."""
    best = ""
    for kept in repeats:
        if (path == kept or path.startswith(kept + ".")) and len(kept) > len(best):
            best = kept
    if not best:
        return path
    info = repeats[best]
    parent = display_path(str(info["parent"]), {k: v for k, v in repeats.items() if k != best})
    span = format_indices(info["indices"])
    return (f"{parent}.{span}" if parent else span) + path[len(best):]
