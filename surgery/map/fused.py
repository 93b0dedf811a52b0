"""Which output features of a fused q/k/v projection feed the query, the key and the value.

A fused projection (GPT-2's ``c_attn``, Phi-3's ``qkv_proj``, Falcon's and GPT-NeoX's and
Bloom's ``query_key_value``) computes the three with one matrix product; the attention code
then cuts its output apart. :func:`fused_slice` follows the dataflow path from the
attention input back to the projection, in the projection's direction of computation, and
reads off which output features the cut keeps:

* GPT-2: ``split(d, dim=2)`` on ``(b, s, 3d)``: query ``[0, d)``;
* Phi-3: ``[..., :q]`` slices on ``(b, s, q + 2kv)``;
* Falcon: ``view(b, s, heads + 2, hd)`` then ``split([heads, 1, 1], dim=-2)``: contiguous;
* GPT-NeoX: ``view(b, s, heads, 3 hd)`` then ``chunk(3, dim=-1)``, and Bloom:
  ``view(b, s, heads, 3, hd)`` then ``[..., 0, :]``: the query of each head sits between
  the key and value of the head before and its own, so the features are *interleaved*
  (:data:`INTERLEAVED`): no one ``(start, stop)`` slice says which they are.

Shapes come from the values recorded on the nodes (export's fake tensors, or fx shape
propagation).
"""

from __future__ import annotations

import math
from typing import Final

import networkx as nx

from surgery.map.graphs import node_value

__all__ = ["INTERLEAVED", "fused_slice"]

INTERLEAVED: Final = "interleaved"
"""Returned by :func:`fused_slice` when the role's features are spread over the output
(a per-head ``[q, k, v]`` layout) instead of one contiguous block."""

_RESHAPES = {"view", "reshape", "_unsafe_view", "unflatten"}
_SAME = {"to", "_to_copy", "type", "float", "half", "bfloat16", "contiguous", "clone",
         "alias", "identity", "dropout", "native_dropout", "placeholder", "type_as",
         "module:dropout", "module:identity", "lift_fresh_copy"}
_PERMUTES = {"transpose", "swapaxes", "permute", "t"}
_SPLITS = {"split", "split_with_sizes", "chunk", "unsafe_split", "tensor_split"}


def _shape(g: nx.DiGraph, nid: str) -> tuple[int, ...] | None:
    val = node_value(g.nodes[nid]["ref"].node)
    if val is None:
        return None
    try:
        return tuple(int(s) for s in val.shape)
    except TypeError:  # a symbolic size
        return None


def _arg(node: object, i: int, name: str, default: object = None) -> object:
    args, kwargs = node.args, node.kwargs  # type: ignore[attr-defined]
    return args[i] if i < len(args) else kwargs.get(name, default)


def _split_range(node: object, op: str, index: int, size: int) -> tuple[int, int] | None:
    """The ``[start, stop)`` along the split dimension of piece ``index``."""
    arg = _arg(node, 1, "split_size_or_sections" if op != "chunk" else "chunks")
    if op == "split_with_sizes" or isinstance(arg, (list, tuple)):
        sizes = [int(s) for s in arg]  # type: ignore[union-attr]
    elif op == "chunk" and isinstance(arg, int):
        step = math.ceil(size / arg)
        sizes = [min(step, size - i) for i in range(0, size, step)]
    elif isinstance(arg, int):
        sizes = [min(arg, size - i) for i in range(0, size, arg)]
    else:
        return None
    if not 0 <= index < len(sizes):
        return None
    start = sum(sizes[:index])
    return start, start + sizes[index]


def fused_slice(g: nx.DiGraph, path: list[str], out_features: int
                ) -> tuple[int, int] | str | None:
    """The output features of the projection at ``path[-1]`` that reach ``path[0]``.

    Args:
        g: the dataflow graph (:func:`surgery.map.dataflow.build_dataflow`).
        path: dataflow ids from an attention input back to the projection's call.
        out_features: the projection's output width.

    Returns:
        ``(start, stop)``; :data:`INTERLEAVED` when the features are spread over the output;
        ``None`` when the path cannot be read (no recorded shapes, an operation not
        followed).
    """
    if len(path) < 2:
        return None
    steps = list(reversed(path))  # projection first
    shape = _shape(g, steps[0])
    if shape is None or not shape or shape[-1] != out_features:
        return None
    lead = len(shape) - 1
    labels: list[tuple[str, int]] = [("lead", i) for i in range(lead)] + [("feat", 0)]
    feats = [out_features]
    for k, nid in enumerate(steps[1:], start=1):
        data = g.nodes[nid]
        op, node = data["name"], data["ref"].node
        if op in _SAME:
            continue
        if op in _RESHAPES:
            new = _shape(g, nid)
            kept = labels[:lead] == [("lead", i) for i in range(lead)]
            if (new is None or not kept or len(new) <= lead or new[:lead] != shape[:lead]
                    or math.prod(new[lead:]) != out_features):
                return None
            feats = list(new[lead:])
            labels = labels[:lead] + [("feat", j) for j in range(len(feats))]
            continue
        if op in _PERMUTES:
            dims = len(labels)
            if op == "permute":
                order = _arg(node, 1, "dims")
                if not isinstance(order, (list, tuple)):
                    return None
                labels = [labels[int(d) % dims] for d in order]
            elif op == "t":
                labels = labels[::-1]
            else:
                a, b = (int(_arg(node, 1, "dim0")) % dims, int(_arg(node, 2, "dim1")) % dims)
                labels[a], labels[b] = labels[b], labels[a]
            continue
        picked: tuple[int, int] | None
        if op in _SPLITS:
            if k + 1 >= len(steps) or g.nodes[steps[k + 1]]["name"] != "getitem":
                return None
            index = g.nodes[steps[k + 1]]["ref"].node.args[1]
            dim = int(_arg(node, 2, "dim", 0)) % len(labels)
            if not isinstance(index, int) or labels[dim][0] != "feat":
                return None
            picked = _split_range(node, op, index, feats[labels[dim][1]])
        elif op == "select":
            dim = int(_arg(node, 1, "dim")) % len(labels)
            index = int(_arg(node, 2, "index"))
            if labels[dim][0] != "feat":
                return None
            size = feats[labels[dim][1]]
            picked = (index % size, index % size + 1)
        elif op == "slice":
            dim = int(_arg(node, 1, "dim", 0)) % len(labels)
            if labels[dim][0] != "feat" or int(_arg(node, 4, "step", 1) or 1) != 1:
                return None
            size = feats[labels[dim][1]]
            start = _arg(node, 2, "start", 0)
            stop = _arg(node, 3, "end", size)
            start = 0 if start is None else int(start)
            stop = size if stop is None else int(stop)
            start, stop = (max(0, min(size, v + size if v < 0 else v)) for v in (start, stop))
            picked = (start, stop)
        else:
            return None  # arithmetic before the cut: the layout cannot be read
        if picked is None:
            return None
        j = labels[dim][1]
        if any(feats[i] != 1 for i in range(j)):
            return INTERLEAVED
        stride = math.prod(feats[j + 1:])
        return picked[0] * stride, picked[1] * stride
    return None
