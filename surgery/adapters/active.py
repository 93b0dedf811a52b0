"""Which named adapters are used, and which train: mode switches on an adapted model.

A model can carry several named adapters of any kind on one base (``LoRAPass(name="sst2")``,
``IA3Pass(name="mnli")``, ...). Like ``train()`` / ``eval()``, the functions here flip flags
on the adapter modules of the model they are given, in place, without tracing anything and
without touching the site graphs' code, the weights, the ``training`` flags or the merge
state::

    adapted = apply_passes(model, [LoRAPass(name="sst2"), LoRAPass(name="mnli")])
    surgery.set_active(adapted, "mnli")          # only mnli contributes
    with surgery.disable_adapters(adapted):      # the base model, bit for bit
        base_logits = adapted(ids)
    surgery.set_trainable(adapted, "mnli")       # only mnli's parameters get gradients

An inactive adapter contributes exactly nothing: the outputs equal, bit for bit, those of
the same model adapted without it (each inserted module honours its ``active`` flag; see
:mod:`passes.modules`). Which adapters are active and which train are independent: an
adapter can train while another one is switched on beside it.

Inside :func:`disable_adapters` every adapter stays off, whatever else asks for it:
per-sample routing (:func:`passes.stack.route_samples`, :class:`passes.stack.AdapterStack`)
does not switch a disabled adapter back on.

Adapters added later (another :func:`surgery.apply_passes` call) start active. An adapter
merged into the weights (:class:`passes.merge.MergeLoRAPass`) cannot be switched off: its
update is in the weights, not in a module. Switching it off raises :class:`MergeError`;
unmerge it first.
"""

from __future__ import annotations

import weakref
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import fx, nn

from surgery.adapters.merge_state import merged_adapters, merged_refusal
from surgery.adapters.names import check_adapter_name
from surgery.errors import AdapterNotFoundError, ConfigError, near_matches
from surgery.sites.marker import AdapterModule, slot_parameters
from surgery.sites.site_graph import site_graphs

__all__ = [
    "INACTIVE_KEY",
    "adapter_names",
    "adapter_modules",
    "active_adapters",
    "set_active",
    "disable_adapters",
    "is_disabled",
    "set_trainable",
    "active_flags",
    "recorded_active",
    "restore_active_flags",
    "merged_names",
    "resolve_names",
]

INACTIVE_KEY = "surgery_inactive"
"""``node.meta`` key set to ``True``, in the site graphs, on the nodes of an adapter switched
off by :func:`set_active` or :func:`disable_adapters` (absent otherwise), so that diagrams
can draw them greyed out. The modules' ``active`` flags are what the forward pass reads.
Kept by ``copy.deepcopy`` and ``pickle`` with the site graphs' other ``surgery*`` tags."""

_HELD_OFF: weakref.WeakKeyDictionary[AdapterModule, int] = weakref.WeakKeyDictionary()
# Adapter module -> how many open ``disable_adapters`` blocks hold it off. Kept beside the
# modules rather than on them, so that a copy made inside a block is not held off forever.

# ids of the parameters of modules trained fully that run with their original values now
_ORIGINAL_IN: set[int] = set()


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, AdapterModule]]:
    """Yield ``(qualified name, module)`` for every adapter module of ``model``, in module order."""
    for qname, mod in model.named_modules():
        if isinstance(mod, AdapterModule):
            yield qname, mod


def adapter_names(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Every adapter name the model carries, with the passes that inserted it.

    Returns:
        Adapter name → pass names (``{"sst2": ("lora",), "default": ("lora", "ia3")}``), in
        the order the modules appear in the model.
    """
    out: dict[str, dict[str, None]] = {}
    for _, mod in adapter_modules(model):
        out.setdefault(mod.adapter_name, {})[mod.pass_name] = None
    return {name: tuple(kinds) for name, kinds in out.items()}


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters in use: those all of whose modules are active, in model order."""
    state: dict[str, bool] = {}
    for _, mod in adapter_modules(model):
        state[mod.adapter_name] = state.get(mod.adapter_name, True) and bool(mod.active)
    return [name for name, on in state.items() if on]


def resolve_names(who: str, model: nn.Module, names: str | Collection[str] | None) -> list[str]:
    """Check adapter names against those ``model`` carries.

    Args:
        who: the caller's name, for messages.
        model: the adapted model.
        names: one name, several (a list, tuple or set), or ``None`` for every adapter.

    Returns:
        The names, without repeats, in the order given (model order for ``None``).

    Raises:
        ConfigError: ``names`` is neither a string, a collection of strings nor ``None``.
        AdapterNotFoundError: a name the model does not carry; the message lists the names
            present, nearest first.
    """
    present = list(adapter_names(model))
    if names is None:
        return present
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, Collection) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{who}: names must be an adapter name, a list of them or None (all), "
                          f"got {names!r}. Way out: names='default' or names=['a', 'b'].")
    names = list(names)
    for name in names:
        check_adapter_name(who, name, field="names")
        if name not in present:
            listed = ", ".join(repr(n) for n in near_matches(name, present, n=len(present)))
            raise AdapterNotFoundError(
                f"{who}: the model has no adapter named {name!r}; "
                + (f"adapters present (nearest first): {listed}." if present
                   else "it carries no adapter. Way out: apply a pass with name=... first, "
                        "and call this on the model apply_passes returns."))
    return list(dict.fromkeys(names))


def merged_names(model: nn.Module) -> dict[str, list[str]]:
    """Adapters merged into the weights: adapter name → ``["lora@layers.0.attn.q_proj", ...]``.

    Read from the merge records in the site graphs (:mod:`surgery.adapters.merge_state`).
    """
    out: dict[str, list[str]] = {}
    for site, labels in merged_adapters(model).items():
        for label in labels:
            kind, _, name = label.partition(":")
            out.setdefault(name, []).append(f"{kind}@{site}")
    return out


def _refuse_merged(who: str, merged: dict[str, list[str]], off: Sequence[str]) -> None:
    for name in off:
        if name in merged:
            raise merged_refusal(who, name, merged[name], "so it cannot be switched off: its "
                                 "update is in the weights, not in a module")


def active_flags(model: nn.Module) -> dict[AdapterModule, bool]:
    """The ``active`` flag of every adapter module, for :func:`restore_active_flags`."""
    return {mod: bool(mod.active) for _, mod in adapter_modules(model)}


def restore_active_flags(model: nn.Module, flags: dict[AdapterModule, bool],
                         active: set[str] | None) -> None:
    """Put back flags saved by :func:`active_flags` and the recorded active set."""
    for mod, flag in flags.items():
        mod.active = flag
    state = getattr(model, "_surgery", None)
    if state is not None:
        state.active = active


def is_disabled(module: AdapterModule) -> bool:
    """True while ``module`` is held off by a :func:`disable_adapters` block: nothing may
    switch it on until the block ends."""
    return _HELD_OFF.get(module, 0) > 0


def _sync_meta(model: nn.Module) -> None:
    """Mark the site-graph nodes of switched-off adapters with :data:`INACTIVE_KEY`."""
    on: dict[tuple[str, str, str], bool] = {}
    for _, mod in adapter_modules(model):
        for key in ((mod.pass_name, mod.site, mod.adapter_name), ("", mod.site, mod.adapter_name)):
            on[key] = on.get(key, True) and bool(mod.active)
    for _, sg in site_graphs(model):
        for node in sg.graph.nodes:
            _mark(node, on)


def _mark(node: fx.Node, on: dict[tuple[str, str, str], bool]) -> None:
    meta = node.meta.get("surgery")
    if not meta or meta.get("adapter") is None:
        return
    key = (str(meta.get("pass")), str(meta.get("site")), str(meta.get("adapter")))
    flag = on.get(key, on.get(("",) + key[1:], True))
    if flag:
        node.meta.pop(INACTIVE_KEY, None)
    else:
        node.meta[INACTIVE_KEY] = True


def recorded_active(model: nn.Module) -> set[str] | None:
    """The active set recorded on the model's state (``None``: all, or no state), for
    :func:`restore_active_flags`."""
    state = getattr(model, "_surgery", None)
    if state is None or state.active is None:
        return None
    return set(state.active)


def set_active(model: nn.Module, names: str | Collection[str] | None) -> nn.Module:
    """Choose which named adapters contribute to the forward pass.

    A mode switch, like ``model.train()``: it flips the ``active`` flag of every adapter
    module of ``model`` in place (``True`` for the adapters named, ``False`` for the others)
    and returns ``model``. Nothing is traced or copied; site graphs, weights, ``training``
    flags, ``requires_grad`` flags and merge state are left alone. The outputs then equal,
    bit for bit, those of the base adapted with only the named adapters (same parameters).

    Args:
        model: an adapted model (from :func:`surgery.apply_passes`).
        names: an adapter name, a list of names (``[]`` switches every adapter off), or
            ``None`` for all of them.

    Returns:
        ``model`` itself.

    Raises:
        AdapterNotFoundError: a name the model does not carry (the names present are listed,
            nearest first).
        MergeError: the call would switch off an adapter that is merged into the weights;
            unmerge it first. Nothing is changed when it raises.
        ConfigError: ``names`` is not a name, a list of names or ``None``.
    """
    chosen = resolve_names("set_active", model, names)
    present = list(adapter_names(model))
    _refuse_merged("set_active", merged_names(model), [n for n in present if n not in chosen])
    keep = set(chosen)
    for _, mod in adapter_modules(model):
        mod.active = mod.adapter_name in keep
    state = getattr(model, "_surgery", None)
    if state is not None:
        state.active = None if names is None else keep
    _sync_meta(model)
    return model


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: every adapter switched off inside the ``with`` block.

    ::

        with surgery.disable_adapters(adapted):
            base = adapted(ids)          # bitwise what the un-adapted model computes

    Disabling wins: inside the block, per-sample routing
    (:func:`passes.stack.route_samples`, :class:`passes.stack.AdapterStack` with an
    ``adapter_id``) leaves the adapters off. A module trained fully
    (:class:`passes.train_module.TrainModulePass`, PEFT's ``modules_to_save``) runs with
    the values it had before training (``model._surgery.originals``), as PEFT runs its
    ``original_module``. The previous ``active`` flags and trained values are put back
    when the block ends, also when it raises. Blocks nest.

    Args:
        model: an adapted model.

    Yields:
        ``model`` itself.

    Raises:
        MergeError: an adapter is merged into the weights (the base weights are not there
            to run); unmerge it first. Raised on entering the block, before anything changes.
    """
    present = list(adapter_names(model))
    _refuse_merged("disable_adapters", merged_names(model), present)
    flags = active_flags(model)
    recorded = recorded_active(model)
    swapped: list[tuple[nn.Parameter, torch.Tensor]] = []
    try:
        for mod in flags:
            _HELD_OFF[mod] = _HELD_OFF.get(mod, 0) + 1
            mod.active = False
        _sync_meta(model)
        swapped = _originals_in(model)
        yield model
    finally:
        for param, trained in reversed(swapped):
            param.data = trained
            _ORIGINAL_IN.discard(id(param))
        for mod in flags:
            depth = _HELD_OFF.get(mod, 1) - 1
            if depth > 0:
                _HELD_OFF[mod] = depth
            else:
                _HELD_OFF.pop(mod, None)
        restore_active_flags(model, flags, recorded)
        _sync_meta(model)


def _originals_in(model: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Point every parameter of the modules trained fully at its original values (moved to
    the parameter's device and dtype); ``(parameter, trained values)`` of each one swapped.
    A parameter already swapped by an enclosing block is left to that block."""
    state = getattr(model, "_surgery", None)
    swapped = []
    for pname, original in getattr(state, "originals", {}).items():
        try:
            param = model.get_parameter(pname)
        except AttributeError:  # unloaded or deleted since
            continue
        if id(param) in _ORIGINAL_IN:
            continue
        trained = param.data
        param.data = original.to(device=trained.device, dtype=trained.dtype)
        _ORIGINAL_IN.add(id(param))
        swapped.append((param, trained))
    return swapped


def set_trainable(model: nn.Module, names: str | Collection[str] | None) -> nn.Module:
    """Choose which named adapters train, independently of which are active.

    Sets ``requires_grad`` on every adapter parameter of ``model``: ``True`` for those of
    the adapters named, ``False`` for the other adapters'. Base parameters are not touched
    (frozen by :func:`surgery.apply_passes`), nor are the ``active`` flags.
    :func:`surgery.trainable_parameters` then returns exactly the named adapters'
    parameters, ready for an optimizer. A merged adapter's parameters take no part in the
    forward pass until it is unmerged: they stay frozen, and unmerging gives back the flags
    they had when merged.

    Args:
        model: an adapted model.
        names: an adapter name, a list of names (``[]`` freezes every adapter), or ``None``
            for all of them.

    Returns:
        ``model`` itself.

    Raises:
        AdapterNotFoundError: a name the model does not carry.
        ConfigError: ``names`` is not a name, a list of names or ``None``.
    """
    keep = set(resolve_names("set_trainable", model, names))
    merged = merged_names(model)
    for _, mod in adapter_modules(model):
        if f"{mod.pass_name}@{mod.site}" in merged.get(mod.adapter_name, ()):
            continue  # frozen while merged; unmerge gives back the flags it had
        flag = mod.adapter_name in keep
        for param in mod.parameters():
            param.requires_grad_(flag)
    for qname, param, pass_name, adapter_name in slot_parameters(model):
        site = qname.rsplit(".", 2)[0] if qname.count(".") >= 2 else ""  # <site>.<slot>.<name>
        if f"{pass_name}@{site}" not in merged.get(adapter_name, ()):
            param.requires_grad_(adapter_name in keep)
    return model
