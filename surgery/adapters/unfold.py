"""The unmerge engine on site graphs: take a merged adapter out of the weight, exactly.

:func:`unmerge` undoes the records :func:`surgery.adapters.fold.merge` left on a site
graph, last-in, first-out: the nodes come back under their old names, the weight comes back
bit for bit (the tensor the merge replaced, or its exact copy written back into the same
storage), and the adapter's ``requires_grad`` flags come back as they were.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from surgery.adapters.fold import adapter_params, qualify, role_of
from surgery.adapters.fold_nodes import missing_refs, restore_adapter
from surgery.adapters.merge_state import (
    KIND_LABEL,
    MERGE_PASS,
    UNMERGE_PASS,
    MergeRecord,
    adapter_inventory,
    label,
    read_records,
    resolve_names,
    write_records,
)
from surgery.errors import MergeError
from surgery.sites.changes import Change
from surgery.sites.site_graph import SiteGraph, site_graphs

__all__ = ["unmerge"]


def _undo_plan(model: nn.Module, kind: str, names: tuple[str, ...] | None, inplace: bool,
               who: str) -> list[tuple[str, SiteGraph, int]]:
    """``[(site, site graph, index of the oldest record to undo there)]``: all later
    records there go too.

    Raises:
        AdapterNotFoundError, MergeError: see :class:`passes.merge.UnmergeLoRAPass`.
    """
    chosen = set(resolve_names(who, kind, names, adapter_inventory(model)))
    todo: list[tuple[str, SiteGraph, int]] = []
    seen: set[str] = set()
    for qname, sg in site_graphs(model):
        records = read_records(sg)
        hits = [i for i, r in enumerate(records) if r.kind == kind and r.adapter in chosen]
        if not hits:
            continue
        k = hits[0]
        later = [r for r in records[k:] if not (r.kind == kind and r.adapter in chosen)]
        if later:
            first, nxt = records[k], later[0]
            raise MergeError(
                f"{who}: cannot unmerge {label(kind, first.adapter)} from {qname} while "
                f"{label(nxt.kind, nxt.adapter)}, merged after it, stays merged: merges come "
                f"out last-in, first-out so that the weight comes back bit for bit. Way out: "
                f"unmerge {nxt.adapter!r} first ({UNMERGE_PASS.get(nxt.kind, 'its unmerge')}), "
                f"then merge it again if you want it merged.")
        written = [r for r in records[k:] if r.inplace]
        if written and not inplace:
            r = written[0]
            raise MergeError(
                f"{who}: {label(r.kind, r.adapter)} was merged into {qname} in place "
                f"({MERGE_PASS[r.kind]}(inplace=True)): its weight is storage shared with the "
                f"model given here and every model made from it, and putting the original "
                f"values back writes into that storage. Way out: "
                f"apply_passes(model, [{UNMERGE_PASS[kind]}(inplace=True)], inplace=True).")
        gone = missing_refs(sg, records[k:])
        if gone:
            raise MergeError(f"{who}: node {gone[0]!r} of {qname}, which {records[k].label} was "
                             f"merged beside, is no longer in its site graph; it cannot be put "
                             f"back.")
        todo.append((qname, sg, k))
        seen.update(records[i].adapter for i in hits)
    if not todo:
        what = (f"{KIND_LABEL[kind]} adapter {sorted(chosen)[0]!r} is"
                if names is not None and chosen else f"no {KIND_LABEL[kind]} adapter is")
        raise MergeError(f"{who}: nothing to unmerge: {what} merged. Way out: "
                         f"{MERGE_PASS[kind]}() merges it.")
    if names is not None:
        unmerged = [n for n in names if n not in seen]
        if unmerged:
            raise MergeError(f"{who}: {KIND_LABEL[kind]} adapter {unmerged[0]!r} is not merged; "
                             f"nothing was changed.")
    return todo


def unmerge(model: nn.Module, *, kind: str, names: tuple[str, ...] | None, inplace: bool,
            who: str, pass_name: str, dry: bool = False) -> list[Change]:
    """Unmerge the ``kind`` adapters ``names`` of ``model``.

    Args:
        model: the adapted model (the pass's private copy under :func:`surgery.apply_passes`).
        kind: the adapters' kind (``"lora"``, ``"ia3"``).
        names: adapter names, or ``None`` for every merged one.
        inplace: allowed to write the saved values of in-place merges back into storage.
        who / pass_name: the pass's class name (messages) and stable name (changes).
        dry: for a dry run on a private copy: swap in new tensors instead of writing.

    Returns:
        Every change made, in order.

    Raises:
        AdapterNotFoundError, MergeError: see :class:`passes.merge.UnmergeLoRAPass`; nothing
            is changed when they are raised.
    """
    changes: list[Change] = []
    for qname, sg, k in _undo_plan(model, kind, names, inplace, who):
        records = read_records(sg)
        for record in reversed(records[k:]):
            nodes = restore_adapter(sg, record)
            _put_back(model, sg, record, write=not dry)
            for rel, param in adapter_params(sg, (record.kind, record.adapter)):
                flag = dict(record.adapter_grads).get(rel)
                if flag is not None:
                    param.requires_grad_(flag)
            records = records[:-1]
            write_records(sg, records)
            changes += _unmerge_changes(sg, record, [n.name for n in nodes], pass_name)
    return changes


def _partner(model: nn.Module, saved: Tensor) -> nn.Parameter | None:
    """A parameter of ``model`` viewing exactly ``saved``'s values (a weight tied to the one
    the merge replaced): put back, it keeps the two tied."""
    for p in model.parameters():
        if (p.untyped_storage().data_ptr() == saved.untyped_storage().data_ptr()
                and p.storage_offset() == saved.storage_offset() and p.shape == saved.shape
                and p.stride() == saved.stride() and p.dtype == saved.dtype):
            return p
    return None


def _put_back(model: nn.Module, sg: SiteGraph, record: MergeRecord, *, write: bool) -> None:
    """Restore the weight (and bias) a merge replaced, bit for bit.

    A model moved since the merge (``.to(torch.float64)``, ``.half()``, ``.to("meta")``)
    gets the kept tensor moved the same way (the record is not a parameter or buffer, so
    the move left it where it was), as moving the unmerged model would have done.
    """
    pairs = [(record.param, record.weight, record.weight_grad)]
    if record.bias is not None:
        pairs.append(("bias", record.bias, record.bias_grad))
    for pname, saved, grad in pairs:
        if record.inplace and write:
            with torch.no_grad():
                sg._parameters[pname].copy_(saved)
            sg._parameters[pname].requires_grad_(grad)
            continue
        now = sg._parameters[pname]
        moved = (saved.dtype, saved.device) != (now.dtype, now.device)
        if moved:
            saved = saved.detach().to(dtype=now.dtype, device=now.device)
        partner = None if record.inplace or moved else _partner(model, saved)
        sg._parameters[pname] = partner if partner is not None else \
            nn.Parameter(saved.detach(), requires_grad=grad)


def _unmerge_changes(sg: SiteGraph, record: MergeRecord, nodes: list[str],
                     pass_name: str) -> list[Change]:
    site, role = record.site, role_of(record)
    changes = [Change("node_added", pass_name, site, f"{site}/{name}", adapter=record.adapter,
                      role=role) for name in nodes]
    for pname in (record.param, "bias") if record.bias is not None else (record.param,):
        param = sg._parameters[pname]
        changes.append(Change("param_rewritten", pass_name, site, qualify(site, pname),
                              adapter=record.adapter, role=role, shape=tuple(param.shape),
                              numel=param.numel(), trainable=param.requires_grad,
                              detail=f"restored from before {record.label} was merged"))
    return changes
