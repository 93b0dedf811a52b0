"""Merge-and-unload: from an adapted model back to a plain model of the user's class.

::

    adapted = apply_passes(model, [LoRAPass(rank=8), IA3Pass()])
    ...                                        # train
    plain = surgery.unload(adapted)            # same class as model, adapters folded in
    type(model)(config).load_state_dict(plain.state_dict(), strict=True)

Neither ``model`` nor ``adapted`` changes: on a private copy of ``adapted`` that shares its
weights, each site graph gets its adapters folded into new weight tensors, with the same
arithmetic in the same order as :class:`passes.merge.MergeLoRAPass` then
:class:`passes.merge.MergeIA3Pass`, and is then replaced by the plain module it stands for
(:func:`surgery.sites.site_graph.plain_module`).
"""

from __future__ import annotations

from torch import nn

from surgery.adapters.fold import check_foldable, fold_steps
from surgery.adapters.fold_layout import Key, adapters_at, fold_head, plan_site
from surgery.adapters.fold_params import fold_params_now, folds_params
from surgery.adapters.merge_state import WHY_NOT_LINEAR, read_records
from surgery.errors import ConfigError, MergeError
from surgery.sites.marker import AdapterModule
from surgery.sites.params import share_weights_copy
from surgery.sites.site_graph import (
    SiteGraph,
    install,
    module_aliases,
    plain_module,
    site_graphs,
)

__all__ = ["unload"]


def unload(model: nn.Module) -> nn.Module:
    """Fold every LoRA and IA³ adapter into its layer and return a plain model.

    The result is a model of the class that was adapted (``model._surgery.source_class``:
    a transformers model stays that transformers class, with ``generate`` and
    ``save_pretrained``) with no adapter module or parameter and no site graph: its
    ``state_dict`` loads with ``strict=True`` into a fresh instance of that class, and its
    forward computes what ``apply_passes(model, [MergeLoRAPass(), MergeIA3Pass()])``
    computes (LoRA dropout counts as off). Adapters merged already stay folded; adapters
    switched off (:func:`surgery.set_active`) contribute nothing and are left out. Where a
    layer carries several adapters they fold innermost first (LoRA, then an IA³ vector
    wrapping it), each in at least float32 and cast once to the weight's dtype.

    Parameters that no fold changes share storage with ``model`` (and so with the model
    originally adapted); folded weights are new tensors; buffers are copies of ``model``'s.
    ``requires_grad`` flags are those of the model originally adapted (what the passes
    froze is unfrozen again). Works as well on a deep-copied, pickled or
    ``torch.load``-ed adapted model.

    Args:
        model: a model returned by :func:`surgery.apply_passes`.

    Returns:
        A new plain model in ``model``'s training mode; ``model`` is not changed.

    Raises:
        ConfigError: ``model`` carries no surgery (nothing to unload).
        MergeError: an adapter cannot be merged (bottleneck adapters, prefixes, anything
            that is not LoRA or IA³: they are not linear in the weights; the way out is
            :func:`surgery.delete_adapter` first), an adapter lies
            where no weight can absorb it, a folded weight would be non-finite, or a folded
            weight is tied to a parameter outside its layer.
    """
    sites = list(site_graphs(model))
    if getattr(model, "_surgery", None) is None and not sites:
        raise ConfigError(f"unload takes a model from surgery.apply_passes; got a plain "
                          f"{type(model).__name__}, which has nothing to unload.")
    _check_mergeable(model)
    frozen = _frozen_by_passes(model)
    work = share_weights_copy(model)
    folded: dict[int, list[str]] = {}
    replaced = []  # kept alive so that their ids stay theirs while ties are checked
    for qname, sg in site_graphs(work):
        for pname, old, new in _fold_site(qname, sg):
            folded.setdefault(id(old), []).append(qname)
            replaced.append(old)
            sg._parameters[pname] = new
    _check_ties(work, folded)
    root = work
    for qname, sg in _outermost(work):
        root = install(root, module_aliases(work, sg) or [qname], plain_module(sg))
    root.__dict__.pop("_surgery", None)
    for name, param in root.named_parameters(remove_duplicate=False):
        if name in frozen:
            param.requires_grad_(True)
    root.train(model.training)
    return root


def _check_mergeable(model: nn.Module) -> None:
    """Raise for adapters that no fold can put into a weight (checked before anything)."""
    foldable: set[Key] = set()
    inside: set[int] = set()  # modules of foldable adapters, and everything in them
    for _, sg in site_graphs(model):
        for key, mods in adapters_at(sg).items():
            if fold_head(sg, key) is not None:
                foldable.add(key)
                inside.update(id(sub) for _, m in mods for sub in m.modules())
    # A switched-off adapter inside a site graph contributes nothing and leaves with it.
    active: dict[tuple[str, str], bool] = {}
    in_sites = {id(sub) for _, sg in site_graphs(model) for sub in sg.modules()}
    for _, mod in model.named_modules():
        if isinstance(mod, AdapterModule):
            key = (mod.pass_name, mod.adapter_name)
            active[key] = active.get(key, False) or mod.active or id(mod) not in in_sites
    others: dict[str, set[str]] = {}
    for _, mod in model.named_modules():
        if isinstance(mod, AdapterModule) and id(mod) not in inside \
                and active[(mod.pass_name, mod.adapter_name)]:
            others.setdefault(mod.adapter_name, set()).add(mod.pass_name)
    for _, sg in site_graphs(model):
        for node in sg.graph.nodes:
            meta = node.meta.get("surgery")
            key = (str(meta.get("pass")), str(meta.get("adapter"))) if meta else None
            if key is not None and key not in foldable and active.get(key, True):
                others.setdefault(key[1], set()).add(key[0])
    if others:
        name, kinds = sorted(others.items())[0]
        more = [n for n in sorted(others) if n != name]
        also = f" (so do {', '.join(map(repr, more))})" if more else ""
        raise MergeError(
            f"unload: adapter {name!r} ({', '.join(sorted(kinds))}) cannot be merged{also}: "
            f"{WHY_NOT_LINEAR}. unload folds every adapter and takes no names. Way out: "
            f"delete it first, model = surgery.delete_adapter(model, {name!r})"
            f"{' (once per adapter named here)' if more else ''}, then surgery.unload(model); "
            f"or keep the adapted model as it is.")


def _frozen_by_passes(model: nn.Module) -> set[str]:
    """Names of the parameters the passes froze (recorded in the model's history)."""
    state = getattr(model, "_surgery", None)
    history = state.history if state is not None else []
    return {c.name for r in history for c in r.changes if c.kind == "param_frozen"}


def _fold_site(qname: str, sg: SiteGraph) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    """``[(parameter name, old, new)]`` of one site graph with its active, unmerged
    adapters folded in (the graph is left alone: the site graph is about to go).

    Raises:
        MergeError: the adapters cannot fold in any order, or the result is not finite.
    """
    present = adapters_at(sg)
    merged = {(r.kind, r.adapter) for r in read_records(sg)}
    wanted = {k for k in present if k not in merged and fold_head(sg, k) is not None}
    if not wanted:
        return []
    try:
        if folds_params(sg, wanted):  # into named parameters: each update on its own
            return _fold_params(qname, sg, wanted)
        order = plan_site(sg, wanted)
    except MergeError as e:
        raise MergeError(f"unload: {e}") from None
    off = {k for k in wanted if not all(m.active for _, m in present[k])}
    steps = [k for k in order if k not in off]  # switched off: adds nothing, left out
    if not steps:
        return []
    check_foldable(sg, "unload")
    weight, bias = sg._parameters["weight"], sg._parameters.get("bias")
    try:
        new_w, new_b = fold_steps(sg, steps, weight, bias)[-1]
    except MergeError as e:
        raise MergeError(f"unload: {e}") from None
    out = []
    for pname, old, value in (("weight", weight, new_w), ("bias", bias, new_b)):
        if value is None or value is old:
            continue
        if not bool(value.isfinite().all()):
            raise MergeError(f"unload: merging {', '.join(n for _, n in steps)} into "
                             f"{qname or 'the model'} gives non-finite values in its {pname}.")
        out.append((pname, old, nn.Parameter(value, requires_grad=old.requires_grad)))
    return out


def _fold_params(qname: str, sg: SiteGraph, wanted: set[Key]
                 ) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    """:func:`_fold_site` for adapters folding into named parameters
    (:mod:`surgery.adapters.fold_params`); switched-off updates are left out."""
    last: dict[str, object] = {}
    for _, _, pname, value in fold_params_now(sg, sorted(wanted), active_only=True):
        last[pname] = value
    out = []
    for pname, value in last.items():
        old = sg._parameters[pname]
        if not bool(value.isfinite().all()):
            raise MergeError(f"unload: merging into {qname}.{pname} gives non-finite values.")
        out.append((pname, old, nn.Parameter(value, requires_grad=old.requires_grad)))
    return out


def _check_ties(model: nn.Module, folded: dict[int, list[str]]) -> None:
    """A folded parameter still held elsewhere (tied), or folded at two sites, would leave
    the plain model holding two values for one tied parameter.

    Args:
        model: the private copy, with the folded weights swapped in.
        folded: ``id`` of each replaced parameter → the sites where it was folded.

    Raises:
        MergeError: naming the tied names.
    """
    holders: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(param), []).append(name)
    for pid, sites in folded.items():
        if len(sites) > 1 or pid in holders:
            names = ", ".join((sites[1:] + sorted(holders.get(pid, [])))[:5])
            raise MergeError(f"unload: the weight folded at {sites[0] or 'the model'} is tied to "
                             f"{names} in {type(model).__name__}, where it is not folded the same "
                             f"way; the plain model cannot hold both values. Way out: do not "
                             f"adapt a layer whose weight is tied (exclude=[{sites[0]!r}]).")


def _outermost(model: nn.Module) -> list[tuple[str, SiteGraph]]:
    """Site graphs not inside another site graph (those are made plain with their parent)."""
    out: list[tuple[str, SiteGraph]] = []
    for qname, sg in site_graphs(model):
        if not any(qname == q or qname.startswith(q + ".") or q == "" for q, _ in out):
            out.append((qname, sg))
    return out
