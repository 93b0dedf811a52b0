"""Adapter nodes woven into the layer's own computation, and how to take them out again.

Most adapters join the layer's path at one node (LoRA's ``add``, an IA³ scaling) whose
first argument is the path without them. An ungated prefix in a hand-written attention
instead rewrites arguments of the attention op itself: its ``cat_key`` node stands where
the keys were, its ``mask`` node where the mask was, and it may switch the op's
``is_causal`` off (the extended mask then carries the causal pattern). To be removable, such
a node records, in its ``node.meta["surgery"]``:

- ``"stands_for"``: the index ``i`` of its own argument that it replaced in its readers
  (``concat_prefix(prefix, keys, dim)`` stands for ``args[1]``, the keys);
- ``"restores"``: the argument values it changed on other nodes, as
  ``(node name, position or None, keyword, old value, was passed)``.

:func:`woven_removal` checks that every node of an adapter that is read from outside the
adapter carries ``"stands_for"``, and returns the edit that gives every reader its argument
back and restores the changed values; erasing the adapter's nodes then leaves the graph as
it was before the adapter was added.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import fx

__all__ = ["stands_for", "record_restore", "woven_removal"]

_ABSENT = "absent"


def stands_for(node: fx.Node, index: int) -> fx.Node:
    """Record that, for its readers outside the adapter, ``node`` replaced its own
    ``args[index]``. Returns ``node``."""
    node.meta["surgery"]["stands_for"] = index
    return node


def record_restore(node: fx.Node, target: fx.Node, names: Sequence[str], name: str,
                   old: Any, passed: bool) -> None:
    """Record on adapter node ``node`` that argument ``name`` of ``target`` (whose
    positional order is ``names``) held ``old`` before the adapter changed it; ``passed``
    says whether the call passed it at all (an argument left at its default is dropped
    again on removal)."""
    i = list(names).index(name)
    position = i if i < len(target.args) else None
    node.meta["surgery"].setdefault("restores", []).append(
        (target.name, position, name, old, passed))


def _restore(graph: fx.Graph, entry: tuple) -> Callable[[], None]:
    target_name, position, name, old, passed = entry
    target = next((n for n in graph.nodes if n.name == target_name), None)

    def run() -> None:
        if target is None:
            return
        if position is not None and position < len(target.args):
            args = list(target.args)
            args[position] = old
            target.args = tuple(args)
        elif passed:
            target.kwargs = {**target.kwargs, name: old}
        else:
            target.kwargs = {k: v for k, v in target.kwargs.items() if k != name}

    return run


def woven_removal(graph: fx.Graph, nodes: list[fx.Node]) -> Callable[[], None] | None:
    """The edit that unweaves an adapter's ``nodes`` (in graph order) from ``graph``, or
    ``None`` when they cannot be taken out this way: a node read from outside the adapter
    that records no ``"stands_for"``, or values to restore while another adapter's nodes
    read this one's (a second prefix stacked on the same op was built on the changed
    values). The edit hands every outside reader its argument back, restores the recorded
    values, then erases the nodes; nothing is changed before it is called."""
    own = set(nodes)
    rewires: list[tuple[fx.Node, fx.Node, Any]] = []
    restores = []
    for node in nodes:
        meta = node.meta.get("surgery") or {}
        outside = [u for u in node.users if u not in own]
        restores += [_restore(graph, e) for e in meta.get("restores", ())]
        if not outside:
            continue
        index = meta.get("stands_for")
        if index is None or index >= len(node.args):
            return None
        rewires += [(u, node, node.args[index]) for u in outside]
    if not rewires:
        return None
    stacked = any("surgery" in u.meta for u, _, _ in rewires)
    if restores and stacked:
        return None

    def run() -> None:
        for user, node, original in rewires:
            user.replace_input_with(node, original)
        for restore in restores:
            restore()
        for node in reversed(nodes):
            graph.erase_node(node)

    return run
