"""Running passes: ``apply_passes``, ``plan``, ``list_targets``, ``trainable_parameters``."""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from surgery.errors import ConfigError
from surgery.map.graphs import call_sites, recompile
from surgery.sites.params import adapter_parameters, restore, share_weights_copy, snapshot
from surgery.pass_base import Change, Pass, PassResult, SurgeryState
from surgery.map.roles import find_roles
from surgery.sites.resolve import candidate_sites, layer_features
from surgery.map.trace import is_leaf_type, is_traced, trace

__all__ = [
    "apply_passes",
    "plan",
    "list_targets",
    "Target",
    "TargetList",
    "trainable_parameters",
    "named_trainable_parameters",
    "history",
]


def _prepare(model: nn.Module, example_inputs: tuple | None, example_kwargs: Mapping[str, Any] | None,
             leaf_modules: Collection[str | type], inplace: bool) -> nn.Module:
    if is_traced(model):
        if inplace:
            return model
        state: SurgeryState = model._surgery
        work = share_weights_copy(model)
        if not is_traced(work):  # some module types drop plain attributes when copied
            work._surgery = copy.copy(state)
            work._surgery.history = list(state.history)
        return work
    if inplace:
        raise ConfigError(
            "inplace=True needs a model that is already traced (from surgery.map.trace or "
            "apply_passes); a plain nn.Module is always traced into a new model, which shares "
            "its weights' storage. Way out: drop inplace=True, or trace first: "
            "traced = surgery.map.trace(model, ...); apply_passes(traced, passes, inplace=True).")
    return trace(model, example_inputs, example_kwargs, leaf_modules=leaf_modules)


def _check_passes(passes: Sequence[Pass] | Pass) -> list[Pass]:
    if isinstance(passes, Pass):
        passes = [passes]
    out = list(passes)
    for i, p in enumerate(out):
        if not isinstance(p, Pass):
            raise ConfigError(f"apply_passes: item {i} is a {type(p).__name__}, not a Pass "
                              f"(LoRAPass(...), IA3Pass(...), ...).")
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
                f"inplace=True) on a traced model, or use the pass without its in-place "
                f"option (it writes new tensors).")
        if i != len(passes) - 1:
            later = ", ".join(q.describe() for q in passes[i + 1:])
            raise ConfigError(
                f"apply_passes: {what} writes into existing weights, so it must be the last "
                f"pass: its writes cannot be rolled back if a later pass ({later}) fails. "
                f"Way out: run it last, or in a separate apply_passes call.")


def freeze_base(model: nn.Module) -> PassResult:
    """Freeze every parameter of ``model`` that is not inside an adapter module."""
    adapters = {id(p) for _, p in adapter_parameters(model)}
    changes = []
    for name, param in model.named_parameters():
        if id(param) not in adapters and param.requires_grad:
            param.requires_grad_(False)
            changes.append(Change("param_frozen", "freeze", name.rpartition(".")[0], name,
                                  shape=tuple(param.shape), numel=param.numel()))
    return PassResult(model, bool(changes), tuple(changes), "freeze")


def _adapted_before(model: nn.Module) -> bool:
    """True when passes already ran on this traced model (its history is not empty)."""
    return bool(history(model))


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
    """Trace ``model`` if needed and run ``passes`` in order.

    Each pass edits the graphs; after each one every graph is linted and recompiled, and its
    :class:`PassResult` is appended to ``adapted._surgery.history``. Each pass freezes the
    base parameters of the layers it adapts. The first time a model is adapted, every other
    base parameter is frozen as well (a ``"freeze"`` step in the history), so exactly the
    adapter parameters train; on a model adapted before, other parameters keep their
    ``requires_grad``, so a base parameter you chose to train (``head.weight``) stays
    trainable through later passes (merge, unmerge, more adapters).

    Args:
        model: a plain ``nn.Module`` (traced first; it is never changed) or a model returned
            by :func:`trace` / :func:`apply_passes`.
        passes: the passes, run in order.
        example_inputs: positional inputs, a tuple; needed where torch.fx cannot trace.
        example_kwargs: keyword inputs (``attention_mask``); the adapted model accepts them.
        inplace: rewrite an already traced ``model`` itself instead of a copy. Required for
            a pass that :attr:`~surgery.pass_base.Pass.writes_in_place` (an in-place merge),
            which must also be the last pass.
        leaf_modules: extra modules to keep opaque when tracing.
        freeze: ``None`` (default): freeze every non-adapter parameter when ``model`` has not
            been adapted before (a plain module, or a model fresh from :func:`trace`), and
            otherwise leave parameters the passes do not touch alone. ``True``: freeze every
            non-adapter parameter, whatever the model's history. ``False``: freeze nothing
            beyond what the passes freeze at their own sites.

    Returns:
        The adapted model (a new object unless ``inplace``); it shares the base weights'
        storage with ``model``.

    Raises:
        TraceError: the model could not be traced.
        ConfigError: a pass that writes into existing weights was given without
            ``inplace=True``, or not as the last pass (checked before anything runs).
        NoMatchError, AlreadyAdaptedError, ConfigError, UnsupportedSiteError: from a pass;
            the model given is left exactly as it was.
    """
    todo = _check_passes(passes)
    _check_in_place_writes(todo, inplace)
    if freeze is None:
        freeze = not _adapted_before(model)
    work = _prepare(model, example_inputs, example_kwargs, leaf_modules, inplace)
    snap = snapshot(work) if inplace else None
    state: SurgeryState = work._surgery
    try:
        for p in todo:
            result = p.run(work)
            recompile(work)
            state.history.append(result)
        if freeze:
            result = freeze_base(work)
            if result.modified:
                state.history.append(result)
    except BaseException:
        if snap is not None:
            restore(work, snap)
        raise
    return work


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
    results = []
    for p in todo:
        if p.writes_in_place:  # the last pass: its dry run leaves the weights alone
            changes = tuple(p.plan(work))
            results.append(PassResult(work, bool(changes), changes, p.name))
            break
        results.append(p.run(work))
        recompile(work)
    return results


@dataclass(frozen=True)
class Target:
    """A candidate site: a module called from the graph that a pass could adapt.

    Attributes:
        qname: qualified module name.
        type: class name (``"Linear"``, ``"Conv1D"``).
        role: role label (``"query"``, ``"qkv (fused)"``) or ``""``.
        shape: weight shape as stored, which depends on the layer type: ``(out, in)`` for
            ``nn.Linear``, ``(in, out)`` for transformers' ``Conv1D``,
            ``(3 * embed_dim, embed_dim)`` (``in_proj_weight``) for ``nn.MultiheadAttention``.
        calls: number of call sites (more than one when weights are shared).
        adapters: adapters already attached (``"lora:default"``).
        in_features / out_features: the layer's input and output sizes, the same way round
            for every type (channels for convolutions, vocabulary and dimension for
            embeddings); ``None`` when unknown.
    """

    qname: str
    type: str
    role: str
    shape: tuple[int, ...]
    calls: int
    adapters: tuple[str, ...]
    in_features: int | None = None
    out_features: int | None = None

    @property
    def features(self) -> str:
        """``"64 → 192"``: input and output size, or ``""`` when unknown."""
        if self.in_features is None or self.out_features is None:
            return ""
        return f"{self.in_features} → {self.out_features}"


class TargetList(list):
    """A list of :class:`Target` that prints as a table.

    The ``in → out`` column reads the same for every layer type; the markdown and rich
    tables also show the weight shape as stored.
    """

    def to_markdown(self) -> str:
        """The targets as a GitHub-flavoured markdown table."""
        rows = ["| name | type | role | in → out | weight shape | calls | adapters |",
                "|---|---|---|---|---|---|---|"]
        for t in self:
            rows.append(f"| {t.qname} | {t.type} | {t.role} | {t.features} | {tuple(t.shape)} | "
                        f"{t.calls} | {', '.join(t.adapters)} |")
        return "\n".join(rows)

    def __str__(self) -> str:
        width = max([len(t.qname) for t in self] + [4])
        lines = [f"{'name':<{width}}  {'type':<20} {'role':<14} {'in → out':<14} calls"]
        for t in self:
            lines.append(f"{t.qname:<{width}}  {t.type:<20} {t.role:<14} "
                         f"{t.features:<14} {t.calls}")
        return "\n".join(lines)

    def __rich__(self) -> Any:
        from rich.table import Table

        table = Table(title="candidate sites")
        for col in ("name", "type", "role", "in → out", "weight shape", "calls", "adapters"):
            table.add_column(col)
        for t in self:
            table.add_row(t.qname, t.type, t.role, t.features, str(tuple(t.shape)),
                          str(t.calls), ", ".join(t.adapters))
        return table


def _adapters_on(module: nn.Module) -> tuple[str, ...]:
    from surgery.sites.marker import AdapterModule

    found = []
    for slot, holder in module.named_children():
        if isinstance(holder, nn.ModuleDict):
            for name, sub in holder.items():
                if isinstance(sub, AdapterModule):
                    found.append(f"{sub.pass_name}:{name}")
    return tuple(dict.fromkeys(found))


def list_targets(model: nn.Module, example_inputs: tuple | None = None,
                 example_kwargs: Mapping[str, Any] | None = None, *,
                 leaf_modules: Collection[str | type] = ()) -> TargetList:
    """Every candidate site of ``model``: name, type, role, ``in → out`` sizes and weight shape.

    Candidates are the linear-like layers and attention modules called from the graph, in
    graph order. ``model`` may be plain (it is traced, not changed) or already traced.
    """
    traced = model if is_traced(model) else trace(model, example_inputs, example_kwargs,
                                                  leaf_modules=leaf_modules)
    roles = find_roles(traced)
    calls = call_sites(traced)
    out = TargetList()
    for qname in candidate_sites(traced, is_leaf_type):
        mod = traced.get_submodule(qname)
        weight = getattr(mod, "weight", None)
        if weight is None:
            weight = getattr(mod, "in_proj_weight", None)
        info = roles.role_of(qname)
        feats = layer_features(mod)
        out.append(Target(qname, type(mod).__name__, info.label if info else "",
                          tuple(weight.shape) if weight is not None else (),
                          len(calls[qname]), _adapters_on(mod),
                          feats[0] if feats else None, feats[1] if feats else None))
    return out


def named_trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(qualified name, parameter)`` for every parameter with ``requires_grad``."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer should get: those with ``requires_grad`` (after
    :func:`apply_passes`, exactly the adapter parameters), without duplicates."""
    return [p for _, p in named_trainable_parameters(model)]


def history(model: nn.Module) -> list[PassResult]:
    """The :class:`PassResult` of every pass applied to ``model``, oldest first."""
    state = getattr(model, "_surgery", None)
    return list(state.history) if state is not None else []
