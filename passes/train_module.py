"""Train chosen base modules fully, beside the adapters (PEFT's ``modules_to_save``).

A task head that ``from_pretrained`` initialised at random (``classifier``, ``score``,
``qa_outputs``) has to learn with the adapters; so may a layer norm or an embedding one
chooses to train whole::

    adapted = apply_passes(model, [LoRAPass(pattern=["query", "value"]),
                                   TrainModulePass(pattern="classifier")])

Nothing in the graph changes: the selected modules keep their class, their qualified names
and their state-dict keys (``classifier.weight`` stays ``classifier.weight``; PEFT's
``modules_to_save`` keeps a copy under ``classifier.modules_to_save.default`` instead).
Every parameter of each selected module becomes trainable, and the module is recorded in
``model._surgery.trained_modules``, so :func:`surgery.apply_passes` does not freeze it then
or in a later call, and refuses a later pass that would freeze it or adapt inside it. As for
every base parameter that stays trainable, ``apply_passes`` gives these parameters their own
storage (copy on write): training them never writes into the model that was adapted. A
parameter tied to another module (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``)
stays tied, and so trains under both names. :func:`surgery.unload` keeps the trained values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from surgery.errors import ConfigError, UnsupportedSiteError
from surgery.pass_base import Change, Pass, PassResult
from surgery.select import Selector, as_patterns, select_names
from surgery.sites.marker import AdapterModule
from surgery.sites.site_graph import base_module, is_site_graph

__all__ = ["TrainModulePass"]


@dataclass(frozen=True, kw_only=True)
class TrainModulePass(Pass):
    """Make every parameter of each selected base module trainable, as PEFT's
    ``modules_to_save``.

    Args:
        pattern: qualified-name glob(s) or ``re:`` regex (see :mod:`surgery.select`) of the
            modules to train fully: any module holding parameters (a ``Linear``, a
            ``LayerNorm``, an embedding, a whole block). Required.
        exclude: patterns removed from the selection.

    Each parameter of a selected module (and of its submodules) gets ``requires_grad=True``
    and a ``"param_unfrozen"`` change record; module names and state-dict keys are
    unchanged. The modules are recorded in ``model._surgery.trained_modules`` (qualified
    name -> ``"train_module"``), which :func:`surgery.apply_passes` and the audit read.

    Raises:
        ConfigError: no pattern, or a pattern that is not a string or a list of strings (at
            construction).
        NoMatchError: the selection matches no module holding parameters (when run).
        UnsupportedSiteError: a selected module is adapted already (a site graph), holds an
            adapted layer or an adapter, or is part of an adapter: its base weights are
            frozen by the adapter's pass, and an adapter trains by itself.
    """

    name: ClassVar[str] = "train_module"

    pattern: Selector = None
    exclude: Selector = None

    def __init__(self, *, pattern: Selector = None, exclude: Selector = None) -> None:
        for key, val in (("pattern", pattern), ("exclude", exclude)):
            object.__setattr__(self, key, tuple(val) if isinstance(val, list) else val)
        self.__post_init__()

    def __post_init__(self) -> None:
        if self.pattern is None:
            raise ConfigError(
                "TrainModulePass: pattern= is required: it names the modules to train fully "
                "(pattern='classifier', pattern=['score', 'ln_f']); surgery.list_targets(model) "
                "or model.named_modules() list the names.")
        try:
            as_patterns(self.pattern)
            as_patterns(self.exclude)
        except ConfigError as exc:
            raise ConfigError(f"TrainModulePass: {exc}") from exc

    def modules(self, model: nn.Module) -> list[tuple[str, ...]]:
        """The modules this pass would train in ``model``, in module order: for each, every
        qualified name it sits under (several when a module is shared), first name first.

        Raises:
            NoMatchError: a pattern matches no module holding parameters, or ``exclude``
                leaves nothing.
            UnsupportedSiteError: a selected module is, holds or is inside an adapter or a
                site graph.
        """
        names: dict[int, list[str]] = {}
        for qname, mod in model.named_modules(remove_duplicate=False):
            if qname and next(mod.parameters(), None) is not None:
                names.setdefault(id(mod), []).append(qname)
        canonical = {alias: group[0] for group in names.values() for alias in group}
        everything = [n for n, _ in model.named_modules(remove_duplicate=False) if n]
        picked = select_names(list(canonical), self.pattern, self.exclude,
                              pass_name="TrainModulePass", all_names=everything)
        chosen = list(dict.fromkeys(canonical[n] for n in picked))
        out = []
        for qname in chosen:
            _refuse_adapted(model, qname)
            out.append(tuple(next(g for g in names.values() if g[0] == qname)))
        return out

    def run(self, model: nn.Module) -> PassResult:
        selected = self.modules(model)
        changes: list[Change] = []
        seen: set[int] = set()
        for aliases in selected:
            qname = aliases[0]
            for pname, param in model.get_submodule(qname).named_parameters(prefix=qname):
                if id(param) in seen:
                    continue
                seen.add(id(param))
                param.requires_grad_(True)
                changes.append(Change("param_unfrozen", self.name, qname, pname,
                                      shape=tuple(param.shape), numel=param.numel(),
                                      trainable=True, detail="trained fully"))
        state = getattr(model, "_surgery", None)
        if state is not None:
            # a new dict, never an edit of the old one: a dry run's shallow copy of the
            # state must not reach the model it was copied from
            state.trained_modules = {**state.trained_modules,
                                     **{alias: self.name for aliases in selected
                                        for alias in aliases}}
        return PassResult(model, True, tuple(changes), self.name)


def _refuse_adapted(model: nn.Module, qname: str) -> None:
    """Raise when the module at ``qname`` is, holds or lies inside an adapter or a site
    graph (its base weights belong to an adapter's pass)."""
    module = model.get_submodule(qname)
    kind = type(base_module(module)).__name__
    parts = qname.split(".")
    for i in range(len(parts)):  # the modules holding it, the model first
        owner = ".".join(parts[:i])
        holder = model.get_submodule(owner)
        if isinstance(holder, AdapterModule):
            raise UnsupportedSiteError(
                f"TrainModulePass: {qname} ({kind}) is part of the {holder.pass_name} adapter "
                f"{holder.adapter_name!r} at {holder.site or 'the model'}; adapter parameters "
                f"train already. Way out: select base modules only (exclude=[{qname!r}]); "
                f"surgery.set_trainable chooses which adapters train.")
        if is_site_graph(holder):
            raise UnsupportedSiteError(
                f"TrainModulePass: {qname} ({kind}) lies inside {owner or 'the model'}, a layer "
                f"adapted already (a site graph: its base weights are frozen so that only its "
                f"adapters train). Way out: exclude=[{qname!r}], or select base modules "
                f"outside adapted layers; surgery.list_targets(model) lists the layers.")
    for sub_name, sub in module.named_modules(prefix=qname):
        if is_site_graph(sub) or isinstance(sub, AdapterModule):
            if sub is module:
                what = ("is adapted already (a site graph)" if is_site_graph(sub) else
                        f"is a module of the {sub.pass_name} adapter {sub.adapter_name!r}")
            else:
                what = (f"holds the adapted layer {sub_name}" if is_site_graph(sub) else
                        f"holds the adapter module {sub_name}")
            raise UnsupportedSiteError(
                f"TrainModulePass: {qname} ({kind}) {what}; the adapter's "
                f"pass froze the base weights there so that only the adapter trains, and a "
                f"module cannot both carry adapters and train fully. Way out: exclude=[{qname!r}] "
                f"here, or leave the module out of the adapters' selection and train it fully "
                f"instead.")
