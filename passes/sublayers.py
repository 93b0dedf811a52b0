"""Sub-layers: the modules bottleneck adapters wrap, and where a parallel adapter reads and
joins inside them (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer
Learning").

A sub-layer is a module of the user's model that computes one block of a layer (``mlp``,
``attn``). It becomes a site graph (:mod:`surgery.sites.site_graph`) in which the adapter's
nodes are inserted. Two ways to name one:

* **By name** (``pattern="mlp"``): any module holding linear layers whose ``forward``
  returns one tensor. The adapter reads the module's first argument and joins its output.
* **By role** (:func:`find_sublayers`, from the map): a feed-forward block spans its
  ``ffn_up`` (and ``ffn_gate``) projection to its ``ffn_down`` projection, an attention
  sub-layer its query projection to its output projection. The site is the smallest module
  holding them (``layers.0.mlp``); its site graph calls both, so the adapter reads what the
  up projection reads and joins what the down projection returns::

      def forward(self, x):                       # layers.0.mlp
          g = self.act(self.up_proj(x))           # reads x
          y = self.down_proj(g)                   # joins y
          return y

  Where the projections sit in sibling modules (BERT: ``intermediate.dense`` and
  ``output.dense``), the site is the module holding the down projection if one of its
  arguments carries the value the up projection reads, as the map's dataflow shows
  (``BertOutput.forward(hidden_states, input_tensor)``: ``input_tensor``).

:func:`find_sublayers` is the discovery function beside
:meth:`passes.parallel_adapter.ParallelAdapterPass.sublayers`;
:func:`passes.branch_points.branch_points` finds the nodes to read and join in a sub-layer's
site graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
from torch import fx, nn

from surgery.errors import ConfigError
from surgery.map.dataflow import build_dataflow, node_id, op_name
from surgery.map.graphs import call_sites, graph_modules
from surgery.map.leaves import is_hf_conv1d
from surgery.map.roles import ELEMENTWISE, ModelRoles, find_roles, walk
from surgery.sites.marker import AdapterModule
from surgery.sites.site_graph import base_module
from surgery.targets import model_map

__all__ = [
    "SubLayer",
    "find_sublayers",
    "is_linear_layer",
    "is_sublayer_module",
    "map_roles",
    "use_signature",
]


def is_linear_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a layer bottleneck adapters attach to: ``nn.Linear`` or
    transformers' ``Conv1D`` (its weight is ``(in_features, out_features)``)."""
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


def is_sublayer_module(module: nn.Module) -> bool:
    """Whether ``module`` can be named as a sub-layer: a module with a ``forward`` of its own
    (not a ``ModuleList`` / ``ModuleDict``, not an adapter) holding at least one linear layer
    outside adapters (``mlp``, ``attn``, a whole block, an ``nn.Sequential``).

    Whether its ``forward`` can be traced and returns one tensor is found when its site graph
    is made.
    """
    if is_linear_layer(module) or isinstance(module, (nn.ModuleList, nn.ModuleDict,
                                                      AdapterModule)):
        return False
    stack = list(module.children())
    while stack:
        child = stack.pop()
        if isinstance(child, AdapterModule):
            continue
        if is_linear_layer(base_module(child)):
            return True
        stack.extend(child.children())
    return False


@dataclass(frozen=True)
class SubLayer:
    """A span a parallel adapter bridges: what it reads and what it joins.

    Attributes:
        kind: ``"ffn"`` (a feed-forward block), ``"attention"`` (query projection to output
            projection), ``"layer"`` (one linear layer, its input to its output) or
            ``"module"`` (a module named by pattern, its first argument to its output).
        module: the site: qualified name of the module whose site graph gets the adapter
            (``"layers.0.mlp"``; ``""`` for the model itself).
        inputs: the layers whose input the adapter reads (``ffn_up`` first, then
            ``ffn_gate``; the query projection); ``()`` for ``"layer"`` and ``"module"``.
        output: the layer whose output the adapter joins; ``None`` for ``"layer"`` and
            ``"module"`` (the site's own output).
        role: the role label the adapter records (``"ffn"``, ``"attention"``, a single
            layer's own role).
        carried: ``True`` when the input reaches ``module`` as one of its arguments rather
            than through a call inside it (BERT's ``input_tensor``).
        carrier: for a carried input, how the module's graph uses that argument (its
            :func:`use_signature`, the same on the map and on the site graph), by which
            :func:`passes.branch_points.branch_points` finds it.
    """

    kind: str
    module: str
    inputs: tuple[str, ...] = ()
    output: str | None = None
    role: str | None = None
    carried: bool = False
    carrier: tuple[str, ...] = field(default=(), repr=False, compare=False)

    @property
    def members(self) -> tuple[str, ...]:
        """Every name the sub-layer answers to: its input layers, output layer and module."""
        names = self.inputs + ((self.output,) if self.output else ()) + (self.module,)
        return tuple(dict.fromkeys(n for n in names if n))


# ------------------------------------------------------------------------------ discovery


def _ancestors(qname: str) -> list[str]:
    """``"a.b.c"`` → ``["a.b", "a", ""]``."""
    parts = qname.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1)]


def _inside(qname: str, module: str) -> bool:
    return module == "" or qname.startswith(module + ".")


def _source(g: nx.DiGraph, nid: str) -> str:
    """Follow a value up through the placeholders of nested graphs to where it is made."""
    seen = set()
    while g.nodes[nid]["op"] == "placeholder" and nid not in seen:
        seen.add(nid)
        preds = list(g.predecessors(nid))
        if len(preds) != 1:
            break
        nid = preds[0]
    return nid


def use_signature(owner: nn.Module, node: fx.Node) -> tuple[str, ...]:
    """How the graph of ``owner`` uses the value of ``node``: the sorted uses (``"module:dense"``, ``"add"``), ignoring
    inserted nodes. The same on the map and on a site graph of the same module."""
    uses = []
    for user in node.users:
        if "surgery" in user.meta:
            continue
        uses.append(f"module:{user.target}" if user.op == "call_module"
                    else op_name(user, owner))
    return tuple(sorted(uses))


def _input_source(g: nx.DiGraph, prefix: str, call: fx.Node) -> str | None:
    arg = call.args[0] if call.args else call.kwargs.get("input")
    return _source(g, node_id(prefix, arg)) if isinstance(arg, fx.Node) else None


def _carrier(owner: nn.Module, prefix: str, g: nx.DiGraph, src: str) -> tuple[str, ...] | None:
    """The signature of the one argument of ``owner`` that carries ``src``, if unambiguous."""
    phs = [n for n in owner.graph.nodes if n.op == "placeholder"]
    hits = [p for p in phs if _source(g, node_id(prefix, p)) == src]
    if len(hits) != 1:
        return None
    sig = use_signature(owner, hits[0])
    if not sig or any(use_signature(owner, p) == sig for p in phs if p is not hits[0]):
        return None
    return sig


def _locate(kind: str, output: str, inputs: tuple[str, ...], src: str | None,
            graphs: Mapping[str, nn.Module], g: nx.DiGraph) -> SubLayer:
    """The smallest module holding ``output`` that holds ``inputs`` too, or that gets the
    value they read as an argument."""
    for anc in _ancestors(output):
        if all(_inside(q, anc) for q in inputs):
            return SubLayer(kind, anc, inputs, output, kind)
        owner = graphs.get(anc)
        if owner is not None and src is not None and anc:
            sig = _carrier(owner, anc, g, src)
            if sig is not None:
                return SubLayer(kind, anc, inputs, output, kind, carried=True, carrier=sig)
    return SubLayer(kind, "", inputs, output, kind)  # unreachable: the root holds everything


def map_roles(graph_map: nn.Module) -> ModelRoles:
    """The roles found on a map, found once and kept with it (as
    :func:`surgery.targets.model_roles` keeps them)."""
    roles = graph_map.__dict__.get("_surgery_roles")
    if roles is None:
        roles = find_roles(graph_map)
        graph_map.__dict__["_surgery_roles"] = roles
    return roles


def _dataflow(graph_map: nn.Module) -> nx.DiGraph:
    """The map's dataflow graph, built once and kept with the map (like its roles)."""
    g = graph_map.__dict__.get("_surgery_dataflow")
    if g is None:
        g = build_dataflow(graph_map)
        graph_map.__dict__["_surgery_dataflow"] = g
    return g


def find_sublayers(model: nn.Module, kind: str, example_inputs: tuple | None = None,
                   example_kwargs: Mapping[str, Any] | None = None) -> list[SubLayer]:
    """The feed-forward blocks (``kind="ffn"``) or attention sub-layers
    (``kind="attention"``) of ``model``, in module order, from its map.

    A feed-forward block reads the input of its ``ffn_up`` (and ``ffn_gate``) projection
    and ends at the output of its ``ffn_down`` projection (paired by the same backward walk
    that finds the roles); an attention sub-layer reads the input of its query projection
    (a fused qkv projection counts) and ends at the output of its ``attn_out`` projection.
    ``nn.MultiheadAttention`` computes its projections inside one call and has no such span.

    Args:
        model: the model (the user's, or one adapted before); it is not changed.
        kind: ``"ffn"`` or ``"attention"``.
        example_inputs / example_kwargs: for tracing the map when torch.fx cannot (a
            transformers model) and ``model`` carries none.

    Returns:
        One :class:`SubLayer` per output layer; empty when the model has none of that kind.
        On transformers' LLaMA: ``SubLayer("ffn", "model.layers.0.mlp",
        ("model.layers.0.mlp.up_proj", "model.layers.0.mlp.gate_proj"),
        "model.layers.0.mlp.down_proj")``; on BERT the block ending at
        ``encoder.layer.0.output.dense`` has site ``encoder.layer.0.output``, ``carried``.

    Raises:
        ConfigError: ``kind`` is neither ``"ffn"`` nor ``"attention"``.
        TraceError: the map cannot be traced.
    """
    if kind not in ("ffn", "attention"):
        raise ConfigError(f"find_sublayers: kind must be 'ffn' or 'attention', got {kind!r}")
    graph_map = model_map(model, example_inputs, example_kwargs)
    roles = map_roles(graph_map)
    g = _dataflow(graph_map)
    graphs = dict(graph_modules(graph_map))
    calls = call_sites(graph_map)
    found: dict[str, SubLayer] = {}
    if kind == "ffn":
        for qname, sites in calls.items():
            info = roles.role_of(qname)
            if info is None or "ffn_down" not in info.roles:
                continue
            call = sites[0]
            x = call.node.args[0] if call.node.args else None
            if not isinstance(x, fx.Node):
                continue
            sources, paths = walk(g, node_id(call.prefix, x), ELEMENTWISE)
            ups = [s for s in sources if (r := roles.role_of(s)) and r.roles & {"ffn_up", "ffn_gate"}]
            if not ups:
                continue
            ups.sort(key=lambda s: "ffn_up" not in roles.role_of(s).roles)  # ffn_up first
            ref = g.nodes[paths[ups[0]][-1]]["ref"]
            src = _input_source(g, ref.prefix, ref.node)
            found.setdefault(qname, _locate("ffn", qname, tuple(ups), src, graphs, g))
    else:
        for op in roles.attention:
            if op.kind == "mha" or not op.query or not op.out:
                continue
            query, out = op.query[0], op.out[0]
            q_calls = calls.get(query, [])
            src = _input_source(g, q_calls[0].prefix, q_calls[0].node) if q_calls else None
            found.setdefault(out, _locate("attention", out, (query,), src, graphs, g))
    order = {n: i for i, (n, _) in enumerate(model.named_modules(remove_duplicate=False))}
    return sorted(found.values(), key=lambda s: order.get(s.output or "", len(order)))
