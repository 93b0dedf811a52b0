"""Walking the map into one ``networkx.DiGraph``: every graph of the tree, calls inlined,
site graphs expanded.

Both front ends give a tree of fx graphs (:mod:`surgery.map.graphs`). The walk starts at the
root graph; a ``call_module`` node whose module owns a graph (an ``InterpreterModule`` from
torch.export + ``unflatten``) is inlined: the caller's argument nodes feed the callee's
placeholders, and the values the callee returns feed the caller's users directly (a
``getitem`` that picks one returned value is resolved to that value). Nodes that only move
sizes around (``sym_size``, ``x.shape``, ``x.size(0)`` and arithmetic on them, runtime
asserts) are dropped; pytree flattening and ``getitem`` on tuples are bypassed.

At every call of a site of the model being drawn, the site graph's inserted nodes are drawn
in place (:mod:`visualize.expand`). What a node says about parameters (shapes, counts,
``requires_grad``) is read from that model's own tensors, by qualified name: the map's are
on the meta device and know nothing of adapters.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import networkx as nx
import torch
from torch import fx, nn

from surgery.map.graphs import graph_modules, qualified
from surgery.sites.marker import AdapterModule, AdapterParameters
from surgery.sites.site_graph import SiteGraph, base_module
from visualize.expand import Region, SiteCall, align, find_regions, site_index
from visualize.facts import fetch_attr, param_totals, rewritten_params, scaling_mode
from visualize.flow import (
    Pack,
    Record,
    Src,
    Value,
    flatten,
    leaves,
    structure,
    with_shape,
)
from visualize.nodeinfo import (
    clean_path,
    is_scalar_value,
    is_shape_plumbing,
    is_tree_plumbing,
    module_params,
    module_types,
    node_cluster,
    param_state,
    parent_path,
    provenance,
    short_label,
    target_name,
    tensor_info,
    value_dtype,
    value_shape,
)

__all__ = ["GraphBuilder"]

_MISS = object()


class GraphBuilder:
    """Walks the graphs of a map once and records the nodes and edges to draw.

    Args:
        graph_map: the map (:func:`surgery.trace` / :func:`surgery.targets.model_map`); only
            read.
        model: the model the map stands for (plain or adapted), or the map itself. Its
            tensors describe the parameters and its site graphs are expanded; only read.
    """

    def __init__(self, graph_map: nn.Module, model: nn.Module) -> None:
        self.map = graph_map
        self.graphs = graph_modules(graph_map)
        self.sites: dict[str, SiteGraph] = site_index(model) if model is not graph_map else {}
        self.modules = dict(model.named_modules(remove_duplicate=False))
        self.tensors: dict[str, torch.Tensor] = dict(model.named_buffers(remove_duplicate=False))
        self.tensors.update(model.named_parameters(remove_duplicate=False))
        self.rewritten = rewritten_params(model)
        self.adapters = {path: mod for path, mod in self.modules.items()
                         if isinstance(mod, AdapterModule)}
        self.g = nx.DiGraph()
        self.walked: dict[str, int] = {}  # map graph prefix -> times walked
        self.expanded: dict[str, int] = {}  # site -> calls expanded
        self.module_values: dict[str, Value] = {}  # module path -> its latest call's value
        self.order = 0
        total, trainable = param_totals(model)
        types = module_types(graph_map, self.graphs, model)
        info = getattr(graph_map, "_surgery_map", None)
        self.g.graph.update(
            name=types[""],
            frontend=getattr(info, "frontend", "fx"),
            module_types=types,
            rewritten=dict(sorted(self.rewritten.items())),
            depth=None,
            param_total=total,
            param_trainable=trainable,
        )

    def build(self) -> nx.DiGraph:
        """Walk the map from its root graph and return the graph drawn.

        Raises:
            TypeError: the map owns no fx graph at its root.
        """
        root = dict(self.graphs).get("")
        if root is None:
            raise TypeError(f"{type(self.map).__name__} owns no fx graph at its root; pass a "
                            f"plain nn.Module, an adapted model or a map from surgery.trace")
        self._walk("", root, None, {})
        return self.g

    # -- walking the map -------------------------------------------------------------------

    def _walk(self, prefix: str, owner: nn.Module, inputs: list[Value] | None,
              kw_inputs: Mapping[str, Value]) -> Value:
        root = inputs is None
        count = self.walked.get(prefix, 0)
        self.walked[prefix] = count + 1
        id_prefix = prefix if count == 0 else f"{prefix}@{count}"
        flat = root and isinstance(owner, fx.GraphModule)
        entries: dict[fx.Node, list[Region]] = {}
        exits: dict[fx.Node, list[Region]] = {}
        if root and self.sites:
            for region in find_regions(owner.graph, self.sites, flat=flat):  # largest first
                entries.setdefault(region.entry, []).append(region)
                exits.setdefault(region.exit, []).insert(0, region)
        opened: dict[Region, tuple[SiteCall, tuple | None]] = {}
        env: dict[fx.Node, Value] = {}
        dropped: set[fx.Node] = set()
        slot = 0
        for node in owner.graph.nodes:
            for region in entries.get(node, ()):
                opened[region] = self._open(region, env)
            aligned = [call for call, _ in opened.values() if node in (call.aligned or ())]
            saved: dict[fx.Node, Value] = {}
            for call in aligned:  # inputs the site graph replaced (a prefix cat before sdpa)
                for arg, value in call.rewired(node).items():
                    saved.setdefault(arg, env.get(arg))
                    env[arg] = value
            if node.op == "placeholder":
                incoming: Value = None
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
                    if isinstance(incoming, (Pack, Record)):
                        env[node] = incoming
                        continue
                env[node] = self._keep(node, id_prefix, prefix, flat, flatten(incoming))
            elif node.op == "get_attr":
                obj = fetch_attr(owner, str(node.target))
                env[node] = (self._keep(node, id_prefix, prefix, flat, (), tensor=obj)
                             if isinstance(obj, torch.Tensor) else None)
            elif node.op == "call_module":
                env[node] = self._call(node, id_prefix, prefix, owner, flat, env)
            elif node.op in ("call_function", "call_method"):
                env[node] = self._op(node, id_prefix, prefix, owner, flat, env, dropped)
            elif node.op == "output":
                if root:
                    self._keep(node, id_prefix, prefix, flat, self._sources(node, env))
                    return None
                return self._resolve(node.args[0] if node.args else None, env)
            env.update(saved)
            for call in aligned:
                call.bind(node, env.get(node))
            for region in exits.get(node, ()):
                self._close(region, opened.pop(region), node, env)
        return None

    def _call(self, node: fx.Node, id_prefix: str, prefix: str, owner: nn.Module, flat: bool,
              env: dict[fx.Node, Value]) -> Value:
        """A ``call_module`` node: a leaf drawn as one node, or a graph walked; at a site,
        with the site graph's inserted nodes around it."""
        target = str(node.target)
        path = qualified(prefix, target)
        sub = owner.get_submodule(target)
        args = [self._resolve(a, env) for a in node.args]
        kwargs = {k: self._resolve(v, env) for k, v in node.kwargs.items()}
        site = clean_path(path)
        call = self._site_call(site, self.sites[site]) if site in self.sites else None
        if call is not None:
            site_in = call.enter(args, kwargs)
            if call.rewires_input and args:
                args[0] = site_in
        if isinstance(getattr(sub, "graph", None), fx.Graph) and sub is not owner:
            value = self._walk(path, sub, args, kwargs)
        else:
            sources = flatten(Pack(args)) + flatten(Record(kwargs))
            value = self._keep(node, id_prefix, prefix, flat, sources, module=sub)
        if call is not None:
            value = call.leave(value)
        self.module_values[site] = value
        return value

    def _open(self, region: Region, env: dict[fx.Node, Value]) -> tuple[SiteCall, tuple | None]:
        """Enter a site call torch.fx inlined: draw its early nodes, rewire its input.

        When the map's nodes of the call pair up with the site graph's base nodes
        (:func:`visualize.expand.align`), placeholders bind to what those nodes read and
        each map node is rewired as the walk reaches it; otherwise the site's first input
        is the region's first input, rewired for the whole call.
        """
        anchors = [a for a in region.inputs if flatten(env.get(a))]
        call = self._site_call(region.site, region.sg, align(region))
        bound = {ph: env.get(m) for ph, m in call.placeholder_sources().items()}
        site_in = call.enter([env.get(a) for a in anchors], {}, bound=bound)
        saved = None
        if call.aligned is None and call.rewires_input and anchors:
            saved = (anchors[0], env.get(anchors[0]))
            env[anchors[0]] = site_in  # the base computation reads the rewired input
        return call, saved

    def _close(self, region: Region, opened: tuple[SiteCall, tuple | None], node: fx.Node,
               env: dict[fx.Node, Value]) -> None:
        """Leave a site call torch.fx inlined: its users read the adapted output."""
        call, saved = opened
        env[node] = call.leave(env.get(node))
        self.module_values[region.site] = env[node]
        if saved is not None:
            env[saved[0]] = saved[1]

    def _site_call(self, site: str, sg: SiteGraph,
                   aligned: Mapping[fx.Node, fx.Node] | None = None) -> SiteCall:
        count = self.expanded.get(site, 0)
        self.expanded[site] = count + 1
        id_prefix = site if count == 0 else f"{site}@{count}"
        return SiteCall(site, sg, id_prefix, self._keep_inserted, self.module_values, aligned)

    def _op(self, node: fx.Node, id_prefix: str, prefix: str, owner: nn.Module, flat: bool,
            env: dict[fx.Node, Value], dropped: set[fx.Node]) -> Value:
        if is_tree_plumbing(node):
            return self._tree(node, owner, env)
        if node.target is operator.getitem:
            picked = self._getitem(node, env, dropped)
            if picked is not _MISS:
                return picked
        if is_shape_plumbing(node, dropped):
            dropped.add(node)
            return None
        return self._keep(node, id_prefix, prefix, flat, self._sources(node, env))

    def _getitem(self, node: fx.Node, env: dict[fx.Node, Value], dropped: set[fx.Node]) -> Value:
        base_node, index = node.args[0], node.args[1]
        if not isinstance(base_node, fx.Node) or base_node in dropped:
            return _MISS
        base = env.get(base_node)
        shape, dtype = value_shape(node), value_dtype(node)
        if isinstance(base, (Pack, Record)):
            if isinstance(index, slice) and isinstance(base, Pack):
                return Pack(base[index])
            try:
                return with_shape(base[index], shape, dtype)
            except (IndexError, KeyError, TypeError):
                return with_shape(flatten(base), shape, dtype)
        if isinstance(index, (int, str)) and base and value_shape(base_node) is None:
            # An element of a tuple returned by a module (attention's (output, weights)):
            # draw the edge from the producer, labelled with the element's shape.
            return with_shape(base, shape, dtype)
        return _MISS

    def _tree(self, node: fx.Node, owner: nn.Module, env: dict[fx.Node, Value]) -> Value:
        """pytree flatten/unflatten calls (around calls that keep their signature)."""
        import torch.utils._pytree as pytree

        name = getattr(node.target, "__name__", "")
        first = self._resolve(node.args[0], env) if node.args else None
        if name == "tree_unflatten" and len(node.args) > 1 and isinstance(first, Pack):
            spec_node = node.args[1]
            spec = (fetch_attr(owner, str(spec_node.target))
                    if isinstance(spec_node, fx.Node) and spec_node.op == "get_attr" else spec_node)
            try:
                return structure(pytree.tree_unflatten(list(first), spec))
            except Exception:  # an unexpected spec: fall back to passing everything through
                return self._sources(node, env)
        if name == "tree_flatten_spec":
            return Pack(leaves(first))
        if name == "tree_flatten":
            return Pack([Pack(leaves(first)), None])
        return self._sources(node, env)

    def _resolve(self, arg: Any, env: dict[fx.Node, Value]) -> Value:
        if isinstance(arg, fx.Node):
            return env.get(arg)
        if isinstance(arg, (tuple, list)):
            return Pack(self._resolve(a, env) for a in arg)
        if isinstance(arg, dict):
            return Record((k, self._resolve(v, env)) for k, v in arg.items())
        return None

    def _sources(self, node: fx.Node, env: dict[fx.Node, Value]) -> tuple[Src, ...]:
        out: list[Src] = []
        for arg in node.all_input_nodes:
            out.extend(flatten(env.get(arg)))
        return tuple(out)

    # -- recording -------------------------------------------------------------------------

    def _add(self, nid: str, attrs: dict[str, Any], sources: tuple[Src, ...]) -> tuple[Src, ...]:
        self.g.add_node(nid, **attrs)
        for src in sources:
            if src.id != nid and not self.g.has_edge(src.id, nid):
                self.g.add_edge(src.id, nid, shape=src.shape, dtype=src.dtype)
        return (Src(nid, attrs["shape"], attrs["dtype"]),)

    def _keep(self, node: fx.Node, id_prefix: str, prefix: str, flat: bool,
              sources: tuple[Src, ...], *, module: nn.Module | None = None,
              tensor: torch.Tensor | None = None) -> tuple[Src, ...]:
        """Draw a node of the map; parameters are described from the model's own tensors."""
        module_path = None
        if module is not None:
            module_path = clean_path(qualified(prefix, str(node.target)))
            module = self.modules.get(module_path, module)
        name = None
        if tensor is not None:
            name = clean_path(qualified(prefix, str(node.target)))
            tensor = self.tensors.get(name, tensor)
        where = node_cluster(node, prefix, module_path, flat, None)
        prov = provenance(node, module) or self._inside_adapter(module_path or where, node)
        attrs = self._attrs(node, graph=clean_path(prefix), module_path=module_path,
                            module=module, tensor_name=name, tensor=tensor, prov=prov,
                            shape=value_shape(node), dtype=value_dtype(node),
                            cluster=node_cluster(node, prefix, module_path, flat, prov))
        return self._add(f"{id_prefix}/{node.name}", attrs, sources)

    def _inside_adapter(self, path: str, node: fx.Node) -> dict | None:
        """Provenance of a map node computed inside an adapter module of the model (an
        attention prefix that the map traced through transformers' attention function),
        else ``None``.

        Args:
            path: the module the node is computed in, or the module it calls.
            node: the map node.
        """
        while True:
            adapter = self.adapters.get(path)
            if adapter is not None:
                return provenance(node, adapter)
            if not path:
                return None
            path = parent_path(path)

    def _keep_inserted(self, node: fx.Node, call: SiteCall,
                       sources: tuple[Src, ...]) -> tuple[Src, ...]:
        """Draw a node a pass inserted into a site graph, beside its site."""
        sg, site = call.sg, call.site
        target = str(node.target)
        module = sg.get_submodule(target) if node.op == "call_module" else None
        tensor = fetch_attr(sg, target) if node.op == "get_attr" else None
        tensor = tensor if isinstance(tensor, torch.Tensor) else None
        shape, dtype = call.shapes.get(node.name, (None, None))
        owner = target.rpartition(".")[0]
        new = (node.op == "get_attr" and bool(owner)  # an adapter's own parameter (IA³'s l)
               and isinstance(sg.get_submodule(owner), AdapterParameters))
        attrs = self._attrs(node, graph=site,
                            module_path=qualified(site, target) if module is not None else None,
                            module=module,
                            tensor_name=qualified(site, target) if tensor is not None else None,
                            tensor=tensor, prov=provenance(node, module), shape=shape,
                            dtype=dtype, cluster=parent_path(site), new_tensor=new)
        return self._add(f"{call.id_prefix}:{node.name}", attrs, sources)

    def _attrs(self, node: fx.Node, *, graph: str, module_path: str | None,
               module: nn.Module | None, tensor_name: str | None, tensor: torch.Tensor | None,
               prov: dict | None, shape: tuple | None, dtype: str | None,
               cluster: str, new_tensor: bool = False) -> dict[str, Any]:
        params: list[dict] = []
        if module is not None:
            params = module_params(module, module_path or "", self.rewritten)
        elif isinstance(tensor, nn.Parameter) and tensor_name is not None and (
                new_tensor or not (prov and node.op == "get_attr")):
            # an inserted read of a base tensor (DoRA's norm) holds nothing new
            params = [tensor_info(tensor_name, tensor, self.rewritten)]
        label = short_label(node, module_path)
        if prov and node.op == "get_attr":  # an adapter's parameter, or a read of the base's
            label = str(node.target) if new_tensor else f"reads {node.target}"
        site = str(prov.get("site") or "") if prov else None
        if module_path and site is not None and (not site or module_path.startswith(site + ".")):
            label = module_path[len(site) + 1:] if site else module_path  # "lora_A.default"
        self.order += 1
        return {
            "op": node.op,
            "name": node.name,
            "graph": graph,
            "target": target_name(node, module_path),
            "label": label,
            "module": module_path,
            "module_type": type(base_module(module)).__name__ if module is not None else None,
            "shape": shape,
            "dtype": dtype,
            "params": tuple(params),
            "numel": sum(p["numel"] for p in params),
            "trainable_numel": sum(p["numel"] for p in params if p["trainable"]),
            "param_state": param_state(params),
            "rewritten": tuple(sorted({p["rewritten"] for p in params if p["rewritten"]})),
            "constant": tensor is not None and not isinstance(tensor, nn.Parameter),
            "provenance": prov,
            "pass_name": str(prov["pass"]) if prov and prov.get("pass") else None,
            "adapter": isinstance(module, AdapterModule) or prov is not None,
            "scaling": scaling_mode(module),
            "adapted": (),
            "collapsed": 0,
            "cluster": cluster,
            "order": self.order,
        }
