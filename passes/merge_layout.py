"""Where the adapter nodes sit around a call of a layer, and in which order they can fold.

A branch folds into a layer's weight only when the weight sees it alone: a LoRA branch
whose ``add`` reads the layer's call (possibly through other LoRA adds) and whose input is
the layer's input; an IA³ vector right at the call (output scaling) or right before it
(input scaling). :func:`plan_site` finds that order for every call of a layer, or says
what has to be merged first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import fx

from passes.merge_records import KIND_LABEL, MERGE_PASS, WHY_NOT_LINEAR
from surgery.errors import MergeError
from surgery.map.graphs import CallSite
from surgery.sites.rewrite import call_input

__all__ = ["LORA_PARTS", "tag", "is_part", "Layout", "layout", "lora_nodes", "plan_call",
           "plan_site"]

LORA_PARTS = ("lora_dropout", "lora_A", "lora_B", "scale", "add")
"""The nodes of one LoRA branch, in graph order."""
SIDE_PARTS = frozenset(LORA_PARTS[:-1])  # nodes beside the path, feeding an add


def tag(node: Any) -> dict | None:
    """The ``meta["surgery"]`` a pass put on ``node`` (``None`` for other nodes and values)."""
    return node.meta.get("surgery") if isinstance(node, fx.Node) else None


def is_part(node: Any, pass_name: str, part: str, site: str) -> bool:
    """Whether ``node`` is the ``part`` node of a ``pass_name`` adapter at ``site``."""
    meta = tag(node)
    return bool(meta) and meta.get("pass") == pass_name and meta.get("part") == part \
        and meta.get("site") == site


@dataclass
class Layout:
    """The LoRA and IA³ nodes around one call of a layer.

    Attributes:
        call: the call site.
        inputs: IA³ input-scaling nodes of this layer, the one feeding the call first.
        outputs: nodes passes put on the path of the call's value (LoRA ``add``, IA³
            output scaling, other passes' nodes), the one reading the call first (a chain:
            each reads the previous one and is its only user).
    """

    call: CallSite
    inputs: list[fx.Node]
    outputs: list[fx.Node]

    def key(self, node: fx.Node) -> tuple[str, str]:
        """``(pass name, adapter name)`` of an adapter node."""
        meta = tag(node)
        return meta["pass"], meta["adapter"]

    def keys(self) -> set[tuple[str, str]]:
        """Every ``(pass name, adapter name)`` around the call."""
        return {self.key(n) for n in self.inputs + self.outputs}


def layout(call: CallSite, site: str) -> Layout:
    """Find the adapter nodes of ``site`` around one call of it."""
    base = call.node
    inputs = []
    cur = call_input(base)
    while is_part(cur, "ia3", "ia3_l", site) and cur.op == "call_module":
        inputs.append(cur)
        cur = call_input(cur)
    outputs = []
    cur = base
    while len(cur.users) == 1:
        (user,) = cur.users
        meta = tag(user)
        if not (meta and meta.get("site") == site and user.args and user.args[0] is cur
                and meta.get("part") not in SIDE_PARTS):
            break
        outputs.append(user)  # LoRA adds, IA³ scalings, and other passes' nodes on the path
        cur = user
    return Layout(call, inputs, outputs)


def lora_nodes(add: fx.Node, site: str) -> dict[str, fx.Node]:
    """The five nodes of the LoRA branch ending in ``add``, by part.

    Raises:
        MergeError: the branch was edited into a shape the merge does not recognise.
    """
    try:
        scale = add.args[1]
        lora_b = scale.args[0]
        lora_a = lora_b.args[0]
        drop = lora_a.args[0]
        nodes = {"lora_dropout": drop, "lora_A": lora_a, "lora_B": lora_b, "scale": scale,
                 "add": add}
    except (AttributeError, IndexError) as e:
        raise MergeError(f"the LoRA branch ending in node {add.name!r} at {site} is not "
                         f"dropout → lora_A → lora_B → scale → add; it cannot be merged") from e
    adapter = tag(add)["adapter"]
    for part, node in nodes.items():
        meta = tag(node)
        if not (meta and meta.get("pass") == "lora" and meta.get("part") == part
                and meta.get("site") == site and meta.get("adapter") == adapter):
            raise MergeError(f"the LoRA branch ending in node {add.name!r} at {site} is not "
                             f"dropout → lora_A → lora_B → scale → add; it cannot be merged")
    for part in ("lora_dropout", "lora_A", "lora_B", "scale"):
        if len(nodes[part].users) != 1:
            raise MergeError(f"node {nodes[part].name!r} of the LoRA branch {adapter!r} at {site} "
                             f"has other users; the branch cannot be removed")
    return nodes


def plan_call(lay: Layout, site: str, wanted: set[tuple[str, str]]) -> list[tuple[str, str]]:
    """The order in which the ``wanted`` adapters of one call can be folded, innermost first.

    A LoRA branch folds when only other LoRA adds lie between it and the call and it reads
    the call's own input; an IA³ output vector when it reads the call directly; an IA³ input
    vector when it feeds the call and nothing else reads it.

    Raises:
        MergeError: an adapter is missing from this call, or another adapter, not being
            merged, lies in the way (the message says which to merge first).
    """
    missing = wanted - lay.keys()
    if missing:
        kind, name = sorted(missing)[0]
        raise MergeError(f"{KIND_LABEL.get(kind, kind)} adapter {name!r} of {site} has no "
                         f"branch at the call {lay.call.node.name!r}: the graph around it was "
                         f"edited by hand or by a pass that does not keep the branch in place")
    outputs = list(lay.outputs)
    inputs = list(lay.inputs)
    base_in = call_input(lay.call.node)
    readers = {n: set(n.users) for n in inputs}
    drop_of = {n: lora_nodes(n, site)["lora_dropout"] for n in outputs if is_part(n, "lora", "add", site)}
    pending = set(wanted)
    order: list[tuple[str, str]] = []

    def take(key: tuple[str, str]) -> None:
        pending.discard(key)
        order.append(key)

    while pending:
        progressed = False
        for p, node in enumerate(outputs):
            key = lay.key(node)
            if key not in pending:
                continue
            if key[0] == "lora":
                x = drop_of[node].args[0]
                if all(q in drop_of for q in outputs[:p]) and x is base_in:
                    outputs.pop(p)
                    if x in readers:
                        readers[x].discard(drop_of[node])
                    take(key)
                    progressed = True
                    break
            elif key[0] == "ia3" and p == 0:
                outputs.pop(0)
                take(key)
                progressed = True
                break
        if progressed:
            continue
        if inputs and lay.key(inputs[0]) in pending and len(readers[inputs[0]]) == 1:
            node = inputs.pop(0)
            base_in = call_input(node)
            take(lay.key(node))
            continue
        raise MergeError(_blocked(lay, site, pending, outputs, inputs, base_in, drop_of))
    return order


def _blocked(lay: Layout, site: str, pending: set[tuple[str, str]], outputs: list[fx.Node],
             inputs: list[fx.Node], base_in: Any, drop_of: dict[fx.Node, fx.Node]) -> str:
    """Explain why none of the ``pending`` adapters can fold, naming what to merge first."""
    def label(node: fx.Node) -> str:
        kind, name = lay.key(node)
        return f"{KIND_LABEL.get(kind, kind)} {name!r}"

    for p, node in enumerate(outputs):
        if lay.key(node) not in pending:
            continue
        kind, name = lay.key(node)
        blockers = [q for q in outputs[:p] if not (kind == "lora" and q in drop_of)]
        if blockers:
            b = blockers[0]
            return (f"cannot merge {KIND_LABEL[kind]} {name!r} into {site}: {label(b)} sits "
                    f"between the layer and it, so the layer's weight does not see it alone. "
                    f"Way out: {_merge_first(lay.key(b), label(b))}.")
        if kind == "lora" and drop_of[node].args[0] is not base_in:
            ins = [n for n in inputs]
            what = label(ins[0]) if ins else "another node"
            return (f"cannot merge LoRA {name!r} into {site}: the layer reads its input through "
                    f"{what} (IA³ input scaling) but the LoRA branch does not, so no single "
                    f"weight computes both. Way out: merge {what} first "
                    f"({MERGE_PASS['ia3']}).")
    node = inputs[0] if inputs else None
    for q, cand in enumerate(inputs):
        if lay.key(cand) in pending:
            kind, name = lay.key(cand)
            if q > 0:
                return (f"cannot merge IA³ {name!r} into {site}: {label(inputs[0])} lies between "
                        f"it and the layer. Way out: merge {label(inputs[0])} first.")
            node = cand
            break
    if node is not None:
        others = [u for u in node.users if u is not lay.call.node]
        readers = [f"LoRA {tag(u)['adapter']!r}" for u in others if tag(u)] or \
            [repr(u.name) for u in others]
        return (f"cannot merge IA³ {lay.key(node)[1]!r} into {site}: its scaled input also feeds "
                f"{', '.join(readers)}, which would lose the scaling. Way out: merge "
                f"{readers[0]} first ({MERGE_PASS['lora']}).")
    kind, name = sorted(pending)[0]
    return f"cannot merge {KIND_LABEL.get(kind, kind)} {name!r} into {site}"


def _merge_first(key: tuple[str, str], label: str) -> str:
    if key[0] in MERGE_PASS:
        return f"merge {label} first ({MERGE_PASS[key[0]]}), in the same apply_passes call if you like"
    return f"{label} cannot be merged ({WHY_NOT_LINEAR}); leave this adapter unmerged"


def plan_site(calls: Sequence[CallSite], site: str,
              wanted: set[tuple[str, str]]) -> list[tuple[str, str]]:
    """:func:`plan_call` for every call of a layer; all calls must agree.

    Raises:
        MergeError: as :func:`plan_call`, or two calls of a shared layer carry different
            adapters.
    """
    order = None
    for call in calls:
        this = plan_call(layout(call, site), site, wanted)
        if order is not None and this != order:
            raise MergeError(f"the calls of {site} carry different adapters ({order} vs "
                             f"{this}); a shared layer merges only when every call has them")
        order = this
    return order or []
