"""Calling a traced model with other inputs than it was traced with: one clear error.

Tracing fixes every forward parameter that is not among the example inputs to its default
(torch.fx ``concrete_args``; torch.export records the call it is shown), and a parameter
given as an example input becomes a real input whose graph may need a value. A call that
breaks either raises :class:`InputMismatchError` (a ``TypeError``) naming the parameter,
what tracing did with it and the way out, on both front ends:

- fx: the checks are nodes of the root graph, calls of :func:`_assert_fixed_input` and
  :func:`_assert_input_given` right after the placeholders (they replace the bare
  ``AssertionError`` checks torch.fx inserts), so they survive copies, ``torch.save`` and
  recompiles. The generated code reads::

      def forward(self, x, attention_mask = None):
          attention_mask_1 = attention_mask
          _assert_fixed_input = surgery_trace_inputs__assert_fixed_input(
              attention_mask_1, 'attention_mask', None, 'this MaskedMLP (traced with torch.fx)')
          ...

- export: :class:`ExportedCallCheck`, a forward pre-hook on the unflattened model, which
  binds the call to the original ``forward`` signature, checks it, and passes the inputs on
  exactly as they were traced (so a keyword input given by position works too).
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.fx._symbolic_trace import _assert_is_none, is_fx_symbolic_tracing

from surgery.errors import InputMismatchError

__all__ = [
    "INPUT_CHECKS",
    "ExportedCallCheck",
    "describe_value",
    "fixed_input_message",
    "install_fx_input_checks",
    "missing_input_message",
    "same_value",
]

_SIMPLE = (type(None), bool, int, float, str)
_NO_VALUE = object()


def describe_value(value: Any) -> str:
    """A short text for an input value: tensors by shape and dtype, others by ``repr``."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} ({str(value.dtype).removeprefix('torch.')})"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def same_value(got: Any, fixed: Any) -> bool:
    """True when ``got`` is the value an input was fixed to (``is``, or ``==`` on plain
    values; a tensor never equals a fixed value)."""
    if got is fixed:
        return True
    if isinstance(got, torch.Tensor) or isinstance(fixed, torch.Tensor):
        return False
    try:
        equal = got == fixed
    except Exception:  # a comparison that cannot be made is a mismatch
        return False
    return isinstance(equal, bool) and equal


def fixed_input_message(owner: str, name: str, got: Any, fixed: Any = inspect.Parameter.empty,
                        also: Any = _NO_VALUE) -> str:
    """The message for an input fixed at trace time and given another value at call time.

    Args:
        owner: ``"this GPT2Model (traced through torch.export)"``.
        name: the forward parameter.
        got: the value it was called with.
        fixed: the value tracing fixed it to; ``inspect.Parameter.empty`` when the parameter
            is not in the signature (a ``**kwargs`` entry) and was simply not traced.
        also: a second accepted value, given only for ``use_cache`` after tracing switched
            the cache off.
    """
    if also is not _NO_VALUE:
        return (f"{owner} was traced with {name}={also!r} (tracing sets config.{name} = False "
                f"on its copy, since a key/value cache cannot be a graph output), and cannot "
                f"take {name}={describe_value(got)}. Way out: call it without {name} (or with "
                f"{name}={also!r}); for generation with a cache, surgery.adapters.unload(model) gives an "
                f"eager model of the original class with the adapters folded in.")
    if fixed is inspect.Parameter.empty:
        what = f"without {name} (it was not among the example inputs)"
    else:
        what = (f"with {name} fixed to {describe_value(fixed)}, its default (it was not among "
                f"the example inputs)")
    return (f"{owner} was traced {what}, and cannot take {name}={describe_value(got)}. "
            f"Way out: trace again (surgery.map.trace, or apply_passes on the original model) with "
            f"example_kwargs={{'{name}': ...}} so that {name} becomes an input of the traced "
            f"model.")


def missing_input_message(owner: str, name: str) -> str:
    """The message for an input traced as a real input and left out (or ``None``) at call time."""
    hint = ""
    if "mask" in name:
        hint = " (for an attention mask without padding: torch.ones_like(input_ids))"
    return (f"{owner} was traced with {name} as an input (it was among the example inputs) "
            f"and needs a value for it; it was called without {name} (or with {name}=None). "
            f"Way out: pass {name}=...{hint}, or trace again without {name} among the example "
            f"inputs, which fixes it to its default.")


# ---- fx: checks in the graph ----------------------------------------------------------------


@fx.node.has_side_effect
def _assert_fixed_input(value: Any, name: str, fixed: Any, owner: str,
                        also: Any = _NO_VALUE) -> None:
    """Raise :class:`InputMismatchError` unless ``value`` is what ``name`` was fixed to (or
    ``also``, a value that means the same for the traced model)."""
    if not same_value(value, fixed) and (also is _NO_VALUE or not same_value(value, also)):
        raise InputMismatchError(fixed_input_message(owner, name, value, fixed, also))


@fx.node.has_side_effect
def _assert_input_given(value: Any, name: str, owner: str) -> None:
    """Raise :class:`InputMismatchError` when the traced input ``name`` is ``None``."""
    if value is None:
        raise InputMismatchError(missing_input_message(owner, name))


INPUT_CHECKS = (_assert_fixed_input, _assert_input_given)


def _is_fx_check(node: fx.Node) -> bool:
    """torch.fx's own check of a fixed input: ``_assert_is_none(ph, msg)`` or
    ``torch._assert(ph == value, msg)``."""
    if node.op != "call_function":
        return False
    if node.target is _assert_is_none:
        return True
    return node.target is operator.eq and bool(node.users) and all(
        u.op == "call_function" and u.target is torch._assert for u in node.users)


def install_fx_input_checks(gm: fx.GraphModule, fixed: Mapping[str, Any],
                            required: Iterable[str],
                            equivalent: Mapping[str, Any] | None = None) -> None:
    """Put clear input checks into the root graph of an fx-traced model.

    Args:
        gm: the traced model (changed in place and recompiled).
        fixed: parameters fixed at trace time, name -> value. Values of plain types (None,
            bool, int, float, str) get a check; torch.fx's own bare checks are removed.
        required: parameters traced as real inputs that must not be ``None``.
        equivalent: for a fixed parameter, a second value that means the same for the traced
            model (``use_cache=False`` once tracing switched the cache off).
    """
    equivalent = equivalent or {}
    graph = gm.graph
    owner = f"this {type(gm).__name__} (traced with torch.fx)"
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return
    by_name = {str(n.target): n for n in placeholders}
    checks: list[tuple[Any, tuple]] = []
    for name, value in fixed.items():
        ph = by_name.get(name)
        if ph is None or not isinstance(value, _SIMPLE):
            continue
        for user in list(ph.users):
            if _is_fx_check(user):
                for inner in list(user.users):
                    graph.erase_node(inner)
                graph.erase_node(user)
        args = (ph, name, value, owner)
        if name in equivalent and isinstance(equivalent[name], _SIMPLE):
            args += (equivalent[name],)
        checks.append((_assert_fixed_input, args))
    for name in required:
        ph = by_name.get(name)
        if ph is not None:
            checks.append((_assert_input_given, (ph, name, owner)))
    anchor = placeholders[-1]
    for fn, args in checks:
        with graph.inserting_after(anchor):
            anchor = graph.call_function(fn, args)
    gm.recompile()


# ---- export: a forward pre-hook ------------------------------------------------------------


class ExportedCallCheck:
    """Forward pre-hook (``with_kwargs=True``) of a model traced through torch.export.

    torch.export records one call: which inputs came by position and which by keyword, and
    every other parameter at its default. This hook binds each call to the original
    ``forward`` signature, raises :class:`InputMismatchError` for an input left out or an
    untraced input given another value than the one traced, drops untraced inputs given
    their traced value, and passes the rest on as they were traced.

    Args:
        class_name: the traced model's class, for messages.
        signature: the original ``forward`` signature (without ``self``).
        positional: names of the inputs traced by position, in order.
        keywords: names of the inputs traced by keyword.
        tensors: names of the traced inputs whose example value was a tensor (``None`` is
            then a missing input).
        equivalent: for an untraced input, a second value that means the same as its default
            for the traced model (``use_cache=False`` once tracing switched the cache off).
    """

    def __init__(self, class_name: str, signature: inspect.Signature, positional: Sequence[str],
                 keywords: Sequence[str], tensors: Collection[str],
                 equivalent: Mapping[str, Any] | None = None) -> None:
        self.owner = f"this {class_name} (traced through torch.export)"
        self.signature = signature
        self.positional = tuple(positional)
        self.keywords = tuple(keywords)
        self.tensors = frozenset(tensors)
        self.equivalent = dict(equivalent or {})
        self.constants: dict[str, Any] = {}

    @classmethod
    def for_call(cls, model: nn.Module, args: tuple, kwargs: Mapping[str, Any],
                 equivalent: Mapping[str, Any] | None = None) -> ExportedCallCheck | None:
        """The check for a model exported with ``model(*args, **kwargs)``; ``None`` when its
        signature cannot be read or takes ``*args`` (the inputs then pass unchecked)."""
        try:
            signature = inspect.signature(model.forward)
            bound = signature.bind(*args, **kwargs)
        except (TypeError, ValueError):
            return None
        params = signature.parameters
        if any(p.kind is p.VAR_POSITIONAL for p in params.values()):
            return None
        positional = list(bound.arguments)[:len(args)]
        values = dict(bound.arguments)
        for name, param in params.items():
            if param.kind is param.VAR_KEYWORD:
                values.update(values.pop(name, {}))
        tensors = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
        check = cls(type(model).__name__, signature, positional, list(kwargs), tensors, equivalent)
        check.constants = {k: v for k, v in values.items() if isinstance(v, _SIMPLE)}
        return check

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]
                 ) -> tuple[tuple, dict[str, Any]] | None:
        if is_fx_symbolic_tracing():
            return None
        params = self.signature.parameters
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise InputMismatchError(
                f"{self.owner} takes the inputs of the original forward: {exc}. It was traced "
                f"with {self._traced()}.") from None
        values: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            if params[name].kind is inspect.Parameter.VAR_KEYWORD:
                values.update(value)
            else:
                values[name] = value
        problems = []
        traced = self.positional + self.keywords
        for name in traced:
            if name in self.constants:
                problem = self._constant(name, values, params.get(name))
                if problem:
                    problems.append(problem)
            elif name not in values or (values[name] is None and name in self.tensors):
                problems.append(missing_input_message(self.owner, name))
        for name, value in values.items():
            if name in traced:
                continue
            param = params.get(name)
            default = param.default if param is not None else inspect.Parameter.empty
            if default is not inspect.Parameter.empty and same_value(value, default):
                continue  # the value it was traced with
            if name in self.equivalent and same_value(value, self.equivalent[name]):
                continue
            problems.append(fixed_input_message(self.owner, name, value, default,
                                                self.equivalent.get(name, _NO_VALUE)))
        if problems:
            raise InputMismatchError("\n".join(problems))
        return (tuple(values[n] for n in self.positional),
                {k: values[k] for k in self.keywords})

    def _constant(self, name: str, values: dict[str, Any], param: inspect.Parameter | None) -> str:
        """Check (and fill in) an input traced with a plain value, which export recorded as a
        constant; return the problem, or ``""``."""
        const = self.constants[name]
        present = name in values
        if present and same_value(values[name], const):
            return ""
        default = param.default if param is not None else inspect.Parameter.empty
        means_default = not present or same_value(values[name], default)
        same_as_default = same_value(const, default) or (
            name in self.equivalent and same_value(const, self.equivalent[name]))
        if means_default and same_as_default:
            values[name] = const  # leaving it out means what was traced
            return ""
        if not present:
            return missing_input_message(self.owner, name)
        return (f"{self.owner} was traced with {name}={describe_value(const)} (from the example "
                f"inputs), a value torch.export fixes, and cannot take "
                f"{name}={describe_value(values[name])}. Way out: pass {name}={const!r}, or trace "
                f"again with the value you will use.")

    def _traced(self) -> str:
        pos = ", ".join(self.positional) or "none"
        kw = ", ".join(f"{k}=..." for k in self.keywords) or "none"
        return f"positional inputs ({pos}) and keyword inputs ({kw})"
