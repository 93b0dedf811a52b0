"""Weighted combination of LoRA adapters into a new named adapter.

::

    mixed = surgery.combine_adapters(adapted, {"a": 0.7, "b": 0.3}, method="cat", name="ab")

The same two methods as PEFT's ``add_weighted_adapter`` (``"linear"`` and ``"cat"``), with
the same formulas; the new adapter is an ordinary LoRA adapter (its own ``lora_A`` /
``lora_B`` and branch nodes) that trains, merges and unloads like any other. As after PEFT's
``add_weighted_adapter`` followed by ``set_adapter``, the new adapter is the only one left
active (:func:`surgery.set_active`), so the model computes the base plus the combined update,
not the sources' updates a second time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, fx, nn

from surgery.adapters.active import merged_names, set_active
from surgery.adapters.fold_layout import adapter_nodes, fold_head, main_node
from surgery.adapters.merge_state import adapter_inventory
from surgery.adapters.names import check_adapter_name
from surgery.errors import AdapterNotFoundError, ConfigError, MergeError, NoMatchError
from surgery.pass_base import Change, Pass, PassResult
from surgery.sites.rewrite import register_adapter, replace_uses_after
from surgery.sites.site_graph import SiteGraph, site_graphs

__all__ = ["combine_adapters", "combine_factors"]

_METHODS = ("linear", "cat")


def combine_factors(factors: list[tuple[Tensor, Tensor, float]], weights: list[float],
                    method: str) -> tuple[Tensor, Tensor]:
    """The ``(A, B)`` of a combined LoRA adapter whose own scaling is 1.

    With ``c_i = w_i · s_i`` (weight times the source adapter's scaling ``alpha_i / r_i``):

    * ``"cat"``: ``A = [c_1 A_1; c_2 A_2; ...]`` (rows stacked, rank ``Σ r_i``),
      ``B = [B_1, B_2, ...]`` (columns stacked), so ``B A = Σ_i w_i · s_i · B_i A_i``
      exactly: the weighted sum of the source updates.
    * ``"linear"`` (equal ranks): ``A = Σ_i sign(c_i) √|c_i| · A_i`` and
      ``B = Σ_i √|c_i| · B_i`` (summed in float32, cast to the factors' dtype), so
      ``B A = Σ_i c_i B_i A_i`` plus cross terms ``√|c_i c_j| B_i A_j``: an approximation,
      cheap in rank.

    Args:
        factors: ``[(A_i (r_i, in), B_i (out, r_i), s_i)]``.
        weights: ``w_i``, one per factor pair.
        method: ``"linear"`` or ``"cat"``.

    Returns:
        ``(A, B)``: ``(r, in)`` and ``(out, r)``, in the dtype of ``A_1`` / ``B_1``.

    Raises:
        ConfigError: unknown method, or ranks differ under ``"linear"``.
    """
    if method == "cat":
        a = torch.cat([fa * w * s for (fa, _, s), w in zip(factors, weights)], dim=0)
        b = torch.cat([fb for _, fb, _ in factors], dim=1)
        return a, b
    if method != "linear":
        raise ConfigError(f"combine_adapters: method must be one of {_METHODS}, got {method!r}")
    ranks = {fa.shape[0] for fa, _, _ in factors}
    if len(ranks) != 1:
        raise ConfigError(f"combine_adapters: method='linear' needs equal ranks, got "
                          f"{sorted(ranks)}. Way out: method='cat' (rank Σ r_i).")
    c = [w * s for (_, _, s), w in zip(factors, weights)]
    w_a = torch.tensor([math.copysign(math.sqrt(abs(ci)), ci) if ci else 0.0 for ci in c],
                       device=factors[0][0].device)
    w_b = torch.tensor([math.sqrt(abs(ci)) for ci in c], device=factors[0][0].device)
    a = (torch.stack([fa for fa, _, _ in factors]) * w_a.view(-1, 1, 1)).sum(0)
    b = (torch.stack([fb for _, fb, _ in factors]) * w_b.view(-1, 1, 1)).sum(0)
    return a.to(factors[0][0].dtype), b.to(factors[0][1].dtype)


@dataclass(frozen=True, kw_only=True)
class _CombineLoRAPass(Pass):
    """Add LoRA adapter ``adapter_name`` combining ``weights`` at every layer carrying them all."""

    name: ClassVar[str] = "combine_lora"

    weights: tuple[tuple[str, float], ...]
    method: str
    adapter_name: str

    def run(self, model: nn.Module) -> PassResult:
        names = [n for n, _ in self.weights]
        self._check(model, names)
        sites = []
        for qname, sg in site_graphs(model):
            heads = [fold_head(sg, ("lora", n)) for n in names]
            if all(h is not None and h.low_rank(sg) is not None for h in heads):
                sites.append((qname, sg, heads))
        if not sites:
            raise NoMatchError(f"combine_adapters: no layer carries all of {names}; a combined "
                               f"adapter goes where every source adapter is.")
        method = "linear" if len(names) == 1 else self.method  # one source: cat == linear
        per_site = []
        for qname, sg, heads in sites:
            factors = [tuple(t.detach() if isinstance(t, Tensor) else t for t in h.low_rank(sg))
                       for h in heads]
            try:
                per_site.append(combine_factors(factors, [w for _, w in self.weights], method))
            except ConfigError as e:
                raise ConfigError(f"{e} (at {qname}; sources {names})") from None
        detail = f"{method} of " + ", ".join(f"{w:g}·{n}" for n, w in self.weights)
        changes: list[Change] = []
        for (qname, sg, heads), (lora_a, lora_b) in zip(sites, per_site):
            # the new modules' initialisation draws random numbers: the caller's RNG stays
            with torch.random.fork_rng(devices=[]):
                mods = heads[0].from_low_rank(sg, lora_a, lora_b, adapter_name=self.adapter_name)
            for slot, mod in mods.items():
                register_adapter(sg, slot, self.adapter_name, mod, pass_name="combine_adapters",
                                 site=qname)
            head = next(m for m in mods.values() if m.fold_mode is not None)
            nodes = _clone_nodes(sg, ("lora", names[0]), self.adapter_name, head.low_rank(sg)[2])
            role = heads[0].role
            changes += [Change("node_added", self.name, qname, f"{qname}/{n.name}",
                               adapter=self.adapter_name, role=role, detail=detail) for n in nodes]
            changes += [Change("param_added", self.name, qname,
                               f"{qname}.{slot}.{self.adapter_name}.{p}" if qname
                               else f"{slot}.{self.adapter_name}.{p}",
                               adapter=self.adapter_name, role=role, shape=tuple(t.shape),
                               numel=t.numel(), trainable=t.requires_grad, detail=detail)
                        for slot, mod in mods.items() for p, t in mod.named_parameters()]
        return PassResult(model, True, tuple(changes), self.name)

    def _check(self, model: nn.Module, names: list[str]) -> None:
        inv = adapter_inventory(model)
        lora_names = sorted(n for n, kinds in inv.items() if "lora" in kinds)
        for source in names:
            if source not in inv:
                raise AdapterNotFoundError(
                    f"combine_adapters: the model has no adapter named {source!r}; LoRA adapters "
                    f"present: {', '.join(map(repr, lora_names)) or 'none'}.")
            if "lora" not in inv[source]:
                raise ConfigError(f"combine_adapters: {source!r} is a {'/'.join(inv[source])} "
                                  f"adapter; only LoRA adapters combine. Way out: weights over "
                                  f"LoRA adapters only (LoRA adapters present: "
                                  f"{', '.join(map(repr, lora_names)) or 'none'}).")
        merged = merged_names(model)
        for source in names:
            if source in merged:
                raise MergeError(
                    f"combine_adapters: source adapter {source!r} is merged into the weights "
                    f"({merged[source][0].partition('@')[2]}, ...), so the combined adapter "
                    f"would add its update a second time. Way out: unmerge it first, "
                    f"apply_passes(model, [UnmergeLoRAPass(names=[{source!r}])]).")
        for qname, sg in site_graphs(model):
            for source in names:
                head = fold_head(sg, ("lora", source))
                if head is not None and head.fold_mode == "dora":
                    raise ConfigError(
                        f"combine_adapters: {source!r} is a DoRA adapter (at {qname}, with a "
                        f"magnitude vector); a weighted sum of DoRA adapters is not a DoRA "
                        f"adapter of their factors (PEFT refuses it too). Way out: combine "
                        f"plain LoRA adapters only, or merge the DoRA adapter "
                        f"(MergeLoRAPass(names=[{source!r}])).")
        if self.adapter_name in inv:
            raise ConfigError(f"combine_adapters: the model already has an adapter named "
                              f"{self.adapter_name!r}. Way out: name=... another name.")


def _clone_nodes(sg: SiteGraph, source: tuple[str, str], name: str,
                 scaling: float) -> list[fx.Node]:
    """Copy the nodes of adapter ``source`` in ``sg`` as those of adapter ``name`` (module
    targets ``<slot>.<source>`` become ``<slot>.<name>``, the ``scale`` node multiplies by
    ``scaling``), beside the source: the new branch reads the source's inputs and its
    ``add`` goes on the layer's path right before the source's."""
    nodes = adapter_nodes(sg, source)
    main = main_node(sg, source, nodes)
    graph = sg.graph
    env: dict[fx.Node, fx.Node] = {}
    with graph.inserting_before(main):
        for node in nodes:
            args = fx.node.map_arg(node.args, lambda a: env.get(a, a))
            kwargs = fx.node.map_arg(node.kwargs, lambda a: env.get(a, a))
            meta = dict(node.meta["surgery"], adapter=name)
            if meta.get("part") == "scale":
                args = (args[0], scaling)
            target = node.target
            if node.op == "call_module":
                slot, _, _ = str(target).rpartition(".")
                target = f"{slot}.{name}"
            env[node] = graph.create_node(node.op, target, tuple(args), dict(kwargs))
            env[node].meta["surgery"] = meta
    replace_uses_after(main.args[0], env[main])
    return list(env.values())


def combine_adapters(model: nn.Module, weights: Mapping[str, float], method: str = "linear",
                     name: str = "combined", *, inplace: bool = False) -> nn.Module:
    """A new LoRA adapter ``name`` made from existing ones, at every layer carrying them all.

    Formulas as PEFT's ``add_weighted_adapter`` for ``"linear"`` and ``"cat"`` (see
    :func:`combine_factors`); the new adapter has ``alpha = rank`` (scaling 1), its
    dropout is that of the first source adapter, and its factors are in the layer's weight
    dtype. One difference: PEFT adds the new adapter at every layer carrying any source
    adapter; here it goes only where all of them are, so its update is the stated formula
    everywhere it exists. With a single source the method is ``"linear"`` (as in PEFT; both
    give ``w · s · B A``).

    Ranks and scalings are read site by site, so sources whose rank differs from layer to
    layer (``LoRAPass(rank_for=...)``, or several passes under one adapter name) combine:
    ``"cat"`` gives each site the sum of the sources' ranks there, and ``"linear"`` needs the
    sources' ranks equal at each site, not everywhere. PEFT pads ``"cat"`` to the sum of each
    source's largest rank at every site, with zeros; the update is the same.

    Afterwards the new adapter is the only active one (:func:`surgery.set_active`; adapters
    merged into the weights stay, being part of them): the sources, and any other adapter,
    are switched off, so the model computes the base plus the combined update exactly once,
    as PEFT's ``add_weighted_adapter`` followed by ``set_adapter(name)`` does. Switch
    others back on with ``surgery.set_active(model, [...])``; their parameters are unchanged.

    Args:
        model: an adapted model (from :func:`surgery.apply_passes`).
        weights: source adapter name → weight, in the order the ranks are stacked.
        method: ``"linear"`` (equal ranks; rank unchanged) or ``"cat"`` (rank ``Σ r_i``).
        name: the new adapter's name.
        inplace: add to ``model`` itself instead of a copy sharing its base weights.

    Returns:
        The model with the new adapter, active alone (a new object unless ``inplace``; the
        ``active`` flags of ``model`` change only with ``inplace``); its parameters train,
        the sources' parameters are unchanged.

    Raises:
        AdapterNotFoundError: a source name the model does not carry.
        ConfigError: bad method, weights or name, a non-LoRA source, a DoRA source, ranks
            that differ at a site under ``"linear"`` (the message names the site).
        NoMatchError: no layer carries every source adapter.
        MergeError: a source adapter is merged into the weights (unmerge it first).
    """
    # runs the combine step on a copy, atomically
    from surgery.apply import apply_passes

    if method not in _METHODS:
        raise ConfigError(f"combine_adapters: method must be one of {_METHODS}, got {method!r}")
    if not isinstance(weights, Mapping) or not weights:
        raise ConfigError(f"combine_adapters: weights must map adapter names to numbers, e.g. "
                          f"{{'a': 0.7, 'b': 0.3}}; got {weights!r}. Way out: "
                          f"combine_adapters(model, {{'a': 0.7, 'b': 0.3}}, name='ab').")
    pairs = []
    for key, val in weights.items():
        if not isinstance(val, (int, float)) or isinstance(val, bool) or not math.isfinite(val):
            raise ConfigError(f"combine_adapters: the weight of {key!r} must be a finite number, "
                              f"got {val!r}. Way out: a float such as 0.5, for each adapter "
                              f"combined.")
        pairs.append((str(key), float(val)))
    check_adapter_name("combine_adapters", name)
    step = _CombineLoRAPass(weights=tuple(pairs), method=method, adapter_name=name)
    out = apply_passes(model, [step], inplace=inplace)
    return set_active(out, [name, *merged_names(out)])  # merged ones cannot be switched off
