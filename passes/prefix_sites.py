"""Where :class:`passes.prefix.PrefixPass` puts a prefix: attention ops, their owners, their
head layout, and the score chain of eager attention.

Read-only graph analysis; nothing here edits a graph or registers a module.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch import fx, nn

from surgery.map.dataflow import build_dataflow, op_name
from surgery.errors import UnsupportedSiteError
from surgery.map.graphs import node_value
from surgery.map.roles import AttentionOp, find_roles

__all__ = [
    "SDPA_ARGS",
    "MHA_ARGS",
    "AttentionSite",
    "EagerAttention",
    "attention_sites",
    "attention_owners",
    "call_arg",
    "set_call_arg",
    "heads_at",
    "dtype_device",
    "eager_attention",
    "first_outputs",
    "sequence_layout",
    "recorded_shape",
]

SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
             "enable_gqa")
MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
            "average_attn_weights", "is_causal")

_SHAPE_OPS = {"transpose", "permute", "contiguous", "clone", "to", "type", "float", "half",
              "bfloat16", "_to_copy", "alias", "dropout", "native_dropout", "identity",
              "module:dropout", "module:identity", "type_as", "lift_fresh_copy"}
_SOFTMAX = {"softmax", "_softmax", "module:softmax", "safe_softmax", "_safe_softmax"}
_ADDITIVE = {"add", "add_", "sub", "sub_"}
_MULTIPLY = {"mul", "mul_"}
_SCALES = _MULTIPLY | {"div", "div_", "truediv"}
_FILLS = {"masked_fill", "masked_fill_", "where"}
_VIEWS = {"view", "reshape", "_unsafe_view", "unflatten"}
_CATS = ("cat_key", "cat_value")


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
    """``x`` as an int when it is a known constant, else ``None``.

    A symbolic size (a ``SymInt`` from export) is never forced to an int: that would add a
    guard to the shape environment the traced model shares and fix the dimension for good.
    """
    if isinstance(x, torch.SymInt):
        return int(x) if is_concrete_int(x) else None
    try:
        return int(x)
    except (TypeError, ValueError):
        return None


# ---- attention ops and their owners ---------------------------------------------------------


@dataclass(frozen=True)
class AttentionSite:
    """One attention op to adapt.

    Attributes:
        op: its :class:`surgery.map.roles.AttentionOp` record.
        node: the fx node (the SDPA call, the ``probs @ v`` matmul, or the MHA call).
        graph_prefix: qualified name of the module owning the graph holding ``node``.
        graph_owner: that module.
        owner: the name the op is selected by (see :func:`attention_owners`).
    """

    op: AttentionOp
    node: fx.Node
    graph_prefix: str
    graph_owner: nn.Module
    owner: str

    def target(self, slot: str, adapter: str) -> str:
        """``call_module`` target, relative to ``graph_owner``, of ``<owner>.<slot>.<adapter>``."""
        if self.op.kind == "mha":
            rel = str(self.node.target)
        elif not self.graph_prefix:
            rel = self.owner
        else:
            rel = "" if self.owner == self.graph_prefix else self.owner[len(self.graph_prefix) + 1:]
        return ".".join(p for p in (rel, slot, adapter) if p)


def _stack_owner(model: nn.Module, node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    if not isinstance(path, str):
        return None
    try:
        model.get_submodule(path)
    except AttributeError:
        return None
    return path


def _common_owner(op: AttentionOp) -> str:
    names = [n for group in (op.query, op.key, op.value, op.out) for n in group]
    parts = [n.split(".")[:-1] for n in names]
    common: list[str] = []
    for segs in zip(*parts):
        if len(set(segs)) != 1:
            break
        common.append(segs[0])
    return ".".join(common)


def attention_sites(model: nn.Module) -> list[AttentionSite]:
    """Every attention op of a traced ``model``, in graph order (see :func:`attention_owners`)."""
    g = build_dataflow(model)
    out = []
    for op in find_roles(model, g).attention:
        data = g.nodes[op.node]
        ref = data["ref"]
        if op.kind == "mha":
            owner = data["qname"]
        elif ref.prefix:
            owner = ref.prefix
        else:
            owner = _stack_owner(model, ref.node) or _common_owner(op)
        out.append(AttentionSite(op, ref.node, ref.prefix, ref.owner, owner))
    return out


def attention_owners(model: nn.Module) -> list[tuple[str, AttentionOp]]:
    """Every attention op of a traced ``model`` with the name ``PrefixPass`` selects it by.

    The name is the qualified name of the module whose ``forward`` holds the op
    (``"layers.0.attn"``, ``"transformer.h.0.attn"``), or of the ``nn.MultiheadAttention``
    itself. On the fx front end, where one flat graph holds every op, it comes from the
    node's ``nn_module_stack`` (failing that, from the names of the op's projections).

    Returns:
        ``[(owner name, AttentionOp)]`` in graph order.
    """
    return [(s.owner, s.op) for s in attention_sites(model)]


# ---- head layout ----------------------------------------------------------------------------


def _view_sizes(node: fx.Node) -> list[Any]:
    rest = list(node.args[1:])
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        rest = list(rest[0])
    return rest


def _heads_from_graph(node: Any, width: int | None) -> tuple[int, int] | None:
    """``(heads, head_dim)`` of ``x.view(B, S, H, hd).transpose(1, 2)``, read from the view."""
    for _ in range(20):
        if not isinstance(node, fx.Node):
            return None
        meta = node.meta.get("surgery")
        if meta is not None and meta.get("part") in _CATS:
            node = node.args[1]
            continue
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


def _layer_width(model: nn.Module, op: AttentionOp, which: str) -> int | None:
    names = getattr(op, which)
    if len(names) != 1:
        return None
    info = find_roles(model).role_of(names[0])
    if info is not None and info.is_fused and which in info.fused:
        start, stop = info.fused[which]
        return stop - start
    layer = model.get_submodule(names[0])
    weight = getattr(layer, "weight", None)
    if weight is None:
        return None
    return int(weight.shape[1 if type(layer).__name__ == "Conv1D" else 0])


def heads_at(model: nn.Module, node: Any, site: AttentionSite, which: str, *,
             transposed: bool = False) -> tuple[int, int]:
    """``(heads, head_dim)`` of the 4-D attention input ``node``.

    Read from its example value (``node.meta["val"]``: export graphs, or fx graphs traced
    with example inputs); otherwise from the ``view(B, S, H, hd)`` that produced it.

    Args:
        which: ``"query"``, ``"key"`` or ``"value"`` (for messages and the layer width).
        transposed: ``node`` is ``k^T``, ``(B, H, hd, S)``.

    Raises:
        UnsupportedSiteError: the input is not 4-D, or nothing tells its layout.
    """
    val = node_value(node) if isinstance(node, fx.Node) else None
    if val is None and isinstance(node, fx.Node):
        meta = node.meta.get("surgery")
        if meta is not None and meta.get("part") in _CATS:
            val = node_value(node.args[1])
    if val is not None:
        if val.dim() != 4:
            raise UnsupportedSiteError(
                f"PrefixPass: the {which} input of the attention op at {site.op.node} has shape "
                f"{tuple(val.shape)}; a prefix needs (batch, heads, seq, head_dim). Way out: "
                f"exclude={site.owner!r}, or mode='sequence'.")
        h, d = _int(val.shape[-3]), _int(val.shape[-2 if transposed else -1])
        if h is not None and d is not None:
            return h, d
    found = _heads_from_graph(node, _layer_width(model, site.op, which))
    if found is None:
        raise UnsupportedSiteError(
            f"PrefixPass: cannot tell the number of heads and the head size at the {which} "
            f"input of the attention op at {site.op.node}: the graph records no shapes. Way "
            f"out: pass example_inputs=... to apply_passes (or surgery.map.trace) so shapes are "
            f"recorded.")
    return found


def _value_dtype(x: Any) -> tuple[torch.dtype, torch.device] | None:
    val = node_value(x) if isinstance(x, fx.Node) else None
    if val is not None and val.is_floating_point():
        return val.dtype, torch.device("cpu") if val.device.type == "meta" else val.device
    return None


def dtype_device(model: nn.Module, modules: list[str], owner: nn.Module,
                 node: Any) -> tuple[torch.dtype, torch.device]:
    """dtype and device for new parameters: of the first floating-point weight among
    ``modules`` (the key and value projections), else of ``owner``'s parameters, else of
    ``node``'s example value, else the defaults."""
    for name in modules:
        weight = getattr(model.get_submodule(name), "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            return weight.dtype, weight.device
    for p in owner.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return _value_dtype(node) or (torch.get_default_dtype(), torch.device("cpu"))


# ---- eager attention ---------------------------------------------------------------------------


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

    def masks(self, site: AttentionSite) -> list[tuple[fx.Node, int, str]]:
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
                    f"PrefixPass: the eager attention at {site.op.node} reshapes its scores to a "
                    f"fixed key length ({n.name}); a prefix would not fit. Way out: "
                    f"exclude={site.owner!r}, or write it with F.scaled_dot_product_attention.")
        return found

    def scales(self, site: AttentionSite) -> tuple[tuple[str, Any], ...]:
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
                    f"PrefixPass: gate='zero' needs the eager attention at {site.op.node} to "
                    f"scale its scores by a scalar; {n.name} does {name} with {others!r}. Way "
                    f"out: gate=None.")
            out.append(("mul" if name in _MULTIPLY else "div", others[0]))
        return tuple(out)


def _scalar_like(x: Any, site: AttentionSite, n: fx.Node, what: str) -> None:
    val = node_value(x) if isinstance(x, fx.Node) else None
    if val is not None and val.dim() and val.shape[-1] != 1:
        raise UnsupportedSiteError(
            f"PrefixPass: the eager attention at {site.op.node} {what} a tensor over the keys "
            f"({n.name}); a prefix cannot extend it. Way out: exclude={site.owner!r}.")


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


def eager_attention(site: AttentionSite) -> EagerAttention:
    """Find ``q @ k^T``, the softmax and the score chain of an eager attention op.

    Raises:
        UnsupportedSiteError: the op is not ``matmul(softmax(...(matmul(q, k^T))), v)``
            with positional arguments.
    """
    pv, owner = site.node, site.graph_owner
    softmax = qk = None
    if op_name(pv) == "matmul" and len(pv.args) == 2:
        softmax = _back_to(pv.args[0], _SOFTMAX, owner, _SHAPE_OPS)
    if softmax is not None and softmax.args:
        qk = _back_to(softmax.args[0], {"matmul"}, owner,
                      _SHAPE_OPS | _ADDITIVE | _SCALES | _VIEWS | _FILLS)
    if qk is None or len(qk.args) != 2:
        raise UnsupportedSiteError(
            f"PrefixPass: the eager attention at {site.op.node} is not "
            f"matmul(softmax(matmul(q, k^T) ...), v) with positional arguments. Way out: "
            f"exclude={site.owner!r}, or write it with F.scaled_dot_product_attention.")
    return EagerAttention(qk, softmax, pv, _chain(qk, softmax))


# ---- module calls --------------------------------------------------------------------------


def first_outputs(node: fx.Node) -> list[fx.Node] | None:
    """The nodes reading element 0 of a module call's output tuple (directly, or through the
    ``tree_flatten_spec`` that export puts after a call whose signature it kept); ``None``
    when the output is also used otherwise."""
    found = []
    for user in node.users:
        if user.op != "call_function":
            return None
        if user.target is operator.getitem:
            if user.args[1] == 0:
                found.append(user)
        elif getattr(user.target, "__name__", "") == "tree_flatten_spec":
            inner = first_outputs(user)
            if inner is None:
                return None
            found += inner
        else:
            return None
    return found


def recorded_shape(val: torch.Tensor) -> tuple[int | str, ...]:
    """The shape of an example value, symbolic sizes given as the example's size (the
    size the value had when traced), or by name when no example size is known."""
    out: list[int | str] = []
    for d in val.shape:
        hint = getattr(getattr(d, "node", None), "hint", None)
        out.append(int(hint) if isinstance(hint, int) else d if isinstance(d, int) else str(d))
    return tuple(out)


def sequence_layout(module: nn.Module, x: Any,
                    qname: str) -> tuple[int, int, torch.dtype, torch.device]:
    """``(width d, sequence dim, dtype, device)`` for a prefix on ``module``'s input ``x``.

    ``x`` must have been recorded (``node.meta["val"]``, from tracing with example inputs)
    as a floating-point ``(batch, seq, d)`` tensor; ``d`` is its last size. The sequence
    dimension is 1 unless the module (or a submodule) says ``batch_first=False`` (``(seq,
    batch, d)``). The dtype and device are those of the module's first floating-point
    parameter, else of ``x``.

    Raises:
        UnsupportedSiteError: ``x`` has no recorded value, or is not a floating-point 3-D
            tensor (token ids, masks, an unbatched ``(seq, d)``...).
    """
    val = node_value(x) if isinstance(x, fx.Node) else None
    if val is None:
        raise UnsupportedSiteError(
            f"PrefixPass: cannot tell the shape of the input of {qname} "
            f"({type(module).__name__}): the graph records no shapes, and mode='sequence' "
            f"needs a (batch, seq, d) floating-point input. Way out: pass example_inputs=... "
            f"to apply_passes (or surgery.map.trace) so shapes are recorded.")
    width = _int(val.shape[-1]) if val.dim() else None
    if val.dim() != 3 or not val.is_floating_point() or width is None:
        raise UnsupportedSiteError(
            f"PrefixPass: the input of {qname} ({type(module).__name__}) was recorded as "
            f"{val.dtype} of shape {recorded_shape(val)}; mode='sequence' needs floating-point "
            f"features (batch, seq, d). Way out: select a module that reads such features "
            f"and whose sequence length flows to the output (e.g. an nn.TransformerEncoder "
            f"called without masks), or mode='attention' to prefix keys and values.")
    batch_first = next((bool(m.batch_first) for m in module.modules() if hasattr(m, "batch_first")),
                       True)
    own = [(p.dtype, p.device) for p in module.parameters() if p.is_floating_point()]
    dtype, device = (own[0] if own else None) or _value_dtype(x) or (
        torch.get_default_dtype(), torch.device("cpu"))
    return width, 1 if batch_first else 0, dtype, device
