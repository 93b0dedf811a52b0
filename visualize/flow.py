"""The values that flow while a graph is walked: which drawn nodes a value comes from.

Walking the map (:mod:`visualize.graph`) and the site graphs (:mod:`visualize.expand`),
every fx node is given the drawn nodes its value comes from: a tuple of :class:`Src` for a
tensor, a :class:`Pack` or :class:`Record` for a tuple, list or dict of values, ``None``
for sizes and other values that are not drawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Src", "Pack", "Record", "Value", "flatten", "leaves", "structure", "with_shape",
           "same_structure"]


@dataclass(frozen=True)
class Src:
    """A drawn node a value flows from, with the shape shown on the edge.

    Attributes:
        id: node id in the networkx graph.
        shape: the value's shape (ints, or strings for symbolic dimensions), if known.
        dtype: ``"float32"``, ``"int64"``, ... if known.
    """

    id: str
    shape: tuple | None
    dtype: str | None


class Pack(list):
    """Structured values (a tuple or list a callee returns, a pytree being unpacked)."""


class Record(dict):
    """Keyed values (a dict a callee returns, keyword arguments being unpacked)."""


Value = Any  # tuple[Src, ...] | Pack | Record | None


def flatten(value: Value) -> tuple[Src, ...]:
    """Every :class:`Src` inside ``value``, in order."""
    if value is None:
        return ()
    if isinstance(value, Pack):
        return tuple(src for item in value for src in flatten(item))
    if isinstance(value, Record):
        return tuple(src for item in value.values() for src in flatten(item))
    return tuple(value)


def leaves(value: Value) -> list[Value]:
    """The pytree leaves of a value, in order."""
    if isinstance(value, Pack):
        return [leaf for item in value for leaf in leaves(item)]
    if isinstance(value, Record):
        return [leaf for item in value.values() for leaf in leaves(item)]
    return [value]


def structure(obj: Any) -> Value:
    """Python containers (from ``tree_unflatten``) to packs and records, leaves as they are."""
    if isinstance(obj, dict):
        return Record((k, structure(v)) for k, v in obj.items())
    if isinstance(obj, (tuple, list)) and not (obj and all(isinstance(x, Src) for x in obj)):
        return Pack(structure(v) for v in obj)
    return obj


def with_shape(value: Value, shape: tuple | None, dtype: str | None) -> Value:
    """Relabel a flow with the shape of the node that picked it out of a container."""
    if shape is None or value is None or isinstance(value, (Pack, Record)):
        return value
    return tuple(Src(src.id, shape, dtype) for src in value)


def same_structure(like: Value, value: Value) -> Value:
    """``value`` in the container ``like`` has, when ``like`` holds exactly one tensor value.

    A module that returns one tensor may reach the walk wrapped (a one-element pack from a
    preserved call signature); a value put in its place keeps the wrapping.
    """
    if isinstance(like, (Pack, Record)):
        items = [leaf for leaf in leaves(like) if leaf]
        if len(items) != 1:
            return value
        if isinstance(like, Pack):
            return Pack(same_structure(item, value) if flatten(item) else item for item in like)
        return Record((k, same_structure(v, value) if flatten(v) else v) for k, v in like.items())
    return value
