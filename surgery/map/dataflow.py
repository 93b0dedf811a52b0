"""One dataflow graph across every fx graph of a traced model.

On the export front end a model is a tree of graphs: a value produced in one submodule's
graph is consumed in its parent's. Role discovery has to follow values across those
boundaries, so this module builds a ``networkx.DiGraph`` over all nodes of all graphs, with
calls into graph-owning submodules inlined: the caller's arguments feed the callee's
placeholders, and the callee's ``output`` feeds the call node.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import networkx as nx
from torch import fx, nn

from surgery.map.graphs import graph_modules, qualified

__all__ = ["NodeRef", "build_dataflow", "op_name", "node_id"]


@dataclass(frozen=True)
class NodeRef:
    """Where an fx node lives: the graph-owning module and its qualified prefix."""

    prefix: str
    owner: nn.Module
    node: fx.Node


def node_id(prefix: str, node: fx.Node) -> str:
    """Stable id of a node in the dataflow graph: ``"<prefix>/<node name>"``."""
    return f"{prefix}/{node.name}"


def op_name(node: fx.Node, owner: nn.Module | None = None) -> str:
    """A normalised operation name: ``"linear"``, ``"softmax"``, ``"module:gelu"``, ...

    ATen overloads lose their namespace and overload (``aten.add.Tensor`` → ``"add"``);
    Python callables give their ``__name__``; ``call_method`` gives the method name;
    ``call_module`` gives ``"module:"`` and the lower-cased class name.
    """
    if node.op == "call_function":
        target = node.target
        if target is operator.getitem:
            return "getitem"
        schema = getattr(target, "_schema", None)
        if schema is not None:
            return schema.name.split("::")[-1]
        name = getattr(target, "__name__", str(target))
        return name.strip("_") if name.startswith("__") else name
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_module" and owner is not None:
        try:
            mod = owner.get_submodule(str(node.target))
        except AttributeError:
            return "module:?"
        return "module:" + type(mod).__name__.lower()
    return node.op


def build_dataflow(model: nn.Module) -> nx.DiGraph:
    """Build the whole-model dataflow graph of a traced ``model``.

    Node attributes: ``ref`` (:class:`NodeRef`), ``op`` (fx op), ``name`` (:func:`op_name`),
    ``qname`` and ``module`` for ``call_module`` nodes, and ``inlined=True`` for calls into a
    graph-owning submodule (their value comes from the callee's ``output`` node).
    """
    g = nx.DiGraph()
    owners = {id(mod): prefix for prefix, mod in graph_modules(model)}
    graphs = graph_modules(model)
    for prefix, owner in graphs:
        for node in owner.graph.nodes:
            attrs = {"ref": NodeRef(prefix, owner, node), "op": node.op,
                     "name": op_name(node, owner)}
            if node.op == "call_module":
                mod = owner.get_submodule(str(node.target))
                attrs["qname"] = qualified(prefix, str(node.target))
                attrs["module"] = mod
                attrs["inlined"] = id(mod) in owners and isinstance(getattr(mod, "graph", None),
                                                                      fx.Graph)
            g.add_node(node_id(prefix, node), **attrs)
    for prefix, owner in graphs:
        for node in owner.graph.nodes:
            nid = node_id(prefix, node)
            data = g.nodes[nid]
            if data.get("inlined"):
                callee_prefix = data["qname"]
                callee = data["module"]
                placeholders = [n for n in callee.graph.nodes if n.op == "placeholder"]
                flat_args = [a for a in node.args]
                for arg, ph in zip(flat_args, placeholders):
                    if isinstance(arg, fx.Node):
                        g.add_edge(node_id(prefix, arg), node_id(callee_prefix, ph))
                for kw, val in node.kwargs.items():
                    match = [ph for ph in placeholders if ph.target == kw]
                    if isinstance(val, fx.Node) and match:
                        g.add_edge(node_id(prefix, val), node_id(callee_prefix, match[0]))
                out = next(n for n in reversed(callee.graph.nodes) if n.op == "output")
                g.add_edge(node_id(callee_prefix, out), nid)
            else:
                for arg in node.all_input_nodes:
                    g.add_edge(node_id(prefix, arg), nid)
    return g
