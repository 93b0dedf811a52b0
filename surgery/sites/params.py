"""Copy-on-write parameter handling: private module trees that share the caller's weights.

The adapted model holds its own ``Parameter`` objects (so freezing them leaves the caller's
``requires_grad`` alone) whose storage is the caller's (so a 7B model is not copied). Buffers
are cloned, since training updates some of them in place (BatchNorm running statistics).
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from collections.abc import Iterator

import torch
import torch.fx
from torch import nn

from surgery.errors import ConfigError

__all__ = ["share_weights_copy", "snapshot", "restore", "is_adapter_parameter", "adapter_parameters"]


_EMPTY_COPYABLE = (dict, OrderedDict, set, list)


def share_weights_copy(model: nn.Module) -> nn.Module:
    """Deep-copy ``model``'s module tree, sharing parameter storage with it.

    Raises:
        ConfigError: some attribute of ``model`` cannot be deep-copied.

    Returns:
        A module of the same class whose parameters are new ``nn.Parameter`` objects viewing
        the same storage (same ``data_ptr``, same ``requires_grad``), and whose buffers and
        other tensors are copies. Submodules, hooks and the ``training`` flag are copied.
        Parameters of adapter modules (already adapted models) are copied, not shared, since
        an optimizer writes into them.
    """
    memo: dict[int, object] = {}
    state = getattr(model, "_surgery", None)
    if state is not None and state.cached_map is not None:  # the map is read-only: share it
        memo[id(state.cached_map)] = state.cached_map
    for value in getattr(state, "originals", {}).values():  # never written: shared too
        memo[id(value)] = value
    adapter_ids = {id(p) for _, p in adapter_parameters(model)}
    for param in model.parameters():
        if id(param) not in memo:
            data = param.detach()
            if id(param) in adapter_ids:  # adapters are trained in place: never share them
                data = data.clone()
            memo[id(param)] = nn.Parameter(data, requires_grad=param.requires_grad)
    # Tensors computed from parameters and kept as plain attributes (a pruned layer's
    # ``weight``, recomputed by its pre-hook at every call) cannot be deep-copied: the copy
    # holds them detached until its next call recomputes them.
    for mod in model.modules():
        for val in vars(mod).values():
            if isinstance(val, torch.Tensor) and val.grad_fn is not None and id(val) not in memo:
                memo[id(val)] = val.detach()
    # Empty containers (most of a module's hook dictionaries): a new empty one of the same
    # type is their deep copy, without ``copy``'s reduce protocol (half the copy's time on a
    # small transformers model). Exact builtin types only; sharing is kept through the memo.
    for mod in model.modules():
        for val in vars(mod).values():
            if type(val) in _EMPTY_COPYABLE and not val and id(val) not in memo:
                memo[id(val)] = type(val)()
    # Lists of graph nodes kept beside a graph (``UnflattenedModule.input_placeholders``)
    # must point into the copied graph; copying them node by node would copy the example
    # values (fake tensors, which cannot be copied) and detach them from any graph.
    node_lists = []
    for mod in model.modules():
        for val in vars(mod).values():
            if (isinstance(val, list) and val and id(val) not in memo
                    and all(isinstance(v, torch.fx.Node) for v in val)):
                fresh: list = []
                memo[id(val)] = fresh
                node_lists.append((val, fresh))
    with warnings.catch_warnings():  # torch's own pytree specs warn when copied
        warnings.simplefilter("ignore", FutureWarning)
        try:
            copied = copy.deepcopy(model, memo)
        except Exception as exc:  # an attribute that cannot be copied (a lock, a hook's tensor)
            raise ConfigError(
                f"could not copy {type(model).__name__} to adapt it ({type(exc).__name__}: "
                f"{exc}). The adapted model is a copy that shares the weights' storage, so that "
                f"your model is left as it is; some attribute of this model cannot be deep-"
                f"copied (a lock, a tensor made under torch.inference_mode, the weight of the "
                f"old torch.nn.utils.weight_norm). Way out: apply_passes(..., inplace=True) "
                f"adapts the model itself, without a copy.") from exc
    for old, fresh in node_lists:
        for node in old:
            new_graph = memo.get(id(node.graph))
            new_node = None
            if isinstance(new_graph, torch.fx.Graph):
                new_node = next((n for n in new_graph.nodes if n.name == node.name), None)
            fresh.append(new_node if new_node is not None else node)
    return copied


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
          "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


def snapshot(model: nn.Module) -> dict:
    """Record everything :func:`restore` needs to put ``model`` back after a failed edit.

    The snapshot is cheap: it keeps references (module objects, parameter objects, graphs
    copied node for node), never weight copies. Weight *values* are not restored: passes only
    add modules, swap parameter objects and edit graphs, and never write into storage.
    """
    from surgery.map.graphs import graph_modules

    configs = {id(c): (c, dict(vars(c))) for c in (m.__dict__.get("config") for m in model.modules())
               if c is not None and hasattr(c, "__dict__")}
    modules = {name: (mod, dict(mod._modules), dict(mod._parameters), dict(mod._buffers),
                      {"training": mod.training,
                       **{k: type(getattr(mod, k))(getattr(mod, k)) for k in _HOOKS}})
               for name, mod in model.named_modules(remove_duplicate=False)}
    flags = {id(p): (p, p.requires_grad) for _, p in model.named_parameters(remove_duplicate=False)}
    graphs = {}
    for name, mod in graph_modules(model):
        new_graph = torch.fx.Graph(owning_module=mod, tracer_cls=mod.graph._tracer_cls)
        value_map: dict = {}
        copied = new_graph.graph_copy(mod.graph, value_map, return_output_node=True)
        if copied is not None:  # a graph without an output node (an empty container) stays so
            out, old_output = copied
            new_output = new_graph.output(out, type_expr=getattr(old_output, "type", None))
            new_output.meta = dict(old_output.meta)
        graphs[name] = (mod, new_graph)
    state = getattr(model, "_surgery", None)
    history_len = len(state.history) if state is not None else 0
    return {"modules": modules, "flags": flags, "graphs": graphs, "state": state,
            "configs": configs,
            "history_len": history_len,
            "state_active": None if state is None or state.active is None else set(state.active),
            "state_trained": None if state is None else dict(state.trained_modules),
            "state_trained_params": None if state is None else dict(state.trained_parameters)}


def restore(model: nn.Module, snap: dict) -> None:
    """Put ``model`` back exactly as :func:`snapshot` saw it (modules, flags, graphs)."""
    from surgery.map.graphs import recompile

    for mod, children, params, buffers, attrs in snap["modules"].values():
        mod._modules.clear()
        mod._modules.update(children)
        mod._parameters.clear()
        mod._parameters.update(params)
        mod._buffers.clear()
        mod._buffers.update(buffers)
        for key, val in attrs.items():
            if key in _HOOKS:  # the same dict object: handles held elsewhere stay valid
                hooks = getattr(mod, key)
                hooks.clear()
                hooks.update(val)
            else:
                object.__setattr__(mod, key, val)
    for param, flag in snap["flags"].values():
        param.requires_grad_(flag)
    for config, attrs in snap.get("configs", {}).values():  # a pass may switch a setting
        vars(config).clear()
        vars(config).update(attrs)
    for mod, graph in snap["graphs"].values():
        mod.graph = graph
    state = snap["state"]
    if state is not None:
        del state.history[snap["history_len"]:]
        state.active = snap["state_active"]
        if snap.get("state_trained") is not None:
            state.trained_modules = snap["state_trained"]
        if snap.get("state_trained_params") is not None:
            state.trained_parameters = snap["state_trained_params"]
    recompile(model)


def is_adapter_parameter(model: nn.Module, name: str) -> bool:
    """True when parameter ``name`` of ``model`` belongs to an inserted adapter module (or
    an adapter's parameter slot, :class:`~surgery.sites.marker.AdapterParameters`)."""
    from surgery.sites.marker import AdapterModule, AdapterParameters

    owner_name = name.rpartition(".")[0]
    parts = owner_name.split(".") if owner_name else []
    mod: nn.Module = model
    for part in parts:
        if isinstance(mod, AdapterModule):
            return True
        mod = getattr(mod, part)
    return isinstance(mod, (AdapterModule, AdapterParameters))


def adapter_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Yield ``(qualified name, parameter)`` for every parameter inside an adapter module or
    an adapter's parameter slot (:class:`~surgery.sites.marker.AdapterParameters`)."""
    from surgery.sites.marker import AdapterModule, slot_parameters

    seen: set[int] = set()
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, AdapterModule):
            continue
        for pname, param in mod.named_parameters(prefix=mod_name):
            if id(param) not in seen:
                seen.add(id(param))
                yield pname, param
    for pname, param, _, _ in slot_parameters(model):
        if id(param) not in seen:
            seen.add(id(param))
            yield pname, param
