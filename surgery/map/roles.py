"""Structural roles found from the graph itself.

For every attention op (a ``scaled_dot_product_attention`` call, the eager
``matmul → softmax → matmul`` pattern, or an ``nn.MultiheadAttention`` call) the linear
layers producing its query, key, value and output are found by walking the dataflow graph
through shape-only and elementwise operations; for every feed-forward block (a linear layer
whose input comes, through an activation, from other linear layers) its up, gate and down
projections. Names differ across model families (``q_proj``, ``query``, ``c_attn``); roles
do not.

Role names: ``"query"``, ``"key"``, ``"value"``, ``"attn_out"``, ``"ffn_up"``,
``"ffn_gate"``, ``"ffn_down"``, and ``"attention"`` for an ``nn.MultiheadAttention`` module.
A fused projection (GPT-2's ``c_attn``) carries several roles and the feature slice of each.

Cross-attention (an op whose keys come from another tensor than its queries: the decoder
of T5, BART, Whisper attending to the encoder) plays the same four roles, so ``"query"``
selects the queries of self- and cross-attention alike (as PEFT's default ``["q", "v"]``
on T5 does), and also ``"cross_query"``, ``"cross_key"``, ``"cross_value"``,
``"cross_attn_out"``. The derived roles ``"self_query"``, ... select self-attention alone
(:meth:`RoleInfo.plays`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import networkx as nx
from torch import nn

from surgery.errors import ConfigError, near_matches
from surgery.map.attention_ops import SHAPE_OPS as _SHAPE_OPS
from surgery.map.attention_ops import find_attention_ops
from surgery.map.dataflow import build_dataflow
from surgery.map.fused import INTERLEAVED, fused_slice
from surgery.map.trace import is_linear_like

__all__ = [
    "ROLES",
    "CROSS_ROLES",
    "SELF_ROLES",
    "ROLE_ALIASES",
    "AttentionOp",
    "RoleInfo",
    "ModelRoles",
    "find_roles",
    "normalize_roles",
    "walk",
    "ELEMENTWISE",
]

_PROJECTIONS = ("query", "key", "value", "attn_out")
CROSS_ROLES = tuple(f"cross_{r}" for r in _PROJECTIONS)
SELF_ROLES = tuple(f"self_{r}" for r in _PROJECTIONS)
ROLES = ("query", "key", "value", "attn_out", "ffn_up", "ffn_gate", "ffn_down", "attention",
         *CROSS_ROLES, *SELF_ROLES)
ROLE_ALIASES = {
    "q": "query", "k": "key", "v": "value", "o": "attn_out", "out": "attn_out",
    "output": "attn_out", "up": "ffn_up", "gate": "ffn_gate", "down": "ffn_down",
}

# Backward from q/k/v, rotary embeddings and scaling add these.
_QKV_OPS = _SHAPE_OPS | {"mul", "add", "sub", "neg", "cat", "div", "truediv", "mul_", "add_"}
_FORWARD_OPS = _SHAPE_OPS
_ACTIVATIONS = {
    "gelu", "relu", "silu", "sigmoid", "tanh", "erf", "mish", "elu", "leaky_relu", "softplus",
    "hardswish", "hardsigmoid", "hardtanh", "relu6", "gelu_", "relu_", "silu_", "glu", "selu",
    "celu", "prelu", "rrelu", "softsign", "tanh_", "sigmoid_",
}
ELEMENTWISE = _ACTIVATIONS | {
    "mul", "add", "sub", "div", "truediv", "pow", "neg", "exp", "clamp", "to", "_to_copy", "type",
    "float", "contiguous", "clone", "dropout", "native_dropout", "getitem", "placeholder",
    "output", "mul_", "add_", "alias", "identity",
}


# A feed-forward block's walk back from its output layer also crosses the split of a fused
# gate-and-up projection (Phi-3's gate_up_proj: ``gate, up = h.chunk(2, dim=-1)``).
_FFN_OPS = ELEMENTWISE | {"chunk", "split", "split_with_sizes", "tensor_split", "unbind"}


def _is_activation(name: str) -> bool:
    if name in _ACTIVATIONS:
        return True
    if name.startswith("module:"):
        cls = name[7:]
        return any(k in cls for k in ("gelu", "relu", "silu", "swish", "tanh", "sigmoid", "mish",
                                      "activation", "elu", "softplus"))
    return False


def _passes(name: str, allowed: set[str]) -> bool:
    return name in allowed or ((allowed is ELEMENTWISE or allowed is _FFN_OPS)
                               and _is_activation(name))


@dataclass
class AttentionOp:
    """One attention op and the layers around it.

    Attributes:
        node: dataflow id of the op (``"<prefix>/<node name>"``).
        kind: ``"sdpa"``, ``"eager"`` or ``"mha"``.
        prefix: qualified name of the module whose graph holds the op.
        query / key / value: qualified names of the layers producing each input.
        out: qualified names of the layers consuming the output.
        cross: ``True`` for cross-attention (keys and values computed from another tensor
            than the queries, as a decoder attending to its encoder).
    """

    node: str
    kind: str
    prefix: str
    query: list[str] = field(default_factory=list)
    key: list[str] = field(default_factory=list)
    value: list[str] = field(default_factory=list)
    out: list[str] = field(default_factory=list)
    cross: bool = False


@dataclass
class RoleInfo:
    """The roles of one module.

    Attributes:
        qname: qualified module name.
        roles: the roles it plays (several for a fused projection).
        fused: for fused projections, the output-feature slice ``(start, stop)`` of each of
            ``query``/``key``/``value``; empty when they are interleaved per head
            (GPT-NeoX, Bloom: see :mod:`surgery.map.fused`).
    """

    qname: str
    roles: set[str] = field(default_factory=set)
    fused: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """A short label: ``"query"``, ``"qkv (fused)"``, ``"ffn_down"``,
        ``"query (cross)"``."""
        cross = " (cross)" if self.is_cross else ""
        plain = self.roles - set(CROSS_ROLES)
        attn = [r for r in ("query", "key", "value") if r in plain]
        if len(attn) > 1:
            short = "".join(r[0] for r in attn)
            rest = sorted(plain - set(attn))
            return ", ".join([f"{short} (fused){cross}"] + rest)
        return ", ".join(r + cross if r in _PROJECTIONS else r
                         for r in sorted(plain, key=ROLES.index))

    @property
    def is_cross(self) -> bool:
        """True for a projection of a cross-attention op (a ``cross_*`` role)."""
        return bool(self.roles & set(CROSS_ROLES))

    def plays(self, role: str) -> bool:
        """True when the module plays the canonical ``role``: one of :attr:`roles`, or a
        derived ``"self_<r>"`` role (plays ``<r>`` and not ``"cross_<r>"``)."""
        if role in SELF_ROLES:
            base = role[len("self_"):]
            return base in self.roles and f"cross_{base}" not in self.roles
        return role in self.roles

    @property
    def is_fused(self) -> bool:
        """True when the module produces more than one of query, key and value."""
        return len(self.roles & {"query", "key", "value"}) > 1


@dataclass
class ModelRoles:
    """Roles of every module of a traced model, and its attention ops."""

    modules: dict[str, RoleInfo]
    attention: list[AttentionOp]

    def role_of(self, qname: str) -> RoleInfo | None:
        """The :class:`RoleInfo` of ``qname``, or ``None`` when it plays no role."""
        return self.modules.get(qname)

    def with_role(self, roles: Iterable[str]) -> list[str]:
        """Qualified names of modules playing any of ``roles`` (already normalised)."""
        wanted = tuple(roles)
        return [q for q, info in self.modules.items() if any(info.plays(r) for r in wanted)]


def normalize_roles(role: str | Iterable[str] | None) -> tuple[str, ...]:
    """Map role names and aliases (``"q"``, ``"down"``) to canonical role names.

    Raises:
        ConfigError: an unknown role, with the nearest valid names.
    """
    if role is None:
        return ()
    items = (role,) if isinstance(role, str) else tuple(role)
    out = []
    for item in items:
        canon = ROLE_ALIASES.get(item, item)
        if canon not in ROLES:
            near = near_matches(item, list(ROLES) + list(ROLE_ALIASES))
            raise ConfigError(f"unknown role {item!r}; nearest valid roles: {', '.join(near)}. "
                              f"Valid roles: {', '.join(ROLES)}.")
        out.append(canon)
    return tuple(dict.fromkeys(out))


def _linear_qname(g: nx.DiGraph, nid: str) -> str | None:
    data = g.nodes[nid]
    if data["op"] == "call_module" and not data.get("inlined") and is_linear_like(data["module"]):
        return data["qname"]
    return None


def walk(g: nx.DiGraph, start: str, allowed: set[str], *, forward: bool = False,
          limit: int = 200, visited: set[str] | None = None
          ) -> tuple[list[str], dict[str, list[str]]]:
    """Walk from ``start`` through ``allowed`` ops; return linear layers reached and paths.

    ``visited``, when given, receives every node walked through (not the layers reached).
    """
    found: list[str] = []
    paths: dict[str, list[str]] = {}
    seen = {start}
    queue = deque([(start, [start])])
    steps = 0
    while queue and steps < limit:
        nid, path = queue.popleft()
        steps += 1
        nxt = g.successors(nid) if forward else g.predecessors(nid)
        for other in sorted(nxt):
            if other in seen:
                continue
            seen.add(other)
            qname = _linear_qname(g, other)
            if qname is not None:
                if qname not in found:
                    found.append(qname)
                    paths[qname] = path + [other]
                continue
            data = g.nodes[other]
            if data.get("inlined") or _passes(data["name"], allowed):
                queue.append((other, path + [other]))
                if visited is not None:
                    visited.add(other)
    return found, paths


def _activated(g: nx.DiGraph, source: str, start: str, region: set[str]) -> bool:
    """True when some path from ``source`` to ``start`` inside ``region`` has an activation."""
    sub = g.subgraph(region | {source})
    acts = [n for n in region if _is_activation(g.nodes[n]["name"])]
    reach_from_source = nx.descendants(sub, source) | {source}
    for act in acts:
        if act in reach_from_source and (act == start or nx.has_path(sub, act, start)):
            return True
    return False


def _input_source(g: nx.DiGraph, call: str) -> str | None:
    """The node a linear layer's input comes from, followed back through shape-only ops
    and across module boundaries (an inlined module's placeholder to its caller's
    argument); ``None`` when the call has no node input."""
    node = g.nodes[call]["ref"].node
    if not node.args or not hasattr(node.args[0], "op"):
        return None
    nid = f"{g.nodes[call]['ref'].prefix}/{node.args[0].name}"
    for _ in range(100):
        preds = list(g.predecessors(nid))
        if len(preds) != 1 or g.nodes[nid]["name"] not in _SHAPE_OPS:
            break
        nid = preds[0]
    return nid


def _is_cross(g: nx.DiGraph, query_calls: list[str], key_calls: list[str]) -> bool:
    """True when the layers producing an attention op's keys read another tensor than the
    layers producing its queries (cross-attention); a fused projection is self-attention."""
    if not query_calls or not key_calls or set(query_calls) & set(key_calls):
        return False
    queries = {_input_source(g, c) for c in query_calls}
    keys = {_input_source(g, c) for c in key_calls}
    return None not in queries | keys and not queries & keys


def _in_out(module: nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` features of a linear-like layer, or ``None`` when they cannot be told."""
    if type(module).__name__ == "Conv1D":  # transformers' Conv1D stores (in, out)
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels, module.out_channels
    return None


def _maps_width_to_itself(down: nn.Module, sources: list[nn.Module]) -> bool:
    """True when a feed-forward block ends at the width it starts from (``d → 4d → d``), as
    every transformer and residual feed-forward sub-layer does; a classification head
    (``d → d → labels``) does not. Unknown widths count as true."""
    out = _in_out(down)
    ins = [_in_out(m) for m in sources]
    if out is None or any(i is None for i in ins):
        return True
    return all(i[0] == out[1] for i in ins)


def _out_features(module: nn.Module) -> int:
    weight = getattr(module, "weight", None)
    if weight is None:
        return 0
    if type(module).__name__ == "Conv1D":  # transformers' Conv1D stores (in, out)
        return int(weight.shape[1])
    return int(weight.shape[0])


def find_roles(model: nn.Module, dataflow: nx.DiGraph | None = None) -> ModelRoles:
    """Find the structural role of every module of a traced ``model``.

    Args:
        model: a traced model (from :func:`surgery.map.trace`).
        dataflow: a prebuilt :func:`surgery.map.dataflow.build_dataflow` graph, to share work.

    Returns:
        :class:`ModelRoles` with a :class:`RoleInfo` per module that plays a role.
    """
    g = dataflow if dataflow is not None else build_dataflow(model)
    modules: dict[str, RoleInfo] = {}
    attention: list[AttentionOp] = []

    role_paths: dict[str, dict[str, list[str]]] = {}

    def info(qname: str) -> RoleInfo:
        return modules.setdefault(qname, RoleInfo(qname))

    for nid, kind, (q, k, v) in find_attention_ops(g):
        op = AttentionOp(node=nid, kind=kind, prefix=g.nodes[nid]["ref"].prefix)
        if kind == "mha":
            info(g.nodes[nid]["qname"]).roles.add("attention")
        else:
            calls: dict[str, list[str]] = {}
            for role, arg in (("query", q), ("key", k), ("value", v)):
                if arg is None:
                    continue
                found, paths = walk(g, arg, _QKV_OPS)
                # the walk starts at the argument itself: it may be the linear output directly
                direct = _linear_qname(g, arg)
                if direct is not None:
                    found, paths = [direct], {direct: [arg]}
                setattr(op, role, found)
                calls[role] = [paths[qname][-1] for qname in found]
                for qname in found:
                    ri = info(qname)
                    ri.roles.add(role)
                    role_paths.setdefault(qname, {}).setdefault(role, paths[qname])
            op.cross = _is_cross(g, calls.get("query", []), calls.get("key", []))
        out, _ = walk(g, nid, _FORWARD_OPS, forward=True)
        op.out = out
        for qname in out:
            info(qname).roles.add("attn_out")
        if op.cross:
            for role, names in (("query", op.query), ("key", op.key), ("value", op.value),
                                ("attn_out", op.out)):
                for qname in names:
                    info(qname).roles.add(f"cross_{role}")
        attention.append(op)

    attn_roles = {"query", "key", "value", "attn_out", "attention"}
    for nid, data in g.nodes(data=True):
        qname = _linear_qname(g, nid)
        if qname is None or (qname in modules and modules[qname].roles & attn_roles):
            continue
        node = data["ref"].node
        if not node.args or not hasattr(node.args[0], "op"):
            continue
        start = f"{data['ref'].prefix}/{node.args[0].name}"
        if _linear_qname(g, start) is not None:
            continue
        region: set[str] = {start}
        sources, paths = walk(g, start, _FFN_OPS, visited=region)
        sources = [s for s in sources if not (s in modules and modules[s].roles & attn_roles)]
        if not sources:
            continue
        activated = {s: _activated(g, paths[s][-1], start, region) for s in sources}
        if not any(activated.values()):
            continue
        if not _maps_width_to_itself(data["module"], [g.nodes[paths[s][-1]]["module"]
                                                      for s in sources]):
            continue  # a classification head (pooler → classifier), not a residual block
        info(qname).roles.add("ffn_down")
        gated = len(sources) > 1 and any(activated.values()) and not all(activated.values())
        for src in sources:
            info(src).roles.add("ffn_gate" if gated and activated[src] else "ffn_up")

    # fused projections: the feature slice of each role, from the split on its path
    for qname, ri in modules.items():
        paths = role_paths.get(qname, {})
        if not ri.is_fused:
            continue
        module = model.get_submodule(qname)
        width = _out_features(module)
        order = [r for r in ("query", "key", "value") if r in ri.roles]
        slices = {r: fused_slice(g, paths.get(r, []), width) for r in order}
        if INTERLEAVED in slices.values():
            continue  # per-head [q, k, v] (GPT-NeoX, Bloom): no contiguous slice per role
        for r in order:
            sl = slices[r]
            if sl is None:  # fall back on equal parts in q, k, v order
                part = width // len(order)
                sl = (order.index(r) * part, (order.index(r) + 1) * part)
            ri.fused[r] = sl
    return ModelRoles(modules=modules, attention=attention)
