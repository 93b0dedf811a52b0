"""The torch.export front end: ``export(strict=False)`` + ``unflatten``, real leaves put back.

Used where torch.fx cannot trace (Hugging Face transformers models). The unflattened model
calls every linear-like layer, dropout and normalisation layer and every
``nn.MultiheadAttention`` as the real module object, binds every other parameter and buffer
back to the caller's tensors, and runs compiled code instead of the node-by-node interpreter.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import warnings
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import torch
from torch import fx, nn

from surgery.map.graphs import graph_modules, is_interpreter_module, qualified
from surgery.map.leaves import MODE_TYPES, SIGNATURE_TYPES, is_linear_like

__all__ = ["trace_export"]


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

    Every input not among ``example_inputs`` / ``example_kwargs`` is traced at its default.
    The result is a map for analysis (roles, shapes, pictures); it is never run as the
    adapted model.

    The model is exported in eval mode: functional dropout inside a layer (``F.dropout``,
    ``dropout_p`` of attention) is recorded as off. An ``nn.MultiheadAttention`` called with
    different arguments at different calls cannot keep one signature; the model is then
    exported again with it decomposed into plain operations (no ``call_module`` node).
    """
    from torch.export import export, unflatten

    kwargs = dict(example_kwargs or {})
    keep = tuple(name for name, mod in model.named_modules() if isinstance(mod, SIGNATURE_TYPES))
    was_training = model.training
    model.eval()
    try:
        with _quiet():
            try:
                program = export(model, tuple(example_inputs), kwargs, strict=False,
                                 preserve_module_call_signature=keep)
            except Exception:
                if not keep:
                    raise
                keep = ()  # those modules stay decomposed; try once more without them
                program = export(model, tuple(example_inputs), kwargs, strict=False)
            unflat = unflatten(program)
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
        if name and (is_linear_like(mod) or isinstance(mod, MODE_TYPES) or name in names
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
