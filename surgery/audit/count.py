"""The audit: what a model holds, what trains, and which pass made it so.

``audit(model)`` walks the module tree once. Every module that owns parameters directly
(``recurse=False``) gets a row; a parameter shared by several modules (GPT-2's ``lm_head``
tied to ``transformer.wte``) is counted at its first owner in module order, so the rows add
up to the totals and the totals count every tensor once, as PEFT's
``get_nb_trainable_parameters`` does. On an adapted model (from :func:`surgery.apply_passes`)
the rows also carry the provenance recorded in ``model._surgery.history``, and structural
roles when they are already known (a pass selected by role, or :func:`surgery.list_targets`
ran: roles and the map are cached on the model); the audit itself never traces. A site graph
is listed under the type of the module it replaced (``Linear``, not ``GraphModule``)::

    >>> passes = [LoRAPass(pattern="attn.*", rank=8, alpha=16), IA3Pass()]  # doctest: +SKIP
    >>> print(audit(apply_passes(model, passes)))                           # doctest: +SKIP
    trainable params: 8,960 || all params: 150,272 || trainable%: 5.9625
    adapter lora:default: 8 site(s), 8,192 params, trainable: yes, active: yes, rank 8
    adapter ia3:default: 6 site(s), 768 params, trainable: yes, active: yes

    name                                 type            role   params  trainable  ...
    ...
    layers.0.attn.q_proj                 Linear          query   4,160  no         ...
    layers.0.attn.q_proj.lora_A.default  LoRAProjection  query     512  yes        ...

Works on any ``nn.Module``: a plain model has no roles and no provenance, and its
trainability is whatever its ``requires_grad`` flags say. An adapted model copied with
``copy.deepcopy``, pickled, or saved and loaded with ``torch.save`` / ``torch.load`` gives
the same audit; pickling drops the cached roles and map, so roles and the front end show
again once something finds them.

Several named adapters on one base (a multi-task stack) are listed one per (pass, name),
with whether each is active (:func:`surgery.adapters.active.set_active`) and whether it trains
(:func:`surgery.adapters.active.set_trainable`); the two are independent. A row of a switched-off
adapter module says ``inactive`` in its provenance. Each LoRA adapter's summary gives its
ranks (one per site, which may differ: ``LoRAPass(rank_for=...)``). A base module trained
fully (:class:`passes.train_module.TrainModulePass`, PEFT's ``modules_to_save``) says
``trained fully (train_module)``, and its parameters count as trainable. The notes of the
model's state (a wrapper taken off, a task head left frozen at its initial values) are
printed after the adapters.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from torch import nn

from surgery.audit import format as audit_format
from surgery.pass_base import SurgeryState
from surgery.sites.marker import AdapterModule, AdapterParameters
from surgery.sites.site_graph import base_module, site_graphs
from surgery.targets import model_roles

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["Audit", "AuditRow", "AdapterSummary", "Totals", "audit", "format_totals"]

# Base freezing done by apply_passes is recorded under this pass name.
_FREEZE = "freeze"


class Totals(NamedTuple):
    """Parameter totals, each tensor counted once.

    Attributes:
        trainable: elements of parameters with ``requires_grad``.
        total: elements of all parameters.
        percent: ``100 * trainable / total`` (0.0 for a model without parameters).
    """

    trainable: int
    total: int
    percent: float

    def __str__(self) -> str:
        return format_totals(self.trainable, self.total)


def format_totals(trainable: int, total: int) -> str:
    """The familiar one-line summary, in PEFT's format (thousands commas, 4 decimals).

    Example:
        >>> format_totals(1234, 56789)
        'trainable params: 1,234 || all params: 56,789 || trainable%: 2.1730'
    """
    percent = 100 * trainable / total if total else 0.0
    return (f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {percent:.4f}")


@dataclass(frozen=True)
class AuditRow:
    """One module that owns parameters (or, with ``depth``, one collapsed subtree).

    Attributes:
        name: qualified module name (``""`` is the root).
        type: class name; for a site graph, the class of the module it replaced
            (``Linear`` for an adapted ``nn.Linear``).
        role: structural role label (``"query"``, ``"qkv (fused)"``) or ``""``.
        params: elements of the parameters counted at this row.
        trainable_params: of those, elements with ``requires_grad``.
        trainable: ``"yes"``, ``"no"`` or ``"partial"`` over the module's own parameters.
        dtype: parameter dtype(s) (``"float32"``; comma-separated when mixed).
        device: parameter device(s) (``"cpu"``).
        added_by: ``"<pass>:<adapter>"`` of the passes that inserted this module or its
            parameters.
        frozen_by: names of the passes that froze its parameters (``"freeze"`` is the
            base freezing :func:`surgery.apply_passes` does after the passes).
        rewritten_by: names of the passes that rewrote its weights (merges).
        adapters: ``"<pass>:<adapter>"`` of the adapters attached to this module.
        tied: ``"<own name>=<first owner's parameter>"`` for parameters shared with a
            module listed earlier (not counted again here).
        active: for an adapter module, ``"yes"`` or ``"no"`` (switched off by
            :func:`surgery.adapters.active.set_active`); ``""`` for other modules.
        trained_by: names of the passes that chose this module, or a module holding it, to
            train fully (``"train_module"``).
        trained_params: ``"<parameter> (<pass>)"`` for each of the module's own parameters a
            pass chose to train alone (``"bias (lora)"`` for ``LoRAPass(bias=...)``;
            ``SurgeryState.trained_parameters``).
    """

    name: str
    type: str
    role: str
    params: int
    trainable_params: int
    trainable: str
    dtype: str
    device: str
    added_by: tuple[str, ...] = ()
    frozen_by: tuple[str, ...] = ()
    rewritten_by: tuple[str, ...] = ()
    adapters: tuple[str, ...] = ()
    tied: tuple[str, ...] = ()
    active: str = ""
    trained_by: tuple[str, ...] = ()
    trained_params: tuple[str, ...] = ()

    @property
    def provenance(self) -> str:
        """A short human-readable note on what passes did here."""
        notes = []
        if self.trained_by:  # frozen by an earlier call, perhaps, but trained now
            notes.append("trained fully (" + ", ".join(self.trained_by) + ")")
        notes.extend(f"{t.replace(' (', ' trained (', 1)}" for t in self.trained_params)
        if self.added_by:
            notes.append("added by " + ", ".join(self.added_by))
        by_pass = [p for p in self.frozen_by if p != _FREEZE]
        if by_pass and not self.trained_by:
            notes.append("frozen by " + ", ".join(by_pass))
        if _FREEZE in self.frozen_by and not self.trained_by:
            notes.append("frozen (base)")
        if self.rewritten_by:
            notes.append("rewritten by " + ", ".join(self.rewritten_by))
        if self.tied:
            notes.append("tied: " + ", ".join(self.tied))
        if self.active == "no":
            notes.append("inactive")
        return "; ".join(notes)


@dataclass(frozen=True)
class AdapterSummary:
    """One named adapter of one pass, over all the sites it sits on.

    Attributes:
        name: the adapter name (``"default"``).
        pass_name: the pass that inserted it (``"lora"``).
        sites: qualified names of the adapted modules, in module order.
        params: elements of its parameters.
        trainable_params: of those, elements with ``requires_grad``.
        trainable: ``"yes"``, ``"no"``, ``"partial"``, or ``""`` without parameters.
        active: ``"yes"`` (used in the forward pass), ``"no"`` (switched off by
            :func:`surgery.adapters.active.set_active`), or ``"partial"`` (some of its modules off).
        ranks: for a low-rank adapter (LoRA), its rank at each site in :attr:`sites` order
            (ranks may differ per site); ``()`` for other adapters.
        variant: ``"DoRA"`` for a LoRA adapter with a learned magnitude, else ``""``.
    """

    name: str
    pass_name: str
    sites: tuple[str, ...]
    params: int
    trainable_params: int
    trainable: str
    active: str = "yes"
    ranks: tuple[int, ...] = ()
    variant: str = ""

    @property
    def rank_text(self) -> str:
        """``"rank 8"``, ``"ranks 4-16"`` (smallest to largest), ``"rank 8, DoRA"``, or ``""``
        without ranks."""
        if not self.ranks:
            return ""
        low, high = min(self.ranks), max(self.ranks)
        text = f"rank {low}" if low == high else f"ranks {low}-{high}"
        return f"{text}, {self.variant}" if self.variant else text

    @property
    def key(self) -> str:
        """``"<pass>:<adapter>"``, as rows refer to it."""
        return f"{self.pass_name}:{self.name}"


@dataclass(frozen=True)
class Audit:
    """The result of :func:`audit`: totals, per-module rows, adapters.

    ``str(audit)`` is the totals line followed by a plain-text table; ``rich.print(audit)``
    draws a rich table; :meth:`to_markdown` and :meth:`to_json` give the same content for
    files.

    Attributes:
        model: class name of the audited model (for a model that is one adapted layer, the
            class of that layer).
        frontend: the front end that traced the cached map (``"fx"``, ``"export"``), or
            ``None`` when no map is cached (a plain module, a model adapted by pattern or whose
            roles came from one block).
        passes: names of the passes in the model's history, oldest first.
        totals: trainable / total elements and the percentage, over the whole model.
        rows: per-module rows in module order (filtered by ``only_trainable`` / ``depth``).
        adapters: one summary per (pass, adapter name).
        notes: the notes of the model's state (``model._surgery.notes``): what surgery did
            besides the passes, or left for the user to decide (a task head left frozen).
    """

    model: str
    frontend: str | None
    passes: tuple[str, ...]
    totals: Totals
    rows: tuple[AuditRow, ...]
    adapters: tuple[AdapterSummary, ...] = ()
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with stable keys (what :meth:`to_json` serialises)."""
        return audit_format.to_dict(self)

    def to_json(self, indent: int | None = 2) -> str:
        """The audit as JSON (keys sorted, so equal audits give equal text)."""
        return audit_format.to_json(self, indent)

    def to_markdown(self) -> str:
        """The audit as GitHub-flavoured markdown: totals, adapters table, module table."""
        return audit_format.to_markdown(self)

    def __str__(self) -> str:
        return audit_format.to_text(self)

    def __rich__(self) -> Table:
        """A ``rich.table.Table``: totals as the title, adapters in the caption."""
        return audit_format.to_rich(self)


def _join(values: Iterable[str]) -> str:
    return ", ".join(dict.fromkeys(values))


def _trainable_word(n_trainable: int, n_frozen: int) -> str:
    if n_trainable and n_frozen:
        return "partial"
    if n_trainable:
        return "yes"
    return "no" if n_frozen else ""


def _type_name(module: nn.Module) -> str:
    """The class name of ``module``, or of the module a site graph replaced."""
    return type(base_module(module)).__name__


def _adapters_of(module: nn.Module) -> tuple[str, ...]:
    """``"<pass>:<adapter>"`` of adapter modules registered under ``module``'s own slots."""
    found = []
    for holder in module.children():
        if isinstance(holder, AdapterModule):
            found.append(f"{holder.pass_name}:{holder.adapter_name}")
        elif isinstance(holder, nn.ModuleDict):
            found += [f"{m.pass_name}:{m.adapter_name}" for m in holder.values()
                      if isinstance(m, AdapterModule)]
    return tuple(dict.fromkeys(found))


def _provenance(state: SurgeryState | None) -> dict[str, dict[str, list[str]]]:
    """Qualified module name -> {"added"|"frozen"|"rewritten": [pass labels]}."""
    out: dict[str, dict[str, list[str]]] = {}
    if state is None:
        return out
    for result in state.history:
        for change in result.changes:
            if change.kind == "module_added":
                owner, slot = change.name, "added"
            elif change.kind in ("param_added", "param_frozen", "param_rewritten"):
                owner = change.name.rpartition(".")[0]
                slot = change.kind[len("param_"):]
            else:
                continue
            label = change.pass_name
            if slot == "added" and change.adapter:
                label = f"{label}:{change.adapter}"
            out.setdefault(owner, {}).setdefault(slot, []).append(label)
    return out


def _trained_by(qname: str, trained: dict[str, str]) -> tuple[str, ...]:
    """Pass names that train ``qname`` fully: it, or a module holding it, is in
    ``trained`` (``SurgeryState.trained_modules``)."""
    return tuple(dict.fromkeys(by for t, by in trained.items()
                               if qname == t or qname.startswith(t + ".")))


def _trained_params(qname: str, own: list[tuple[str, nn.Parameter]],
                    trained: dict[str, str]) -> tuple[str, ...]:
    """``"<parameter> (<pass>)"`` for each of ``own`` that a pass chose to train alone
    (``SurgeryState.trained_parameters``)."""
    out = []
    for pname, _ in own:
        by = trained.get(f"{qname}.{pname}" if qname else pname)
        if by is not None:
            out.append(f"{pname} ({by})")
    return tuple(out)


def _ranks(model: nn.Module) -> dict[int, int]:
    """``id`` of each adapter module heading a low-rank update -> its rank at that site
    (read through the fold protocol, from the site graph holding it)."""
    out: dict[int, int] = {}
    for _, sg in site_graphs(model):
        for holder in sg.children():
            mods = holder.values() if isinstance(holder, nn.ModuleDict) else [holder]
            for mod in mods:
                if isinstance(mod, AdapterModule):
                    factors = mod.low_rank(sg)
                    if factors is not None:
                        out[id(mod)] = int(factors[0].shape[0])
    return out


def _roles(model: nn.Module, state: SurgeryState | None) -> dict[str, str]:
    """Role labels by qualified name, only when the roles or the map are already cached:
    the audit never traces."""
    if state is None or (state.cached_roles is None and state.cached_map is None):
        return {}
    return {q: info.label for q, info in model_roles(model).modules.items()}


def _row(qname: str, module: nn.Module, own: list[tuple[str, nn.Parameter]], count: int,
         n_train: int, tied: tuple[str, ...], roles: dict[str, str],
         prov: dict[str, list[str]], trained: dict[str, str],
         trained_params: dict[str, str] | None = None) -> AuditRow:
    added = list(prov.get("added", []))
    role = roles.get(qname, "")
    if isinstance(module, AdapterModule):
        added.insert(0, f"{module.pass_name}:{module.adapter_name}")
        role = role or module.role or roles.get(module.site, "")
    elif isinstance(module, AdapterParameters):  # <site>.ia3_l: the role of its site
        role = role or roles.get(qname.rpartition(".")[0], "")
    flags = [p.requires_grad for _, p in own]
    return AuditRow(
        name=qname,
        type=_type_name(module),
        role=role,
        params=count,
        trainable_params=n_train,
        trainable=_trainable_word(sum(flags), len(flags) - sum(flags)),
        dtype=_join(str(p.dtype).removeprefix("torch.") for _, p in own),
        device=_join(str(p.device) for _, p in own),
        added_by=tuple(dict.fromkeys(added)),
        frozen_by=tuple(dict.fromkeys(prov.get("frozen", []))),
        rewritten_by=tuple(dict.fromkeys(prov.get("rewritten", []))),
        adapters=_adapters_of(module),
        tied=tied,
        active=("yes" if module.active else "no") if isinstance(module, AdapterModule) else "",
        trained_by=_trained_by(qname, trained),
        trained_params=_trained_params(qname, own, trained_params or {}),
    )


def audit(model: nn.Module, only_trainable: bool = False, depth: int | None = None) -> Audit:
    """Audit ``model``: parameter totals, per-module rows, adapters and their provenance.

    Args:
        model: any ``nn.Module``; a model from :func:`surgery.apply_passes` also gets
            pass provenance, and roles when they are cached (never traced here).
        only_trainable: keep only rows with at least one trainable parameter (the totals
            still cover the whole model).
        depth: collapse every module deeper than ``depth`` dotted segments into its
            ancestor at that depth (``depth=2`` gives one row per ``layers.<i>``); ``None``
            lists every module that owns parameters.

    Returns:
        An :class:`Audit`. Its totals equal PEFT's ``get_nb_trainable_parameters()`` for
        the same model and configuration: every distinct parameter tensor counted once.

    Raises:
        ValueError: ``depth`` is negative.
    """
    if depth is not None and depth < 0:
        raise ValueError(f"audit: depth must be None or >= 0, got {depth!r}")
    state = getattr(model, "_surgery", None)
    state = state if isinstance(state, SurgeryState) else None
    roles = _roles(model, state)
    prov = _provenance(state)
    trained = dict(getattr(state, "trained_modules", {}) or {})
    trained_params = dict(getattr(state, "trained_parameters", {}) or {})
    ranks = _ranks(model)
    seen: dict[int, str] = {}
    rows: list[AuditRow] = []
    adapters: dict[tuple[str, str], dict[str, Any]] = {}
    total = trainable_total = 0
    for qname, module in model.named_modules(remove_duplicate=False):
        own = list(module.named_parameters(recurse=False))
        entry = None
        if isinstance(module, AdapterModule):
            entry = _summary_entry(adapters, module.pass_name, module.adapter_name)
            entry["dora"] = entry["dora"] or module.fold_mode == "dora"
            entry["sites"].append(module.site)
            if id(module) in ranks:
                entry["ranks"].setdefault(module.site, ranks[id(module)])
            entry["on" if module.active else "off"] += 1
        if not own:
            continue
        count = n_train = 0
        tied = []
        for pname, param in own:
            if id(param) in seen:
                tied.append(f"{pname}={seen[id(param)]}")
                continue
            seen[id(param)] = f"{qname}.{pname}" if qname else pname
            count += param.numel()
            n_train += param.numel() if param.requires_grad else 0
            if isinstance(module, AdapterParameters):  # named after its adapter
                held = _summary_entry(adapters, module.pass_name, pname)
                held["params"] += param.numel()
                held["trainable"] += param.numel() if param.requires_grad else 0
        total += count
        trainable_total += n_train
        if entry is not None:
            entry["params"] += count
            entry["trainable"] += n_train
        rows.append(_row(qname, module, own, count, n_train, tuple(tied), roles,
                         prov.get(qname, {}), trained, trained_params))
    if depth is not None:
        rows = _collapse(rows, depth, model, roles)
    if only_trainable:
        rows = [r for r in rows if r.trainable_params]
    summaries = tuple(
        AdapterSummary(name=name, pass_name=pass_name, sites=tuple(dict.fromkeys(e["sites"])),
                       params=e["params"], trainable_params=e["trainable"],
                       trainable=(_trainable_word(e["trainable"], e["params"] - e["trainable"])
                                  or "no parameters"),
                       active=_trainable_word(e["on"], e["off"]),
                       ranks=tuple(e["ranks"][s] for s in dict.fromkeys(e["sites"])
                                   if s in e["ranks"]),
                       variant="DoRA" if e["dora"] else "")
        for (pass_name, name), e in adapters.items())
    return Audit(
        model=_type_name(model),
        frontend=state.frontend if state is not None else None,
        passes=tuple(r.pass_name for r in state.history) if state is not None else (),
        totals=Totals(trainable_total, total, 100 * trainable_total / total if total else 0.0),
        rows=tuple(rows),
        adapters=summaries,
        notes=tuple(state.notes) if state is not None else (),
    )


def _summary_entry(adapters: dict[tuple[str, str], dict[str, Any]], pass_name: str,
                   adapter_name: str) -> dict[str, Any]:
    """The running totals of one adapter (created empty on first use)."""
    return adapters.setdefault((pass_name, adapter_name),
                               {"sites": [], "params": 0, "trainable": 0, "on": 0, "off": 0,
                                "ranks": {}, "dora": False})


def _below(name: str, ancestor: str) -> str:
    """``name`` relative to ``ancestor``, with a trailing dot (``""`` for the same name)."""
    if name == ancestor:
        return ""
    return (name[len(ancestor) + 1:] if ancestor else name) + "."


def _collapse(rows: list[AuditRow], depth: int, model: nn.Module,
              roles: dict[str, str]) -> list[AuditRow]:
    """Merge rows deeper than ``depth`` segments into their ancestor at that depth."""
    groups: dict[str, list[AuditRow]] = {}
    for r in rows:
        parts = r.name.split(".") if r.name else []
        groups.setdefault(".".join(parts[:depth]), []).append(r)
    out = []
    for name, members in groups.items():
        if len(members) == 1 and members[0].name == name:
            out.append(members[0])
            continue
        module = model.get_submodule(name)
        n_train = sum(1 for r in members if r.trainable in ("yes", "partial"))
        n_frozen = sum(1 for r in members if r.trainable in ("no", "partial"))
        out.append(AuditRow(
            name=name,
            type=_type_name(module),
            role=roles.get(name, ""),
            params=sum(r.params for r in members),
            trainable_params=sum(r.trainable_params for r in members),
            trainable=_trainable_word(n_train, n_frozen),
            dtype=_join(d for r in members for d in r.dtype.split(", ")),
            device=_join(d for r in members for d in r.device.split(", ")),
            added_by=tuple(dict.fromkeys(p for r in members for p in r.added_by)),
            frozen_by=tuple(dict.fromkeys(p for r in members for p in r.frozen_by)),
            rewritten_by=tuple(dict.fromkeys(p for r in members for p in r.rewritten_by)),
            adapters=tuple(dict.fromkeys(a for r in members for a in r.adapters)),
            tied=tuple(t for r in members for t in r.tied),
            trained_by=tuple(dict.fromkeys(p for r in members for p in r.trained_by)),
            trained_params=tuple(f"{_below(r.name, name)}{t}" for r in members
                                 for t in r.trained_params),
        ))
    return out
