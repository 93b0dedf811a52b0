"""The merge and unmerge engines: fold the arithmetic in, take the nodes out, and back.

:func:`merge` plans and computes every merged weight before it changes anything, then, per
layer and step, removes the adapter's nodes from every call, swaps in (or writes) the
merged weight, freezes the merged adapter's parameters and appends a
:class:`passes.merge_records.MergeRecord` to the layer's call nodes. :func:`unmerge` undoes
records last-in, first-out: the nodes come back under their old names and meta, the weight
comes back bit for bit, and the adapter's ``requires_grad`` flags come back as they were.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, fx, nn

from passes.merge_layout import LORA_PARTS, is_part, layout, lora_nodes, plan_site, tag
from passes.merge_records import (
    KIND_LABEL,
    MERGE_PASS,
    UNMERGE_PASS,
    CallSpec,
    MergeRecord,
    NodeSpec,
    adapter_inventory,
    describe_present,
    inactive_adapters,
    read_records,
    resolve_names,
    write_records,
)
from surgery.errors import MergeError
from surgery.map.graphs import CallSite, call_sites
from surgery.adapters.merge_math import compute_dtype, ia3_fold, is_finite, lora_delta, merge_delta
from surgery.pass_base import Change, PassResult
from surgery.sites.rewrite import call_input, editable_graph, insert_chain, set_call_input
from surgery.map.trace import is_hf_conv1d

__all__ = ["fold_steps", "adapter_params", "merge", "unmerge", "dry_run"]

_ADAPTER_SLOTS = {"lora": ("lora_dropout", "lora_A", "lora_B"), "ia3": ("ia3_l",)}


# --------------------------------------------------------------------------------------
# Arithmetic over a sequence of merges
# --------------------------------------------------------------------------------------


def fold_steps(site_module: nn.Module, steps: Sequence[tuple[str, str]], weight: Tensor,
               bias: Tensor | None) -> list[tuple[Tensor, Tensor | None]]:
    """Weight and bias after each merge step, computed from ``weight`` and ``bias``.

    Args:
        site_module: the adapted layer (holding ``lora_A``/``lora_B``/``ia3_l``).
        steps: ``[(kind, adapter name)]`` in merge order.
        weight / bias: the starting values (not changed).

    Returns:
        ``[(weight, bias)]`` after each step: new tensors, or the input ones where a step
        does not change them.
    """
    transposed = is_hf_conv1d(site_module)
    out = []
    with torch.no_grad():
        for kind, name in steps:
            if kind == "lora":
                lora_a = site_module._modules["lora_A"][name]
                lora_b = site_module._modules["lora_B"][name]
                delta = lora_delta(lora_a.weight, lora_b.weight, lora_b.scaling,
                                   transposed=transposed, dtype=compute_dtype(weight.dtype))
                weight = merge_delta(weight, delta)
            else:
                vec = site_module._modules["ia3_l"][name]
                weight, bias = ia3_fold(weight, bias, vec.vector().detach(), mode=vec.mode,
                                        transposed=transposed)
            out.append((weight, bias))
    return out


def _detail(site_module: nn.Module, kind: str, name: str, inplace: bool) -> str:
    where = " (in place)" if inplace else ""
    if kind == "lora":
        scaling = site_module._modules["lora_B"][name].scaling
        t = "ᵀ" if is_hf_conv1d(site_module) else ""
        return f"W + {scaling:g}·(B A){t} of LoRA {name!r}{where}"
    mode = site_module._modules["ia3_l"][name].mode
    return f"IA³ {name!r} folded ({mode} scaling){where}"


def _mode(module: nn.Module, kind: str, name: str) -> str:
    return "lora" if kind == "lora" else module._modules["ia3_l"][name].mode


def adapter_params(site_module: nn.Module, kind: str, name: str) -> list[tuple[str, nn.Parameter]]:
    """``(name relative to the layer, parameter)`` of one adapter's modules at a layer.

    ``[("lora_A.default.weight", ...), ("lora_B.default.weight", ...)]`` for LoRA,
    ``[("ia3_l.default.weight", ...)]`` for IA³.
    """
    out = []
    for slot in _ADAPTER_SLOTS[kind]:
        holder = site_module._modules.get(slot)
        if holder is not None and name in holder._modules:
            for pname, param in holder._modules[name].named_parameters():
                out.append((f"{slot}.{name}.{pname}", param))
    return out


# --------------------------------------------------------------------------------------
# Graph edits
# --------------------------------------------------------------------------------------


def _owner(model: nn.Module, prefix: str) -> nn.Module:
    return model.get_submodule(prefix) if prefix else model


def _has(model: nn.Module, prefix: str) -> bool:
    try:
        _owner(model, prefix)
    except AttributeError:
        return False
    return True


def _spec(node: fx.Node) -> NodeSpec:
    part = tag(node)["part"]
    const = node.args[1] if part == "scale" else None
    return NodeSpec(node.name, node.target, node.op, part, dict(node.meta), const)


def _node_name(prefix: str, name: str) -> str:
    return f"{prefix}/{name}"


def _remove(call: CallSite, site: str, kind: str, name: str) -> CallSpec:
    """Take one adapter's nodes out of one call; return what is needed to put them back."""
    lay = layout(call, site)
    graph = call.owner.graph
    base = call.node
    if kind == "lora":
        add = next(n for n in lay.outputs if lay.key(n) == (kind, name))
        nodes = lora_nodes(add, site)
        anchor = add.args[0]
        specs = tuple(_spec(nodes[p]) for p in LORA_PARTS)
        add.replace_all_uses_with(anchor)
        for part in reversed(LORA_PARTS):
            graph.erase_node(nodes[part])
        return CallSpec(call.prefix, base.name, anchor.name, specs)
    node = next(n for n in lay.inputs + lay.outputs if lay.key(n) == (kind, name))
    spec = (_spec(node),)
    if node in lay.outputs:
        node.replace_all_uses_with(base)
    else:
        set_call_input(base, call_input(node))
    graph.erase_node(node)
    return CallSpec(call.prefix, base.name, base.name, spec)


def _create(graph: fx.Graph, spec: NodeSpec, args: tuple, live: set[str]) -> fx.Node:
    """Recreate a removed node under its old name (when free) and with its old meta."""
    namespace = getattr(graph, "_graph_namespace", None)
    used = getattr(namespace, "_used_names", None)
    if spec.name not in live and isinstance(used, set):
        used.discard(spec.name)  # names of erased nodes stay reserved; free the old one
    node = graph.create_node(spec.op, spec.target, args, {}, name=spec.name)
    node.meta = dict(spec.meta)
    live.add(node.name)
    return node


def _restore(model: nn.Module, record: MergeRecord, spec: CallSpec) -> None:
    """Put one adapter's nodes back at one call, where the merge found them."""
    owner = _owner(model, spec.prefix)
    by_name = {n.name: n for n in owner.graph.nodes}
    live = set(by_name)
    base = by_name[spec.base]
    graph = editable_graph(CallSite(record.site, spec.prefix, owner, base))
    if record.kind == "lora":
        anchor = base
        cur = base
        while cur.name != spec.anchor and len(cur.users) == 1:  # the old anchor, if still there
            (user,) = cur.users
            if not (is_part(user, "lora", "add", record.site) and user.args[0] is cur):
                break
            cur = user
        if cur.name == spec.anchor:
            anchor = cur
        x = call_input(base)
        parts = {s.part: s for s in spec.nodes}

        def build() -> fx.Node:
            d = _create(graph, parts["lora_dropout"], (x,), live)
            a = _create(graph, parts["lora_A"], (d,), live)
            b = _create(graph, parts["lora_B"], (a,), live)
            s = _create(graph, parts["scale"], (b, parts["scale"].const), live)
            return _create(graph, parts["add"], (anchor, s), live)

        add = insert_chain(graph, anchor, build)
        anchor.replace_all_uses_with(add, delete_user_cb=lambda user: user is not add)
        return
    (node_spec,) = spec.nodes
    if record.mode == "input":
        with graph.inserting_before(base):
            node = _create(graph, node_spec, (call_input(base),), live)
        set_call_input(base, node)
    else:
        node = insert_chain(graph, base, lambda: _create(graph, node_spec, (base,), live))
        base.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)


# --------------------------------------------------------------------------------------
# Merge
# --------------------------------------------------------------------------------------


def _tied(model: nn.Module, param: Tensor) -> list[str]:
    ptr = param.untyped_storage().data_ptr()
    return [n for n, p in model.named_parameters(remove_duplicate=False)
            if p.untyped_storage().data_ptr() == ptr]


def _work(model: nn.Module, kind: str, names: tuple[str, ...] | None,
          who: str) -> dict[str, set[tuple[str, str]]]:
    """Layer → ``{(kind, adapter)}`` still to merge there.

    Raises:
        AdapterNotFoundError, MergeError: see :class:`passes.merge.MergeLoRAPass`.
    """
    inv = adapter_inventory(model)
    chosen = resolve_names(who, kind, names, inv)
    if not chosen:
        raise MergeError(f"{who}: nothing to merge: the model has no {KIND_LABEL[kind]} adapter "
                         f"({describe_present(inv)}).")
    chosen = _active_only(who, kind, names, chosen, inactive_adapters(model, kind))
    calls_of = call_sites(model)
    work: dict[str, set[tuple[str, str]]] = {}
    merged_already: dict[str, list[str]] = {}
    for name in chosen:
        for site in inv[name][kind]:
            if site not in calls_of:
                raise MergeError(f"{who}: {site}, which carries {KIND_LABEL[kind]} {name!r}, "
                                 f"is not called from the graph")
            if any(r.kind == kind and r.adapter == name
                   for r in read_records(calls_of[site], site)):
                merged_already.setdefault(name, []).append(site)
            else:
                work.setdefault(site, set()).add((kind, name))
    pending_names = {n for keys in work.values() for _, n in keys}
    done = [n for n in chosen if n not in pending_names]
    if names is not None and done:
        raise MergeError(f"{who}: {KIND_LABEL[kind]} adapter {done[0]!r} is already merged (into "
                         f"{', '.join(merged_already[done[0]][:5])}); merging twice would add "
                         f"its update twice. Way out: {UNMERGE_PASS[kind]}(names="
                         f"[{done[0]!r}]) first.")
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
    label = KIND_LABEL[kind]
    named_off = [n for n in chosen if n in off]
    if names is not None and named_off:
        raise MergeError(
            f"{who}: {label} adapter {named_off[0]!r} is switched off (surgery.set_active), so "
            f"it adds nothing to the outputs; merging it would put its update into the "
            f"weights. Way out: switch it on first, surgery.set_active(model, [..., "
            f"{named_off[0]!r}]), or leave it out of names.")
    kept = [n for n in chosen if n not in off]
    if not kept:
        raise MergeError(
            f"{who}: nothing to merge: every {label} adapter is switched off "
            f"({', '.join(map(repr, named_off))}; surgery.set_active). Way out: switch the ones "
            f"to merge on first.")
    return kept


def merge(model: nn.Module, *, kind: str, names: tuple[str, ...] | None, safe: bool,
          inplace: bool, who: str, pass_name: str, dry: bool = False) -> PassResult:
    """Merge the ``kind`` adapters ``names`` of ``model`` (in place on ``model``'s graphs).

    Args:
        model: the traced model (the pass's private copy under :func:`surgery.apply_passes`).
        kind: ``"lora"`` or ``"ia3"``.
        names: adapter names, or ``None`` for every one not merged yet.
        safe: refuse non-finite merged weights.
        inplace: write the merged values into the existing weight storage.
        who / pass_name: the pass's class name (messages) and stable name (changes).
        dry: for :meth:`Pass.plan` on a private copy: an in-place merge is reported as such
            but swaps in new tensors instead of writing into shared storage.

    Raises:
        AdapterNotFoundError, MergeError: see :class:`passes.merge.MergeLoRAPass`; nothing
            is changed when they are raised.
    """
    work = _work(model, kind, names, who)
    calls_of = call_sites(model)
    write = inplace and not dry

    # Plan and compute everything first: nothing changes unless all of it can be done.
    plans: dict[str, tuple[nn.Module, list[tuple[str, str]], list]] = {}
    for site, wanted in work.items():
        calls = calls_of[site]
        module = calls[0].owner.get_submodule(str(calls[0].node.target))
        steps = plan_site(calls, site, wanted)
        if inplace:
            others = [n for n in _tied(model, module.weight) if n != f"{site}.weight"]
            if others:
                raise MergeError(f"{who}: {site}.weight shares its storage with "
                                 f"{', '.join(others[:5])}; an in-place merge would change them "
                                 f"too. Way out: inplace=False.")
        results = fold_steps(module, steps, module.weight, module._parameters.get("bias"))
        if safe:
            for (k, n), (w, b) in zip(steps, results):
                if not is_finite(w) or (b is not None and not is_finite(b)):
                    raise MergeError(
                        f"{who}: merging {KIND_LABEL[k]} {n!r} into {site} gives non-finite "
                        f"values (inf or nan) in its {'weight' if not is_finite(w) else 'bias'}; "
                        f"nothing was changed. Way out: check the adapter's parameters, or pass "
                        f"safe=False to merge anyway.")
        plans[site] = (module, steps, [] if write else results)
        del results  # an in-place merge recomputes them one at a time below

    changes: list[Change] = []
    for site, (module, steps, results) in plans.items():
        calls = calls_of[site]
        records = read_records(calls, site)
        for i, (k, n) in enumerate(steps):
            record, specs = _merge_step(module, calls, site, k, n, results[i] if results else None,
                                        write=write, inplace=inplace)
            records = records + (record,)
            write_records(calls, records)
            changes += _merge_changes(module, record, specs, pass_name, _detail(module, k, n, inplace))
    return PassResult(model, True, tuple(changes), pass_name)


def _merge_step(module: nn.Module, calls: Sequence[CallSite], site: str, kind: str, name: str,
                result: tuple[Tensor, Tensor | None] | None, *, write: bool,
                inplace: bool) -> tuple[MergeRecord, tuple[CallSpec, ...]]:
    """Merge one adapter into one layer: nodes out, weight in, adapter frozen."""
    weight = module.weight
    bias = module._parameters.get("bias")
    if result is None:  # in place: computed from the weight as the previous step left it
        ((new_w, new_b),) = fold_steps(module, [(kind, name)], weight, bias)
    else:
        new_w, new_b = result
    rewrites_bias = new_b is not bias
    specs = tuple(_remove(call, site, kind, name) for call in calls)
    params = adapter_params(module, kind, name)
    grads = tuple((rel, p.requires_grad) for rel, p in params)
    bias_grad = bool(bias is not None and bias.requires_grad)
    if write:
        record = MergeRecord(kind, name, site, _mode(module, kind, name), True,
                             weight.detach().clone(),
                             bias.detach().clone() if rewrites_bias else None,
                             weight.requires_grad, bias_grad, specs, grads)
        with torch.no_grad():
            weight.copy_(new_w)
            if rewrites_bias:
                bias.copy_(new_b)
    else:
        record = MergeRecord(kind, name, site, _mode(module, kind, name), inplace, weight,
                             bias if rewrites_bias else None, weight.requires_grad, bias_grad,
                             specs, grads)
        module._parameters["weight"] = nn.Parameter(new_w, requires_grad=weight.requires_grad)
        if rewrites_bias:
            module._parameters["bias"] = nn.Parameter(new_b, requires_grad=bias.requires_grad)
    for _, param in params:  # its update is in the weight now: nothing of it trains
        param.requires_grad_(False)
    return record, specs


def _merge_changes(module: nn.Module, record: MergeRecord, specs: tuple[CallSpec, ...],
                   pass_name: str, detail: str) -> list[Change]:
    site, name = record.site, record.adapter
    role = specs[0].nodes[0].meta["surgery"].get("role") if specs else None
    changes = [Change("node_removed", pass_name, site, _node_name(spec.prefix, node.name),
                      adapter=name, role=role)
               for spec in specs for node in spec.nodes]
    for pname in ("weight", "bias") if record.bias is not None else ("weight",):
        param = module._parameters[pname]
        changes.append(Change("param_rewritten", pass_name, site, f"{site}.{pname}",
                              adapter=name, role=role, shape=tuple(param.shape),
                              numel=param.numel(), trainable=param.requires_grad, detail=detail))
    was = dict(record.adapter_grads)
    for rel, param in adapter_params(module, record.kind, name):
        if was.get(rel):
            changes.append(Change("param_frozen", pass_name, site, f"{site}.{rel}", adapter=name,
                                  role=role, shape=tuple(param.shape), numel=param.numel(),
                                  trainable=False, detail=f"{record.label} merged"))
    return changes


# --------------------------------------------------------------------------------------
# Unmerge
# --------------------------------------------------------------------------------------


def _undo_plan(model: nn.Module, kind: str, names: tuple[str, ...] | None, inplace: bool,
               who: str) -> dict[str, int]:
    """Layer → index of the oldest record to undo there (all later ones go too).

    Raises:
        AdapterNotFoundError, MergeError: see :class:`passes.merge.UnmergeLoRAPass`.
    """
    inv = adapter_inventory(model)
    chosen = set(resolve_names(who, kind, names, inv))
    todo: dict[str, int] = {}
    seen: set[str] = set()
    for site, calls in call_sites(model).items():
        records = read_records(calls, site)
        hits = [i for i, r in enumerate(records) if r.kind == kind and r.adapter in chosen]
        if not hits:
            continue
        k = hits[0]
        later = [r for r in records[k:] if not (r.kind == kind and r.adapter in chosen)]
        if later:
            first = records[k]
            raise MergeError(
                f"{who}: cannot unmerge {KIND_LABEL[kind]} {first.adapter!r} from {site} while "
                f"{KIND_LABEL[later[0].kind]} {later[0].adapter!r}, merged after it, stays merged: "
                f"merges come out last-in, first-out so that the weight comes back bit for bit. "
                f"Way out: unmerge {later[0].adapter!r} first ({UNMERGE_PASS[later[0].kind]}), "
                f"then merge it again if you want it merged.")
        written = [r for r in records[k:] if r.inplace]
        if written and not inplace:
            r = written[0]
            raise MergeError(
                f"{who}: {KIND_LABEL[r.kind]} {r.adapter!r} was merged into {site} in place "
                f"({MERGE_PASS[r.kind]}(inplace=True)): its weight is storage shared with the "
                f"model given here and every model made from it, and putting the original "
                f"values back writes into that storage. Way out: "
                f"apply_passes(model, [{UNMERGE_PASS[kind]}(inplace=True)], inplace=True).")
        for spec in records[k].calls:
            owner = _owner(model, spec.prefix) if _has(model, spec.prefix) else None
            if owner is None or not any(n.name == spec.base for n in owner.graph.nodes):
                raise MergeError(f"{who}: the call {spec.base!r} of {site} that "
                                 f"{records[k].label} was merged at is no longer in the graph")
        todo[site] = k
        seen.update(records[i].adapter for i in hits)
    if not todo:
        what = f"{KIND_LABEL[kind]} adapter {sorted(chosen)[0]!r} is" if names is not None and chosen \
            else f"no {KIND_LABEL[kind]} adapter is"
        raise MergeError(f"{who}: nothing to unmerge: {what} merged. Way out: "
                         f"{MERGE_PASS[kind]}() merges it.")
    if names is not None:
        unmerged = [n for n in names if n not in seen]
        if unmerged:
            raise MergeError(f"{who}: {KIND_LABEL[kind]} adapter {unmerged[0]!r} is not merged; "
                             f"nothing was changed.")
    return todo


def unmerge(model: nn.Module, *, kind: str, names: tuple[str, ...] | None, inplace: bool,
            who: str, pass_name: str, dry: bool = False) -> PassResult:
    """Unmerge the ``kind`` adapters ``names`` of ``model`` (in place on its graphs).

    Args:
        model: the traced model (the pass's private copy under :func:`surgery.apply_passes`).
        kind: ``"lora"`` or ``"ia3"``.
        names: adapter names, or ``None`` for every merged one.
        inplace: allowed to write the saved values of in-place merges back into storage.
        who / pass_name: the pass's class name (messages) and stable name (changes).
        dry: for :meth:`Pass.plan` on a private copy: swap in new tensors instead of writing.

    Raises:
        AdapterNotFoundError, MergeError: see :class:`passes.merge.UnmergeLoRAPass`; nothing
            is changed when they are raised.
    """
    todo = _undo_plan(model, kind, names, inplace, who)
    calls_of = call_sites(model)
    changes: list[Change] = []
    for site, k in todo.items():
        calls = calls_of[site]
        records = read_records(calls, site)
        module = calls[0].owner.get_submodule(str(calls[0].node.target))
        for record in reversed(records[k:]):
            for spec in record.calls:
                _restore(model, record, spec)
            _put_back(model, module, record, write=not dry)
            for rel, flag in record.adapter_grads:
                param = _param(module, rel)
                if param is not None:
                    param.requires_grad_(flag)
            records = records[:-1]
            write_records(calls, records)
            changes += _unmerge_changes(module, record, pass_name)
    return PassResult(model, True, tuple(changes), pass_name)


def _param(module: nn.Module, rel: str) -> nn.Parameter | None:
    try:
        return module.get_parameter(rel)
    except AttributeError:  # the adapter's module was removed by hand since the merge
        return None


def _put_back(model: nn.Module, module: nn.Module, record: MergeRecord, *, write: bool) -> None:
    """Restore the weight (and bias) a merge replaced, bit for bit."""
    pairs = [("weight", record.weight, record.weight_grad)]
    if record.bias is not None:
        pairs.append(("bias", record.bias, record.bias_grad))
    present = {id(p) for p in model.parameters()}
    for pname, saved, grad in pairs:
        if record.inplace and write:
            with torch.no_grad():
                module._parameters[pname].copy_(saved)
            module._parameters[pname].requires_grad_(grad)
        elif isinstance(saved, nn.Parameter) and id(saved) in present:
            module._parameters[pname] = saved  # still held by a tied module: keep them tied
        else:
            module._parameters[pname] = nn.Parameter(saved.detach(), requires_grad=grad)


def _unmerge_changes(module: nn.Module, record: MergeRecord, pass_name: str) -> list[Change]:
    site = record.site
    role = record.calls[0].nodes[0].meta.get("surgery", {}).get("role") if record.calls else None
    changes = [Change("node_added", pass_name, site, _node_name(spec.prefix, node.name),
                      adapter=record.adapter, role=role)
               for spec in record.calls for node in spec.nodes]
    for pname in ("weight", "bias") if record.bias is not None else ("weight",):
        param = module._parameters[pname]
        changes.append(Change("param_rewritten", pass_name, site, f"{site}.{pname}",
                              adapter=record.adapter, role=role, shape=tuple(param.shape),
                              numel=param.numel(), trainable=param.requires_grad,
                              detail=f"restored from before {record.label} was merged"))
    return changes


# --------------------------------------------------------------------------------------
# Dry runs
# --------------------------------------------------------------------------------------


def dry_run(model: nn.Module, run: Callable[[nn.Module], PassResult]) -> list[Change]:
    """The changes ``run`` makes on a private copy of ``model`` that shares its storage.

    ``run`` must not write into storage (the engines' ``dry=True``); the copy is dropped.
    """
    import copy

    from surgery.sites.params import share_weights_copy

    work = share_weights_copy(model)
    state = getattr(model, "_surgery", None)
    if state is not None and getattr(work, "_surgery", None) is None:
        work._surgery = copy.copy(state)
    return list(run(work).changes)
