"""Where :class:`passes.prefix.PrefixPass` puts a prefix in a hand-written model: the
attention ops the map shows, the module whose ``forward`` holds each one (its site graph
is rewritten), their head layout, and the same ops found again in that site graph.

Read-only analysis; nothing here edits a graph or registers a module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from surgery.errors import UnsupportedSiteError
from surgery.map.dataflow import build_dataflow, op_name
from surgery.map.graphs import node_value
from surgery.map.roles import AttentionOp, ModelRoles, find_roles
from surgery.sites.site_graph import SiteGraph, base_module

__all__ = [
    "MHA_ARGS",
    "SDPA_ARGS",
    "MapAttention",
    "SiteOp",
    "attention_owners",
    "call_arg",
    "dtype_device",
    "first_outputs",
    "heads_at",
    "map_attention",
    "set_call_arg",
    "site_ops",
]

SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
             "enable_gqa")
MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
            "average_attn_weights", "is_causal")

_VIEWS = {"view", "reshape", "_unsafe_view", "unflatten"}


def call_arg(node: fx.Node, names: tuple[str, ...], name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call whose positional order is ``names``."""
    i = names.index(name)
    if i < len(node.args):
        return node.args[i]
    return node.kwargs.get(name, default)


def set_call_arg(node: fx.Node, names: tuple[str, ...], name: str, value: Any) -> None:
    """Set argument ``name`` where the call passes it (positionally or by keyword)."""
    i = names.index(name)
    if i < len(node.args):
        args = list(node.args)
        args[i] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def _int(x: Any) -> int | None:
    """``x`` as an int when it is a known constant, else ``None`` (a symbolic size is never
    forced to an int: that would add a guard to the shape environment of the map)."""
    if isinstance(x, torch.SymInt):
        return int(x) if is_concrete_int(x) else None
    try:
        return int(x)
    except (TypeError, ValueError):
        return None


# ---- the attention ops of the map -----------------------------------------------------------


@dataclass(frozen=True)
class MapAttention:
    """One attention op as the map shows it.

    Attributes:
        op: its :class:`surgery.map.roles.AttentionOp` record.
        node: the op's node in the map (the SDPA call, the ``probs @ v`` matmul, or the
            ``nn.MultiheadAttention`` call); its arguments carry the recorded shapes.
        owner: the name the op is selected by: the module whose ``forward`` holds it
            (``"layers.0.attn"``), or the ``nn.MultiheadAttention`` itself.
        holder: the module whose ``forward`` makes the call, where its site graph goes:
            ``owner`` itself, or the module calling the ``nn.MultiheadAttention``.
    """

    op: AttentionOp
    node: fx.Node
    owner: str
    holder: str


def _stack(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [v[0] for v in stack.values() if isinstance(v, tuple) and isinstance(v[0], str)]


def _exists(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _common_owner(op: AttentionOp) -> str:
    names = [n for group in (op.query, op.key, op.value, op.out) for n in group]
    parts = [n.split(".")[:-1] for n in names]
    common: list[str] = []
    for segs in zip(*parts):
        if len(set(segs)) != 1:
            break
        common.append(segs[0])
    return ".".join(common)


def map_attention(graph_map: nn.Module) -> tuple[list[MapAttention], ModelRoles]:
    """Every attention op of the whole-model map, in graph order, and the map's roles.

    The owner is read from the op's ``nn_module_stack`` (a flat torch.fx map), from the
    graph holding it (an export map), or, failing both, from the common prefix of the names
    of its projections. Roles are found on this very map (not on one block per kind), so
    every op is a node of it, with its recorded shapes.
    """
    g = build_dataflow(graph_map)
    roles = find_roles(graph_map, g)
    out = []
    seen: set[str] = set()
    for op in roles.attention:
        if op.node in seen:  # one record per op
            continue
        seen.add(op.node)
        data = g.nodes[op.node]
        ref = data["ref"]
        if op.kind == "mha":
            owner = data["qname"]
            outer = [p for p in _stack(ref.node) if p != owner and _exists(graph_map, p)]
            holder = outer[-1] if outer else (ref.prefix or owner.rpartition(".")[0])
        else:
            stack = [p for p in _stack(ref.node) if _exists(graph_map, p)]
            owner = ref.prefix or (stack[-1] if stack else _common_owner(op))
            holder = owner
        out.append(MapAttention(op, ref.node, owner, holder))
    return out, roles


def attention_owners(graph_map: nn.Module) -> list[tuple[str, AttentionOp]]:
    """Every attention op of a map with the name ``PrefixPass`` selects it by
    (``"layers.0.attn"``, ``"encoder.layer.0.attention.self"``, an ``nn.MultiheadAttention``).

    Returns:
        ``[(owner name, AttentionOp)]`` in graph order.
    """
    return [(a.owner, a.op) for a in map_attention(graph_map)[0]]


# ---- the same ops in the holder's site graph --------------------------------------------------


@dataclass(frozen=True)
class SiteOp:
    """One attention op to rewrite, found in the site graph of its holder.

    Attributes:
        kind: ``"sdpa"``, ``"eager"`` or ``"mha"``.
        node: the op's node in the site graph.
        site: the map's view of the op (shapes, names).
        sg: the site graph holding ``node``.
    """

    kind: str
    node: fx.Node
    site: MapAttention
    sg: SiteGraph

    @property
    def owner(self) -> str:
        """The name the op is selected by."""
        return self.site.owner

    @property
    def where(self) -> str:
        """The op's node in the map, for messages (``"/scaled_dot_product_attention_1"``)."""
        return self.site.op.node

    @property
    def owner_module(self) -> nn.Module:
        """The module the prefix registers on: the site graph, or the MHA inside it."""
        return self.sg.get_submodule(str(self.node.target)) if self.kind == "mha" else self.sg

    def target(self, slot: str, adapter: str) -> str:
        """``call_module`` target in the site graph of ``<owner>.<slot>.<adapter>``."""
        rel = str(self.node.target) if self.kind == "mha" else ""
        return ".".join(p for p in (rel, slot, adapter) if p)


def site_ops(sg: SiteGraph, holder: str, wanted: list[MapAttention]) -> list[SiteOp]:
    """Find the map's attention ops ``wanted`` (all held by ``holder``) in its site graph.

    An ``nn.MultiheadAttention`` is found by its call; the other ops are the site graph's
    own (not inside a child's inlined code), matched to the map's in graph order.

    Raises:
        UnsupportedSiteError: the site graph does not show the ops the map shows.
    """
    g = build_dataflow(sg)
    own = []
    for op in find_roles(sg, g).attention:
        ref = g.nodes[op.node]["ref"]
        if ref.prefix == "" and not _stack(ref.node) and op.kind != "mha":
            own.append((op.kind, ref.node))
    calls = {str(n.target): n for n in sg.graph.nodes if n.op == "call_module"
             and isinstance(base_module(sg.get_submodule(str(n.target))), nn.MultiheadAttention)}
    owned = [w for w in wanted if w.op.kind != "mha"]  # in the map's graph order
    found: list[SiteOp] = []
    if len(own) != len(owned) or any(k != w.op.kind for (k, _), w in zip(own, owned)):
        raise UnsupportedSiteError(
            f"PrefixPass: the forward of {holder or 'the model'} ({type(sg.template).__name__}) "
            f"traced on its own shows the attention ops {[k for k, _ in own]}, not the "
            f"{[w.op.kind for w in owned]} the model's map shows there. Way out: "
            f"exclude={holder!r}.")
    for w in wanted:
        if w.op.kind == "mha":
            rel = w.owner[len(holder) + 1:] if holder else w.owner
            node = calls.get(rel)
            if node is None:
                raise UnsupportedSiteError(
                    f"PrefixPass: {holder or 'the model'} does not call {w.owner} "
                    f"(nn.MultiheadAttention) in its own forward. Way out: exclude={w.owner!r}.")
            found.append(SiteOp("mha", node, w, sg))
        else:
            kind, node = own[owned.index(w)]
            found.append(SiteOp(kind, node, w, sg))
    return found


# ---- head layout ----------------------------------------------------------------------------


def _view_sizes(node: fx.Node) -> list[Any]:
    rest = list(node.args[1:])
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        rest = list(rest[0])
    if op_name(node) == "unflatten" and len(rest) == 2 and isinstance(rest[1], (list, tuple)):
        rest = list(rest[1])
    return rest


def _heads_from_graph(node: Any, width: int | None) -> tuple[int, int] | None:
    """``(heads, head_dim)`` of ``x.view(B, S, H, hd).transpose(1, 2)``, read from the view."""
    for _ in range(20):
        if not isinstance(node, fx.Node):
            return None
        name = op_name(node)
        if name in {"transpose", "permute", "contiguous", "to", "clone", "type", "float"}:
            node = node.args[0]
            continue
        if name not in _VIEWS or node.op not in ("call_method", "call_function"):
            return None
        sizes = _view_sizes(node)
        if len(sizes) < 2:
            return None
        hd, heads = _int(sizes[-1]), _int(sizes[-2])
        if hd and hd > 0 and heads and heads > 0:
            return heads, hd
        if hd and hd > 0 and heads == -1 and width:
            return width // hd, hd
        if heads and heads > 0 and hd == -1 and width:
            return heads, width // heads
        return None
    return None


def _layer_width(graph_map: nn.Module, roles: ModelRoles, names: list[str],
                 which: str) -> int | None:
    if len(names) != 1:
        return None
    info = roles.role_of(names[0])
    if info is not None and info.is_fused and which in info.fused:
        start, stop = info.fused[which]
        return stop - start
    layer = graph_map.get_submodule(names[0])
    weight = getattr(layer, "weight", None)
    if weight is None:
        return None
    return int(weight.shape[1 if type(layer).__name__ == "Conv1D" else 0])


def heads_at(graph_map: nn.Module, roles: ModelRoles, node: Any, site: MapAttention,
             which: str, *, transposed: bool = False) -> tuple[int, int]:
    """``(heads, head_dim)`` of the 4-D attention input ``node`` (a node of the map).

    Read from its recorded example value (a map traced with example inputs); otherwise
    from the ``view(B, S, H, hd)`` (or ``unflatten``) that produced it.

    Args:
        which: ``"query"``, ``"key"`` or ``"value"`` (for messages and the layer width).
        transposed: ``node`` is ``k^T``, ``(B, H, hd, S)``.

    Raises:
        UnsupportedSiteError: the input is not 4-D, or nothing tells its layout.
    """
    val = node_value(node) if isinstance(node, fx.Node) else None
    if val is not None:
        if val.dim() != 4:
            raise UnsupportedSiteError(
                f"PrefixPass: the {which} input of the attention op at {site.op.node} has shape "
                f"{tuple(val.shape)}; a prefix needs (batch, heads, seq, head_dim). Way out: "
                f"exclude={site.owner!r}, or mode='sequence'.")
        h, d = _int(val.shape[-3]), _int(val.shape[-2 if transposed else -1])
        if h is not None and d is not None:
            return h, d
    found = _heads_from_graph(node, _layer_width(graph_map, roles, getattr(site.op, which),
                                                 which))
    if found is None:
        raise UnsupportedSiteError(
            f"PrefixPass: cannot tell the number of heads and the head size at the {which} "
            f"input of the attention op at {site.op.node} in {site.owner or 'the model'}: the "
            f"map records no shapes. Way out: pass example_inputs=... to apply_passes so "
            f"shapes are recorded.")
    return found


def dtype_device(model: nn.Module, modules: list[str], owner: nn.Module,
                 fallback: Any) -> tuple[torch.dtype, torch.device]:
    """dtype and device for new parameters: of the first floating-point weight among
    ``modules`` (the key and value projections), else of ``owner``'s parameters, else of
    ``fallback``'s recorded value (a map node), else the defaults."""
    for name in modules:
        try:
            weight = getattr(model.get_submodule(name), "weight", None)
        except AttributeError:
            weight = None
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            return weight.dtype, weight.device
    for p in owner.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    val = node_value(fallback) if isinstance(fallback, fx.Node) else None
    if val is not None and val.is_floating_point():
        return val.dtype, torch.device("cpu") if val.device.type == "meta" else val.device
    return torch.get_default_dtype(), torch.device("cpu")


def first_outputs(node: fx.Node) -> list[fx.Node] | None:
    """The nodes reading element 0 of a module call's output tuple; ``None`` when the
    output is also used otherwise."""
    import operator

    found = []
    for user in node.users:
        if user.op != "call_function" or user.target is not operator.getitem:
            return None
        if user.args[1] == 0:
            found.append(user)
    return found
