"""Where an adapter sits in a site graph, and in which order adapters can fold.

An adapter at a site is a key ``(kind, name)`` (``("lora", "default")``): its modules on the
site graph (found by type, :class:`~surgery.sites.marker.AdapterModule`, never by name) and
its nodes (tagged ``node.meta["surgery"]`` with that pass and adapter). One node, its
*main* node, is on the layer's path (LoRA's ``add``, an IA³ scaling); the others form a
side branch (:data:`surgery.sites.rewrite.BRANCH_PARTS`).

An adapter folds into the layer's weight only when the weight sees it alone
(:func:`plan_site`): an ``"add"`` branch whose main node follows the layer's result through
other ``"add"`` branches only and whose branch reads the layer's own input; an ``"output"``
scaling right at the layer's result; an ``"input"`` scaling right before the layer, read by
nothing else; a ``"dora"`` branch placed as an ``"add"`` one. An unmerged DoRA branch reads
the layer's weight, so nothing else folds into that weight before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from surgery.adapters.merge_state import MERGE_PASS, WHY_NOT_LINEAR, label
from surgery.errors import MergeError
from surgery.sites.marker import AdapterModule
from surgery.sites.rewrite import BRANCH_PARTS, site_input
from surgery.sites.site_graph import SiteGraph

__all__ = ["Key", "tag", "key_of", "adapter_modules", "adapters_at", "fold_head",
           "adapter_nodes", "main_node", "branch_inputs", "Layout", "layout", "plan_site"]

Key = tuple[str, str]
"""``(kind, adapter name)``: the pass name an adapter's modules and nodes carry, and its name."""


def tag(node: Any) -> dict | None:
    """The ``meta["surgery"]`` a pass put on ``node`` (``None`` for other nodes and values)."""
    return node.meta.get("surgery") if isinstance(node, fx.Node) else None


def key_of(node: fx.Node) -> Key:
    """The adapter an inserted node belongs to."""
    meta = tag(node)
    return str(meta.get("pass")), str(meta.get("adapter"))


def _walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, AdapterModule]]:
    for name, child in module._modules.items():
        if child is None or isinstance(child, SiteGraph):  # a nested site has its own adapters
            continue
        if isinstance(child, AdapterModule):
            yield prefix + name, child
        else:
            yield from _walk(child, f"{prefix}{name}.")


def adapters_at(sg: SiteGraph) -> dict[Key, list[tuple[str, AdapterModule]]]:
    """Every adapter registered on a site graph: key → ``[(name relative to the site
    graph, module)]`` (``"lora_A.default"``), in registration order."""
    out: dict[Key, list[tuple[str, AdapterModule]]] = {}
    for rel, mod in _walk(sg, ""):
        out.setdefault((mod.pass_name, mod.adapter_name), []).append((rel, mod))
    return out


def adapter_modules(sg: SiteGraph, key: Key) -> list[tuple[str, AdapterModule]]:
    """The modules of one adapter at a site graph, with their names relative to it."""
    return adapters_at(sg).get(key, [])


def fold_head(sg: SiteGraph, key: Key) -> AdapterModule | None:
    """The module that answers for the adapter's fold (``fold_mode`` set), or ``None``."""
    return next((m for _, m in adapter_modules(sg, key) if m.fold_mode is not None), None)


def adapter_nodes(sg: SiteGraph, key: Key) -> list[fx.Node]:
    """The nodes of one adapter in the site graph, in graph order."""
    return [n for n in sg.graph.nodes if tag(n) and key_of(n) == key]


def main_node(sg: SiteGraph, key: Key, nodes: list[fx.Node]) -> fx.Node:
    """The adapter's one node on the layer's path.

    Raises:
        MergeError: there is not exactly one (the graph was edited into a shape the fold
            does not recognise).
    """
    main = [n for n in nodes if tag(n).get("part") not in BRANCH_PARTS]
    if len(main) != 1:
        raise MergeError(f"{label(*key)} at {sg.site or 'the model'} has {len(main)} nodes on "
                         f"the layer's path instead of one; the site graph was edited by hand, "
                         f"so it cannot be folded")
    return main[0]


def branch_inputs(nodes: list[fx.Node], main: fx.Node) -> set[fx.Node]:
    """The nodes outside the adapter that its side branch reads."""
    own = set(nodes)
    read = {a for n in nodes if n is not main for a in n.all_input_nodes}
    read.update(a for a in main.all_input_nodes[1:])
    return read - own


@dataclass
class Layout:
    """The inserted nodes on a layer's path in its site graph.

    Attributes:
        outputs: the nodes passes put on the path of the layer's result, the one reading
            it first (a chain: each reads the previous one as its first argument).
        inputs: the nodes passes put on the path of the layer's input, the one feeding the
            layer first.
        layer_in: the node the layer's own computation reads as its input.
    """

    outputs: list[fx.Node]
    inputs: list[fx.Node]
    layer_in: fx.Node

    def keys(self) -> set[Key]:
        """Every adapter with a node on the path."""
        return {key_of(n) for n in self.outputs + self.inputs}


def _chain(start: fx.Node) -> list[fx.Node]:
    out, cur = [], start
    while True:
        nxt = [u for u in cur.users if tag(u) and tag(u).get("part") not in BRANCH_PARTS
               and u.args and u.args[0] is cur]
        if len(nxt) != 1:
            return out
        cur = nxt[0]
        out.append(cur)


def layout(sg: SiteGraph) -> Layout:
    """Find the inserted nodes around the layer of a site graph."""
    return Layout(_chain(sg.base_node), list(reversed(_chain(sg.input_node))), site_input(sg))


def plan_site(sg: SiteGraph, wanted: set[Key]) -> list[Key]:
    """The order in which the ``wanted`` adapters of a site graph can fold, innermost first.

    Raises:
        MergeError: a wanted adapter has no node on the layer's path, or another adapter,
            not being folded, lies in the way (the message says which to merge first).
    """
    lay = layout(sg)
    site = sg.site or "the model"
    missing = wanted - lay.keys()
    if missing:
        raise MergeError(f"{label(*sorted(missing)[0])} at {site} has no node on the layer's "
                         f"path: the site graph was edited by hand or by a pass that does not "
                         f"keep the adapter next to the layer")
    modes = {key_of(n): _mode(sg, key_of(n)) for n in lay.outputs + lay.inputs}
    # a DoRA branch also reads the layer's own result (W x = result - bias): not an input
    branch = {n: branch_inputs(adapter_nodes(sg, key_of(n)), n)
              - ({sg.base_node} if modes[key_of(n)] == "dora" else set()) for n in lay.outputs}
    outputs, inputs, layer_in = list(lay.outputs), list(lay.inputs), lay.layer_in
    removed: set[fx.Node] = set()
    pending, order = set(wanted), []

    def take(node: fx.Node) -> None:
        pending.discard(key_of(node))
        order.append(key_of(node))
        removed.update(adapter_nodes(sg, key_of(node)))

    while pending:
        node = _next_output(outputs, pending, modes, branch, layer_in)
        if node is not None:
            outputs.remove(node)
            take(node)
            continue
        if inputs and key_of(inputs[0]) in pending and modes[key_of(inputs[0])] == "input" \
                and not {u for u in inputs[0].users if tag(u)} - removed \
                and _reads_weight(outputs, None, modes) is None:
            node = inputs.pop(0)
            layer_in = node.args[0]
            take(node)
            continue
        raise MergeError(_blocked(sg, pending, outputs, inputs, layer_in, modes, branch,
                                  removed))
    return order


def _mode(sg: SiteGraph, key: Key) -> str | None:
    head = fold_head(sg, key)
    return head.fold_mode if head is not None else None


def _next_output(outputs: list[fx.Node], pending: set[Key], modes: dict[Key, str | None],
                 branch: dict[fx.Node, set[fx.Node]], layer_in: fx.Node) -> fx.Node | None:
    for p, node in enumerate(outputs):
        key = key_of(node)
        if key not in pending:
            continue
        if _reads_weight(outputs, node, modes):
            continue
        if modes[key] == "add" and branch[node] == {layer_in} \
                and all(modes[key_of(q)] == "add" for q in outputs[:p]):
            return node
        if modes[key] == "dora" and branch[node] == {layer_in} \
                and all(modes[key_of(q)] == "add" for q in outputs[:p]):
            return node
        if modes[key] == "output" and p == 0:
            return node
    return None


def _reads_weight(outputs: list[fx.Node], node: fx.Node | None,
                  modes: dict[Key, str | None]) -> fx.Node | None:
    """An unfolded DoRA branch other than ``node``: it reads the layer's weight, so nothing
    else may fold into that weight before it."""
    return next((q for q in outputs if q is not node and modes[key_of(q)] == "dora"), None)


def _merge_first(key: Key, mode: str | None) -> str:
    if mode is not None:
        how = f" ({MERGE_PASS[key[0]]})" if key[0] in MERGE_PASS else ""
        return f"merge {label(*key)} first{how}, in the same apply_passes call if you like"
    return f"{label(*key)} cannot be merged ({WHY_NOT_LINEAR}); leave this adapter unmerged"


def _dora_reads(key: Key, dora: Key, modes: dict[Key, str | None], site: str) -> str:
    """Why ``key`` cannot fold while the DoRA adapter ``dora`` reads the layer's weight."""
    return (f"cannot merge {label(*key)} into {site}: the DoRA branch of {label(*dora)} "
            f"reads the layer's weight (its norm), so folding anything else into that "
            f"weight first would change what it computes. Way out: "
            f"{_merge_first(dora, modes[dora])}.")


def _blocked(sg: SiteGraph, pending: set[Key], outputs: list[fx.Node], inputs: list[fx.Node],
             layer_in: fx.Node, modes: dict[Key, str | None],
             branch: dict[fx.Node, set[fx.Node]], removed: set[fx.Node]) -> str:
    """Explain why none of the ``pending`` adapters can fold, naming what to merge first."""
    site = sg.site or "the model"
    for p, node in enumerate(outputs):
        key = key_of(node)
        if key not in pending:
            continue
        dora = _reads_weight(outputs, node, modes)
        if dora is not None:
            d = key_of(dora)
            if modes[key] == "dora":
                return (f"cannot merge {label(*key)} into {site}: it and {label(*d)} are both "
                        f"DoRA, and each reads the layer's weight (its norm) that the other "
                        f"would fold into, so neither can be merged while the other is there. "
                        f"Way out: keep them unmerged, or unload one of them first.")
            return _dora_reads(key, d, modes, site)
        blockers = [q for q in outputs[:p]
                    if not (modes[key] in ("add", "dora") and modes[key_of(q)] == "add")]
        if blockers:
            b = key_of(blockers[0])
            return (f"cannot merge {label(*key)} into {site}: {label(*b)} sits between the "
                    f"layer and it, so the layer's weight does not see it alone. Way out: "
                    f"{_merge_first(b, modes[b])}.")
        if modes[key] in ("add", "dora") and branch[node] != {layer_in}:
            what = label(*key_of(inputs[0])) if inputs else "another node"
            return (f"cannot merge {label(*key)} into {site}: the layer reads its input through "
                    f"{what} (input scaling) but the branch does not, so no single weight "
                    f"computes both. Way out: merge {what} first.")
    for q, cand in enumerate(inputs):
        key = key_of(cand)
        if key not in pending:
            continue
        dora = _reads_weight(outputs, None, modes)
        if dora is not None:
            d = key_of(dora)
            return _dora_reads(key, d, modes, site)
        if q > 0:
            first = key_of(inputs[0])
            return (f"cannot merge {label(*key)} into {site}: {label(*first)} lies between it "
                    f"and the layer. Way out: {_merge_first(first, modes[first])}.")
        readers = [u for u in cand.users if tag(u) and u not in removed]
        if readers:
            first = key_of(readers[0])
            names = ", ".join(sorted({label(*key_of(u)) for u in readers}))
            return (f"cannot merge {label(*key)} into {site}: its scaled input also feeds "
                    f"{names}, which would lose the scaling. Way out: "
                    f"{_merge_first(first, _mode(sg, first))}.")
    return f"cannot merge {label(*sorted(pending)[0])} into {site}"
