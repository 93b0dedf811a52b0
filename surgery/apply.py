"""Running passes: ``apply_passes``, ``plan``, ``list_targets``, ``trainable_parameters``."""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from surgery.errors import ConfigError
from surgery.graphs import call_sites, recompile
from surgery.params import adapter_parameters, restore, share_weights_copy, snapshot
from surgery.pass_base import Change, Pass, PassResult, SurgeryState
from surgery.roles import find_roles
from surgery.sites import candidate_sites
from surgery.trace import is_leaf_type, is_traced, trace

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
            "inplace=True needs a model that is already traced (from surgery.trace or "
            "apply_passes); a plain nn.Module is always traced into a new model, which shares "
            "its weights' storage. Way out: drop inplace=True, or trace first: "
            "traced = surgery.trace(model, ...); apply_passes(traced, passes, inplace=True).")
    return trace(model, example_inputs, example_kwargs, leaf_modules=leaf_modules)


def _check_passes(passes: Sequence[Pass]) -> list[Pass]:
    if isinstance(passes, Pass):
        passes = [passes]
    out = list(passes)
    for i, p in enumerate(out):
        if not isinstance(p, Pass):
            raise ConfigError(f"apply_passes: item {i} is a {type(p).__name__}, not a Pass "
                              f"(LoRAPass(...), IA3Pass(...), ...).")
    return out


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


def apply_passes(
    model: nn.Module,
    passes: Sequence[Pass] | Pass,
    example_inputs: tuple | None = None,
    example_kwargs: Mapping[str, Any] | None = None,
    inplace: bool = False,
    *,
    leaf_modules: Collection[str | type] = (),
    freeze: bool = True,
) -> nn.Module:
    """Trace ``model`` if needed and run ``passes`` in order.

    Each pass edits the graphs; after each one every graph is linted and recompiled, and its
    :class:`PassResult` is appended to ``adapted._surgery.history``. Finally every base
    parameter is frozen, so exactly the adapter parameters train.

    Args:
        model: a plain ``nn.Module`` (traced first; it is never changed) or a model returned
            by :func:`trace` / :func:`apply_passes`.
        passes: the passes, run in order.
        example_inputs: positional inputs, a tuple; needed where torch.fx cannot trace.
        example_kwargs: keyword inputs (``attention_mask``); the adapted model accepts them.
        inplace: rewrite an already traced ``model`` itself instead of a copy.
        leaf_modules: extra modules to keep opaque when tracing.
        freeze: freeze base parameters (default ``True``).

    Returns:
        The adapted model (a new object unless ``inplace``); it shares the base weights'
        storage with ``model``.

    Raises:
        TraceError: the model could not be traced.
        NoMatchError, AlreadyAdaptedError, ConfigError, UnsupportedSiteError: from a pass;
            the model given is left exactly as it was.
    """
    todo = _check_passes(passes)
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

    The passes run on a private copy that shares ``model``'s weights and is then dropped.

    Returns:
        One :class:`PassResult` per pass (its ``module`` is the discarded copy).

    Raises:
        the same errors as :func:`apply_passes`.
    """
    todo = _check_passes(passes)
    work = _prepare(model, example_inputs, example_kwargs, leaf_modules, inplace=False)
    results = []
    for p in todo:
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
        shape: weight shape as stored.
        calls: number of call sites (more than one when weights are shared).
        adapters: adapters already attached (``"lora:default"``).
    """

    qname: str
    type: str
    role: str
    shape: tuple[int, ...]
    calls: int
    adapters: tuple[str, ...]


class TargetList(list):
    """A list of :class:`Target` that prints as a table."""

    def to_markdown(self) -> str:
        """The targets as a GitHub-flavoured markdown table."""
        rows = ["| name | type | role | weight shape | calls | adapters |",
                "|---|---|---|---|---|---|"]
        for t in self:
            rows.append(f"| {t.qname} | {t.type} | {t.role} | {tuple(t.shape)} | {t.calls} | "
                        f"{', '.join(t.adapters)} |")
        return "\n".join(rows)

    def __str__(self) -> str:
        width = max([len(t.qname) for t in self] + [4])
        lines = [f"{'name':<{width}}  {'type':<20} {'role':<14} {'shape':<16} calls"]
        for t in self:
            lines.append(f"{t.qname:<{width}}  {t.type:<20} {t.role:<14} "
                         f"{str(tuple(t.shape)):<16} {t.calls}")
        return "\n".join(lines)

    def __rich__(self) -> Any:
        from rich.table import Table

        table = Table(title="candidate sites")
        for col in ("name", "type", "role", "weight shape", "calls", "adapters"):
            table.add_column(col)
        for t in self:
            table.add_row(t.qname, t.type, t.role, str(tuple(t.shape)), str(t.calls),
                          ", ".join(t.adapters))
        return table


def _adapters_on(module: nn.Module) -> tuple[str, ...]:
    from surgery.adapter_base import AdapterModule

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
    """Every candidate site of ``model``: name, type, role and weight shape.

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
        out.append(Target(qname, type(mod).__name__, info.label if info else "",
                          tuple(weight.shape) if weight is not None else (),
                          len(calls[qname]), _adapters_on(mod)))
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
