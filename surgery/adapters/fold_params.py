"""Folding adapters into a named parameter of a site graph other than its ``weight``.

Most adapters fold into the one weight of a layer (:mod:`surgery.adapters.fold`). A site
may instead hold several weights, each computed with by a call of its own, and an adapter
may put one update beside each of those calls: LoRA on the fused expert weights of a
mixture-of-experts module (``experts.gate_up_proj`` and ``experts.down_proj``, PEFT's
``target_parameters``). Such an adapter has one head per weight, with
:attr:`~surgery.sites.marker.AdapterModule.fold_mode` ``"param"``; each head names the
parameter (``fold_param``) and computes its merged value (``fold_value(site, weight)``),
and the nodes of its branch carry ``meta["surgery"]["param"]``. Each (adapter, parameter)
pair folds on its own, into a :class:`~surgery.adapters.merge_state.MergeRecord` whose
``param`` names the parameter, so that unmerge puts back exactly that tensor.

Branches beside one call only add to its result, so they commute: any of them folds at any
time, in at least float32, cast once (the head's arithmetic).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, fx, nn

from surgery.adapters.fold_layout import Key, adapter_modules, adapter_nodes, main_node, tag
from surgery.adapters.fold_nodes import remove_adapter
from surgery.adapters.merge_state import MergeRecord, label, read_records, write_records
from surgery.errors import MergeError
from surgery.sites.changes import Change
from surgery.sites.marker import AdapterModule
from surgery.sites.site_graph import SiteGraph

__all__ = ["PARAM_MODE", "folds_params", "param_heads", "param_nodes", "plan_params",
           "apply_params", "fold_params_now", "param_removal"]

PARAM_MODE = "param"

Step = tuple[Key, AdapterModule, str, Tensor]
"""``(adapter, head, parameter name, merged value)``."""


def param_heads(sg: SiteGraph, key: Key) -> list[AdapterModule]:
    """The heads of one adapter that fold into named parameters, in registration order."""
    return [m for _, m in adapter_modules(sg, key) if m.fold_mode == PARAM_MODE]


def folds_params(sg: SiteGraph, keys: Iterable[Key]) -> bool:
    """True when the adapters ``keys`` at ``sg`` fold into named parameters.

    Raises:
        MergeError: some of them do and some do not (one site cannot mix both).
    """
    kinds = {bool(param_heads(sg, k)) for k in keys}
    if len(kinds) > 1:
        raise MergeError(f"{sg.site or 'the model'} carries adapters folding into its weight "
                         f"and adapters folding into named parameters; they cannot be merged "
                         f"together")
    return kinds == {True}


def param_nodes(sg: SiteGraph, key: Key, param: str) -> list[fx.Node]:
    """The nodes of one adapter's branch beside the call reading ``param``."""
    return [n for n in adapter_nodes(sg, key) if (tag(n) or {}).get("param") == param]


def _unit(sg: SiteGraph, key: Key, param: str) -> list[tuple[str, nn.Parameter]]:
    """``(name relative to the site graph, parameter)`` of the modules of one adapter that
    belong to its update of ``param``."""
    return [(f"{rel}.{pname}", p) for rel, mod in adapter_modules(sg, key)
            if getattr(mod, "fold_param", None) == param for pname, p in mod.named_parameters()]


def fold_params_now(sg: SiteGraph, keys: Iterable[Key], *, active_only: bool = False
                    ) -> list[Step]:
    """The merged value of every parameter the adapters ``keys`` fold into, each step
    computed from the value the previous one left (the site graph is not changed).

    Args:
        active_only: leave out heads switched off (what ``unload`` folds).
    """
    values: dict[str, Tensor] = {}
    steps: list[Step] = []
    with torch.no_grad():
        for key in keys:
            for head in param_heads(sg, key):
                if active_only and not head.active:
                    continue
                pname = head.fold_param
                current = values.get(pname, sg._parameters[pname])
                values[pname] = head.fold_value(sg, current)
                steps.append((key, head, pname, values[pname]))
    return steps


def plan_params(sg: SiteGraph, keys: Iterable[Key], *, safe: bool, who: str) -> list[Step]:
    """Check and compute the merges of ``keys`` at ``sg`` before anything changes.

    Raises:
        MergeError: a branch cannot be taken out, or (``safe``) a merged value is not finite.
    """
    steps = fold_params_now(sg, sorted(keys))
    for key, _, pname, value in steps:
        nodes = param_nodes(sg, key, pname)
        try:
            main_node(sg, key, nodes)
        except MergeError as e:
            raise MergeError(f"{who}: {e}") from None
        if safe and not bool(value.isfinite().all()):
            raise MergeError(f"{who}: merging {label(*key)} into {sg.site}.{pname} gives "
                             f"non-finite values (inf or nan); nothing was changed. Way out: "
                             f"check the adapter's parameters, or pass safe=False.")
    return steps


def apply_params(sg: SiteGraph, qname: str, steps: list[Step], *, write: bool,
                 inplace: bool, pass_name: str) -> list[Change]:
    """Merge planned steps: take each branch out, swap in (or write) the merged value,
    freeze that update's parameters and record it."""
    changes: list[Change] = []
    site = qname
    for key, head, pname, value in steps:
        weight = sg._parameters[pname]
        params = _unit(sg, key, pname)
        grads = tuple((rel, p.requires_grad) for rel, p in params)
        specs, main = remove_adapter(sg, key, nodes=param_nodes(sg, key, pname))
        common = dict(kind=key[0], adapter=key[1], site=qname, mode=PARAM_MODE, inplace=inplace,
                      weight_grad=weight.requires_grad, bias_grad=False, nodes=specs, main=main,
                      adapter_grads=grads, param=pname)
        if write:
            record = MergeRecord(weight=weight.detach().clone(), bias=None, **common)
            with torch.no_grad():
                weight.copy_(value)
        else:
            record = MergeRecord(weight=weight, bias=None, **common)
            sg._parameters[pname] = nn.Parameter(value, requires_grad=weight.requires_grad)
        for _, p in params:
            p.requires_grad_(False)
        write_records(sg, read_records(sg) + (record,))
        full = f"{site}.{pname}" if site else pname
        detail = head.fold_detail(sg) + (" (in place)" if inplace else "")
        changes += [Change("node_removed", pass_name, site, f"{site}/{s.name}", adapter=key[1])
                    for s in specs]
        changes.append(Change("param_rewritten", pass_name, site, full, adapter=key[1],
                              shape=tuple(value.shape), numel=value.numel(),
                              trainable=weight.requires_grad, detail=detail))
        changes += [Change("param_frozen", pass_name, site, f"{site}.{rel}" if site else rel,
                           adapter=key[1], shape=tuple(p.shape), numel=p.numel(),
                           detail=f"{record.label} merged") for rel, p in params if dict(grads)[rel]]
    return changes


def param_removal(sg: SiteGraph, key: Key) -> Callable[[], None] | None:
    """The edit that takes every branch of one adapter folding into named parameters out of
    the site graph (each cut where it joins its call's result), or ``None`` when the
    adapter's nodes are not such branches."""
    nodes = adapter_nodes(sg, key)
    params = {(tag(n) or {}).get("param") for n in nodes}
    if not nodes or None in params:
        return None
    cuts = []
    for pname in sorted(params):
        part = param_nodes(sg, key, pname)
        try:
            main = main_node(sg, key, part)
        except MergeError:
            return None
        cuts.append((part, main))

    def cut() -> None:
        for part, main in cuts:
            main.replace_all_uses_with(main.args[0])
            for node in reversed(part):
                sg.graph.erase_node(node)

    return cut
