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

import contextlib
import copy
import inspect
import warnings
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from surgery.errors import InputTypeError
from surgery.map.export_frontend import trace_export
from surgery.map.leaves import LINEAR_TYPES, is_hf_conv1d, is_leaf_type, is_linear_like
from surgery.map.trace_errors import trace_error
from surgery.map.wrappers import memo_compiled_as_bare, unwrap

__all__ = [
    "LINEAR_TYPES",
    "SurgeryTracer",
    "as_input_tuple",
    "is_hf_conv1d",
    "is_linear_like",
    "is_leaf_type",
    "MapInfo",
    "is_map",
    "weight_free_copy",
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
        super().__init__()
        self.leaf_names = {x for x in leaf_modules if isinstance(x, str)}
        self.leaf_types = tuple(x for x in leaf_modules if isinstance(x, type))

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_leaf_type(m) or module_qualified_name in self.leaf_names:
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)


@dataclass
class MapInfo:
    """What a map knows about how it was made, kept on it as ``._surgery_map``.

    Attributes:
        frontend: ``"fx"`` or ``"export"``.
        source_class: the class of the model that was traced.
        example_inputs / example_kwargs: what tracing was given, if anything.
        notes: what tracing changed on its private copy (``config.use_cache`` switched off,
            ...), one sentence each.
        weight_free: ``True`` when the map was traced from a meta-device copy (its tensors
            have shapes but no storage).
    """

    frontend: str
    source_class: type
    example_inputs: tuple | None = None
    example_kwargs: dict | None = None
    notes: list[str] = field(default_factory=list)
    weight_free: bool = False


def is_map(model: nn.Module) -> bool:
    """True when ``model`` is a map made by :func:`trace`."""
    return isinstance(getattr(model, "_surgery_map", None), MapInfo)


def weight_free_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers live on the meta device, and
    whose modules carry no hooks (the user's hooks are not run on the map's meta tensors).

    Costs no copy of the weights: tracing reads shapes and dtypes only.
    """
    memo: dict[int, Any] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in memo:
            continue
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        memo_compiled_as_bare(model, memo, copy.deepcopy)  # a compiled block: its bare module
        copied = copy.deepcopy(unwrap(model)[0], memo)
    for mod in copied.modules():  # the map is traced and run on meta tensors: no user hooks
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                      "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
                      "_backward_hooks", "_backward_pre_hooks"):
            getattr(mod, hooks).clear()
    return copied


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to("meta")
    if isinstance(value, (tuple, list)):
        return type(value)(_to_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_meta(v) for k, v in value.items()}
    return value


def as_input_tuple(example_inputs: Any, where: str) -> tuple | None:
    """``example_inputs`` as a tuple of positional inputs: a lone input is wrapped.

    Args:
        example_inputs: ``None``, a tuple, or one positional input (a tensor).
        where: the function the inputs were given to, for the message.

    Raises:
        InputTypeError: ``example_inputs`` is a mapping; keyword inputs belong in
            ``example_kwargs=`` (a forward would get the whole dict as its first input).
    """
    if isinstance(example_inputs, Mapping):
        keys = ", ".join(repr(k) for k in list(example_inputs)[:4])
        raise InputTypeError(
            f"{where}: example_inputs= is a dict (keys {keys}); example_inputs are the "
            f"positional inputs, a tuple, and a dict there would reach forward as its first "
            f"argument. Way out: pass the dict as example_kwargs={{...}} (keyword inputs "
            f"alone are enough), or its values as example_inputs=(...).")
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        return (example_inputs,)
    return example_inputs


def trace(
    model: nn.Module,
    example_inputs: tuple | None = None,
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    leaf_modules: Collection[str | type] = (),
    frontend: str = "auto",
) -> nn.Module:
    """Build the map of ``model``: its whole-model graph tree, for analysis only.

    The map is what selection by role, the audit and the pictures read; it is never run as
    the adapted model (that is the user's own model with site graphs inside, see
    :func:`surgery.apply_passes`). It is traced from a weight-free (meta-device) copy, so it
    costs no second copy of the weights. torch.fx is tried first (no inputs needed); when
    it fails and example inputs are given (positional, keyword or both: keyword inputs
    alone are traced with no positional ones), torch.export (``strict=False``) with
    ``unflatten`` is used, with the shapes of the example inputs (the map is never run, so
    nothing needs other sizes); where export cannot run on meta tensors, it runs on ``model`` itself (whose
    cache setting is put back). Forward parameters not among the example inputs are traced at their default. A
    Hugging Face model whose config has ``use_cache=True`` is traced with ``use_cache=False``
    (a cache object cannot be a graph output); ``._surgery_map.notes`` says so.

    Every module keeps its qualified name in the map, so a role found there names the
    module of the user's model.

    Args:
        model: the module to trace. It is not changed.
        example_inputs: positional inputs, as a tuple, used by export and for shapes.
        example_kwargs: keyword inputs (``attention_mask``).
        leaf_modules: extra modules to keep opaque (qualified names or classes).
        frontend: ``"auto"``, ``"fx"`` or ``"export"``.

    Returns:
        A ``torch.fx.GraphModule`` (fx) or ``torch.export.UnflattenedModule`` (export)
        carrying a :class:`MapInfo` as ``._surgery_map``. Its tensors are on the meta device
        when ``._surgery_map.weight_free``.

    Raises:
        TraceError: neither front end could trace the model; the message names the module,
            the source line that broke tracing, and the way out.
        InputTypeError: ``example_inputs`` is a dict (keyword inputs go in ``example_kwargs``).
        ValueError: ``frontend`` is not one of the three choices.
    """
    if frontend not in ("auto", "fx", "export"):
        raise ValueError(f"frontend must be 'auto', 'fx' or 'export', got {frontend!r}")
    example_inputs = as_input_tuple(example_inputs, "trace")
    kwargs = dict(example_kwargs or {})
    has_inputs = example_inputs is not None or bool(kwargs)
    model = unwrap(model)[0]  # torch.compile / DDP wrappers: the map is the bare model's
    work = weight_free_copy(model)
    notes = switch_off_cache(work)
    fx_error: BaseException | None = None
    traced: nn.Module | None = None
    used = frontend
    weight_free = True
    if frontend in ("auto", "fx"):
        try:
            traced = _trace_fx(work, leaf_modules, example_inputs or (), kwargs)
            used = "fx"
        except Exception as exc:  # any failure inside user code while tracing
            fx_error = exc
            if frontend == "fx" or not has_inputs:  # export needs inputs (keywords alone do)
                raise trace_error(model, fx_error, None, not has_inputs) from exc
    if traced is None:
        try:
            traced = trace_export(work, _to_meta(example_inputs or ()), _to_meta(kwargs),
                                  leaf_modules=leaf_modules)
            used = "export"
        except Exception:  # some code cannot run on meta tensors: trace shared weights
            try:
                with _cache_switched_off(model):
                    traced = trace_export(model, example_inputs or (), kwargs,
                                          leaf_modules=leaf_modules)
                used, weight_free = "export", False
            except Exception as exc:
                raise trace_error(model, fx_error, exc, False) from exc
    traced._surgery_map = MapInfo(
        frontend=used,
        source_class=type(model),
        example_inputs=example_inputs,
        example_kwargs=kwargs or None,
        notes=notes,
        weight_free=weight_free,
    )
    traced.train(model.training)
    if used == "fx" and has_inputs:
        propagate_shapes(traced, _to_meta(example_inputs or ()), _to_meta(kwargs))
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


@contextlib.contextmanager
def _cache_switched_off(model: nn.Module) -> Iterator[None]:
    """:func:`switch_off_cache` on ``model`` itself, undone on exit."""
    configs = [mod.__dict__["config"] for _, mod in model.named_modules()
               if getattr(mod.__dict__.get("config"), "use_cache", None) is True]
    switch_off_cache(model)
    try:
        yield
    finally:
        for config in configs:
            config.use_cache = True


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
    attention_mask is not None`` traces the branch the model takes by default. Only the
    number of ``example_inputs`` matters (which parameters they give), not their values.
    """
    return _trace_fx(model, leaf_modules, example_inputs, example_kwargs or {})


def _trace_fx(model: nn.Module, leaf_modules: Collection[str | type], example_inputs: tuple,
              example_kwargs: Mapping[str, Any]) -> fx.GraphModule:
    concrete = _defaults_not_given(model, len(example_inputs), example_kwargs)
    tracer = SurgeryTracer(leaf_modules)
    with warnings.catch_warnings():
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
    gm.train(model.training)
    return gm


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
