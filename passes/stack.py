"""Several task adapters on one base, picked per call or per sample (multi-task serving).

::

    adapted = apply_passes(model, [LoRAPass(name="sst2"), IA3Pass(name="mnli")])
    stack = AdapterStack(adapted, names=["sst2", "mnli"])
    stack(ids, adapter_id="mnli")                      # one adapter for the whole batch
    stack(ids, adapter_id=torch.tensor([0, 1, 1, 0]))  # one adapter per sample

With a tensor of ids, sample ``i`` gets exactly what the batch gets when only adapter
``names[ids[i]]`` is active (:func:`surgery.adapters.active.set_active`): every adapter of the stack
runs on the whole batch and its contribution is kept, bit for bit, for the samples routed
to it and dropped for the others (``torch.where`` along the batch dimension, inside the
adapter modules). Exact in evaluation mode, or with no dropout: in training mode a
dropout inside an adapter draws random numbers for the whole batch.

How each kind of adapter is routed:

* LoRA and IA³ modules (:mod:`passes.modules`) select their own contribution per sample.
* Any other adapter module (bottleneck adapters, prefix gates) is routed by a forward hook
  that runs it once more switched off and keeps, per sample, its active or its inactive
  output; modules whose output only feeds other modules of the same adapter (a bottleneck's
  ``down``, the learned prefix read by a gate) are left alone, since the module reading
  them is routed. This needs the output's leading dimension to be the batch and the
  active and inactive outputs to have one shape.
* A prefix concatenated in front of the keys and values (``PrefixPass`` without a gate)
  changes the key length, so it cannot be selected per sample: routing a batch over such
  an adapter raises :class:`ConfigError`; pick it per call (``adapter_id=k``) or use
  ``gate="zero"``.

The batch is the leading dimension of every adapted tensor (``(batch, seq, d)``, the layout
of transformers models and ``batch_first`` attention). A layer called on a flattened
``(batch · seq, d)`` input is detected and refused; a sequence-first layout ``(seq, batch,
d)`` is detected only when ``seq != batch``, so do not route such models.

Routing state (masks, hooks, active flags) is set for the duration of one call and reset
in ``finally``, also when the call raises. Not thread-safe: one call at a time.

Adapter modules of other kinds can route themselves instead of being hooked: set the class
attribute ``routes_samples = True`` and select with :func:`passes.modules.route_mask`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, fx, nn

from surgery.adapters.active import (
    active_flags,
    adapter_modules,
    is_disabled,
    merged_names,
    recorded_active,
    resolve_names,
    restore_active_flags,
)
from surgery.errors import AdapterNotFoundError, ConfigError, MergeError, near_matches
from surgery.sites.marker import AdapterModule
from surgery.sites.site_graph import site_graphs

__all__ = ["AdapterStack", "route_samples"]


def _select(mask: Tensor, on: Any, off: Any, module: AdapterModule) -> Any:
    """Per sample, ``on`` where ``mask`` is set, else ``off`` (tensors, or tuples of them)."""
    if isinstance(on, Tensor) and isinstance(off, Tensor):
        if on.shape != off.shape or on.ndim == 0 or on.shape[0] != mask.shape[0]:
            raise ConfigError(
                f"per-sample routing: {module.site} ({type(module).__name__}, adapter "
                f"{module.adapter_name!r}) gives an output of shape {tuple(on.shape)} when "
                f"active and {tuple(off.shape)} when not, for a batch of {mask.shape[0]}; its "
                f"samples cannot be selected one by one (a prefix concatenated to the keys "
                f"changes their length). Way out: pick one adapter per call (adapter_id=k), "
                f"or PrefixPass(gate='zero'), whose gate routes per sample.")
        keep = mask.to(on.device).view((-1,) + (1,) * (on.ndim - 1))
        return torch.where(keep, on, off)
    if isinstance(on, (tuple, list)) and isinstance(off, (tuple, list)) and len(on) == len(off):
        return type(on)(_select(mask, a, b, module) for a, b in zip(on, off))
    if on is off or on is None:
        return on
    raise ConfigError(f"per-sample routing: cannot select the output of {module.site} "
                      f"({type(module).__name__}) per sample: it is a {type(on).__name__}.")


def _hook(mask: Tensor) -> Any:
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not module.active:  # called inside another module's switched-off run
            return output
        module.active = False
        try:
            off = module.forward(*args, **kwargs)
        finally:
            module.active = True
        return _select(mask, output, off, module)

    return hook


def _internal_modules(model: nn.Module) -> set[AdapterModule]:
    """Adapter modules whose every call only feeds modules of the same adapter.

    Their output reaches the rest of the model only through another module of the same
    adapter, which is routed, so they need no routing of their own.
    """
    internal: set[AdapterModule] = set()
    seen: set[AdapterModule] = set()
    for _, owner in site_graphs(model):
        for node in owner.graph.nodes:
            if node.op != "call_module":
                continue
            mod = _target(owner, node)
            if not isinstance(mod, AdapterModule):
                continue
            feeds_own = bool(node.users) and all(
                isinstance(u, fx.Node) and u.op == "call_module"
                and isinstance(other := _target(owner, u), AdapterModule)
                and other.adapter_name == mod.adapter_name
                for u in node.users)
            if mod not in seen:
                seen.add(mod)
                if feeds_own:
                    internal.add(mod)
            elif not feeds_own:
                internal.discard(mod)
    return internal


def _target(owner: nn.Module, node: fx.Node) -> nn.Module | None:
    try:
        return owner.get_submodule(str(node.target))
    except AttributeError:
        return None


def _routes_itself(mod: AdapterModule) -> bool:
    return bool(getattr(type(mod), "routes_samples", False))


@contextmanager
def route_samples(model: nn.Module, routes: dict[str, Tensor]) -> Iterator[nn.Module]:
    """Route the samples of one batch to adapters, for the calls made inside the block.

    Inside :func:`surgery.adapters.active.disable_adapters` nothing is switched on: the
    adapters held off by the block stay off for every sample.

    Args:
        model: an adapted model.
        routes: adapter name → boolean mask of shape ``(batch,)``: the samples that get
            this adapter's contribution. Adapters not named keep their current state.

    Yields:
        ``model``, with the routing in place; everything is reset when the block ends.

    Raises:
        AdapterNotFoundError: a name the model does not carry.
        MergeError: a merged adapter would have to be left out for some samples.
        ConfigError: (inside the block) an adapter whose output cannot be selected per sample.
    """
    resolve_names("route_samples", model, list(routes))
    masks = {name: m.reshape(-1).to(torch.bool) for name, m in routes.items()}
    counts = {name: int(m.sum()) for name, m in masks.items()}
    merged = merged_names(model)
    for name, mask in masks.items():
        if name in merged and counts[name] < mask.numel():
            raise MergeError(f"route_samples: adapter {name!r} is merged into the weights, so "
                             f"it cannot be left out for some samples. Way out: unmerge it "
                             f"first.")
    partial = {name for name, mask in masks.items() if 0 < counts[name] < mask.numel()}
    # Inside disable_adapters every adapter stays off: disabling wins over routing.
    mods = [m for _, m in adapter_modules(model) if m.adapter_name in masks and not is_disabled(m)]
    internal = _internal_modules(model) if any(
        m.adapter_name in partial and not _routes_itself(m) for m in mods) else set()
    flags = active_flags(model)
    recorded = recorded_active(model)
    handles = []
    routed: list[AdapterModule] = []
    try:
        for mod in mods:
            name = mod.adapter_name
            mod.active = counts[name] > 0
            if name not in partial:
                continue
            if _routes_itself(mod):
                mod.route = masks[name]
                routed.append(mod)
            elif mod not in internal:
                handles.append(mod.register_forward_hook(_hook(masks[name]), with_kwargs=True))
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for mod in routed:
            mod.route = None
        restore_active_flags(model, flags, recorded)


class AdapterStack(nn.Module):
    """An adapted model holding several named adapters, with the adapter chosen per call.

    Args:
        model: an adapted model (from :func:`surgery.apply_passes`) carrying the adapters.
            The stack holds it as ``stack.model``; nothing is copied.
        names: the adapters to choose between, in id order (``adapter_id=0`` is
            ``names[0]``); ``None`` = every adapter of the model, in model order.
            Adapters of the model not listed keep whatever state they have (a shared
            adapter can stay active under all of them).

    ``forward(*inputs, adapter_id=None, **kwargs)`` calls ``model(*inputs, **kwargs)``
    (the model's own calling convention) with:

    * ``adapter_id=None``: the adapters as they are currently switched;
    * an ``int`` ``k`` (an index into ``names``) or a name: that adapter active and the
      other adapters of ``names`` off, for the whole batch;
    * an integer tensor of shape ``(batch,)``: sample ``i`` routed to ``names[ids[i]]``;
      its outputs equal, bit for bit, row ``i`` of the batch run with only that adapter
      active (LoRA, IA³, serial and parallel adapters, gated prefixes; see the module
      docstring for prefixes without a gate).

    The adapters' ``active`` flags are put back after every call. Inside
    :func:`surgery.adapters.active.disable_adapters`, every id gives the base model.

    Raises:
        ConfigError: ``names`` empty, repeated, or not strings.
        AdapterNotFoundError: a name the model does not carry.
    """

    def __init__(self, model: nn.Module, names: Sequence[str] | None = None) -> None:
        super().__init__()
        if names is not None and (isinstance(names, str) or not isinstance(names, Sequence)):
            raise ConfigError(f"AdapterStack: names must be a list of adapter names, got "
                              f"{names!r}")
        if names is not None and len(set(names)) != len(names):
            raise ConfigError(f"AdapterStack: names must not repeat, got {list(names)!r}")
        if names is not None and not names:
            raise ConfigError("AdapterStack: names is empty; give the adapters to choose "
                              "between, or names=None for every adapter the model carries.")
        resolved = resolve_names("AdapterStack", model, None if names is None else list(names))
        if not resolved:
            raise ConfigError("AdapterStack: the model carries no adapter to choose between. "
                              "Way out: apply passes with name=... first.")
        self.model = model
        self.names: tuple[str, ...] = tuple(resolved)

    def extra_repr(self) -> str:
        return "names=" + ", ".join(f"{i}: {n!r}" for i, n in enumerate(self.names))

    def index(self, adapter_id: int | str) -> int:
        """The position in ``names`` of an adapter given by index or name.

        Raises:
            ConfigError: an index out of range, or not an int or str.
            AdapterNotFoundError: a name not in the stack.
        """
        if isinstance(adapter_id, str):
            if adapter_id not in self.names:
                near = ", ".join(repr(n) for n in near_matches(adapter_id, self.names,
                                                               n=len(self.names)))
                raise AdapterNotFoundError(f"AdapterStack: no adapter named {adapter_id!r} in the "
                                           f"stack; it holds (nearest first): {near}.")
            return self.names.index(adapter_id)
        if isinstance(adapter_id, bool) or not isinstance(adapter_id, int):
            raise ConfigError(f"AdapterStack: adapter_id must be an int, a name or an integer "
                              f"tensor of shape (batch,), got {type(adapter_id).__name__}")
        if not 0 <= adapter_id < len(self.names):
            raise ConfigError(f"AdapterStack: adapter_id {adapter_id} is out of range: the stack "
                              f"holds {len(self.names)} adapters ({self._listing()}).")
        return adapter_id

    def _listing(self) -> str:
        return ", ".join(f"{i}: {n!r}" for i, n in enumerate(self.names))

    def forward(self, *inputs: Any, adapter_id: int | str | Tensor | None = None,
                **kwargs: Any) -> Any:
        """Run the model with the adapter(s) chosen by ``adapter_id`` (see the class doc).

        Raises:
            ConfigError: an id out of range, a routing tensor that is not 1-D integer or
                whose length is not the batch size.
            AdapterNotFoundError: an unknown name.
            MergeError: a merged adapter would have to be switched off.
        """
        if adapter_id is None:
            return self.model(*inputs, **kwargs)
        if isinstance(adapter_id, Tensor) and adapter_id.ndim == 0:
            adapter_id = int(adapter_id.item()) if not adapter_id.is_floating_point() else adapter_id
        if isinstance(adapter_id, Tensor):
            routes = self._routes(adapter_id, inputs, kwargs)
        else:
            k = self.index(adapter_id)
            n = _batch_size(inputs, kwargs) or 1
            routes = {name: torch.full((n,), i == k) for i, name in enumerate(self.names)}
        with route_samples(self.model, routes):
            return self.model(*inputs, **kwargs)

    def _routes(self, ids: Tensor, inputs: tuple, kwargs: dict) -> dict[str, Tensor]:
        if ids.ndim != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ConfigError(f"AdapterStack: a routing adapter_id must be an integer tensor of "
                              f"shape (batch,), got {ids.dtype} of shape {tuple(ids.shape)}")
        batch = _batch_size(inputs, kwargs)
        if batch is not None and ids.shape[0] != batch:
            raise ConfigError(f"AdapterStack: adapter_id holds {ids.shape[0]} ids but the batch "
                              f"has {batch} samples; give one id per sample.")
        bad = ids[(ids < 0) | (ids >= len(self.names))]
        if bad.numel():
            raise ConfigError(f"AdapterStack: adapter_id values {sorted(set(bad.tolist()))} are "
                              f"out of range: the stack holds {len(self.names)} adapters "
                              f"({self._listing()}).")
        return {name: ids == i for i, name in enumerate(self.names)}


def _batch_size(inputs: tuple, kwargs: dict) -> int | None:
    for value in (*inputs, *kwargs.values()):
        if isinstance(value, Tensor) and value.ndim >= 1:
            return int(value.shape[0])
    return None
