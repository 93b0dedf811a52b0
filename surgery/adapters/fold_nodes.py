"""Taking an adapter's nodes out of a site graph and putting them back exactly.

A merge removes every node of the adapter (:func:`remove_adapter`): the main node's users
read its first argument instead (the layer's result for a branch's ``add`` and an output
scaling, the layer's input for an input scaling), and the branch goes. What was removed is
kept as :class:`~surgery.adapters.merge_state.NodeSpec` (names, targets, arguments by node
name, ``surgery*`` metadata, position), picklable with the model. :func:`restore_adapter`
recreates the nodes under their old names and makes what reads the main node's first
argument on the layer's path, and the side branches that read the main node before the
merge, read the main node again.
"""

from __future__ import annotations

from typing import Any

from torch import fx
from torch.fx.node import map_aggregate

from surgery.adapters.fold_layout import Key, adapter_nodes, main_node, tag
from surgery.adapters.merge_state import MergeRecord, NodeRef, NodeSpec, label
from surgery.errors import MergeError
from surgery.sites.rewrite import BRANCH_PARTS
from surgery.sites.site_graph import SiteGraph

__all__ = ["check_removable", "remove_adapter", "missing_refs", "restore_adapter"]

USERS_KEY = "surgery_merge_users"
"""Key, in the main node's :class:`NodeSpec` meta, of the names of the nodes that read it
when it was removed."""


def check_removable(sg: SiteGraph, key: Key, nodes: list[fx.Node] | None = None
                    ) -> tuple[list[fx.Node], fx.Node]:
    """The adapter's nodes and main node, after checking they can be taken out.

    ``nodes``: a part of the adapter's nodes to take out alone (one branch of an adapter
    with several, :mod:`surgery.adapters.fold_params`); all of them by default.

    Raises:
        MergeError: no single main node, or a branch node feeds something outside the
            adapter (it cannot go without changing what that reads).
    """
    nodes = adapter_nodes(sg, key) if nodes is None else nodes
    main = main_node(sg, key, nodes)
    if not main.args or not isinstance(main.args[0], fx.Node):
        raise MergeError(f"{label(*key)} at {sg.site or 'the model'}: node {main.name!r} does "
                         f"not read the layer's path as its first argument; it cannot be folded")
    own = set(nodes)
    for node in nodes:
        if node is not main and any(u not in own for u in node.users):
            raise MergeError(f"node {node.name!r} of {label(*key)} at {sg.site or 'the model'} "
                             f"has users outside the adapter; the branch cannot be removed")
    return nodes, main


def _spec(node: fx.Node, extra: dict[str, Any]) -> NodeSpec:
    def ref(a: Any) -> Any:
        return NodeRef(a.name) if isinstance(a, fx.Node) else a

    return NodeSpec(node.name, node.op, node.target, map_aggregate(node.args, ref),
                    dict(map_aggregate(node.kwargs, ref)),
                    {k: v for k, v in node.meta.items() if k.startswith("surgery")} | extra,
                    node.prev.name)


def remove_adapter(sg: SiteGraph, key: Key, nodes: list[fx.Node] | None = None
                   ) -> tuple[tuple[NodeSpec, ...], str]:
    """Take every node of one adapter (or only ``nodes``, see :func:`check_removable`) out
    of the site graph.

    Returns:
        ``(specs, main)``: the removed nodes in graph order, and the main node's name.

    Raises:
        MergeError: see :func:`check_removable`; nothing is changed then.
    """
    nodes, main = check_removable(sg, key, nodes)
    users = {USERS_KEY: tuple(u.name for u in main.users if u not in nodes)}
    specs = tuple(_spec(n, users if n is main else {}) for n in nodes)
    main.replace_all_uses_with(main.args[0])
    for node in reversed(nodes):
        sg.graph.erase_node(node)
    return specs, main.name


def _refs(spec: NodeSpec) -> list[str]:
    found: list[str] = []
    map_aggregate((spec.args, spec.kwargs),
                  lambda a: found.append(a.name) if isinstance(a, NodeRef) else None)
    return found


def missing_refs(sg: SiteGraph, records: tuple[MergeRecord, ...]) -> list[str]:
    """Names the removed nodes of ``records`` read that are no longer in the graph (the
    nodes of the records themselves count as present: they come back first)."""
    present = {n.name for n in sg.graph.nodes}
    present.update(s.name for r in records for s in r.nodes)
    return [name for r in records for s in r.nodes for name in _refs(s) if name not in present]


def _is_branch(node: fx.Node) -> bool:
    meta = tag(node)
    return bool(meta) and meta.get("part") in BRANCH_PARTS


def restore_adapter(sg: SiteGraph, record: MergeRecord) -> list[fx.Node]:
    """Put the nodes of one merged adapter back into the site graph.

    Each node is recreated under its old name where that name is free, with its old
    metadata, right after the node it followed when removed (or after its last input, if
    that node is gone or comes too early). Then every user of the main node's first
    argument, except the adapter's own nodes and other adapters' side branches, reads
    the main node again: exactly the nodes that saw the merged weight's result; and so do
    the side branches that read the main node when it was removed (a serial adapter's
    ``down`` reading the layer's output; their names are kept in the main node's spec).

    Returns:
        The recreated nodes, in graph order.

    Raises:
        MergeError: a node they read is no longer in the graph (see :func:`missing_refs`).
    """
    graph = sg.graph
    gone = missing_refs(sg, (record,))
    if gone:
        raise MergeError(f"{record.label} at {record.site}: node {gone[0]!r} it read is no "
                         f"longer in the site graph, so the adapter cannot be put back")
    by_name = {n.name: n for n in graph.nodes}
    used = getattr(getattr(graph, "_graph_namespace", None), "_used_names", None)
    created: dict[str, fx.Node] = {}

    def resolve(a: Any) -> Any:
        if isinstance(a, NodeRef):
            return created.get(a.name) or by_name[a.name]
        return a

    for spec in record.nodes:
        args = map_aggregate(spec.args, resolve)
        kwargs = dict(map_aggregate(spec.kwargs, resolve))
        if spec.name not in by_name and isinstance(used, set):
            used.discard(spec.name)  # names of erased nodes stay reserved; free the old one
        with graph.inserting_after(_anchor(graph, created.get(spec.after) or
                                           by_name.get(spec.after), args, kwargs)):
            node = graph.create_node(spec.op, spec.target, tuple(args), kwargs, name=spec.name)
        node.meta = dict(spec.meta)
        created[spec.name] = node
    main = created[record.main]
    through = main.args[0]
    own = set(created.values())
    through.replace_all_uses_with(main, delete_user_cb=lambda u: u not in own and not _is_branch(u))
    for name in main.meta.pop(USERS_KEY, ()):
        if name in by_name:  # a side branch that read the main node (a serial adapter's down)
            by_name[name].replace_input_with(through, main)
    return list(created.values())


def _anchor(graph: fx.Graph, after: fx.Node | None, args: Any, kwargs: Any) -> fx.Node:
    """``after`` if every input comes no later than it, else the last input."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    inputs: list[fx.Node] = []
    map_aggregate((args, kwargs), lambda a: inputs.append(a) if isinstance(a, fx.Node) else None)
    last = max(inputs, key=order.__getitem__, default=None)
    if after is None or (last is not None and order[last] > order[after]):
        return last if last is not None else next(iter(graph.nodes))
    return after
