"""The pass interface: a frozen configuration with one method, and the record it returns.

A pass is a small frozen, keyword-only dataclass with a stable ``name`` (``"lora"``,
``"ia3"``, ...). ``Pass.run(model)`` rewrites the sites of ``model`` in place and returns a
:class:`PassResult`; ``Pass.plan(model)`` runs the same matching and returns the changes it
would make without touching anything. :func:`surgery.apply_passes` owns copying, linting,
recompiling and atomicity, so a pass only edits graphs and registers modules.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from surgery.errors import ConfigError
from surgery.pass_keywords import check_keywords
from surgery.sites.changes import Change, ChangeKind

__all__ = ["Change", "ChangeKind", "PassResult", "Pass", "pass_class", "registered_passes"]

_REGISTRY: dict[str, type["Pass"]] = {}
"""Stable pass name -> pass class, filled as pass classes are defined (the recipe of a
checkpoint names passes by ``name``)."""

@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the module, whether it changed, and every change made.

    Attributes:
        module: the model after the pass: the object the pass was given, or the site graph
            that replaced it when the model is itself one layer; ``None`` in the history.
        modified: ``True`` when anything changed.
        changes: every site touched, node added or removed, parameter added, frozen or
            rewritten, in the order they happened.
        pass_name: the stable name of the pass that produced this result.
        step: the pass object itself (its full configuration), as recorded in the history
            by :func:`surgery.apply_passes`; ``None`` for steps that are not passes (the
            ``"freeze"`` step).
    """

    module: nn.Module
    modified: bool
    changes: tuple[Change, ...] = ()
    pass_name: str = ""
    step: Pass | None = field(default=None, compare=False)

    @property
    def sites(self) -> list[str]:
        """Qualified names of the sites touched, in first-touched order, without repeats."""
        return list(dict.fromkeys(c.site for c in self.changes))


@dataclass(frozen=True, kw_only=True)
class Pass:
    """Base class of every rewrite pass.

    Subclasses are frozen keyword-only dataclasses, set the class attribute ``name`` and
    implement :meth:`run`; they validate their configuration in ``__post_init__`` and
    raise :class:`surgery.errors.ConfigError` there.
    """

    name: ClassVar[str] = "pass"
    peft_spellings: ClassVar[dict[str, str]] = {}
    """PEFT's name of a setting -> this pass's (``{"r": "rank"}``), for the error on a
    keyword the pass does not take."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Pass:
        """Refuse a keyword the pass does not take with a :class:`ConfigError` (PEFT's
        spelling answered with ours; see :func:`surgery.pass_keywords.check_keywords`)."""
        check_keywords(cls, kwargs, cls.peft_spellings)
        return super().__new__(cls)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            _REGISTRY[cls.__dict__["name"]] = cls

    def config(self) -> dict[str, Any]:
        """The keyword arguments that rebuild this pass (``type(p).from_config(p.config())
        == p``), as JSON-ready values: tuples become lists, a mapping stays a mapping.

        The keys are the constructor's: a pass whose constructor takes ``name=`` for the
        field ``adapter_name`` gets ``"name"``.
        """
        params = inspect.signature(type(self).__init__).parameters
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if not f.init and f.name not in params:
                continue
            key = f.name
            if key == "adapter_name" and "adapter_name" not in params and "name" in params:
                key = "name"
            out[key] = _jsonable(getattr(self, f.name))
        return out

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Pass:
        """The pass that :meth:`config` describes.

        Raises:
            ConfigError: a key the constructor does not take, or a value it refuses.
        """
        params = inspect.signature(cls.__init__).parameters
        unknown = sorted(set(config) - set(params))
        if unknown and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            raise ConfigError(f"{cls.__name__}: unknown settings {unknown}; it takes "
                              f"{sorted(k for k in params if k != 'self')}")
        try:
            return cls(**config)
        except TypeError as exc:
            raise ConfigError(f"{cls.__name__}: cannot be built from {config!r}: {exc}") from None

    @property
    def writes_in_place(self) -> bool:
        """``True`` when :meth:`run` writes into the storage of existing weights.

        Such a pass cannot run on the private copy :func:`surgery.apply_passes` makes (that
        copy shares the weights of the model it was given), and what it wrote cannot be
        rolled back if a later pass fails, so ``apply_passes`` accepts it only with
        ``inplace=True`` and as the last pass. ``False`` here; a pass with an in-place
        option returns that option.
        """
        return False

    def run(self, model: nn.Module) -> PassResult:
        """Rewrite the sites of ``model`` in place and return what changed.

        The caller (:func:`surgery.apply_passes`) hands over a private copy and restores it
        if this raises, so a pass does not need to undo partial work.
        """
        raise NotImplementedError

    def plan(self, model: nn.Module) -> list[Change]:
        """Return the changes :meth:`run` would make, without changing ``model``.

        The default runs the pass on a private copy of ``model`` (sharing its
        weights' storage) and drops the copy.

        Raises:
            ConfigError: the pass :attr:`writes_in_place`: run on a copy sharing the weights,
                it would change them.
        """
        import copy

        from surgery.sites.params import share_weights_copy

        if self.writes_in_place:
            raise ConfigError(
                f"{type(self).__name__}.plan: this pass writes into existing weights "
                f"(in place), and a dry run shares the model's weights, so it would change "
                f"them. Way out: plan the same pass without its in-place option; it makes the "
                f"same changes into new tensors.")

        work = share_weights_copy(model)
        state = getattr(model, "_surgery", None)
        if state is not None and getattr(work, "_surgery", None) is None:
            work._surgery = copy.copy(state)
        return list(self.run(work).changes)

    def describe(self) -> str:
        """One line naming the pass and its non-default settings, for logs and diagrams."""
        parts = []
        for f in self.__dataclass_fields__.values():  # type: ignore[attr-defined]
            val = getattr(self, f.name)
            if f.default is not val and f.default != val:
                parts.append(f"{f.name}={val!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    return value


def registered_passes() -> dict[str, type[Pass]]:
    """Every pass class registered so far, by its stable name (a pass class registers when
    its module is imported; :mod:`surgery.checkpoint.registry` imports the built-in ones)."""
    return dict(_REGISTRY)


def pass_class(name: str) -> type[Pass]:
    """The registered pass class whose stable :attr:`Pass.name` is ``name``.

    Raises:
        ConfigError: no registered pass has that name (the message lists the nearest).
    """
    if name not in _REGISTRY:
        from surgery.errors import near_matches

        raise ConfigError(f"no pass is named {name!r}; known passes (nearest first): "
                          f"{', '.join(near_matches(name, _REGISTRY, n=8))}")
    return _REGISTRY[name]


@dataclass
class SurgeryState:
    """Bookkeeping stored on an adapted model as ``model._surgery``.

    It travels with the model: ``copy.deepcopy``, ``pickle`` and ``torch.save`` keep it
    (with the roles found; a pickled copy drops the cached map, rebuilt when next needed).

    Attributes:
        source_class: the class of the model that was adapted.
        history: the :class:`PassResult` of every pass applied, oldest first.
        example_inputs / example_kwargs: what :func:`surgery.apply_passes` was given for
            tracing the map, if anything.
        leaf_modules: extra modules kept opaque when tracing the map.
        active: adapter names in use (``None`` = all).
        notes: what surgery did besides the passes, or what it left for the user to decide,
            one sentence each (a ``torch.compile`` or DDP wrapper taken off, a task head left
            frozen at its initial values, ...); :func:`surgery.audit` prints them.
        trained_modules: qualified name of each base module trained fully (every parameter
            trainable, as PEFT's ``modules_to_save``) -> the stable name of the pass that chose
            it (``"train_module"``). :func:`surgery.apply_passes` never freezes their
            parameters, and no later pass may freeze them or adapt inside them.
        trained_parameters: qualified name of each single base parameter a pass made
            trainable (``q_proj.bias`` for ``LoRAPass(bias="lora_only")``) -> the stable name
            of that pass (``"lora"``). :func:`surgery.apply_passes` never freezes them and
            gives them their own storage; the audit shows them and a checkpoint saves them.
        originals: for each parameter of a module trained fully, by qualified name, the
            values it had when the module was chosen (a tensor sharing the storage of the
            model that was adapted, never written; PEFT's ``original_module``).
            :func:`surgery.disable_adapters` runs the module with them.
        cached_map: the map (:func:`surgery.targets.model_map`), once built.
        cached_roles: the structural roles (:func:`surgery.targets.model_roles`), once found.
    """

    source_class: type
    history: list[PassResult] = field(default_factory=list)
    example_inputs: tuple | None = None
    example_kwargs: dict | None = None
    leaf_modules: tuple = ()
    active: set[str] | None = None
    notes: list[str] = field(default_factory=list)
    trained_modules: dict[str, str] = field(default_factory=dict)
    trained_parameters: dict[str, str] = field(default_factory=dict)
    originals: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    cached_map: nn.Module | None = field(default=None, repr=False, compare=False)
    cached_roles: Any = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["cached_map"] = None  # a graph tree on meta tensors: rebuilt when next needed
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        # a state pickled before a field existed gets the field's default
        for f in dataclasses.fields(self):
            if f.name not in self.__dict__ and f.default_factory is not dataclasses.MISSING:
                self.__dict__[f.name] = f.default_factory()
            elif f.name not in self.__dict__ and f.default is not dataclasses.MISSING:
                self.__dict__[f.name] = f.default

    def __deepcopy__(self, memo: dict[int, Any]) -> SurgeryState:
        import copy

        new = SurgeryState.__new__(SurgeryState)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__getstate__(), memo))
        new.cached_map = self.cached_map  # read-only analysis: safe to share
        new.cached_roles = self.cached_roles
        return new

    @property
    def frontend(self) -> str | None:
        """``"fx"`` or ``"export"`` once the map was built, else ``None``."""
        info = getattr(self.cached_map, "_surgery_map", None)
        return info.frontend if info is not None else None
