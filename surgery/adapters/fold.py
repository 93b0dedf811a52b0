"""The merge engine on site graphs: fold the arithmetic in, take the nodes out.

:func:`merge` plans and computes every merged weight before it changes anything, then, per
site graph and step, removes the adapter's nodes, swaps in (or writes) the merged weight,
freezes the merged adapter's parameters and appends a
:class:`~surgery.adapters.merge_state.MergeRecord` to the site graph.
:func:`surgery.adapters.unfold.unmerge` undoes it.

The arithmetic is the adapters' own (the fold protocol of
:class:`~surgery.sites.marker.AdapterModule`): this module plans, swaps and records, and
imports no pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surgery.adapters.fold_layout import (
    Key,
    adapter_modules,
    adapters_at,
    fold_head,
    plan_site,
)
from surgery.adapters.fold_nodes import check_removable, remove_adapter
from surgery.adapters.fold_params import apply_params, folds_params, param_heads, plan_params
from surgery.adapters.merge_state import (
    KIND_LABEL,
    UNMERGE_PASS,
    MergeRecord,
    adapter_inventory,
    describe_present,
    inactive_adapters,
    label,
    read_records,
    resolve_names,
    write_records,
)
from surgery.errors import MergeError
from surgery.map.leaves import is_linear_like
from surgery.sites.changes import Change
from surgery.sites.marker import AdapterParameters
from surgery.sites.site_graph import SiteGraph, plain_module, site_graphs

__all__ = ["adapter_params", "check_foldable", "fold_steps", "merge", "qualify", "role_of"]


def fold_steps(sg: SiteGraph, steps: Sequence[Key], weight: Tensor, bias: Tensor | None
               ) -> list[tuple[Tensor, Tensor | None]]:
    """Weight and bias after each fold step, computed from ``weight`` and ``bias``.

    Args:
        sg: the site graph holding the adapters.
        steps: adapters in fold order.
        weight / bias: the starting values (not changed).

    Returns:
        ``[(weight, bias)]`` after each step: new tensors, or the input ones where a step
        does not change them.

    Raises:
        MergeError: the layer's output is not its weight's product alone (see
            :func:`check_foldable`).
    """
    check_foldable(sg)
    out = []
    with torch.no_grad():
        for key in steps:
            weight, bias = fold_head(sg, key).fold(sg, weight, bias)
            out.append((weight, bias))
    return out


_PLAIN_FORWARDS = (nn.Linear.forward, nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward,
                   nn.Embedding.forward)
"""The forwards that compute the product with the layer's weight (and bias) alone."""


def check_foldable(sg: SiteGraph, who: str = "merge") -> None:
    """Refuse to fold into a layer whose output is not the product with its own weight.

    Folding writes an adapter into ``weight`` (and ``bias``), which is exact only when the
    layer computes its product with them and nothing else: the forward of ``nn.Linear``,
    ``nn.Conv1d/2d/3d``, ``nn.Embedding`` or transformers' ``Conv1D`` themselves, on a
    weight that is a plain parameter. A subclass with a forward of its own
    (``super().forward(x) * 2``), a parametrised or pruned weight (computed from other
    tensors), or an embedding with ``max_norm`` (it renormalises the rows it reads) would be
    folded wrongly.

    Raises:
        MergeError: naming the site, its type and the reason, with the way out.
    """
    base = sg.template
    cls = type(base)
    plain = cls.forward in _PLAIN_FORWARDS or (
        cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")
        and cls.forward.__qualname__ == "Conv1D.forward")
    why = None
    if not plain and not _computes_linear(sg):
        why = (f"its forward ({cls.__qualname__}.forward) is not the product with its weight "
               f"alone")
    elif not isinstance(sg._parameters.get("weight"), nn.Parameter):
        why = "its weight is not a plain parameter (parametrised or pruned)"
    elif isinstance(base, nn.Embedding) and base.max_norm is not None:
        why = (f"it renormalises every row it reads to max_norm={base.max_norm:g}, so its "
               f"output is not linear in its weight")
    if why is not None:
        raise MergeError(
            f"{who}: {sg.site or 'the model'} ({cls.__name__}) cannot take an adapter into its "
            f"weight: "
            f"{why}, so a folded weight would compute something else. Way out: keep the "
            f"adapter unmerged (it computes exactly), or adapt layers of type nn.Linear / "
            f"Conv1D / nn.Conv* / nn.Embedding.")


def _computes_linear(sg: SiteGraph) -> bool:
    """True for an ``nn.Linear`` subclass whose own one-input ``forward`` computes
    ``F.linear(x, weight, bias)`` (Falcon's ``FalconLinear`` writes ``x @ W.T + b``): checked
    on a probe batch of standard normal rows, to float32 rounding (a relative 1e-5), so a
    forward that scales, shifts or drops its weight is refused."""
    if not (isinstance(sg.template, nn.Linear) and is_linear_like(sg.template)):
        return False
    weight, bias = sg._parameters.get("weight"), sg._parameters.get("bias")
    if not isinstance(weight, nn.Parameter) or weight.dim() != 2 or weight.is_meta:
        return False
    layer = plain_module(sg).eval()
    probe = torch.randn(4, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(
        device=weight.device, dtype=weight.dtype)
    try:
        with torch.no_grad():
            got = layer(probe)
    except (RuntimeError, TypeError, ValueError):
        return False
    with torch.no_grad():
        want = F.linear(probe, weight, bias)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return False
    scale = float(want.abs().max()) or 1.0
    return bool(((got.float() - want.float()).abs().max() <= 1e-5 * scale).item())


def adapter_params(sg: SiteGraph, key: Key) -> list[tuple[str, nn.Parameter]]:
    """``(name relative to the site graph, parameter)`` of one adapter's modules
    (``[("lora_A.default.weight", ...), ("lora_B.default.weight", ...)]``), and of its
    entries in the site graph's parameter slots (``("ia3_l.default", ...)``)."""
    return [(f"{rel}.{pname}", p) for rel, mod in adapter_modules(sg, key)
            for pname, p in mod.named_parameters()] + [
        (f"{slot}.{key[1]}", held._parameters[key[1]]) for slot, held in sg._modules.items()
        if isinstance(held, AdapterParameters) and held.pass_name == key[0]
        and held._parameters.get(key[1]) is not None]


def qualify(site: str, name: str) -> str:
    """``"<site>.<name>"``, or ``name`` for a site at the model's root (``""``)."""
    return f"{site}.{name}" if site else name


def _plan_or_raise(sg: SiteGraph, wanted: set[Key], who: str) -> list[Key]:
    try:
        steps = plan_site(sg, wanted)
        for key in steps:
            check_removable(sg, key)
    except MergeError as e:
        raise MergeError(f"{who}: {e}") from None
    return steps


# --------------------------------------------------------------------------------------
# Merge
# --------------------------------------------------------------------------------------


def _work(model: nn.Module, kind: str, names: tuple[str, ...] | None,
          who: str) -> list[tuple[str, SiteGraph, set[Key]]]:
    """``[(site, site graph, {adapters still to merge there})]`` in model order.

    Raises:
        AdapterNotFoundError, MergeError: see :class:`passes.merge.MergeLoRAPass`.
    """
    inv = adapter_inventory(model)
    chosen = resolve_names(who, kind, names, inv)
    if not chosen:
        raise MergeError(f"{who}: nothing to merge: the model has no {KIND_LABEL[kind]} adapter "
                         f"({describe_present(inv)}). Way out: merge the model apply_passes "
                         f"returned after adding the adapter, or leave this pass out.")
    chosen = _active_only(who, kind, names, chosen, inactive_adapters(model, kind))
    work: list[tuple[str, SiteGraph, set[Key]]] = []
    merged_already: dict[str, list[str]] = {}
    carried: set[str] = set()
    for qname, sg in site_graphs(model):
        present = adapters_at(sg)
        done = {(r.kind, r.adapter) for r in read_records(sg)}
        wanted = set()
        for name in chosen:
            key = (kind, name)
            if key in done:
                merged_already.setdefault(name, []).append(qname)
                carried.add(name)
            elif key in present and fold_head(sg, key) is not None:
                wanted.add(key)
                carried.add(name)
        if wanted:
            work.append((qname, sg, wanted))
    lost = [n for n in chosen if n not in carried]
    if lost:
        where = ", ".join(inv[lost[0]][kind][:5])
        raise MergeError(f"{who}: {label(kind, lost[0])} sits at {where}, "
                         f"which is not a site graph with a weight to merge it into.")
    pending = {n for _, _, keys in work for _, n in keys}
    done_names = [n for n in chosen if n not in pending]
    if names is not None and done_names:
        n = done_names[0]
        raise MergeError(f"{who}: {label(kind, n)} is already merged (into "
                         f"{', '.join(merged_already[n][:5])}); merging twice would add its update "
                         f"twice. Way out: {UNMERGE_PASS[kind]}(names=[{n!r}]) first.")
    if not work:
        raise MergeError(f"{who}: every {KIND_LABEL[kind]} adapter is already merged "
                         f"({', '.join(map(repr, chosen))}); nothing to merge.")
    return work


def _active_only(who: str, kind: str, names: tuple[str, ...] | None, chosen: list[str],
                 off: set[str]) -> list[str]:
    """Leave out switched-off adapters: they add nothing now, a merge would add their update.

    Raises:
        MergeError: a switched-off adapter is named, or every candidate is switched off.
    """
    named_off = [n for n in chosen if n in off]
    if names is not None and named_off:
        raise MergeError(
            f"{who}: {KIND_LABEL[kind]} adapter {named_off[0]!r} is switched off "
            f"(surgery.set_active), so it adds nothing to the outputs; merging it would put its "
            f"update into the weights. Way out: switch it on first, surgery.set_active(model, "
            f"[..., {named_off[0]!r}]), or leave it out of names.")
    kept = [n for n in chosen if n not in off]
    if not kept:
        raise MergeError(
            f"{who}: nothing to merge: every {KIND_LABEL[kind]} adapter is switched off "
            f"({', '.join(map(repr, named_off))}; surgery.set_active). Way out: switch the ones "
            f"to merge on first.")
    return kept


def _tied(model: nn.Module, param: Tensor) -> list[str]:
    ptr = param.untyped_storage().data_ptr()
    return [n for n, p in model.named_parameters(remove_duplicate=False)
            if p.untyped_storage().data_ptr() == ptr]


def merge(model: nn.Module, *, kind: str, names: tuple[str, ...] | None, safe: bool,
          inplace: bool, who: str, pass_name: str, dry: bool = False) -> list[Change]:
    """Merge the ``kind`` adapters ``names`` of ``model`` into their layers' weights.

    Args:
        model: the adapted model (the pass's private copy under :func:`surgery.apply_passes`).
        kind: the adapters' kind (``"lora"``, ``"ia3"``).
        names: adapter names, or ``None`` for every active one not merged yet.
        safe: refuse non-finite merged weights.
        inplace: write the merged values into the existing weight storage.
        who / pass_name: the pass's class name (messages) and stable name (changes).
        dry: for a dry run on a private copy: an in-place merge is reported as such but
            swaps in new tensors instead of writing into shared storage.

    Returns:
        Every change made, in order.

    Raises:
        AdapterNotFoundError, MergeError: see :class:`passes.merge.MergeLoRAPass`; nothing
            is changed when they are raised.
    """
    work = _work(model, kind, names, who)
    write = inplace and not dry
    plans = []  # plan and compute everything first: nothing changes unless all of it can
    by_param = []  # sites whose adapters fold into named parameters (fold_params)
    for qname, sg, wanted in work:
        if folds_params(sg, wanted):
            if inplace:
                for key in wanted:
                    for pname in {h.fold_param for h in param_heads(sg, key)}:
                        others = [n for n in _tied(model, sg._parameters[pname])
                                  if n != qualify(qname, pname)]
                        if others:
                            raise MergeError(f"{who}: {qualify(qname, pname)} shares its "
                                             f"storage with {', '.join(others[:5])}; an "
                                             f"in-place merge would change them too. Way "
                                             f"out: inplace=False.")
            by_param.append((qname, sg, plan_params(sg, wanted, safe=safe, who=who)))
            continue
        steps = _plan_or_raise(sg, wanted, who)
        check_foldable(sg, who)
        if inplace:
            others = [n for n in _tied(model, sg.weight) if n != qualify(qname, "weight")]
            if others:
                raise MergeError(f"{who}: {qualify(qname, 'weight')} shares its storage with "
                                 f"{', '.join(others[:5])}; an in-place merge would change them "
                                 f"too. Way out: inplace=False.")
        try:
            results = fold_steps(sg, steps, sg.weight, sg._parameters.get("bias"))
        except MergeError as e:
            raise MergeError(f"{who}: {e}") from None
        if safe:
            for key, (w, b) in zip(steps, results):
                if not bool(w.isfinite().all()) or (b is not None and not bool(b.isfinite().all())):
                    what = "weight" if not bool(w.isfinite().all()) else "bias"
                    raise MergeError(
                        f"{who}: merging {label(*key)} into {qname or 'the model'} gives "
                        f"non-finite values (inf or nan) in its {what}; nothing was changed. "
                        f"Way out: check the adapter's parameters, or pass safe=False to merge "
                        f"anyway.")
        plans.append((qname, sg, steps, None if write else results))
        del results  # an in-place merge recomputes them one at a time below

    changes: list[Change] = []
    for qname, sg, param_steps in by_param:
        changes += apply_params(sg, qname, param_steps, write=write, inplace=inplace,
                                pass_name=pass_name)
    for qname, sg, steps, results in plans:
        for i, key in enumerate(steps):
            record = _merge_step(sg, qname, key, None if results is None else results[i],
                                 write=write, inplace=inplace)
            write_records(sg, read_records(sg) + (record,))
            changes += _merge_changes(sg, record, pass_name, inplace)
    return changes


def _merge_step(sg: SiteGraph, qname: str, key: Key, result: tuple[Tensor, Tensor | None] | None,
                *, write: bool, inplace: bool) -> MergeRecord:
    """Merge one adapter into one layer: nodes out, weight in, adapter frozen."""
    weight = sg._parameters["weight"]
    bias = sg._parameters.get("bias")
    if result is None:  # in place: computed from the weight as the previous step left it
        ((new_w, new_b),) = fold_steps(sg, [key], weight, bias)
    else:
        new_w, new_b = result
    rewrites_bias = new_b is not bias
    mode = fold_head(sg, key).fold_mode
    params = adapter_params(sg, key)
    grads = tuple((rel, p.requires_grad) for rel, p in params)
    bias_grad = bool(bias is not None and bias.requires_grad)
    specs, main = remove_adapter(sg, key)
    common = dict(kind=key[0], adapter=key[1], site=qname, mode=mode, inplace=inplace,
                  weight_grad=weight.requires_grad, bias_grad=bias_grad, nodes=specs, main=main,
                  adapter_grads=grads)
    if write:
        record = MergeRecord(weight=weight.detach().clone(),
                             bias=bias.detach().clone() if rewrites_bias else None, **common)
        with torch.no_grad():
            weight.copy_(new_w)
            if rewrites_bias:
                bias.copy_(new_b)
    else:
        record = MergeRecord(weight=weight, bias=bias if rewrites_bias else None, **common)
        sg._parameters["weight"] = nn.Parameter(new_w, requires_grad=weight.requires_grad)
        if rewrites_bias:
            sg._parameters["bias"] = nn.Parameter(new_b, requires_grad=bias.requires_grad)
    for _, param in params:  # its update is in the weight now: nothing of it trains
        param.requires_grad_(False)
    return record


def role_of(record: MergeRecord) -> str | None:
    """The structural role the merged adapter's nodes were tagged with, if any."""
    return next((s.meta.get("surgery", {}).get("role") for s in record.nodes), None)


def _merge_changes(sg: SiteGraph, record: MergeRecord, pass_name: str,
                   inplace: bool) -> list[Change]:
    site, name, role = record.site, record.adapter, role_of(record)
    changes = [Change("node_removed", pass_name, site, f"{site}/{spec.name}", adapter=name,
                      role=role) for spec in record.nodes]
    head = fold_head(sg, (record.kind, name))
    detail = head.fold_detail(sg) + (" (in place)" if inplace else "")
    for pname in ("weight", "bias") if record.bias is not None else ("weight",):
        param = sg._parameters[pname]
        changes.append(Change("param_rewritten", pass_name, site, qualify(site, pname),
                              adapter=name, role=role, shape=tuple(param.shape),
                              numel=param.numel(), trainable=param.requires_grad, detail=detail))
    was = dict(record.adapter_grads)
    for rel, param in adapter_params(sg, (record.kind, name)):
        if was.get(rel):
            changes.append(Change("param_frozen", pass_name, site, qualify(site, rel),
                                  adapter=name, role=role, shape=tuple(param.shape),
                                  numel=param.numel(), trainable=False,
                                  detail=f"{record.label} merged"))
    return changes
