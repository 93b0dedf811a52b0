"""The score chain of an eager attention op, ``softmax(f(q @ k^T)) @ v`` written out.

:class:`passes.prefix.PrefixPass` puts the prefix in front of ``k^T`` and ``v``, and gives
every mask applied to the scores ``P`` visible columns; with the zero-init gate it replays
the scalings of the scores on the prefix. This module finds those parts in a site graph.
Read-only analysis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from passes.prefix_sites import SiteOp
from surgery.errors import UnsupportedSiteError
from surgery.map.dataflow import op_name
from surgery.map.graphs import node_value

__all__ = ["EagerAttention", "eager_attention"]

_SHAPE_OPS = {"transpose", "permute", "contiguous", "clone", "to", "type", "float", "half",
              "bfloat16", "_to_copy", "alias", "dropout", "native_dropout", "identity",
              "module:dropout", "module:identity", "type_as", "lift_fresh_copy"}
_SOFTMAX = {"softmax", "_softmax", "module:softmax", "safe_softmax", "_safe_softmax"}
_ADDITIVE = {"add", "add_", "sub", "sub_"}
_MULTIPLY = {"mul", "mul_"}
_SCALES = _MULTIPLY | {"div", "div_", "truediv"}
_FILLS = {"masked_fill", "masked_fill_", "where"}
_VIEWS = {"view", "reshape", "_unsafe_view", "unflatten"}


@dataclass(frozen=True)
class EagerAttention:
    """The parts of ``matmul(softmax(f(matmul(q, k^T))), v)``.

    Attributes:
        qk: the ``q @ k^T`` matmul; ``qk.args = (q, k^T)``.
        softmax: the softmax over the scores.
        pv: the ``probs @ v`` matmul; ``pv.args = (probs, v)``.
        chain: the nodes from ``qk`` to ``softmax`` (both included), in graph order.
    """

    qk: fx.Node
    softmax: fx.Node
    pv: fx.Node
    chain: tuple[fx.Node, ...]

    def masks(self, site: SiteOp) -> list[tuple[fx.Node, int, str]]:
        """``(node, argument index, convention)`` of every mask applied to the scores:
        ``scores + m`` / ``- m`` (additive, ``"keep"``), ``scores.masked_fill(m, x)``
        (``"drop"``), ``where(m, scores, x)`` (``"keep"``) and ``where(m, x, scores)``
        (``"drop"``).

        Raises:
            UnsupportedSiteError: the scores are multiplied by, filled from or reshaped to
                something spanning the original keys.
        """
        on = set(self.chain)
        found = []
        for n in self.chain[1:-1]:
            name = op_name(n)
            args = n.args
            if name in _ADDITIVE:
                found += [(n, i, "keep") for i, a in enumerate(args[:2])
                          if isinstance(a, fx.Node) and a not in on]
            elif name in ("masked_fill", "masked_fill_") and isinstance(args[1], fx.Node):
                found.append((n, 1, "drop"))
            elif name == "where" and len(args) >= 3:
                if isinstance(args[0], fx.Node) and args[0] not in on:
                    found.append((n, 0, "keep" if args[1] in on else "drop"))
                _scalar_like(args[2 if args[1] in on else 1], site, n, "fills masked scores from")
            elif name in _SCALES:
                for a in args[:2]:
                    if a not in on:
                        _scalar_like(a, site, n, "scales its scores by")
            elif name in _VIEWS:
                raise UnsupportedSiteError(
                    f"PrefixPass: the eager attention at {site.where} in {site.owner} reshapes "
                    f"its scores to a fixed key length ({n.name}); a prefix would not fit. Way "
                    f"out: exclude={site.owner!r}, or write it with "
                    f"F.scaled_dot_product_attention.")
        return found

    def scales(self, site: SiteOp) -> tuple[tuple[str, Any], ...]:
        """The scalings of the scores between ``q @ k^T`` and the softmax, in order.

        Each is ``("mul" | "div", operand)``, the operand a number or a scalar-valued node.
        Masks and additive constants are left out: the prefix has no mask, and a softmax
        does not see a constant shift.

        Raises:
            UnsupportedSiteError: a scaling by a tensor over the keys, or of a constant by
                the scores.
        """
        out = []
        on = set(self.chain)
        for n in self.chain[1:-1]:
            name = op_name(n)
            if name not in _SCALES:
                continue
            others = [a for a in n.args[:2] if a not in on]
            val = node_value(others[0]) if others and isinstance(others[0], fx.Node) else None
            if len(others) != 1 or (val is not None and val.numel() != 1) or (
                    name not in _MULTIPLY and n.args[0] not in on):
                raise UnsupportedSiteError(
                    f"PrefixPass: gate='zero' needs the eager attention at {site.where} in "
                    f"{site.owner} to scale its scores by a scalar; {n.name} does {name} with "
                    f"{others!r}. Way out: gate=None.")
            out.append(("mul" if name in _MULTIPLY else "div", others[0]))
        return tuple(out)


def _scalar_like(x: Any, site: SiteOp, n: fx.Node, what: str) -> None:
    val = node_value(x) if isinstance(x, fx.Node) else None
    if val is not None and val.dim() and val.shape[-1] != 1:
        raise UnsupportedSiteError(
            f"PrefixPass: the eager attention at {site.where} in {site.owner} {what} a tensor "
            f"over the keys ({n.name}); a prefix cannot extend it. Way out: "
            f"exclude={site.owner!r}.")


def _back_to(start: Any, wanted: set[str], owner: nn.Module, through: set[str]) -> fx.Node | None:
    """Walk back from ``start`` through ``through`` ops to the nearest ``wanted`` op."""
    node = start
    for _ in range(50):
        if not isinstance(node, fx.Node):
            return None
        name = op_name(node, owner)
        if name in wanted:
            return node
        if name not in through:
            return None
        inputs = [a for a in node.args if isinstance(a, fx.Node)]
        if name == "where" and len(node.args) >= 3:  # where(cond, scores, other)
            inputs = [a for a in node.args[1:3] if isinstance(a, fx.Node)]
        hits = [h for h in (_back_to(a, wanted, owner, through) for a in inputs) if h is not None] \
            if len(inputs) > 1 else None
        if hits is not None:
            return hits[0] if hits else None
        if not inputs:
            return None
        node = inputs[0]
    return None


def _chain(qk: fx.Node, softmax: fx.Node) -> tuple[fx.Node, ...]:
    down: set[fx.Node] = set()
    stack = [qk]
    while stack:
        n = stack.pop()
        if n not in down:
            down.add(n)
            if n is not softmax:
                stack.extend(n.users)
    up: set[fx.Node] = set()
    stack = [softmax]
    while stack:
        n = stack.pop()
        if n not in up and n in down:
            up.add(n)
            stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(qk.graph.nodes)}
    return tuple(sorted(up, key=order.__getitem__))


def eager_attention(site: SiteOp) -> EagerAttention:
    """Find ``q @ k^T``, the softmax and the score chain of an eager attention op.

    Raises:
        UnsupportedSiteError: the op is not ``matmul(softmax(...(matmul(q, k^T))), v)``
            with positional arguments.
    """
    pv, owner = site.node, site.sg
    softmax = qk = None
    if op_name(pv) == "matmul" and len(pv.args) == 2:
        softmax = _back_to(pv.args[0], _SOFTMAX, owner, _SHAPE_OPS)
    if softmax is not None and softmax.args:
        qk = _back_to(softmax.args[0], {"matmul"}, owner,
                      _SHAPE_OPS | _ADDITIVE | _SCALES | _VIEWS | _FILLS)
    if qk is None or len(qk.args) != 2:
        raise UnsupportedSiteError(
            f"PrefixPass: the eager attention at {site.where} in {site.owner} is not "
            f"matmul(softmax(matmul(q, k^T) ...), v) with positional arguments. Way out: "
            f"exclude={site.owner!r}, or write it with F.scaled_dot_product_attention.")
    return EagerAttention(qk, softmax, pv, _chain(qk, softmax))
