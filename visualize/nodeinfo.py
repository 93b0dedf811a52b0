"""What the renderer shows about one fx node: names, shapes, parameters, provenance.

Pure functions over fx nodes and modules; :mod:`visualize.walk` calls them while it walks
the map and the site graphs of a model.
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import fx, nn

from surgery.adapters.active import INACTIVE_KEY
from surgery.map.dataflow import op_name
from surgery.map.graphs import is_interpreter_module, surgery_meta
from surgery.sites.marker import AdapterModule, AdapterParameters
from surgery.sites.site_graph import base_module

__all__ = [
    "ParamInfo",
    "clean_path",
    "parent_path",
    "target_name",
    "short_label",
    "value_shape",
    "value_dtype",
    "is_scalar_value",
    "is_shape_plumbing",
    "is_tree_plumbing",
    "module_params",
    "tensor_info",
    "param_state",
    "provenance",
    "node_cluster",
    "module_types",
]

# A parameter as the graph shows it: name, shape, numel, trainable, rewritten-by pass.
ParamInfo = dict[str, Any]

_SHAPE_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "is_nested",
                          "requires_grad", "layout", "is_sparse", "is_quantized"})
_SHAPE_METHODS = frozenset({"size", "dim", "numel", "stride", "nelement", "element_size",
                            "get_device", "is_contiguous", "is_floating_point", "data_ptr",
                            "storage_offset", "is_complex"})
_ARITHMETIC = frozenset({operator.add, operator.sub, operator.mul, operator.floordiv,
                         operator.truediv, operator.mod, operator.pow, operator.neg,
                         operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
                         operator.ge, operator.and_, operator.or_, operator.not_,
                         operator.getitem, builtins.getattr, builtins.len, builtins.int,
                         builtins.float, builtins.bool, builtins.max, builtins.min})
_TREE_PLUMBING = ("tree_flatten_spec", "tree_unflatten", "tree_flatten")


def clean_path(path: str) -> str:
    """A qualified module name without the ``@n`` call-count suffixes ``unflatten`` adds."""
    return ".".join(part.split("@")[0] for part in path.split(".")) if path else ""


def parent_path(path: str) -> str:
    """``"layers.0.attn"`` → ``"layers.0"``; ``""`` for a top-level name or the root."""
    return path.rpartition(".")[0]


def target_name(node: fx.Node, module_path: str | None = None) -> str:
    """A readable, address-free string for ``node.target``.

    ATen overloads print as ``aten.add.Tensor``, Python callables as ``module.qualname``
    (``_operator.add`` becomes ``operator.add``), modules as their qualified name.
    """
    target = node.target
    if node.op == "call_module" and module_path is not None:
        return module_path
    if isinstance(target, str):
        return target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    try:
        text = fx.node._get_qualified_name(target)  # what fx's generated code calls it
    except Exception:  # not every callable has a findable module
        text = None
    if text:
        return "operator." + text[len("_operator."):] if text.startswith("_operator.") else text
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    if name is None:
        return type(target).__name__
    if module in ("_operator", "builtins"):
        module = "operator" if module == "_operator" else ""
    return f"{module}.{name}" if module else name


def short_label(node: fx.Node, module_path: str | None = None, module_type: str | None = None) -> str:
    """The short name a diagram prints for a node: ``q_proj``, ``add``, ``input_ids``."""
    if node.op == "call_module":
        leaf = (module_path or str(node.target)).rpartition(".")[2]
        return leaf if not module_type else f"{leaf}: {module_type}"
    if node.op in ("call_function", "call_method"):
        return op_name(node)
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[2]
    if node.op == "placeholder":
        return str(node.target).lstrip("*")
    return node.op


def _shape_of(val: Any) -> tuple | None:
    shape = getattr(val, "shape", None)
    if shape is None:
        return None
    return tuple(int(d) if isinstance(d, int) else str(d) for d in shape)


def value_shape(node: fx.Node) -> tuple | None:
    """Shape of the value a node produces, ``None`` when unknown or not a tensor.

    Dimensions are ints, or strings naming a symbol (``"s27"``) for dynamic dimensions on
    the torch.export front end.
    """
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    if isinstance(val, torch.Tensor) or type(val).__name__ == "TensorMetadata":
        return _shape_of(val)
    return None


def value_dtype(node: fx.Node) -> str | None:
    """``"float32"``, ``"int64"``, ... for a node producing a tensor, else ``None``."""
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    dtype = getattr(val, "dtype", None)
    return str(dtype).replace("torch.", "") if isinstance(dtype, torch.dtype) else None


def is_scalar_value(node: fx.Node) -> bool:
    """True when the recorded example value is a Python or symbolic scalar, or a ``Size``."""
    val = node.meta.get("val")
    return isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool,
                            torch.Size))


def is_tree_plumbing(node: fx.Node) -> bool:
    """pytree flatten/unflatten calls: data passes through them unchanged."""
    if node.op != "call_function":
        return False
    name = getattr(node.target, "__name__", "")
    return any(key in name for key in _TREE_PLUMBING)


def is_shape_plumbing(node: fx.Node, dropped: Iterable[fx.Node]) -> bool:
    """True for nodes that only compute sizes, dtypes or checks, never tensor data.

    Args:
        node: a ``call_function`` or ``call_method`` node.
        dropped: the nodes already found to be shape plumbing (the inputs seen so far).
    """
    if is_scalar_value(node):
        return True
    target = node.target
    if node.op == "call_method":
        return str(target) in _SHAPE_METHODS
    if node.op != "call_function":
        return False
    if target is builtins.getattr and len(node.args) > 1 and node.args[1] in _SHAPE_ATTRS:
        return True
    if isinstance(target, torch._ops.OpOverload):
        packet = target.overloadpacket.__name__
        if packet.startswith("sym_") or "_assert" in packet:
            return True
    name = getattr(target, "__name__", "")
    if "_assert" in name or name in ("sym_size", "sym_numel", "sym_stride"):
        return True
    if target in _ARITHMETIC:
        inputs = node.all_input_nodes
        drop = set(dropped)
        return bool(inputs) and all(n in drop for n in inputs)
    return False


def _owned_parameters(module: nn.Module) -> Iterable[tuple[str, nn.Parameter]]:
    """Parameters of ``module``, skipping those of adapter modules and adapters' parameter
    slots (IA³'s ``ia3_l``) registered under it."""
    if isinstance(module, AdapterModule):
        yield from module.named_parameters()
        return
    skip: list[str] = []
    for sub_name, sub in module.named_modules():
        if any(sub_name == s or sub_name.startswith(s + ".") for s in skip):
            continue
        if sub is not module and isinstance(sub, (AdapterModule, AdapterParameters)):
            skip.append(sub_name)
            continue
        for pname, param in sub.named_parameters(recurse=False):
            yield (f"{sub_name}.{pname}" if sub_name else pname), param


def module_params(module: nn.Module, prefix: str, rewritten: Mapping[str, str]) -> list[ParamInfo]:
    """Describe the parameters a called module owns (not those of adapters under it).

    Args:
        module: the called module.
        prefix: its qualified name, prepended to parameter names.
        rewritten: qualified parameter name → name of the pass that rewrote it.

    Returns:
        ``[{"name", "shape", "numel", "trainable", "rewritten"}]`` in registration order;
        ``rewritten`` is the pass name or ``None``.
    """
    out = []
    for pname, param in _owned_parameters(module):
        full = f"{prefix}.{pname}" if prefix else pname
        out.append(tensor_info(full, param, rewritten))
    return out


def tensor_info(name: str, tensor: torch.Tensor, rewritten: Mapping[str, str]) -> ParamInfo:
    """Describe one parameter or buffer for the graph (see :func:`module_params`)."""
    trainable = isinstance(tensor, nn.Parameter) and tensor.requires_grad
    return {"name": name, "shape": tuple(int(d) for d in tensor.shape),
            "numel": int(tensor.numel()), "trainable": bool(trainable),
            "rewritten": rewritten.get(name)}


def param_state(params: Iterable[ParamInfo]) -> str:
    """``"none"``, ``"trainable"``, ``"frozen"`` or ``"mixed"`` for a list of parameters."""
    flags = {p["trainable"] for p in params}
    if not flags:
        return "none"
    if flags == {True}:
        return "trainable"
    if flags == {False}:
        return "frozen"
    return "mixed"


def provenance(node: fx.Node, module: nn.Module | None = None) -> dict | None:
    """The pass provenance of a node: its ``meta["surgery"]``, else that of its adapter module.

    A node of an adapter that is switched off (:func:`surgery.adapters.active.set_active`: its module
    is inactive, or the node carries ``meta["surgery_inactive"]``) also gets
    ``"active": False``; active adapters get no such key.

    Returns:
        ``{"pass", "site", "role", "adapter", ...}`` (a copy), or ``None`` for an original node.
    """
    meta = surgery_meta(node)
    prov = None
    if meta:
        prov = {str(k): v for k, v in meta.items()}
    elif isinstance(module, AdapterModule):
        prov = {"pass": module.pass_name, "site": module.site, "role": module.role,
                "adapter": module.adapter_name}
    if prov is not None and (node.meta.get(INACTIVE_KEY) or (
            isinstance(module, AdapterModule) and not module.active)):
        prov["active"] = False
    return prov


def node_cluster(node: fx.Node, prefix: str, module_path: str | None, flat: bool,
                 prov: dict | None) -> str:
    """The qualified module path a node is drawn inside.

    On the torch.export front end every graph belongs to one module, so the answer is the
    graph's owner (``prefix``). A flat torch.fx graph records the module stack of each node
    (``meta["nn_module_stack"]``): a call belongs to the module that makes it, any other
    node to the innermost module on the stack. Nodes inserted by a pass sit beside their site.
    """
    if not flat:
        return clean_path(prefix)
    if prov and prov.get("site"):
        return parent_path(str(prov["site"]))
    stack = node.meta.get("nn_module_stack") or {}
    paths = [clean_path(str(v[0])) for v in stack.values()]
    if node.op == "call_module":
        if len(paths) >= 2 and paths[-1] == module_path:
            return paths[-2]
        return parent_path(module_path or "")
    return paths[-1] if paths else clean_path(prefix)


def module_types(graph_map: nn.Module, graphs: Iterable[tuple[str, nn.Module]],
                 model: nn.Module | None = None) -> dict[str, str]:
    """Map qualified module paths to class names, for cluster titles.

    Export turns submodules into ``InterpreterModule`` objects, so their classes are read
    from ``nn_module_stack`` metadata; real modules say it directly. ``model`` (the model the
    map stands for) has the last word: a site graph reads as the class it replaced, and
    the modules of adapters are left out (they are drawn beside their site, not as
    clusters).
    """
    known = {clean_path(path) for path, _ in graph_map.named_modules(remove_duplicate=False)}
    types: dict[str, str] = {}
    for _, owner in graphs:
        for node in owner.graph.nodes:
            for path, typ in (node.meta.get("nn_module_stack") or {}).values():
                path = clean_path(str(path))
                if path in known:
                    name = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
                    types.setdefault(path, name.rpartition(".")[2])
    for path, mod in graph_map.named_modules(remove_duplicate=False):
        if (not path or type(mod) is nn.Module  # containers fx creates for dotted paths
                or is_interpreter_module(mod) or isinstance(mod, fx.GraphModule)):
            continue
        types[clean_path(path)] = type(mod).__name__
    if model is not None and model is not graph_map:
        adapters = [path for path, mod in model.named_modules(remove_duplicate=False)
                    if isinstance(mod, (AdapterModule, AdapterParameters))]
        for path, mod in model.named_modules(remove_duplicate=False):
            if any(path == a or path.startswith(a + ".") for a in adapters):
                continue
            if isinstance(mod, nn.ModuleDict) and len(mod) and all(
                    isinstance(m, AdapterModule) for m in mod.values()):
                continue  # a site's slot of named adapters (lora_A)
            types[clean_path(path)] = type(base_module(mod)).__name__
    types[""] = _root_class(graph_map, model)
    return dict(sorted(types.items()))


def _root_class(graph_map: nn.Module, model: nn.Module | None) -> str:
    """The class name the model had before surgery."""
    for holder in (model, graph_map):
        state = getattr(holder, "_surgery", None)
        cls = getattr(state, "source_class", None)
        if cls is None:
            cls = getattr(getattr(holder, "_surgery_map", None), "source_class", None)
        if cls is not None:
            return cls.__name__
    return type(base_module(model if model is not None else graph_map)).__name__
