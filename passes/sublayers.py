"""Sub-layers: the spans of a traced model a parallel adapter bridges (He et al. 2022,
"Towards a Unified View of Parameter-Efficient Transfer Learning").

A parallel adapter reads the input of one layer and adds to the output of another. A
feed-forward block spans its ``ffn_up`` (and ``ffn_gate``) projection to its ``ffn_down``
projection; an attention sub-layer spans its query projection to its output projection::

    g = act(up_proj(x))        # x: the input the adapter reads
    y = down_proj(g)           # y: the output it joins

:func:`find_sublayers` is the discovery function beside the selection of
:class:`passes.adapters.ParallelAdapterPass`: it lists the spans that pass's ``role=``
chooses from, and ``pattern=`` / ``exclude=`` match their member layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
from torch import fx, nn

from surgery.map.dataflow import build_dataflow, node_id
from surgery.errors import ConfigError
from surgery.map.graphs import CallSite
from surgery.sites.rewrite import call_input
from surgery.map.roles import ELEMENTWISE, ModelRoles, find_roles, walk
from surgery.sites.resolve import Site, candidate_sites
from surgery.map.trace import is_hf_conv1d

__all__ = ["SubLayer", "find_sublayers", "is_linear_layer"]


def is_linear_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a layer bottleneck adapters attach to: ``nn.Linear`` or
    transformers' ``Conv1D`` (its weight is ``(in_features, out_features)``)."""
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


@dataclass(frozen=True)
class SubLayer:
    """A span of the graph a parallel adapter bridges.

    Attributes:
        kind: ``"ffn"`` (a feed-forward block), ``"attention"`` (query projection to output
            projection) or ``"layer"`` (one selected layer).
        output: the layer whose output the adapter joins; the adapter is registered under it.
        inputs: qualified names of the layers whose input the adapter reads (the ``ffn_up``
            and ``ffn_gate`` of a block, the query projection, or the layer itself).
        calls: ``(input call, output call)`` pairs, one per call of ``output``.
    """

    kind: str
    output: Site
    inputs: tuple[str, ...]
    calls: tuple[tuple[CallSite, CallSite], ...]

    @property
    def members(self) -> tuple[str, ...]:
        """Every layer of the span: inputs, then the output layer."""
        return tuple(dict.fromkeys(self.inputs + (self.output.qname,)))


def _call_at(g: nx.DiGraph, nid: str, qname: str) -> CallSite:
    ref = g.nodes[nid]["ref"]
    return CallSite(qname, ref.prefix, ref.owner, ref.node)


def _nearest(g: nx.DiGraph, ids: list[str], *, before: str | None = None,
             after: str | None = None) -> str | None:
    """Of the call ids that reach ``before`` (or are reached from ``after``), the nearest.

    A layer shared by several blocks has one call per block; every earlier call reaches a
    later attention op through the residual stream, so the nearest is the one no other
    candidate lies between.
    """
    if before is not None:
        hits = [i for i in ids if nx.has_path(g, i, before)]
        return next((i for i in hits
                     if not any(j != i and nx.has_path(g, i, j) for j in hits)), None)
    hits = [i for i in ids if nx.has_path(g, after, i)]
    return next((i for i in hits
                 if not any(j != i and nx.has_path(g, j, i) for j in hits)), None)


def _ffn_sublayers(g: nx.DiGraph, roles: ModelRoles, cands: dict[str, list[CallSite]]
                   ) -> list[SubLayer]:
    """One :class:`SubLayer` per feed-forward down projection, paired with its up / gate
    projections by the same backward walk :func:`surgery.map.roles.find_roles` pairs them with."""
    out = []
    for qname, calls in cands.items():
        info = roles.role_of(qname)
        if info is None or "ffn_down" not in info.roles:
            continue
        pairs, inputs = [], []
        for call in calls:
            x = call_input(call.node)
            if not isinstance(x, fx.Node):
                continue
            sources, paths = walk(g, node_id(call.prefix, x), ELEMENTWISE)
            ups = [s for s in sources
                   if (r := roles.role_of(s)) and r.roles & {"ffn_up", "ffn_gate"}]
            if not ups:
                continue
            ups.sort(key=lambda s: "ffn_up" not in roles.role_of(s).roles)  # ffn_up first
            pairs.append((_call_at(g, paths[ups[0]][-1], ups[0]), call))
            inputs.extend(ups)
        if pairs:
            site = Site(qname, calls[0].owner.get_submodule(str(calls[0].node.target)),
                        tuple(calls), info)
            out.append(SubLayer("ffn", site, tuple(dict.fromkeys(inputs)), tuple(pairs)))
    return out


def _attention_sublayers(g: nx.DiGraph, roles: ModelRoles, cands: dict[str, list[CallSite]]
                         ) -> list[SubLayer]:
    """One :class:`SubLayer` per attention op with a query and an output projection."""
    out = []
    order = {q: i for i, q in enumerate(cands)}
    for op in roles.attention:
        query = [q for q in op.query if q in cands]
        outs = [q for q in op.out if q in cands]
        if op.kind == "mha" or not query or not outs:
            continue
        q_name, o_name = query[0], outs[0]
        q_ids = [node_id(c.prefix, c.node) for c in cands[q_name]]
        o_ids = [node_id(c.prefix, c.node) for c in cands[o_name]]
        q_id = q_ids[0] if len(q_ids) == 1 else _nearest(g, q_ids, before=op.node)
        o_id = o_ids[0] if len(o_ids) == 1 else _nearest(g, o_ids, after=op.node)
        if q_id is None or o_id is None:
            continue
        site = Site(o_name, cands[o_name][0].owner.get_submodule(str(cands[o_name][0].node.target)),
                    tuple(cands[o_name]), roles.role_of(o_name))
        out.append(SubLayer("attention", site, (q_name,),
                            ((_call_at(g, q_id, q_name), _call_at(g, o_id, o_name)),)))
    merged: dict[str, SubLayer] = {}
    for sub in out:  # an output projection shared by several attention ops: one entry
        prev = merged.get(sub.output.qname)
        if prev is not None:
            sub = SubLayer("attention", sub.output, tuple(dict.fromkeys(prev.inputs + sub.inputs)),
                           prev.calls + sub.calls)
        merged[sub.output.qname] = sub
    return sorted(merged.values(), key=lambda s: order[s.output.qname])


def find_sublayers(model: nn.Module, kind: str, *, dataflow: nx.DiGraph | None = None,
                   roles: ModelRoles | None = None) -> list[SubLayer]:
    """The feed-forward blocks (``kind="ffn"``) or attention sub-layers
    (``kind="attention"``) of a traced ``model``, in graph order.

    A feed-forward block reads the input of its ``ffn_up`` (and ``ffn_gate``) projection and
    ends at the output of its ``ffn_down`` projection; an attention sub-layer reads the input
    of its query projection (a fused qkv projection counts) and ends at the output of its
    ``attn_out`` projection. ``nn.MultiheadAttention`` computes its projections inside one
    opaque call and has no such span.

    Args:
        model: a traced model (:func:`surgery.map.trace.trace`, either front end).
        kind: ``"ffn"`` or ``"attention"``.
        dataflow / roles: prebuilt :func:`surgery.map.dataflow.build_dataflow` /
            :func:`surgery.map.roles.find_roles` results, to share work.

    Returns:
        One :class:`SubLayer` per output layer (an output projection shared by several
        attention ops gives one entry with a call pair per op); empty when the model has
        none of that kind. On transformers' LLaMA, the block ending at
        ``model.layers.0.mlp.down_proj`` has inputs
        ``("model.layers.0.mlp.up_proj", "model.layers.0.mlp.gate_proj")``.

    Raises:
        ConfigError: ``kind`` is neither ``"ffn"`` nor ``"attention"``.
    """
    g = dataflow if dataflow is not None else build_dataflow(model)
    roles = roles if roles is not None else find_roles(model, g)
    cands = candidate_sites(model, is_linear_layer)
    if kind == "ffn":
        return _ffn_sublayers(g, roles, cands)
    if kind == "attention":
        return _attention_sublayers(g, roles, cands)
    raise ConfigError(f"find_sublayers: kind must be 'ffn' or 'attention', got {kind!r}")
