"""A traced model as one ``networkx.DiGraph``: every graph of the tree, calls inlined.

Both front ends give a tree of fx graphs (:mod:`surgery.map.graphs`). This module walks it from
the root graph; a ``call_module`` node whose module owns a graph (an ``InterpreterModule``
from torch.export + ``unflatten``) is inlined: the caller's argument nodes feed the callee's
placeholders, and the values the callee returns feed the caller's users directly (a
``getitem`` that picks one returned value is resolved to that value). Nodes that only move
sizes around (``sym_size``, ``x.shape``, ``x.size(0)`` and arithmetic on them, runtime
asserts) are dropped; pytree flattening and ``getitem`` on tuples are bypassed.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
from torch import fx, nn

from surgery.sites.marker import AdapterModule
from surgery.map.dataflow import node_id
from surgery.map.graphs import graph_modules, qualified
from surgery.map.trace import is_traced, trace
from visualize.collapse import collapse
from visualize.nodeinfo import (
    clean_path,
    is_scalar_value,
    is_shape_plumbing,
    is_tree_plumbing,
    module_params,
    module_types,
    node_cluster,
    param_state,
    provenance,
    short_label,
    target_name,
    tensor_info,
    value_dtype,
    value_shape,
)

__all__ = ["to_networkx", "traced_to_networkx", "is_traced_like", "rewritten_params",
           "param_totals"]


@dataclass(frozen=True)
class _Src:
    """A kept node a value flows from, with the shape shown on the edge."""

    id: str
    shape: tuple | None
    dtype: str | None


class _Pack(list):
    """Structured values (a tuple or list a callee returns, a pytree being unpacked)."""


class _Record(dict):
    """Keyed values (a dict a callee returns, keyword arguments being unpacked)."""


_Value = Any  # tuple[_Src, ...] | _Pack | _Record | None
_MISS = object()


def _flatten(value: _Value) -> tuple[_Src, ...]:
    if value is None:
        return ()
    if isinstance(value, _Pack):
        return tuple(src for item in value for src in _flatten(item))
    if isinstance(value, _Record):
        return tuple(src for item in value.values() for src in _flatten(item))
    return tuple(value)


def _leaves(value: _Value) -> list[_Value]:
    """The pytree leaves of a value, in order."""
    if isinstance(value, _Pack):
        return [leaf for item in value for leaf in _leaves(item)]
    if isinstance(value, _Record):
        return [leaf for item in value.values() for leaf in _leaves(item)]
    return [value]


def _structure(obj: Any) -> _Value:
    """Python containers (from ``tree_unflatten``) to packs and records, leaves as they are."""
    if isinstance(obj, dict):
        return _Record((k, _structure(v)) for k, v in obj.items())
    if isinstance(obj, (tuple, list)) and not (obj and all(isinstance(x, _Src) for x in obj)):
        return _Pack(_structure(v) for v in obj)
    return obj


def _with_shape(value: _Value, shape: tuple | None, dtype: str | None) -> _Value:
    """Relabel a flow with the shape of the node that picked it out of a container."""
    if shape is None or value is None or isinstance(value, (_Pack, _Record)):
        return value
    return tuple(_Src(src.id, shape, dtype) for src in value)


def _fetch_attr(owner: nn.Module, target: str) -> Any:
    obj: Any = owner
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def param_totals(model: nn.Module) -> tuple[int, int]:
    """``(all parameter elements, trainable ones)`` of ``model``, as :func:`surgery.audit` counts.

    Every parameter of the model counts, called from the graph or not (a merged adapter's
    unused modules included); a parameter shared by several modules counts once; trainable
    means ``requires_grad``.
    """
    params = list(model.parameters())  # distinct Parameter objects, each once
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def rewritten_params(model: nn.Module) -> dict[str, str]:
    """Map parameter names a pass rewrote (``param_rewritten`` changes) to that pass's name."""
    state = getattr(model, "_surgery", None)
    out: dict[str, str] = {}
    for result in getattr(state, "history", None) or []:
        for change in result.changes:
            if change.kind == "param_rewritten":
                out[change.name] = change.pass_name
    return out


class _Builder:
    """Walks the graphs of a traced model once and records kept nodes and edges."""

    def __init__(self, traced: nn.Module, source: nn.Module | None) -> None:
        self.traced = traced
        self.graphs = graph_modules(traced)
        self.rewritten = rewritten_params(traced)
        self.g = nx.DiGraph()
        self.walked: dict[str, int] = {}
        self.order = 0
        state = getattr(traced, "_surgery", None)
        # a plain model traced on a private copy is counted as given (tracing may drop
        # modules the forward never calls); a traced model as it is
        total, trainable = param_totals(source if source is not None else traced)
        if source is None:  # the eager copy tracing keeps knows the original module classes
            source = getattr(state, "source", None)
        types = module_types(traced, self.graphs, source)
        self.g.graph.update(
            name=types[""],
            frontend=getattr(state, "frontend", "fx"),
            module_types=types,
            rewritten=dict(sorted(self.rewritten.items())),
            depth=None,
            param_total=total,
            param_trainable=trainable,
        )

    def build(self) -> nx.DiGraph:
        root = dict(self.graphs).get("")
        if root is None:
            raise TypeError(f"{type(self.traced).__name__} owns no fx graph at its root; pass a "
                            f"plain nn.Module (it is traced) or a model from surgery.map.trace")
        self._walk("", root, None, {})
        return self.g

    # -- walking ---------------------------------------------------------------------------

    def _walk(self, prefix: str, owner: nn.Module, inputs: list[_Value] | None,
              kw_inputs: Mapping[str, _Value]) -> _Value:
        root = inputs is None
        count = self.walked.get(prefix, 0)
        self.walked[prefix] = count + 1
        id_prefix = prefix if count == 0 else f"{prefix}@{count}"
        flat = root and isinstance(owner, fx.GraphModule)
        env: dict[fx.Node, _Value] = {}
        dropped: set[fx.Node] = set()
        slot = 0
        for node in owner.graph.nodes:
            if node.op == "placeholder":
                incoming: _Value = None
                if not root:
                    if slot < len(inputs):
                        incoming = inputs[slot]
                    else:
                        incoming = kw_inputs.get(str(node.target))
                    slot += 1
                    if is_scalar_value(node):
                        dropped.add(node)
                        env[node] = None
                        continue
                    if isinstance(incoming, (_Pack, _Record)):
                        env[node] = incoming
                        continue
                env[node] = self._keep(node, id_prefix, owner, flat, _flatten(incoming))
            elif node.op == "get_attr":
                obj = _fetch_attr(owner, str(node.target))
                env[node] = (self._keep(node, id_prefix, owner, flat, (), tensor=obj)
                             if isinstance(obj, torch.Tensor) else None)
            elif node.op == "call_module":
                sub = owner.get_submodule(str(node.target))
                if isinstance(getattr(sub, "graph", None), fx.Graph) and sub is not owner:
                    args = [self._resolve(a, env) for a in node.args]
                    kwargs = {k: self._resolve(v, env) for k, v in node.kwargs.items()}
                    env[node] = self._walk(qualified(prefix, str(node.target)), sub, args, kwargs)
                else:
                    env[node] = self._keep(node, id_prefix, owner, flat,
                                           self._sources(node, env), module=sub)
            elif node.op in ("call_function", "call_method"):
                env[node] = self._op(node, id_prefix, owner, flat, env, dropped)
            elif node.op == "output":
                if root:
                    self._keep(node, id_prefix, owner, flat, self._sources(node, env))
                    return None
                return self._resolve(node.args[0] if node.args else None, env)
        return None

    def _op(self, node: fx.Node, id_prefix: str, owner: nn.Module, flat: bool,
            env: dict[fx.Node, _Value], dropped: set[fx.Node]) -> _Value:
        if is_tree_plumbing(node):
            return self._tree(node, owner, env)
        if node.target is operator.getitem:
            picked = self._getitem(node, env, dropped)
            if picked is not _MISS:
                return picked
        if is_shape_plumbing(node, dropped):
            dropped.add(node)
            return None
        return self._keep(node, id_prefix, owner, flat, self._sources(node, env))

    def _getitem(self, node: fx.Node, env: dict[fx.Node, _Value], dropped: set[fx.Node]) -> _Value:
        base_node, index = node.args[0], node.args[1]
        if not isinstance(base_node, fx.Node) or base_node in dropped:
            return _MISS
        base = env.get(base_node)
        shape, dtype = value_shape(node), value_dtype(node)
        if isinstance(base, (_Pack, _Record)):
            if isinstance(index, slice) and isinstance(base, _Pack):
                return _Pack(base[index])
            try:
                return _with_shape(base[index], shape, dtype)
            except (IndexError, KeyError, TypeError):
                return _with_shape(_flatten(base), shape, dtype)
        if isinstance(index, (int, str)) and base and value_shape(base_node) is None:
            # An element of a tuple returned by a module (attention's (output, weights)):
            # draw the edge from the producer, labelled with the element's shape.
            return _with_shape(base, shape, dtype)
        return _MISS

    def _tree(self, node: fx.Node, owner: nn.Module, env: dict[fx.Node, _Value]) -> _Value:
        """pytree flatten/unflatten calls (around calls that keep their signature)."""
        import torch.utils._pytree as pytree

        name = getattr(node.target, "__name__", "")
        first = self._resolve(node.args[0], env) if node.args else None
        if name == "tree_unflatten" and len(node.args) > 1 and isinstance(first, _Pack):
            spec_node = node.args[1]
            spec = (_fetch_attr(owner, str(spec_node.target))
                    if isinstance(spec_node, fx.Node) and spec_node.op == "get_attr" else spec_node)
            try:
                return _structure(pytree.tree_unflatten(list(first), spec))
            except Exception:  # an unexpected spec: fall back to passing everything through
                return self._sources(node, env)
        if name == "tree_flatten_spec":
            return _Pack(_leaves(first))
        if name == "tree_flatten":
            return _Pack([_Pack(_leaves(first)), None])
        return self._sources(node, env)

    def _resolve(self, arg: Any, env: dict[fx.Node, _Value]) -> _Value:
        if isinstance(arg, fx.Node):
            return env.get(arg)
        if isinstance(arg, (tuple, list)):
            return _Pack(self._resolve(a, env) for a in arg)
        if isinstance(arg, dict):
            return _Record((k, self._resolve(v, env)) for k, v in arg.items())
        return None

    def _sources(self, node: fx.Node, env: dict[fx.Node, _Value]) -> tuple[_Src, ...]:
        out: list[_Src] = []
        for arg in node.all_input_nodes:
            out.extend(_flatten(env.get(arg)))
        return tuple(out)

    # -- recording -------------------------------------------------------------------------

    def _keep(self, node: fx.Node, id_prefix: str, owner: nn.Module, flat: bool,
              sources: tuple[_Src, ...], *, module: nn.Module | None = None,
              tensor: torch.Tensor | None = None) -> tuple[_Src, ...]:
        nid = node_id(id_prefix, node)
        attrs = self._attrs(node, id_prefix, flat, module, tensor)
        self.g.add_node(nid, **attrs)
        for src in sources:
            if src.id != nid and not self.g.has_edge(src.id, nid):
                self.g.add_edge(src.id, nid, shape=src.shape, dtype=src.dtype)
        return (_Src(nid, attrs["shape"], attrs["dtype"]),)

    def _attrs(self, node: fx.Node, prefix: str, flat: bool, module: nn.Module | None,
               tensor: torch.Tensor | None) -> dict[str, Any]:
        module_path = clean_path(qualified(prefix, str(node.target))) if module is not None else None
        prov = provenance(node, module)
        params: list[dict] = []
        if module is not None:
            params = module_params(module, module_path or "", self.rewritten)
        elif isinstance(tensor, nn.Parameter):
            name = clean_path(qualified(prefix, str(node.target)))
            params = [tensor_info(name, tensor, self.rewritten)]
        label = short_label(node, module_path)
        site = str(prov.get("site") or "") if prov else ""
        if module_path and site and module_path.startswith(site + "."):
            label = module_path[len(site) + 1:]  # "lora_A.default" rather than "default"
        self.order += 1
        return {
            "op": node.op,
            "name": node.name,
            "graph": clean_path(prefix),
            "target": target_name(node, module_path),
            "label": label,
            "module": module_path,
            "module_type": type(module).__name__ if module is not None else None,
            "shape": value_shape(node),
            "dtype": value_dtype(node),
            "params": tuple(params),
            "numel": sum(p["numel"] for p in params),
            "trainable_numel": sum(p["numel"] for p in params if p["trainable"]),
            "param_state": param_state(params),
            "rewritten": tuple(sorted({p["rewritten"] for p in params if p["rewritten"]})),
            "constant": tensor is not None and not isinstance(tensor, nn.Parameter),
            "provenance": prov,
            "pass_name": str(prov["pass"]) if prov and prov.get("pass") else None,
            "adapter": isinstance(module, AdapterModule) or prov is not None,
            "adapted": (),
            "collapsed": 0,
            "cluster": node_cluster(node, prefix, module_path, flat, prov),
            "order": self.order,
        }


def to_networkx(
    model: nn.Module,
    example_inputs: tuple | None = None,
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    depth: int | None = None,
) -> nx.DiGraph:
    """Build the whole-model dataflow graph of ``model`` for drawing and diffing.

    Args:
        model: a plain ``nn.Module`` (traced with :func:`surgery.map.trace.trace` on a private
            copy; the model itself is not changed), or a model already traced (from
            :func:`surgery.map.trace.trace` or :func:`surgery.apply_passes`, or any module that
            owns an fx graph at its root), used as it is.
        example_inputs: positional inputs, for tracing a plain model with torch.export and
            for shapes (``(batch, seq)`` token ids, ...). Ignored for a traced model.
        example_kwargs: keyword inputs for tracing. Ignored for a traced model.
        depth: when given (``>= 1``), every module nested deeper than ``depth`` levels is
            drawn as one node in its ancestor at that depth (``depth=2`` shows
            ``layers.0``, ``layers.1``, ... as single nodes). Nodes inserted by passes stay
            visible, and a collapsed node holding adapted layers is marked ``adapted``.

    Returns:
        A ``networkx.DiGraph`` whose node ids are ``"<graph prefix>/<fx node name>"``
        (``"/input_ids"``, ``"layers.0.attn/q_proj"`` on the export front end); collapsed
        modules are ``"<module path>/*"``. Node attributes: ``op`` (fx op, or ``"module"``
        for a collapsed module), ``name``, ``graph``, ``target`` (str), ``label``,
        ``module`` and ``module_type`` (called modules), ``shape`` (tuple of ints, or of
        strings for symbolic dimensions) and ``dtype`` (str) when known, ``params`` (tuple of
        ``{"name", "shape", "numel", "trainable", "rewritten"}``), ``numel``,
        ``trainable_numel``, ``param_state`` (``"none"``/``"trainable"``/``"frozen"``/
        ``"mixed"``), ``rewritten`` (passes that rewrote a weight), ``constant``,
        ``provenance`` (the ``meta["surgery"]`` dict) and ``pass_name``, ``adapter`` (inserted
        by a pass), ``adapted`` (passes that adapted something inside a collapsed module),
        ``collapsed`` (how many nodes a collapsed module stands for), ``cluster`` (the qualified module path the node is drawn in) and ``order`` (graph
        order); :func:`visualize.render_diff` adds ``diff="removed"`` to the nodes of its
        ``before`` graph that are gone from ``after``. Edge attributes: ``shape`` and ``dtype`` of the value. Graph attributes:
        ``name``, ``frontend``, ``module_types`` (path → class name), ``rewritten``,
        ``depth``, ``param_total`` and ``param_trainable`` (every parameter of the model,
        drawn or not, each once, as :func:`param_totals` and :func:`surgery.audit` count).

    Raises:
        ValueError: ``depth`` is not a positive int.
        TypeError: ``model`` is neither a module that can be traced nor a traced model.
        surgery.errors.TraceError: a plain model could not be traced.
    """
    if depth is not None and (not isinstance(depth, int) or isinstance(depth, bool) or depth < 1):
        raise ValueError(f"depth must be a positive int or None, got {depth!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_networkx() takes an nn.Module, got {type(model).__name__}")
    if is_traced_like(model):
        return traced_to_networkx(model, depth=depth)
    traced = trace(model, example_inputs, example_kwargs)
    return traced_to_networkx(traced, source=model, depth=depth)


def is_traced_like(model: nn.Module) -> bool:
    """True for a model from :func:`surgery.map.trace.trace`, or any module owning a root fx graph."""
    return is_traced(model) or isinstance(getattr(model, "graph", None), fx.Graph)


def traced_to_networkx(traced: nn.Module, *, source: nn.Module | None = None,
                       depth: int | None = None) -> nx.DiGraph:
    """:func:`to_networkx` for a model that is already traced.

    Args:
        traced: a traced model (see :func:`is_traced_like`); it is only read.
        source: the untraced model it came from, if at hand: its module classes name the
            clusters where tracing replaced them (torch.export's ``InterpreterModule``).
        depth: as in :func:`to_networkx`.

    Raises:
        ValueError: ``depth`` is not a positive int.
        TypeError: ``traced`` owns no fx graph at its root.
    """
    if depth is not None and (not isinstance(depth, int) or isinstance(depth, bool) or depth < 1):
        raise ValueError(f"depth must be a positive int or None, got {depth!r}")
    graph = _Builder(traced, source).build()
    if depth is not None:
        graph = collapse(graph, depth)
    return graph
