"""Merge-and-unload: from an adapted model back to a plain model of the original class.

::

    adapted = apply_passes(model, [LoRAPass(rank=8), IA3Pass()])
    ...                                        # train
    plain = surgery.adapters.unload(adapted)            # same class as model, adapters folded in
    type(model)(config).load_state_dict(plain.state_dict(), strict=True)

No graph is edited and neither ``model`` nor ``adapted`` changes: the merged weights are
computed with the same arithmetic, in the same order, as :class:`passes.merge.MergeLoRAPass`
and :class:`passes.merge.MergeIA3Pass` would use, and put into a fresh eager copy of the
traced model.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from surgery.sites.marker import AdapterModule
from surgery.errors import ConfigError, MergeError
from surgery.map.graphs import call_sites, graph_modules, qualified
from surgery.sites.params import share_weights_copy
from surgery.map.trace import is_traced

__all__ = ["unload"]

_MERGEABLE = ("lora", "ia3")


def unload(model: nn.Module) -> nn.Module:
    """Fold every LoRA and IA³ adapter into its layer and return a plain eager model.

    The result is an instance of the class that was traced (``model._surgery.source_class``)
    with no adapter module, parameter or node: its ``state_dict`` loads with ``strict=True``
    into a fresh instance of that class, and its forward computes what the model merged by
    ``apply_passes(model, [MergeLoRAPass(), MergeIA3Pass()])`` computes (LoRA dropout
    counts as off). Adapters merged already stay folded; adapters switched off
    (:func:`surgery.set_active`) contribute nothing and are left out. Where a layer carries
    several adapters they fold innermost first (LoRA, then an IA³ vector wrapping it), each
    in at least float32 and cast once to the weight's dtype.

    Parameters that no merge changes share storage with ``model`` (and so with the model
    originally traced); merged weights are new tensors; buffers are copied from ``model``.
    ``requires_grad`` flags are those of the model originally traced.

    Args:
        model: a model returned by :func:`surgery.apply_passes` (or :func:`surgery.map.trace`).

    Returns:
        A new eager model in ``model``'s training mode; ``model`` is not changed.

    Raises:
        ConfigError: ``model`` was not traced by fx-surgery, or keeps no eager copy.
        MergeError: an adapter cannot be merged (bottleneck adapters, prefixes, anything
            that is not LoRA or IA³: they are not linear in the weights), an adapter lies
            where no weight can absorb it, a merged weight would be non-finite, or a merged
            weight is tied to another parameter of the model.
    """
    from passes.merge_edit import fold_steps
    from passes.merge_layout import layout, plan_site
    from passes.merge_records import MERGED_KEY, inactive_adapters, not_mergeable_error

    if not is_traced(model):
        raise ConfigError(f"unload takes a model from surgery.apply_passes or surgery.map.trace; got a "
                          f"plain {type(model).__name__}, which has nothing to unload.")
    state = model._surgery
    if state.source is None:
        raise ConfigError("unload: this traced model keeps no eager copy of the traced model "
                          "(model._surgery.source), so there is no plain class to rebuild.")
    _check_mergeable(model, not_mergeable_error)

    off = {(kind, name) for kind in _MERGEABLE for name in inactive_adapters(model, kind)}
    expected = _adapters_by_site(model)
    finals: dict[str, Tensor] = {}
    for site, calls in call_sites(model).items():
        merged = {(r.kind, r.adapter) for r in calls[0].node.meta.get(MERGED_KEY, ())}
        wanted = {key for key in layout(calls[0], site).keys() if key not in merged}
        lost = expected.pop(site, set()) - wanted - merged
        if lost:
            kind, name = sorted(lost)[0]
            raise MergeError(f"unload: {site} carries {kind} adapter {name!r}, but its nodes are "
                             f"not where a merge can find them (next to the layer's call).")
        if not wanted:
            continue
        module = calls[0].owner.get_submodule(str(calls[0].node.target))
        steps = [s for s in plan_site(calls, site, wanted) if s not in off]  # off: adds nothing
        if not steps:
            continue
        weight, bias = fold_steps(module, steps, module.weight,
                                  module._parameters.get("bias"))[-1]
        for pname, value in (("weight", weight), ("bias", bias)):
            if value is not None and value is not module._parameters.get(pname):
                if not bool(value.isfinite().all()):
                    raise MergeError(f"unload: merging {', '.join(n for _, n in steps)} into "
                                     f"{site} gives non-finite values in its {pname}.")
                finals[f"{site}.{pname}"] = value

    if expected:
        site, keys = sorted(expected.items())[0]
        raise MergeError(f"unload: {site} carries {sorted(keys)[0]} but is not called from the "
                         f"graph, so there is nothing to merge it into.")
    plain = share_weights_copy(state.source)
    _bind_parameters(plain, model, finals)
    _copy_buffers(plain, model)
    plain.train(model.training)
    return plain


def _adapters_by_site(model: nn.Module) -> dict[str, set[tuple[str, str]]]:
    """Layer → ``{(pass name, adapter name)}`` of the LoRA and IA³ modules it holds."""
    out: dict[str, set[tuple[str, str]]] = {}
    for _, mod in model.named_modules():
        if isinstance(mod, AdapterModule) and mod.pass_name in _MERGEABLE:
            out.setdefault(mod.site, set()).add((mod.pass_name, mod.adapter_name))
    return out


def _check_mergeable(model: nn.Module, error: Callable[[str, str, list[str]], Exception]) -> None:
    """Raise for adapter modules or inserted nodes that no merge can fold into a weight."""
    others: dict[str, list[str]] = {}
    for _, mod in model.named_modules():
        if isinstance(mod, AdapterModule) and mod.pass_name not in _MERGEABLE:
            others.setdefault(mod.adapter_name, []).append(mod.pass_name)
    for _, owner in graph_modules(model):
        for node in owner.graph.nodes:
            meta = node.meta.get("surgery")
            if meta and meta.get("pass") not in _MERGEABLE:
                others.setdefault(str(meta.get("adapter")), []).append(str(meta.get("pass")))
    if others:
        name, kinds = sorted(others.items())[0]
        raise error("unload", name, sorted(set(kinds)))


def _bind_parameters(plain: nn.Module, model: nn.Module, finals: dict[str, Tensor]) -> None:
    """Give ``plain`` the traced model's current base weights, merged ones from ``finals``."""
    current = {name: p.detach() for name, p in model.named_parameters(remove_duplicate=False)}
    current.update(finals)
    groups: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for mod_name, mod in plain.named_modules(remove_duplicate=False):
        for key, param in mod._parameters.items():
            if param is not None:
                groups.setdefault(id(param), []).append((mod, key, qualified(mod_name, key)))
    for slots in groups.values():
        first_mod, first_key, _ = slots[0]
        old = first_mod._parameters[first_key]
        values = {full: current[full] for _, _, full in slots if full in current}
        if not values:
            continue
        storages = {(v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
                    for v in values.values()}
        if len(storages) > 1:
            names = ", ".join(sorted(values))
            raise MergeError(f"unload: {names} are one tied parameter in "
                             f"{type(plain).__name__}, but a merge changed only some of them; "
                             f"the plain model cannot hold both. Way out: do not adapt a layer "
                             f"whose weight is tied (exclude=[...]).")
        value = next(iter(values.values()))
        if value.data_ptr() == old.data_ptr() and value.shape == old.shape \
                and value.dtype == old.dtype:
            continue  # already the same storage
        new = nn.Parameter(value, requires_grad=old.requires_grad)
        for mod, key, _ in slots:
            mod._parameters[key] = new


def _copy_buffers(plain: nn.Module, model: nn.Module) -> None:
    """Copy the traced model's buffers (running statistics may have moved) into ``plain``."""
    current = dict(model.named_buffers(remove_duplicate=False))
    for mod_name, mod in plain.named_modules(remove_duplicate=False):
        for key, buf in mod._buffers.items():
            src = current.get(qualified(mod_name, key))
            if buf is not None and src is not None and src.shape == buf.shape \
                    and src.dtype == buf.dtype:
                mod._buffers[key] = src.detach().clone()
