"""Attention ops in a dataflow graph (:func:`surgery.map.dataflow.build_dataflow`): ``scaled_dot_product_attention`` calls, the eager
``matmul → softmax → matmul`` pattern, and ``nn.MultiheadAttention`` calls, each with the
nodes that feed its query, key and value."""

from __future__ import annotations

from collections import deque
from collections.abc import Collection

import networkx as nx
from torch import nn

__all__ = ["MATMULS", "SHAPE_OPS", "SOFTMAX_PRE", "args_of", "find_attention_ops"]

SHAPE_OPS = {
    "view", "reshape", "_unsafe_view", "transpose", "permute", "contiguous", "clone", "to",
    "type", "float", "half", "bfloat16", "_to_copy", "split", "split_with_sizes", "chunk",
    "unbind", "unsafe_split", "getitem", "unflatten", "flatten", "expand", "unsqueeze",
    "squeeze", "slice", "narrow", "select", "t", "alias", "repeat", "repeat_interleave",
    "dropout", "native_dropout", "identity", "module:dropout", "module:identity",
    "placeholder", "output", "type_as", "movedim", "swapaxes", "lift_fresh_copy",
}
SOFTMAX_PRE = SHAPE_OPS | {"div", "truediv", "mul", "add", "sub", "masked_fill", "where", "tanh",
                             "masked_fill_", "add_", "div_", "mul_"}
MATMULS = {"matmul", "bmm", "baddbmm", "einsum"}


def args_of(g: nx.DiGraph, nid: str, names: tuple[str, ...], count: int) -> list[str | None]:
    """Dataflow ids of the first ``count`` arguments of node ``nid`` (positional, or by the
    keyword in ``names``); ``None`` for an argument that is not a node."""
    node = g.nodes[nid]["ref"].node
    prefix = g.nodes[nid]["ref"].prefix
    out: list[str | None] = []
    for i in range(count):
        val = node.args[i] if i < len(node.args) else node.kwargs.get(names[i])
        out.append(f"{prefix}/{val.name}" if hasattr(val, "name") and hasattr(val, "op") else None)
    return out


def find_attention_ops(g: nx.DiGraph) -> list[tuple[str, str, list[str | None]]]:
    """Return ``(node id, kind, [q, k, v])`` for every attention op."""
    ops = []
    for nid, data in g.nodes(data=True):
        name = data["name"]
        if "scaled_dot_product" in name and data["op"] in ("call_function", "call_method"):
            ops.append((nid, "sdpa", args_of(g, nid, ("query", "key", "value"), 3)))
        elif data["op"] == "call_module" and isinstance(data.get("module"), nn.MultiheadAttention):
            ops.append((nid, "mha", args_of(g, nid, ("query", "key", "value"), 3)))
        elif name in ("softmax", "_softmax", "module:softmax", "safe_softmax", "_safe_softmax"):
            eager = _eager_from_softmax(g, nid)
            if eager is not None:
                ops.append(eager)
    return ops


def _nearest_matmul(g: nx.DiGraph, start: str, *, forward: bool,
                    through: Collection[str]) -> str | None:
    """Breadth-first from ``start`` along successors (``forward``) or predecessors, passing
    only nodes whose name is in ``through``; the first matmul reached (neighbours taken in
    sorted order), or ``None``."""
    step = g.successors if forward else g.predecessors
    queue, seen = deque([start]), {start}
    while queue:
        nid = queue.popleft()
        for other in sorted(step(nid)):
            if other in seen:
                continue
            seen.add(other)
            name = g.nodes[other]["name"]
            if name in MATMULS:
                return other
            if name in through:
                queue.append(other)
    return None


def _eager_from_softmax(g: nx.DiGraph, sm: str) -> tuple[str, str, list[str | None]] | None:
    pv = _nearest_matmul(g, sm, forward=True, through=SHAPE_OPS)  # probs @ v
    if pv is None:
        return None
    qk = _nearest_matmul(g, sm, forward=False, through=SOFTMAX_PRE)  # q @ k^T
    if qk is None:
        return None
    if g.nodes[qk]["name"] == "baddbmm":  # bias + q @ k^T (Bloom's ALiBi): batch1, batch2
        _, q, k = args_of(g, qk, ("input", "batch1", "batch2"), 3)
    else:
        q, k = args_of(g, qk, ("input", "other"), 2)
    _, v = args_of(g, pv, ("input", "other"), 2)
    return (pv, "eager", [q, k, v])
