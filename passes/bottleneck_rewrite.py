"""Selecting the sites of bottleneck adapters and inserting their branch, shared by
:class:`passes.adapters.SerialAdapterPass` and
:class:`passes.parallel_adapter.ParallelAdapterPass` (Houlsby et al. 2019; He et al. 2022).

The branch a bottleneck adds inside a site graph, right after the node it joins::

    z = <slot>.<name>.down(reads)      # (..., d_in) -> (..., m)
    a = <slot>.<name>.act(z)
    u = <slot>.<name>.up(a)            # (..., m) -> (..., d_out), zero at init
    u = u * scaling                    # parallel adapters only
    y = joins + u                      # every former user of ``joins`` reads ``y``
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

import torch
from torch import fx, nn

from passes.bottleneck import (
    BottleneckAdapter,
    bottleneck_width,
    check_adapter_settings,
)
from passes.sublayers import is_linear_layer, is_sublayer_module
from surgery.errors import NoMatchError, UnsupportedSiteError
from surgery.pass_base import Change
from surgery.select import Selector, as_patterns, matches
from surgery.sites.rewrite import (
    insert_after,
    mark,
    register_adapter,
    replace_uses_after,
)
from surgery.sites.site_graph import SiteGraph
from surgery.targets import Site, candidate_sites, resolve_sites

__all__ = ["BottleneckSettings", "attach_bottleneck", "select_sites", "store_settings"]

_ACCEPTED = "nn.Linear / Conv1D layers, or modules holding them (sub-layers such as mlp)"


class BottleneckSettings(Protocol):
    """What the helpers here read of an adapter pass (serial or parallel)."""

    name: ClassVar[str]
    slot: ClassVar[str]
    pattern: Selector
    exclude: Selector
    bottleneck: int | None
    reduction_factor: int | None
    activation: str
    adapter_name: str

    def __post_init__(self) -> None: ...


def select_sites(model: nn.Module, *, pass_name: str, pattern: Selector,
                 role: str | Sequence[str] | None, exclude: Selector,
                 default_roles: Sequence[str]) -> list[Site]:
    """The sites a bottleneck adapter pass selects, in module order.

    Roles (and the defaults) select linear layers. A pattern selects the linear layers it
    matches; a pattern that matches no linear layer selects the modules it names that hold
    linear layers (``"mlp"``, ``"attn"``, ``"layers.0"``) as sub-layers. So ``"*"`` keeps
    selecting layers, and ``["mlp", "o_proj"]`` selects both kinds.

    Raises:
        NoMatchError, UnsupportedSiteError, ConfigError, TraceError: as
            :func:`surgery.targets.resolve_sites`.
    """
    common = dict(pass_name=pass_name, pattern=pattern, role=role, exclude=exclude,
                  default_roles=default_roles)
    if pattern is None:
        return resolve_sites(model, accept=is_linear_layer, accepted_types="nn.Linear / Conv1D",
                             **common)
    sites = resolve_sites(model, accept=lambda m: is_linear_layer(m) or is_sublayer_module(m),
                          accepted_types=_ACCEPTED, **common)
    layers = [a for s in candidate_sites(model, is_linear_layer).values() for a in s.aliases]
    by_name = [p for p in as_patterns(pattern) if not any(matches(p, n) for n in layers)]
    keep = [s for s in sites if is_linear_layer(s.base)
            or any(matches(p, a) for p in by_name for a in s.aliases)]
    if not keep:
        raise NoMatchError(f"{pass_name}: exclude={exclude!r} removes every layer that pattern="
                           f"{pattern!r} selects. Way out: narrow exclude, or widen the pattern.")
    return keep


def attach_bottleneck(adapter_pass: BottleneckSettings, sg: SiteGraph, site: str,
                      role: str | None, reads: fx.Node, joins: fx.Node, d_in: int, d_out: int,
                      weight: torch.Tensor, scaling: float | None) -> list[Change]:
    """Register a ``d_in → m → d_out`` bottleneck on ``sg`` as ``<slot>.<name>`` and insert
    ``joins + [scaling ·] up(act(down(reads)))`` right after ``joins``.

    Args:
        adapter_pass: the pass (its ``slot``, ``name``, ``adapter_name``, ``bottleneck``,
            ``reduction_factor`` and ``activation``).
        sg / site / role: the site graph, its qualified name and role label.
        reads / joins: the nodes the branch reads and is added to; every other user of
            ``joins`` reads the sum instead.
        d_in / d_out: widths of ``reads`` and ``joins``; ``m`` comes from ``d_in``.
        weight: a weight whose dtype and device the adapter takes.
        scaling: the factor on the branch, or ``None`` for none (a serial adapter).

    Returns:
        The changes: nodes and parameters added.

    Raises:
        ConfigError: the reduction factor leaves no bottleneck.
        UnsupportedSiteError: ``weight`` has an integer dtype (an ``int8`` layer).
        AlreadyAdaptedError: ``sg`` already has an adapter of this name in this slot.
    """
    who = type(adapter_pass).__name__
    if not (weight.is_floating_point() or weight.is_complex()):
        raise UnsupportedSiteError(
            f"{who}: {site} holds its weight as {weight.dtype}; the adapter's parameters take "
            f"that dtype and must be floating point to train. Way out: adapt the "
            f"floating-point model (before quantizing it; float16 and bfloat16 work), or "
            f"exclude=[{site!r}].")
    width = bottleneck_width(who, adapter_pass.bottleneck, adapter_pass.reduction_factor, d_in,
                             site)
    name, slot = adapter_pass.adapter_name, adapter_pass.slot
    adapter = BottleneckAdapter(d_in, width, d_out, activation=adapter_pass.activation,
                                scaling=1.0 if scaling is None else scaling,
                                pass_name=adapter_pass.name, site=site, adapter_name=name,
                                role=role, dtype=weight.dtype, device=weight.device)
    register_adapter(sg, slot, name, adapter, pass_name=who, site=site)
    graph = sg.graph
    tag = dict(pass_name=adapter_pass.name, site=site, role=role, adapter=name)
    parts = ("down", "act", "up") + (() if scaling is None else ("scale",)) + ("add",)

    def build() -> fx.Node:
        z = mark(graph.call_module(f"{slot}.{name}.down", (reads,)), part="down", **tag)
        a = mark(graph.call_module(f"{slot}.{name}.act", (z,)), part="act", **tag)
        u = mark(graph.call_module(f"{slot}.{name}.up", (a,)), part="up", like=joins, **tag)
        if scaling is not None:
            u = mark(graph.call_function(operator.mul, (u, scaling)), part="scale", like=joins,
                     **tag)
        return mark(graph.call_function(operator.add, (joins, u)), part="add", like=joins, **tag)

    replace_uses_after(joins, insert_after(graph, joins, build))
    detail = f"bottleneck {d_in} -> {width} -> {d_out}"
    changes = [Change("node_added", adapter_pass.name, site, f"{site}/{part}", adapter=name,
                      role=role, detail=detail) for part in parts]
    for pname, param in adapter.named_parameters():
        changes.append(Change("param_added", adapter_pass.name, site,
                              ".".join(p for p in (site, slot, name, pname) if p),
                              adapter=name, role=role, shape=tuple(param.shape),
                              numel=param.numel(), trainable=True))
    return changes


def store_settings(adapter_pass: BottleneckSettings, settings: dict[str, Any]) -> None:
    """Set the frozen fields of ``adapter_pass`` (lists kept as tuples), then validate the
    selection and bottleneck settings both adapter passes share and run its own checks.

    Raises:
        ConfigError: an invalid pattern, width, reduction factor, activation or name.
    """
    for key, val in settings.items():
        object.__setattr__(adapter_pass, key, tuple(val) if isinstance(val, list) else val)
    as_patterns(adapter_pass.pattern)
    as_patterns(adapter_pass.exclude)
    check_adapter_settings(type(adapter_pass).__name__, adapter_pass.bottleneck,
                           adapter_pass.reduction_factor, adapter_pass.activation,
                           adapter_pass.adapter_name)
    adapter_pass.__post_init__()
