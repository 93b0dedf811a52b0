"""Tracing: torch.fx first, torch.export + ``unflatten`` where fx cannot go.

Both front ends return a tree of fx graphs in which every linear-like layer (``nn.Linear``,
``nn.Conv*``, ``nn.Embedding``, transformers' ``Conv1D``), ``nn.MultiheadAttention``, and
any module the user names is called through a ``call_module`` node on the real module object.
The traced model owns its module objects; its parameters share the caller's storage.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import io
import logging
import os
import traceback
import warnings
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import torch
from torch import fx, nn
from torch.export.unflatten import FlatArgsAdapter

from surgery.errors import TraceError
from surgery.graphs import graph_modules, is_interpreter_module, qualified
from surgery.params import share_weights_copy
from surgery.pass_base import SurgeryState

__all__ = [
    "LINEAR_TYPES",
    "SurgeryTracer",
    "is_linear_like",
    "is_leaf_type",
    "is_traced",
    "trace",
    "trace_fx",
    "trace_export",
]

LINEAR_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Embedding,
)

# Modules that export would otherwise bake into their graph with the training flag of the
# moment (dropout, batch statistics); they are called as real modules on both front ends.
_MODE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
)


# Modules that export keeps whole (``preserve_module_call_signature``) and that are then
# called as the real module object, as on the fx front end.
_SIGNATURE_TYPES: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)


def is_hf_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (a linear layer storing its weight as ``(in, out)``)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def is_linear_like(module: nn.Module) -> bool:
    """True for the layers adapters attach to: Linear, Conv, Embedding, transformers' Conv1D."""
    return isinstance(module, LINEAR_TYPES) or is_hf_conv1d(module)


def is_leaf_type(module: nn.Module) -> bool:
    """True for modules both front ends keep as opaque ``call_module`` nodes."""
    return is_linear_like(module) or isinstance(module, nn.MultiheadAttention)


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
    fx_error: BaseException | None = None
    traced: nn.Module | None = None
    used = frontend
    if frontend in ("auto", "fx"):
        try:
            traced = trace_fx(work, leaf_modules=leaf_modules, example_kwargs=kwargs)
            used = "fx"
        except Exception as exc:  # any failure inside user code while tracing
            fx_error = exc
            if frontend == "fx" or example_inputs is None:
                raise _trace_error(model, fx_error, None, example_inputs is None) from exc
    if traced is None:
        try:
            traced = trace_export(work, example_inputs or (), kwargs, leaf_modules=leaf_modules)
            used = "export"
        except Exception as exc:
            raise _trace_error(model, fx_error, exc, False) from exc
    traced._surgery = SurgeryState(
        frontend=used,
        source_class=type(model),
        example_inputs=example_inputs,
        example_kwargs=kwargs or None,
        source=share_weights_copy(model),
    )
    traced.train(model.training)
    if used == "fx" and example_inputs is not None:
        propagate_shapes(traced, example_inputs, kwargs)
    return traced


def trace_fx(
    model: nn.Module,
    *,
    leaf_modules: Collection[str | type] = (),
    example_kwargs: Mapping[str, Any] | None = None,
) -> fx.GraphModule:
    """Trace ``model`` with :class:`SurgeryTracer`; it is used, not copied.

    Forward parameters that have a default and are not in ``example_kwargs`` are fixed to
    their default (fx ``concrete_args``), so ``if attention_mask is not None`` traces the
    branch the model takes by default; the traced model still accepts the parameter by its
    name, and passing anything but the default raises. A parameter defaulting to ``None``
    stays a real input when the graph hands it only to leaf modules or to functions kept
    opaque with ``torch.fx.wrap`` (which can take ``None`` at run time): tracing is tried
    that way first.
    """
    defaults: dict[str, Any] = {}
    given = set(example_kwargs or ())
    for pname, param in inspect.signature(model.forward).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.default is not param.empty and pname not in given:
            defaults[pname] = param.default
    optional = {k for k, v in defaults.items() if v is None}
    if optional:
        try:
            gm = _trace_fx_once(model, leaf_modules,
                                {k: v for k, v in defaults.items() if k not in optional})
        except Exception:  # the general trace failed: fix every default below
            gm = None
        if gm is not None and all(_none_safe(n) for n in gm.graph.nodes
                                  if n.op == "placeholder" and n.target in optional):
            return gm
    return _trace_fx_once(model, leaf_modules, defaults)


def _trace_fx_once(model: nn.Module, leaf_modules: Collection[str | type],
                   concrete: dict[str, Any]) -> fx.GraphModule:
    tracer = SurgeryTracer(leaf_modules)
    graph = tracer.trace(model, concrete_args=concrete or None)
    for node in graph.nodes:  # fx names a fixed parameter "<name>_1"; keep the user's keyword
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


def _dynamic_shapes(model: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> dict:
    from torch.export import Dim

    bound = inspect.signature(model.forward).bind(*args, **kwargs)

    def spec(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return {d: Dim.AUTO for d in range(min(value.dim(), 2))} or None
        if isinstance(value, (tuple, list)):
            return type(value)(spec(v) for v in value)
        if isinstance(value, dict):
            return {k: spec(v) for k, v in value.items()}
        return None

    return {k: spec(v) for k, v in bound.arguments.items()}


def trace_export(
    model: nn.Module,
    example_inputs: tuple,
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    leaf_modules: Collection[str | type] = (),
) -> nn.Module:
    """Export ``model`` (``strict=False``), unflatten it, and put the real leaves back.

    ``torch.export.unflatten`` turns every submodule into an ``InterpreterModule`` holding
    cloned weights. This function then (1) replaces the ``InterpreterModule`` of every
    linear-like layer, dropout and normalisation layer that takes one tensor and returns one
    with the real module object, called with that tensor alone, and every
    ``nn.MultiheadAttention`` (exported with ``preserve_module_call_signature``) with the
    real module called with its original arguments, so passes see the same
    ``call_module`` nodes as on the fx front end and ``train()``/``eval()`` keep working;
    (2) binds every remaining parameter and buffer back to ``model``'s tensors by name, so
    no weight is copied; (3) switches each graph to compiled code instead of the
    node-by-node interpreter.

    The model is exported in eval mode: functional dropout inside a layer (``F.dropout``,
    ``dropout_p`` of attention) is recorded as off. An ``nn.MultiheadAttention`` called with
    different arguments at different calls cannot keep one signature; the model is then
    exported again with it decomposed into plain operations (no ``call_module`` node).
    """
    from torch.export import export, unflatten

    kwargs = dict(example_kwargs or {})
    keep = tuple(name for name, mod in model.named_modules() if isinstance(mod, _SIGNATURE_TYPES))
    was_training = model.training
    model.eval()
    try:
        with _quiet():
            dynamic = _dynamic_shapes(model, tuple(example_inputs), kwargs)
            try:
                program = export(model, tuple(example_inputs), kwargs, strict=False,
                                 dynamic_shapes=dynamic, preserve_module_call_signature=keep)
            except Exception:
                if not keep:
                    raise
                keep = ()  # those modules stay decomposed; try once more without them
                program = export(model, tuple(example_inputs), kwargs, strict=False,
                                 dynamic_shapes=dynamic)
            unflat = unflatten(program, flat_args_adapter=_ExportedInputs(type(model).__name__))
    finally:
        model.train(was_training)
    names = {x for x in leaf_modules if isinstance(x, str)}
    types = tuple(x for x in leaf_modules if isinstance(x, type))
    _restore_signature_modules(unflat, model, set(keep))
    _restore_real_modules(unflat, model, names, types)
    _bind_tensors(unflat, model)
    for _, mod in graph_modules(unflat):  # the root too: its compiled copy still holds the
        if is_interpreter_module(mod) or mod is unflat:  # InterpreterModules replaced above
            for node in mod.graph.nodes:  # a submodule named "self" (BERT) would shadow self
                if node.name == "self":
                    node._rename("self_out")
            mod._run_with_interpreter = False
            mod.graph.owning_module = mod
            mod.finalize()
    del program
    gc.collect()  # unflatten's cloned weights sit in reference cycles: free them now
    return unflat


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence what export writes while it works: warnings, shape-guard log lines and, on
    failure, the partial graph it prints to stderr (the ``TraceError`` says what failed)."""
    logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _spec_inputs(spec: Any) -> tuple[int, list[str]]:
    """``(number of positional inputs, keyword names)`` of an ``(args, kwargs)`` TreeSpec."""
    try:
        args_spec, kwargs_spec = spec.children()
        return args_spec.num_children, list(kwargs_spec.context or [])
    except Exception:  # an unexpected layout: say nothing precise
        return -1, []


class _ExportedInputs(FlatArgsAdapter):
    """Turns a call of an exported model with other inputs than it was traced with into a
    clear ``TypeError`` (``unflatten`` otherwise says only "no flat args adapter")."""

    def __init__(self, class_name: str) -> None:
        self.class_name = class_name

    def adapt(self, target_spec: Any, input_spec: Any, input_args: list[Any],
              metadata: dict[str, Any] | None = None, obj: Any | None = None) -> list[Any]:
        n_want, kw_want = _spec_inputs(target_spec)
        n_got, kw_got = _spec_inputs(input_spec)
        missing = [k for k in kw_want if k not in kw_got]
        extra = [k for k in kw_got if k not in kw_want]
        raise TypeError(
            f"this {self.class_name} was traced through torch.export with {n_want} positional "
            f"input(s) and keyword input(s) {kw_want}, and takes exactly those; it was "
            f"called with {n_got} positional input(s) and keyword input(s) {kw_got}"
            + (f" (missing: {missing})" if missing else "")
            + (f" (not traced: {extra})" if extra else "")
            + ". Way out: pass the same inputs (e.g. attention_mask=torch.ones_like("
            "input_ids) for no padding), or trace again with example_inputs / "
            "example_kwargs that have the inputs you will use.")


def _from_call_spec(arg: Any) -> bool:
    """True for an input that ``unflatten`` unpacked from a preserved call signature."""
    import operator

    import torch.utils._pytree as pytree

    node = arg
    for _ in range(2):
        if not (isinstance(node, fx.Node) and node.op == "call_function"
                and node.target is operator.getitem):
            return False
        node = node.args[0]
    return isinstance(node, fx.Node) and node.target is pytree.tree_unflatten


def _restore_signature_modules(unflat: nn.Module, model: nn.Module, keep: set[str]) -> None:
    """Put the real module back at every call of a module exported with its signature kept.

    ``unflatten`` calls such a module with the original arguments, unpacked from a pytree;
    it can also pass stray inputs of the parent graph in front of them, which are dropped.
    """
    if not keep:
        return
    originals = dict(model.named_modules(remove_duplicate=False))
    for prefix, owner in graph_modules(unflat):
        for node in owner.graph.nodes:
            if node.op != "call_module":
                continue
            target = str(node.target)
            qname = qualified(prefix, target)
            if qname not in keep:
                continue
            node.args = tuple(a for a in node.args if _from_call_spec(a))
            parent_name, _, leaf = target.rpartition(".")
            parent = owner.get_submodule(parent_name) if parent_name else owner
            setattr(parent, leaf, originals[qname])


def _tensor_placeholders(mod: nn.Module) -> list[int]:
    out = []
    for i, node in enumerate(n for n in mod.graph.nodes if n.op == "placeholder"):
        if isinstance(node.meta.get("val"), torch.Tensor):
            out.append(i)
    return out


def _returns_single_tensor(mod: nn.Module) -> bool:
    out = next(n for n in reversed(mod.graph.nodes) if n.op == "output")
    val = out.args[0]
    if isinstance(val, (tuple, list)):
        if len(val) != 1:
            return False
        val = val[0]
    return isinstance(val, fx.Node) and isinstance(val.meta.get("val"), torch.Tensor)


def _restore_real_modules(unflat: nn.Module, model: nn.Module, names: set[str],
                          types: tuple[type, ...]) -> None:
    originals = dict(model.named_modules(remove_duplicate=False))
    wanted = {
        name
        for name, mod in originals.items()
        if name and (is_linear_like(mod) or isinstance(mod, _MODE_TYPES) or name in names
                     or (types and isinstance(mod, types)))
    }
    for prefix, owner in graph_modules(unflat):
        for node in list(owner.graph.nodes):
            if node.op != "call_module":
                continue
            qname = qualified(prefix, str(node.target)).split("@")[0]
            if qname not in wanted:
                continue
            callee = owner.get_submodule(str(node.target))
            if not is_interpreter_module(callee):
                continue
            tensor_slots = _tensor_placeholders(callee)
            if len(tensor_slots) != 1 or not _returns_single_tensor(callee):
                continue
            (slot,) = tensor_slots
            if slot >= len(node.args) or node.kwargs:
                continue
            node.args = (node.args[slot],)
            target = str(node.target)
            base = target.split("@")[0]
            parent_name, _, leaf = base.rpartition(".")
            parent = owner.get_submodule(parent_name) if parent_name else owner
            setattr(parent, leaf, originals[qname])
            if target != base:  # a later call of a shared module: call the one real module
                tparent, _, tleaf = target.rpartition(".")
                delattr(owner.get_submodule(tparent) if tparent else owner, tleaf)
                node.target = base


def _bind_tensors(unflat: nn.Module, model: nn.Module) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    for mod_name, mod in unflat.named_modules(remove_duplicate=False):
        for key in list(mod._parameters):
            full = qualified(mod_name, key)
            if full in params and mod._parameters[key] is not params[full]:
                mod._parameters[key] = params[full]
        for key in list(mod._buffers):
            full = qualified(mod_name, key)
            if full in buffers and mod._buffers[key] is not buffers[full]:
                mod._buffers[key] = buffers[full]


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


def _user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    frames = traceback.extract_tb(exc.__traceback__)
    torch_dir = os.path.dirname(torch.__file__)
    ours = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename)
        if path.startswith(torch_dir) or path.startswith(os.path.join(ours, "surgery")):
            continue
        if "<" in frame.filename:  # generated code
            continue
        return frame
    return frames[-1] if frames else None


def _failing_module(model: nn.Module, frame: traceback.FrameSummary | None) -> str:
    if frame is None:
        return type(model).__name__
    for name, mod in model.named_modules():
        fwd = type(mod).forward
        try:
            code = fwd.__code__
        except AttributeError:
            continue
        if (os.path.abspath(code.co_filename) == os.path.abspath(frame.filename)
                and frame.name == "forward"):
            lines = inspect.getsourcelines(fwd)
            if lines[1] <= (frame.lineno or 0) < lines[1] + len(lines[0]):
                return f"{name or '<root>'} ({type(mod).__name__})"
    return type(model).__name__


def _describe(exc: BaseException | None, model: nn.Module) -> str:
    if exc is None:
        return "not tried"
    frame = _user_frame(exc)
    where = ""
    if frame is not None:
        where = f"\n    at {frame.filename}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}{where}\n    in module {_failing_module(model, frame)}"


def _trace_error(model: nn.Module, fx_exc: BaseException | None, export_exc: BaseException | None,
                 no_inputs: bool) -> TraceError:
    lines = [f"could not trace {type(model).__name__}."]
    lines.append(f"  torch.fx: {_describe(fx_exc, model)}")
    if no_inputs:
        lines.append("  torch.export: not tried, because no example_inputs were given.")
        lines.append(
            "Way out: pass example_inputs=(...) (and example_kwargs={...} for keyword inputs) "
            "so torch.export can trace the model, or name the module that breaks tracing in "
            "leaf_modules=[...] to keep it opaque."
        )
    else:
        lines.append(f"  torch.export: {_describe(export_exc, model)}")
        lines.append(
            "Way out: name the module that breaks tracing in leaf_modules=[...] to keep it "
            "opaque, or check that example_inputs/example_kwargs run the model eagerly."
        )
    return TraceError("\n".join(lines))
