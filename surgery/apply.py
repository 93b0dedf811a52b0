"""Running passes: ``apply_passes``, ``plan``, ``trainable_parameters``, ``history``.

The model a user gets back is their own: a weight-sharing copy of it (same class, methods,
module tree and calling convention) in which each adapted site is a small fx graph
(:mod:`surgery.sites.site_graph`). Nothing here runs a whole-model graph.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from torch import nn

from surgery.errors import ConfigError, TraceError
from surgery.map.example_inputs import made_up_note
from surgery.map.graphs import recompile
from surgery.map.trace import as_input_tuple, is_map
from surgery.map.wrappers import unwrap
from surgery.pass_base import Change, Pass, PassResult, SurgeryState
from surgery.sites.marker import AdapterModule
from surgery.sites.params import (
    adapter_parameters,
    restore,
    share_weights_copy,
    snapshot,
)
from surgery.sites.site_graph import deferred_code, is_site_graph, recompile_sites
from surgery.task_heads import note_frozen_heads

__all__ = [
    "apply_passes",
    "plan",
    "trainable_parameters",
    "named_trainable_parameters",
    "history",
    "unwrap",
]


def _prepare(model: nn.Module, example_inputs: tuple | None,
             example_kwargs: Mapping[str, Any] | None, leaf_modules: Collection[str | type],
             inplace: bool) -> nn.Module:
    """The model the passes edit: ``model`` itself (``inplace``) or a weight-sharing copy,
    carrying its :class:`SurgeryState`."""
    if is_map(model):
        raise ConfigError(
            "apply_passes: this is a map from surgery.trace (a graph for analysis, traced from "
            "a weight-free copy), not a model that runs. Way out: pass the model itself; "
            "apply_passes builds the map it needs.")
    example_inputs = as_input_tuple(example_inputs, "apply_passes")
    model, notes = unwrap(model)
    work = model if inplace else share_weights_copy(model)
    state = getattr(work, "_surgery", None)
    if state is None:
        work._surgery = SurgeryState(
            source_class=type(model), example_inputs=example_inputs,
            example_kwargs=dict(example_kwargs) if example_kwargs else None,
            leaf_modules=tuple(leaf_modules), notes=notes)
    else:
        state.notes.extend(notes)
        made_up = made_up_note(state.notes)  # inputs made up for the map: the user's win
        given = example_inputs is not None or bool(example_kwargs)
        had = state.example_inputs is not None or bool(state.example_kwargs)
        if given and (not had or made_up):
            if made_up:
                state.notes.remove(made_up)
            state.example_inputs = example_inputs
            state.example_kwargs = dict(example_kwargs) if example_kwargs else None
            state.cached_map = None
    return work


def _check_passes(passes: Sequence[Pass] | Pass) -> list[Pass]:
    """``passes`` as a list of :class:`Pass` objects.

    Raises:
        ConfigError: ``passes`` is neither a pass nor a list of them, or an item is not a
            pass object (a pass class such as ``LoRAPass`` instead of ``LoRAPass(...)``).
    """
    if isinstance(passes, Pass):
        passes = [passes]
    if isinstance(passes, type) and issubclass(passes, Pass):
        passes = [passes]  # the item check below names the class and the way out
    if not isinstance(passes, (list, tuple)):
        raise ConfigError(f"apply_passes: passes must be a pass or a list of passes, got "
                          f"{repr(passes)[:60]} ({type(passes).__name__}). Way out: "
                          f"apply_passes(model, [LoRAPass(...), IA3Pass(...)]).")
    out = list(passes)
    for i, p in enumerate(out):
        if isinstance(p, type) and issubclass(p, Pass):
            raise ConfigError(f"apply_passes: item {i} is the class {p.__name__}, not a pass "
                              f"object. Way out: {p.__name__}(...) (with its settings).")
        if not isinstance(p, Pass):
            raise ConfigError(f"apply_passes: item {i} is a {type(p).__name__}, not a Pass: "
                              f"{repr(p)[:60]}. Way out: pass objects such as LoRAPass(...), "
                              f"IA3Pass(...).")
    return out


def _check_in_place_writes(passes: list[Pass], inplace: bool) -> None:
    """Refuse a pass that writes into existing weights unless it runs, last, on the model
    itself (``inplace=True``)."""
    for i, p in enumerate(passes):
        if not p.writes_in_place:
            continue
        what = p.describe()
        if not inplace:
            raise ConfigError(
                f"apply_passes: {what} writes into existing weights, and in-place merges write "
                f"into the weights shared with the model you passed (apply_passes works on a "
                f"copy that shares their storage). Way out: call apply_passes(model, passes, "
                f"inplace=True), or use the pass without its in-place "
                f"option (it writes new tensors).")
        if i != len(passes) - 1:
            later = ", ".join(q.describe() for q in passes[i + 1:])
            raise ConfigError(
                f"apply_passes: {what} writes into existing weights, so it must be the last "
                f"pass: its writes cannot be rolled back if a later pass ({later}) fails. "
                f"Way out: run it last, or in a separate apply_passes call.")


def _run(step: Pass, model: nn.Module) -> PassResult:
    """``step.run(model)``, with a :class:`TraceError` from building the map (which any pass
    may need) made to name the pass.

    Raises:
        TraceError: the map could not be traced; the message starts with the pass's class.
    """
    try:
        return step.run(model)
    except TraceError as exc:
        who = type(step).__name__
        if str(exc).startswith(who):
            raise
        raise TraceError(f"{who}: needs the model's map (the whole-model graph), and it could "
                         f"not be traced.\n{exc}") from exc


def _trained_parameters(model: nn.Module) -> set[int]:
    """``id`` of every parameter of the modules trained fully
    (``model._surgery.trained_modules``), tied ones included, and of every single parameter
    a pass made trainable (``model._surgery.trained_parameters``)."""
    state = getattr(model, "_surgery", None)
    out: set[int] = set()
    for qname in getattr(state, "trained_modules", {}):
        out.update(id(p) for p in model.get_submodule(qname).parameters())
    for pname in getattr(state, "trained_parameters", {}):
        out.add(id(model.get_parameter(pname)))
    return out


def freeze_base(model: nn.Module) -> PassResult:
    """Freeze every parameter of ``model`` that is neither inside an adapter module, nor in a
    module trained fully (``model._surgery.trained_modules``, from
    :class:`passes.train_module.TrainModulePass`), nor a parameter a pass chose to train
    (``model._surgery.trained_parameters``: the biases of ``LoRAPass(bias=...)``)."""
    keep = {id(p) for _, p in adapter_parameters(model)} | _trained_parameters(model)
    changes = []
    for name, param in model.named_parameters():
        if id(param) not in keep and param.requires_grad:
            param.requires_grad_(False)
            changes.append(Change("param_frozen", "freeze", name.rpartition(".")[0], name,
                                  shape=tuple(param.shape), numel=param.numel()))
    return PassResult(model, bool(changes), tuple(changes), "freeze")


def _own_trainable_base_weights(model: nn.Module) -> None:
    """Give every base parameter that stays trainable its own storage (copy on write).

    The adapted model shares its base weights' storage with the model it was made from; a
    base parameter that trains (``freeze=False``, or one a user unfroze before another
    ``apply_passes``) would otherwise write into that model's weights.
    """
    adapters = {id(p) for _, p in adapter_parameters(model)}
    for param in model.parameters():
        if param.requires_grad and id(param) not in adapters:
            param.data = param.detach().clone()


def _check_trained_modules(model: nn.Module, state: SurgeryState, step: Pass) -> None:
    """A module trained fully must stay so: no pass may freeze its parameters (a tied one
    included) or put an adapter or a site graph inside it.

    Raises:
        ConfigError: naming the pass, the module, what the pass did there and the way out.
    """
    for qname, by in state.trained_modules.items():
        module = model.get_submodule(qname)
        for sub_name, sub in module.named_modules(prefix=qname):
            if is_site_graph(sub) or isinstance(sub, AdapterModule):
                raise ConfigError(
                    f"{step.describe()}: adapts {sub_name}, which is or lies inside {qname}, a "
                    f"module trained fully ({by}); its base weights would be frozen for the "
                    f"adapter while the module is meant to train whole. Way out: "
                    f"exclude=[{sub_name!r}] from this pass, or do not train {qname} fully.")
        frozen = [n for n, p in module.named_parameters(prefix=qname) if not p.requires_grad]
        if frozen:
            raise ConfigError(
                f"{step.describe()}: froze {frozen[0]}, a parameter of {qname}, which is trained "
                f"fully ({by}); the pass adapted a layer holding that parameter (a tied weight "
                f"is held by two layers). Way out: exclude that layer from this pass, or do not "
                f"train {qname} fully.")


def _keep_originals(model: nn.Module, state: SurgeryState, inplace: bool) -> None:
    """Keep the values of every parameter of a module newly trained fully, as they are before
    any training (``state.originals``), for :func:`surgery.disable_adapters`. They share the
    storage of the model adapted (the adapted model's parameters get their own storage next);
    a model adapted in place trains that storage itself, so it keeps a copy."""
    for qname in state.trained_modules:
        for pname, param in model.get_submodule(qname).named_parameters(prefix=qname):
            if pname not in state.originals:
                value = param.detach()
                state.originals[pname] = value.clone() if inplace else value


def _keep_trained_parameters(model: nn.Module, state: SurgeryState) -> None:
    """A parameter a pass chose to train alone (``state.trained_parameters``: a bias of
    ``LoRAPass(bias=...)``) stays trainable when a later pass adapts its layer again (that
    pass freezes the base parameters of its sites)."""
    for pname in state.trained_parameters:
        model.get_parameter(pname).requires_grad_(True)


def _adapted_before(model: nn.Module) -> bool:
    """True when passes already ran on this model (its history is not empty)."""
    return bool(history(unwrap(model)[0]))


def _record(state: SurgeryState, result: PassResult, step: Pass | None = None) -> None:
    """Append ``result`` to the history with the pass that made it, without its reference
    to the model (a history that held models would copy them with every copy of the
    adapted model)."""
    state.history.append(dataclasses.replace(result, module=None, step=step))


def apply_passes(
    model: nn.Module,
    passes: Sequence[Pass] | Pass,
    example_inputs: tuple | None = None,
    example_kwargs: Mapping[str, Any] | None = None,
    inplace: bool = False,
    *,
    leaf_modules: Collection[str | type] = (),
    freeze: bool | None = None,
) -> nn.Module:
    """Run ``passes`` in order on ``model`` and return the adapted model.

    The result is the user's own model: an object of the same class (for a model that is
    itself one layer, the site graph standing for it), with the same methods and calling
    convention, sharing the base weights' storage, in which every adapted site is a small
    fx graph holding the base computation and the inserted nodes. Selection by pattern
    reads module names and types only; selection by role reads the map, traced once (from a
    weight-free copy) and cached on the result.

    Each pass freezes the base parameters of the sites it adapts. The first time a model is
    adapted, every other base parameter is frozen as well (a ``"freeze"`` step in the
    history), so exactly the adapter parameters train; on a model adapted before, other
    parameters keep their ``requires_grad``, so a base parameter you chose to train
    (``head.weight``) stays trainable through later passes. Modules trained fully
    (:class:`passes.train_module.TrainModulePass`, recorded in
    ``adapted._surgery.trained_modules``) are never frozen, in this call or a later one, and
    a pass that would freeze them or adapt inside them is refused. Each pass's
    :class:`PassResult` is appended to ``adapted._surgery.history``. A ``torch.compile`` or
    DDP / DataParallel wrapper is taken off first (a note in ``adapted._surgery.notes``).
    A transformers task model (``*ForSequenceClassification``, ...) whose task head is left
    frozen at its initial values gets a note and a warning
    (:func:`surgery.task_heads.note_frozen_heads`).

    Args:
        model: the model to adapt; it is never changed unless ``inplace``.
        passes: the passes, run in order.
        example_inputs: positional inputs, a tuple; needed only where a pass reads the map
            (roles, defaults, prefix) and torch.fx cannot trace the model.
        example_kwargs: keyword inputs for the same (``attention_mask``).
        inplace: edit ``model`` itself instead of a copy. Required for a pass that
            :attr:`~surgery.pass_base.Pass.writes_in_place` (an in-place merge), which must
            also be the last pass.
        leaf_modules: extra modules to keep opaque when tracing the map.
        freeze: ``None`` (default): freeze every non-adapter parameter when ``model`` has not
            been adapted before, and otherwise leave parameters the passes do not touch
            alone. ``True``: freeze every non-adapter parameter. ``False``: freeze nothing
            beyond what the passes freeze at their own sites. A base parameter that stays
            trainable gets its own storage (unless ``inplace``), so training it never
            writes into ``model``.

    Returns:
        The adapted model (a new object unless ``inplace``).

    Raises:
        TraceError: a pass needs the map and the model could not be traced.
        InputTypeError: ``example_inputs`` is a dict (keyword inputs go in ``example_kwargs``).
        ConfigError: a pass that writes into existing weights was given without
            ``inplace=True``, or not as the last pass (checked before anything runs).
        NoMatchError, AlreadyAdaptedError, ConfigError, UnsupportedSiteError: from a pass;
            the model given is left exactly as it was.
        ConfigError: a pass froze a parameter of a module trained fully, or adapted inside
            one (the model given is left exactly as it was).

    Warns:
        UserWarning: the task head of a transformers task model stays frozen at its
            initial values (once per adapted model; the way out is
            ``TrainModulePass(pattern="classifier")`` or the head's own name).
    """
    todo = _check_passes(passes)
    _check_in_place_writes(todo, inplace)
    if freeze is None:
        freeze = not _adapted_before(model)
    fresh_state = getattr(unwrap(model)[0], "_surgery", None) is None
    work = _prepare(model, example_inputs, example_kwargs, leaf_modules, inplace)
    snap = snapshot(work) if inplace else None
    state: SurgeryState = work._surgery
    root = work
    try:
        for p in todo:
            with deferred_code():
                result = _run(p, root)
            if result.module is not None and result.module is not root:  # the root became a site
                result.module.__dict__["_surgery"] = state
                root = result.module
            recompile_sites(root, result.sites)
            _check_trained_modules(root, state, p)
            _keep_originals(root, state, inplace)
            _keep_trained_parameters(root, state)
            _record(state, result, p)
        if freeze:
            result = freeze_base(root)
            if result.modified:
                _record(state, result)
        if not inplace:
            _own_trainable_base_weights(root)
        note_frozen_heads(root, state.notes)
    except BaseException:
        if snap is not None:
            restore(work, snap)
            if fresh_state:  # a plain model edited in place: it had no state before
                del work.__dict__["_surgery"]
        raise
    return root


def plan(model: nn.Module, passes: Sequence[Pass] | Pass, example_inputs: tuple | None = None,
         example_kwargs: Mapping[str, Any] | None = None, *,
         leaf_modules: Collection[str | type] = ()) -> list[PassResult]:
    """Dry run: what :func:`apply_passes` would do, without changing ``model``.

    The passes run on a private copy that shares ``model``'s weights and is then dropped. A
    pass that :attr:`~surgery.pass_base.Pass.writes_in_place` is not run: its own
    :meth:`~surgery.pass_base.Pass.plan` (a dry run that writes nothing) says what it would
    do, so it must be the last pass, as in :func:`apply_passes`.

    Returns:
        One :class:`PassResult` per pass (its ``module`` is the discarded copy).

    Raises:
        ConfigError: a pass that writes into existing weights is not the last one, or has
            no dry run of its own (:meth:`Pass.plan` would run it on the shared weights).
        the same errors as :func:`apply_passes`.
    """
    todo = _check_passes(passes)
    _check_in_place_writes(todo, inplace=True)  # only the order matters for a dry run
    work = _prepare(model, example_inputs, example_kwargs, leaf_modules, inplace=False)
    state = work._surgery
    results = []
    for p in todo:
        if p.writes_in_place:  # the last pass: its dry run leaves the weights alone
            changes = tuple(p.plan(work))
            results.append(PassResult(work, bool(changes), changes, p.name))
            break
        result = _run(p, work)
        if result.module is not None and result.module is not work:
            result.module.__dict__["_surgery"] = state
            work = result.module
        recompile(work)
        results.append(result)
    return results


def named_trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(qualified name, parameter)`` for every parameter with ``requires_grad``."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer should get: those with ``requires_grad`` (after
    :func:`apply_passes`, exactly the adapter parameters and those of modules trained
    fully), without duplicates."""
    return [p for _, p in named_trainable_parameters(model)]


def history(model: nn.Module) -> list[PassResult]:
    """The :class:`PassResult` of every pass applied to ``model``, oldest first."""
    state = getattr(unwrap(model)[0], "_surgery", None)
    return list(state.history) if state is not None else []
