"""Deleting a named adapter from an adapted model.

::

    adapted = apply_passes(model, [LoRAPass(name="a"), IA3Pass(name="b")])
    only_a = surgery.delete_adapter(adapted, "b")     # as if IA3Pass(name="b") never ran

Every module of the adapter (found by type, :class:`~surgery.sites.marker.AdapterModule`,
and its ``adapter_name``) leaves the model, with its parameters and buffers, and every node
of it (tagged ``node.meta["surgery"]``) leaves the site graphs: what read the adapter's node
on the layer's path (LoRA's or a bottleneck's ``add``, an IA³ scaling, a sequence prefix)
reads that node's first argument again, as :func:`surgery.adapters.fold_nodes.remove_adapter`
does for a merge. Slots left empty (``lora_A`` with no adapter in it) go too. Nothing else
changes: other adapters keep their parameter objects and values, flags and nodes.

A site graph left with no adapter stays a site graph: it computes the base layer with the
same operations in the same order (bitwise the base), its state-dict keys are the base
layer's, and a later pass or :func:`surgery.unload` treats it as any other site graph.

The deletion is a step of the model's history (a pass named ``"delete_adapter"``), so that
:func:`surgery.save_adapters` / :func:`surgery.load_adapters` replay it in order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from torch import fx, nn

from surgery.adapters.active import merged_names, resolve_names
from surgery.adapters.fold_layout import Key, adapter_nodes, key_of
from surgery.adapters.fold_nodes import check_removable
from surgery.adapters.fold_params import param_removal
from surgery.adapters.merge_state import label, merged_refusal
from surgery.adapters.names import check_adapter_name
from surgery.errors import ConfigError, MergeError, UnsupportedSiteError
from surgery.pass_base import Change, Pass, PassResult
from surgery.sites.marker import AdapterModule, AdapterParameters, slot_parameters
from surgery.sites.site_graph import SiteGraph, site_graphs
from surgery.sites.woven import woven_removal

__all__ = ["delete_adapter"]


@dataclass(frozen=True, kw_only=True)
class _DeleteAdapterPass(Pass):
    """Remove every module and graph node of the adapters ``names``."""

    name: ClassVar[str] = "delete_adapter"

    names: tuple[str, ...]

    def __post_init__(self) -> None:
        names = self.names
        if isinstance(names, str):
            names = (names,)
        if not isinstance(names, (list, tuple)) or not names \
                or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"delete_adapter: names must be a non-empty list of adapter names, "
                              f"got {self.names!r}")
        object.__setattr__(self, "names", tuple(names))

    def run(self, model: nn.Module) -> PassResult:
        resolve_names("delete_adapter", model, list(self.names))
        _refuse_merged(model, self.names)
        wanted = set(self.names)
        # every check before any edit: the model is left alone if one fails
        edits = [(qname, key, *_removable(sg, key))
                 for qname, sg in site_graphs(model) for key in _keys(sg, wanted)]
        modules = _modules_of(model, wanted)
        changes: list[Change] = []
        for qname, key, nodes, remove in edits:
            for node in nodes:
                changes.append(Change("node_removed", self.name, qname, f"{qname}/{node.name}",
                                      adapter=key[1], role=node.meta["surgery"].get("role"),
                                      detail=f"{label(*key)} deleted"))
            remove()
        for qname, parent, slot, mod in modules:
            changes.append(Change("module_removed", self.name, mod.site, qname,
                                  adapter=mod.adapter_name, role=mod.role,
                                  detail=f"{type(mod).__name__} deleted"))
            changes += [Change("param_removed", self.name, mod.site, f"{qname}.{pname}",
                               adapter=mod.adapter_name, role=mod.role, shape=tuple(p.shape),
                               numel=p.numel()) for pname, p in mod.named_parameters()]
            del parent._modules[slot]
        for qname, param, pass_name, adapter_name in list(slot_parameters(model)):
            if adapter_name in wanted:  # a parameter slot's entry: <site>.ia3_l.<adapter>
                owner_name, _, leaf = qname.rpartition(".")
                changes.append(Change("param_removed", self.name, owner_name.rpartition(".")[0],
                                      qname, adapter=adapter_name, shape=tuple(param.shape),
                                      numel=param.numel(), detail=f"{pass_name} parameter deleted"))
                owner = model.get_submodule(owner_name)
                del owner._parameters[leaf]
        _drop_empty_slots(model, {id(parent) for _, parent, _, _ in modules})
        state = getattr(model, "_surgery", None)
        if state is not None and state.active is not None:
            state.active = set(state.active) - wanted
        return PassResult(model, bool(changes), tuple(changes), self.name)


def _refuse_merged(model: nn.Module, names: tuple[str, ...]) -> None:
    merged = merged_names(model)
    for name in names:
        if name in merged:
            raise merged_refusal("delete_adapter", name, merged[name], "deleting its modules "
                                 "would leave its update in the weights with no way to take "
                                 "it out", then="then delete it")


def _keys(sg: SiteGraph, wanted: set[str]) -> list[Key]:
    """The adapters of ``wanted`` with nodes in ``sg``'s own graph, in graph order."""
    keys: dict[Key, None] = {}
    for node in sg.graph.nodes:
        meta = node.meta.get("surgery")
        if meta and meta.get("adapter") in wanted:
            keys[key_of(node)] = None
    return list(keys)


def _removable(sg: SiteGraph, key: Key) -> tuple[list[fx.Node], Callable[[], None]]:
    """The adapter's nodes, and the edit that takes them out: a side branch joined to the
    layer's path by one node is cut there; nodes woven into the layer's own arguments (a
    prefix in an attention op) give those arguments back (:mod:`surgery.sites.woven`).

    Raises:
        UnsupportedSiteError: neither applies (a second prefix was stacked on values this
            one changed, or the graph was edited by hand).
    """
    try:
        nodes, main = check_removable(sg, key)
    except MergeError:
        nodes = adapter_nodes(sg, key)
        per_param = param_removal(sg, key)  # one branch per named parameter (fold_params)
        if per_param is not None:
            return nodes, per_param
    else:
        def cut() -> None:
            main.replace_all_uses_with(main.args[0])
            for node in reversed(nodes):
                sg.graph.erase_node(node)

        return nodes, cut
    unweave = woven_removal(sg.graph, nodes)
    if unweave is not None:
        return nodes, unweave
    site = sg.site or "the model"
    raise UnsupportedSiteError(
        f"delete_adapter: {label(*key)} at {site} is woven into the computation there "
        f"({len(nodes)} nodes, {', '.join(n.name for n in nodes[:5])}, rewrite arguments of "
        f"nodes that are not its own), so removing its nodes cannot give the original "
        f"computation back. Way out: switch it off with surgery.set_active(model, [...other "
        f"adapters]) (it then contributes nothing), or rebuild without it: "
        f"surgery.load_adapters(base, directory, names=[...other adapters]).")


def _modules_of(model: nn.Module, wanted: set[str]
                ) -> list[tuple[str, nn.Module, str, AdapterModule]]:
    """``(qualified name, parent, name in parent, module)`` of every adapter module of
    ``wanted`` not inside another one, once per parent (a shared module is listed under
    each parent holding it)."""
    out: list[tuple[str, nn.Module, str, AdapterModule]] = []
    seen: set[tuple[int, str]] = set()

    def walk(module: nn.Module, prefix: str) -> None:
        for slot, child in module._modules.items():
            if child is None:
                continue
            qname = f"{prefix}{slot}"
            if isinstance(child, AdapterModule) and child.adapter_name in wanted:
                if (id(module), slot) not in seen:
                    seen.add((id(module), slot))
                    out.append((qname, module, slot, child))
                continue  # what it holds leaves with it
            walk(child, qname + ".")

    walk(model, "")
    return out


def _drop_empty_slots(model: nn.Module, parents: set[int]) -> None:
    """Remove the ``nn.ModuleDict`` slots (``lora_A``, ``prefix``, ...) and parameter slots
    (``ia3_l``) that the deletion left empty from the modules holding them."""
    for module in list(model.modules()):
        for slot, child in list(module._modules.items()):
            if isinstance(child, nn.ModuleDict) and id(child) in parents and not len(child):
                del module._modules[slot]
            elif isinstance(child, AdapterParameters) and not child._parameters:
                del module._modules[slot]


def delete_adapter(model: nn.Module, name: str, *, inplace: bool = False) -> nn.Module:
    """The model without adapter ``name``: as PEFT's ``delete_adapter``.

    Every module of the adapter, of any kind (LoRA, IA³, serial and parallel bottleneck
    adapters, prefixes), leaves the model with its parameters (their keys leave the
    ``state_dict``), and every node of it leaves the site graphs. The outputs then equal,
    bit for bit, those of the same base adapted without that adapter (same other
    adapters, same parameters); the other adapters' parameters are the same objects with
    the same values, ``requires_grad`` and ``active`` flags. A site graph left with no
    adapter stays a site graph computing exactly the base layer (its keys are the base
    layer's); :func:`surgery.unload` makes it plain. The deletion is recorded in the
    model's history as a ``"delete_adapter"`` step, so :func:`surgery.save_adapters` and
    :func:`surgery.load_adapters` of the result round-trip. A prefix through transformers'
    attention interface leaves its attention module with no prefix: the attention
    function then calls the base one with the same arguments.

    Args:
        model: an adapted model (from :func:`surgery.apply_passes`).
        name: the adapter to delete.
        inplace: delete from ``model`` itself instead of a copy sharing its weights.

    Returns:
        The model without the adapter (a new object sharing ``model``'s weights, unless
        ``inplace``); ``model`` is not changed unless ``inplace``.

    Raises:
        ConfigError: ``name`` is not a string.
        AdapterNotFoundError: the model carries no adapter ``name`` (the names present are
            listed, nearest first).
        MergeError: the adapter is merged into the weights; the way out is to unmerge it
            first (``UnmergeLoRAPass(names=[name])`` / ``UnmergeIA3Pass``).
        UnsupportedSiteError: the adapter rewrote arguments of nodes that are not its own
            in a way that cannot be given back (a prefix under a second prefix stacked on
            the same causal attention op: delete the top one first). A prefix woven into a
            hand-written attention op (keys, values, mask, ``is_causal``) is taken out and
            the op reads its original arguments again.

        Nothing is changed when it raises.
    """
    # runs the delete step on a copy, atomically
    from surgery.apply import apply_passes

    check_adapter_name("delete_adapter", name)
    return apply_passes(model, [_DeleteAdapterPass(names=(name,))], inplace=inplace)
