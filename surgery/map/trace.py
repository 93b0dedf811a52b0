"""Tracing: torch.fx first, torch.export + ``unflatten`` where fx cannot go.

Both front ends return a tree of fx graphs in which every linear-like layer (``nn.Linear``,
``nn.Conv*``, ``nn.Embedding``, transformers' ``Conv1D``), ``nn.MultiheadAttention``, and
any module the user names is called through a ``call_module`` node on the real module object.
The traced model owns its module objects; its parameters share the caller's storage.

This module holds :func:`trace` and the torch.fx front end; the torch.export front end is in
:mod:`surgery.map.export_frontend`, the checks of call-time inputs in :mod:`surgery.map.trace_inputs`
and the :class:`TraceError` message in :mod:`surgery.map.trace_errors`.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Collection, Mapping
from typing import Any

import torch
from torch import fx, nn

from surgery.map.export_frontend import trace_export
from surgery.map.leaves import LINEAR_TYPES, is_hf_conv1d, is_leaf_type, is_linear_like
from surgery.sites.params import share_weights_copy
from surgery.pass_base import SurgeryState
from surgery.map.trace_errors import trace_error
from surgery.map.trace_inputs import INPUT_CHECKS, install_fx_input_checks

__all__ = [
    "LINEAR_TYPES",
    "SurgeryTracer",
    "is_hf_conv1d",
    "is_linear_like",
    "is_leaf_type",
    "is_traced",
    "trace",
    "trace_fx",
    "trace_export",
]


class SurgeryTracer(fx.Tracer):
    """A ``torch.fx.Tracer`` whose leaves are linear-like layers, attention modules and more.

    Args:
        leaf_modules: extra leaves, each a qualified module name (``"encoder.block"``) or a
            module class. Everything torch.fx treats as a leaf by default (modules defined in
            ``torch.nn``) stays a leaf.
    """

    def __init__(self, leaf_modules: Collection[str | type] = ()) -> None:
        # The input checks stay calls when a saved traced model is traced again on load.
        super().__init__(autowrap_functions=INPUT_CHECKS)
        self.leaf_names = {x for x in leaf_modules if isinstance(x, str)}
        self.leaf_types = tuple(x for x in leaf_modules if isinstance(x, type))

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_leaf_type(m) or module_qualified_name in self.leaf_names:
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def is_traced(model: nn.Module) -> bool:
    """True when ``model`` came out of :func:`trace` (or :func:`surgery.apply_passes`)."""
    return isinstance(getattr(model, "_surgery", None), SurgeryState)


def trace(
    model: nn.Module,
    example_inputs: tuple | None = None,
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    leaf_modules: Collection[str | type] = (),
    frontend: str = "auto",
) -> nn.Module:
    """Trace ``model`` into a tree of fx graphs that passes can rewrite.

    torch.fx is tried first (no inputs needed). When it fails and ``example_inputs`` are
    given, torch.export (``strict=False``) with ``unflatten`` is used, with dimensions 0 and 1
    (batch and sequence) of every tensor input exported dynamic.

    Forward parameters that are not among the example inputs are fixed to their default
    (recorded as ``._surgery.fixed_inputs``); calling the traced model with another value
    for one, or without an input it was traced with, raises
    :class:`surgery.errors.InputMismatchError` naming it. A Hugging Face model whose config
    has ``use_cache=True`` is traced with ``use_cache=False`` on the private copy (a cache
    object cannot be a graph output); ``._surgery.notes`` says so.

    Args:
        model: the module to trace. It is not changed: the result holds its own module and
            ``Parameter`` objects, sharing the weights' storage.
        example_inputs: positional inputs, as a tuple, used by export and for shapes.
        example_kwargs: keyword inputs (``attention_mask``); the traced model accepts them too.
        leaf_modules: extra modules to keep opaque (qualified names or classes).
        frontend: ``"auto"``, ``"fx"`` or ``"export"``.

    Returns:
        A ``torch.fx.GraphModule`` (fx) or ``torch.export.UnflattenedModule`` (export) with
        the same forward signature, carrying its bookkeeping as ``._surgery``.

    Raises:
        TraceError: neither front end could trace the model; the message names the module,
            the source line that broke tracing, and the way out.
        ValueError: ``frontend`` is not one of the three choices.
    """
    if frontend not in ("auto", "fx", "export"):
        raise ValueError(f"frontend must be 'auto', 'fx' or 'export', got {frontend!r}")
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    kwargs = dict(example_kwargs or {})
    work = share_weights_copy(model)
    notes = switch_off_cache(work)
    equivalent = {"use_cache": False} if notes else {}
    fx_error: BaseException | None = None
    traced: nn.Module | None = None
    fixed: dict[str, Any] = {}
    used = frontend
    if frontend in ("auto", "fx"):
        try:
            traced, fixed = _trace_fx(work, leaf_modules, example_inputs or (), kwargs, equivalent)
            used = "fx"
        except Exception as exc:  # any failure inside user code while tracing
            fx_error = exc
            if frontend == "fx" or example_inputs is None:
                raise trace_error(model, fx_error, None, example_inputs is None) from exc
    if traced is None:
        try:
            traced = trace_export(work, example_inputs or (), kwargs, leaf_modules=leaf_modules,
                                  equivalent=equivalent)
            used = "export"
        except Exception as exc:
            raise trace_error(model, fx_error, exc, False) from exc
        fixed = _defaults_not_given(work, len(example_inputs or ()), kwargs)
    traced._surgery = SurgeryState(
        frontend=used,
        source_class=type(model),
        example_inputs=example_inputs,
        example_kwargs=kwargs or None,
        source=share_weights_copy(model),
        fixed_inputs=fixed,
        notes=notes,
    )
    traced.train(model.training)
    if used == "fx" and example_inputs is not None:
        propagate_shapes(traced, example_inputs, kwargs)
    return traced


def switch_off_cache(model: nn.Module) -> list[str]:
    """Set ``config.use_cache = False`` on every transformers-style config in ``model``.

    A causal LM with ``use_cache=True`` returns a key/value cache object, which neither front
    end can put in a graph. Call this only on a private copy: the config object is changed.

    Returns:
        One note per config changed, for ``SurgeryState.notes``.
    """
    notes = []
    seen: set[int] = set()
    for name, mod in model.named_modules():
        config = mod.__dict__.get("config")
        if config is None or id(config) in seen or getattr(config, "use_cache", None) is not True:
            continue
        seen.add(id(config))
        try:
            config.use_cache = False
        except Exception:  # a frozen config: leave it, tracing says what fails
            continue
        where = f"{name}.config" if name else "config"
        notes.append(f"{where}.use_cache was set to False on the traced copy (a key/value cache "
                     f"cannot be a graph output); the model given keeps use_cache=True, and the "
                     f"traced model returns no cache.")
    return notes


def _positional_names(model: nn.Module, n: int) -> list[str]:
    """Names of the first ``n`` forward parameters (those positional inputs bind to)."""
    names = []
    for pname, param in inspect.signature(model.forward).parameters.items():
        positional = param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD)
        if len(names) >= n or not positional:
            break
        names.append(pname)
    return names


def _defaults_not_given(model: nn.Module, n_args: int, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Forward parameters with a default that neither ``n_args`` positional inputs nor
    ``kwargs`` give: the inputs tracing fixes to their default."""
    given = set(kwargs) | set(_positional_names(model, n_args))
    out = {}
    for pname, param in inspect.signature(model.forward).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.default is not param.empty and pname not in given:
            out[pname] = param.default
    return out


def trace_fx(
    model: nn.Module,
    *,
    leaf_modules: Collection[str | type] = (),
    example_inputs: tuple = (),
    example_kwargs: Mapping[str, Any] | None = None,
) -> fx.GraphModule:
    """Trace ``model`` with :class:`SurgeryTracer`; it is used, not copied.

    Forward parameters that have a default and are not among the example inputs (by
    position or keyword) are fixed to their default (fx ``concrete_args``), so ``if
    attention_mask is not None`` traces the branch the model takes by default; the traced
    model still accepts the parameter by its name, and passing anything but the default
    raises :class:`surgery.errors.InputMismatchError`. A parameter defaulting to ``None``
    stays a real input when the graph hands it only to leaf modules or to functions kept
    opaque with ``torch.fx.wrap`` (which can take ``None`` at run time): tracing is tried
    that way first. A parameter defaulting to ``None`` that the example inputs give is a
    real input; unless ``None`` can flow through the graph, calling without it raises
    :class:`surgery.errors.InputMismatchError`.

    Only the number of ``example_inputs`` matters (which parameters they give), not their
    values.
    """
    return _trace_fx(model, leaf_modules, example_inputs, example_kwargs or {})[0]


def _trace_fx(model: nn.Module, leaf_modules: Collection[str | type], example_inputs: tuple,
              example_kwargs: Mapping[str, Any], equivalent: Mapping[str, Any] | None = None
              ) -> tuple[fx.GraphModule, dict[str, Any]]:
    """:func:`trace_fx`, also returning the parameters fixed to their default."""
    defaults = _defaults_not_given(model, len(example_inputs), example_kwargs)
    given_optional = {pname for pname, param in inspect.signature(model.forward).parameters.items()
                      if param.default is None and pname not in defaults}
    optional = {k for k, v in defaults.items() if v is None}
    gm = None
    fixed = defaults
    if optional:
        fixed = {k: v for k, v in defaults.items() if k not in optional}
        try:
            gm = _trace_fx_once(model, leaf_modules, fixed)
        except Exception:  # the general trace failed: fix every default below
            gm = None
        if gm is not None and not all(_none_safe(n) for n in gm.graph.nodes
                                      if n.op == "placeholder" and n.target in optional):
            gm = None
    if gm is None:
        fixed = defaults
        gm = _trace_fx_once(model, leaf_modules, fixed)
    required = [str(n.target) for n in gm.graph.nodes
                if n.op == "placeholder" and n.target in given_optional and not _none_safe(n)]
    install_fx_input_checks(gm, fixed, required, equivalent)
    return gm, dict(fixed)


def _trace_fx_once(model: nn.Module, leaf_modules: Collection[str | type],
                   concrete: dict[str, Any]) -> fx.GraphModule:
    tracer = SurgeryTracer(leaf_modules)
    with warnings.catch_warnings():  # inputs fx cannot check get a check of ours, or none
        warnings.filterwarnings("ignore", message="Was not able to add assertion")
        graph = tracer.trace(model, concrete_args=concrete or None)
    for node in graph.nodes:  # fx names a fixed parameter "<name>_1"; keep the user's keyword
        if isinstance(node.type, str):  # a postponed annotation: code that cannot be pickled
            node.type = None
        if node.op != "placeholder":
            continue
        for pname, value in concrete.items():
            if node.target == f"{pname}_1" and not isinstance(value, (tuple, list, dict)):
                node.target = pname
    gm = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
    # GraphModule copies only what the graph references; keep the rest of the bookkeeping.
    gm.train(model.training)
    return gm


_OPAQUE_SKIP = ("torch", "_operator", "operator", "builtins", "math")


def _none_safe(placeholder: fx.Node) -> bool:
    """True when ``None`` can flow into every user of ``placeholder`` at run time."""
    for user in placeholder.users:
        if user.op == "call_module":
            continue
        if user.op == "call_function":
            module = getattr(user.target, "__module__", None) or ""
            if module and module.split(".")[0] not in _OPAQUE_SKIP:  # a torch.fx.wrap-ped function
                continue
        return False
    return True


def propagate_shapes(traced: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> None:
    """Record ``node.meta["val"]`` (a meta tensor) on every node of an fx-traced model.

    Runs the graph once on the example inputs under ``torch.no_grad``; failures are
    ignored (shapes are an annotation, not a requirement).
    """
    if not isinstance(traced, fx.GraphModule):
        return

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            if isinstance(result, torch.Tensor):
                n.meta["val"] = torch.empty(result.shape, dtype=result.dtype, device="meta")
            return result

    try:
        placeholders = [n.target for n in traced.graph.nodes if n.op == "placeholder"]
        bound = inspect.signature(traced.forward).bind(*args, **kwargs)
        bound.apply_defaults()
        values = [bound.arguments.get(str(p)) for p in placeholders]
        with torch.no_grad():
            _Recorder(traced).run(*values)
    except Exception:  # shapes are optional
        return
