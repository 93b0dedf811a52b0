"""Site graphs of transformers' fused mixture-of-experts modules, traced through their
grouped-matmul forward.

transformers 5 stores the experts of a mixture-of-experts block fused (``Qwen3MoeExperts``,
``MixtralExperts``, ...): ``gate_up_proj`` ``(experts, 2·intermediate, hidden)`` and
``down_proj`` ``(experts, hidden, intermediate)`` as plain ``nn.Parameter``\\ s, and the
class decorator ``use_experts_implementation`` dispatches its ``forward`` by
``config._experts_implementation``: ``"grouped_mm"`` (the default of a fresh config: tokens
sorted by expert, one grouped matmul per projection), ``"batched_mm"`` (the expert weights
gathered per token) or ``"eager"`` (a Python loop over the experts hit).

The site graph of such a module is a torch.fx trace of transformers' own
``grouped_mm_experts_forward`` bound to the module, with ``_grouped_linear`` kept as a
call (a leaf), so every projection reads::

    sort = torch.sort(reshape_1)                 # routed (token, expert) pairs by expert
    getitem_2 = hidden_states[floordiv]          # (S, hidden): the routed tokens, sorted
    cumsum = torch.cumsum(histc, dim=0, dtype=torch.int32)   # (experts,) group offsets
    _grouped_linear = transformers.integrations.moe._grouped_linear(
        getitem_2, self.gate_up_proj, cumsum, bias=None, is_transposed=False)

so a pass can put its update next to the grouped linear of the weight it adapts, on the
routed tokens only. With the default ``"grouped_mm"`` the site graph computes exactly what
the module computes (bitwise). A module configured for ``"eager"`` or ``"batched_mm"`` runs
the grouped forward inside its site graph too (the same routed products, summed in another
order: equal to rounding); :func:`implementation_note` says so.

Two values of the traced code are read at trace time: the device type of the module's
weights (the grouped forward counts tokens per expert in float on CPU and MPS, in int
elsewhere: both give the same counts) and the module's structural flags (``has_gate``,
``has_bias``, ``is_transposed``). Expert parallelism is refused.
"""

from __future__ import annotations

import copy
import operator
from typing import Any

from torch import fx, nn

from surgery.errors import UnsupportedSiteError

__all__ = ["grouped_linear", "implementation_note", "is_fused_experts", "trace_experts"]

_CLASSES: dict[type, type] = {}


def _moe() -> Any:
    from transformers.integrations import moe

    return moe


def grouped_linear() -> Any:
    """transformers' ``_grouped_linear(input (S, in), weight (E, out, in) or (E, in, out),
    offs (E,) int32, bias=None, is_transposed=False) -> (S, out)``: rows of ``input`` sorted
    by expert, ``offs`` the cumulative row counts per expert."""
    return _moe()._grouped_linear


def is_fused_experts(module: nn.Module) -> bool:
    """True for a transformers experts module with fused 3-D weights whose forward is
    dispatched by ``config._experts_implementation`` (the ``use_experts_implementation``
    decorator): it has ``has_gate``, ``is_transposed`` and a ``config``, and a 3-D
    ``down_proj`` parameter."""
    down = module._parameters.get("down_proj")
    return (hasattr(module, "has_gate") and hasattr(module, "is_transposed")
            and hasattr(getattr(module, "config", None), "_experts_implementation")
            and isinstance(down, nn.Parameter) and down.dim() == 3)


def implementation_note(module: nn.Module, site: str) -> str | None:
    """A note when the module is configured for another experts implementation than the
    grouped one its site graph runs, else ``None``."""
    impl = getattr(module.config, "_experts_implementation", None)
    if impl in (None, "grouped_mm"):
        return None
    return (f"{site} ({type(module).__name__}) is configured with "
            f"_experts_implementation={impl!r}; its site graph runs transformers' grouped_mm "
            f"forward instead (the same routed products, equal to rounding)")


class _Proxy(fx.Proxy):
    """A proxy that item assignment can write to and whose ``.device.type`` is known."""

    def __getattr__(self, k: str) -> Any:
        if k == "device":
            return _Device(self, k)
        return super().__getattr__(k)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


class _Device(fx.proxy.Attribute):
    """``tensor.device``: a node, whose ``.type`` is the module's device type at trace time."""

    @property
    def type(self) -> str:
        return self.tracer.device_type


class _ExpertsTracer(fx.Tracer):
    def __init__(self, device_type: str) -> None:
        super().__init__()
        self.device_type = device_type

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)


def _bound(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` (same parameter objects) whose class runs the grouped
    forward."""
    cls = type(module)
    if cls not in _CLASSES:
        _CLASSES[cls] = type(cls.__name__, (cls,), {"forward": _moe().grouped_mm_experts_forward})
    shim = copy.copy(module)
    shim.__class__ = _CLASSES[cls]
    return shim


def trace_experts(module: nn.Module, site: str, *, who: str) -> fx.Graph:
    """The graph of transformers' grouped experts forward on ``module``.

    Args:
        module: a fused experts module (:func:`is_fused_experts`); not changed.
        site: its qualified name, for messages.
        who: the pass asking, for messages.

    Returns:
        A graph with placeholders ``hidden_states`` ``(tokens, hidden)``, ``top_k_index``
        ``(tokens, k)`` int64 and ``top_k_weights`` ``(tokens, k)``, returning
        ``(tokens, hidden)``; one ``_grouped_linear`` call per projection, reading its
        weight through a ``get_attr`` node.

    Raises:
        UnsupportedSiteError: the module is split for expert parallelism, or its forward
            cannot be traced.
    """
    kind = type(module).__name__
    if getattr(module, "_is_expert_parallel", False):
        raise UnsupportedSiteError(
            f"{who}: {site} ({kind}) is split for expert parallelism; its experts cannot be "
            f"adapted as one site. Way out: adapt the model before sharding it.")
    moe = _moe()
    original = moe._grouped_linear
    weights = [p for p in module.parameters(recurse=False)]
    tracer = _ExpertsTracer(weights[0].device.type if weights else "cpu")

    def leaf(*args: Any, **kwargs: Any) -> Any:
        return tracer.create_proxy("call_function", original, args, kwargs)

    moe._grouped_linear = leaf
    try:
        graph = tracer.trace(_bound(module))
    except Exception as exc:  # any failure inside transformers' code while tracing
        raise UnsupportedSiteError(
            f"{who}: {site} ({kind}) cannot be traced through transformers' grouped experts "
            f"forward ({type(exc).__name__}: {exc}). Way out: adapt the layers around it "
            f"instead, see surgery.list_targets(model).") from exc
    finally:
        moe._grouped_linear = original
    for node in graph.nodes:
        if isinstance(node.type, str):  # a postponed annotation cannot be pickled
            node.type = None
    return graph
