"""The record of one edit at a site: what a pass added, removed, froze or rewrote."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Change", "ChangeKind"]

ChangeKind = Literal[
    "node_added",
    "node_removed",
    "module_added",
    "module_removed",
    "param_added",
    "param_frozen",
    "param_unfrozen",
    "param_rewritten",
    "param_removed",
]


@dataclass(frozen=True)
class Change:
    """One thing a pass did (or, from ``plan``, would do).

    Attributes:
        kind: what happened (see :data:`ChangeKind`).
        pass_name: the stable name of the pass (``"lora"``).
        site: qualified name of the module adapted (``"layers.0.attn.q_proj"``).
        name: qualified name of the node, module or parameter concerned.
        adapter: adapter name (``"default"``) or ``None``.
        role: structural role of the site (``"q"``, ``"ffn_down"``, ...) or ``None``.
        shape: parameter shape, ``()`` for nodes.
        numel: number of elements of the parameter, 0 for nodes.
        trainable: whether the parameter trains after the pass.
        detail: a short human-readable note.
    """

    kind: ChangeKind
    pass_name: str
    site: str
    name: str
    adapter: str | None = None
    role: str | None = None
    shape: tuple[int, ...] = ()
    numel: int = 0
    trainable: bool = False
    detail: str = ""
