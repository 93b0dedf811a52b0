"""The bottleneck module that serial and parallel adapters insert (Houlsby et al. 2019,
"Parameter-Efficient Transfer Learning for NLP"; He et al. 2022, "Towards a Unified View of
Parameter-Efficient Transfer Learning").

A :class:`BottleneckAdapter` holds three children that the graph calls one by one, so a
diagram shows each step::

    z = down(x)      # (..., in_features) -> (..., bottleneck)
    a = act(z)       # gelu / relu / silu / tanh
    u = up(a)        # (..., bottleneck) -> (..., out_features), zero at init

The residual (serial) or the scaled sum with the sub-layer's output (parallel) are graph
nodes too; see :mod:`passes.adapters`. :func:`check_adapter_settings` and
:func:`bottleneck_width` hold the width rules both adapter passes share.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgery.adapters.names import check_adapter_name
from surgery.errors import ConfigError, near_matches
from surgery.sites.marker import AdapterModule

__all__ = [
    "ACTIVATIONS",
    "DEFAULT_REDUCTION",
    "BottleneckAdapter",
    "BottleneckProjection",
    "bottleneck_width",
    "check_adapter_settings",
    "make_activation",
]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}
DEFAULT_REDUCTION = 16
"""Reduction factor used when neither ``bottleneck`` nor ``reduction_factor`` is given."""


def make_activation(name: str, *, who: str = "BottleneckAdapter") -> nn.Module:
    """The activation module for ``name`` (one of :data:`ACTIVATIONS`).

    Every one of them maps 0 to 0, so an inactive adapter's zeros stay zeros.

    Raises:
        ConfigError: an unknown name; the message lists the nearest valid names.
    """
    if not isinstance(name, str) or name not in ACTIVATIONS:
        near = near_matches(str(name), ACTIVATIONS)
        raise ConfigError(f"{who}: unknown activation {name!r}; nearest: {', '.join(near)}. "
                          f"Valid activations: {', '.join(ACTIVATIONS)}.")
    return ACTIVATIONS[name]()


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_adapter_settings(who: str, bottleneck: Any, reduction_factor: Any, activation: Any,
                           adapter_name: Any) -> None:
    """Validate the settings the serial and parallel adapter passes share.

    Args:
        who: the pass, as named in error messages (``"SerialAdapterPass"``).
        bottleneck: ``None`` or the bottleneck width ``m``, a positive ``int``.
        reduction_factor: ``None`` or a positive ``int``; not together with ``bottleneck``.
        activation: a key of :data:`ACTIVATIONS`.
        adapter_name: the adapter's name, a free string without ``"."`` (as in PEFT; see
            :func:`~surgery.adapters.names.check_adapter_name`).

    Raises:
        ConfigError: both or an invalid one of ``bottleneck`` / ``reduction_factor``, an
            unknown activation, or a name the adapter-name rule refuses.
    """
    if bottleneck is not None and reduction_factor is not None:
        raise ConfigError(f"{who}: give bottleneck= or reduction_factor=, not both (got "
                          f"bottleneck={bottleneck!r}, reduction_factor={reduction_factor!r}).")
    if bottleneck is not None and not _positive_int(bottleneck):
        raise ConfigError(f"{who}: bottleneck must be a positive int, got {bottleneck!r}. "
                          f"Way out: bottleneck=64 (the hidden width m of the adapter), or "
                          f"reduction_factor=16.")
    if reduction_factor is not None and not _positive_int(reduction_factor):
        raise ConfigError(f"{who}: reduction_factor must be a positive int, got "
                          f"{reduction_factor!r}. Way out: reduction_factor=16 (m = d / 16).")
    make_activation(activation, who=who)
    check_adapter_name(who, adapter_name)


def bottleneck_width(who: str, bottleneck: int | None, reduction_factor: int | None,
                     features: int, site: str) -> int:
    """The bottleneck width ``m`` for a layer of ``features`` features.

    ``bottleneck`` when given, else ``features // reduction_factor`` (with
    :data:`DEFAULT_REDUCTION` when that is ``None`` too): 768 features and a factor of 16
    give ``m = 48``.

    Args:
        who: the pass, as named in error messages.
        bottleneck / reduction_factor: as validated by :func:`check_adapter_settings`.
        features: the width the ``down`` projection reads.
        site: qualified name of the adapted layer, for error messages.

    Raises:
        ConfigError: ``features // reduction_factor`` is 0.
    """
    if bottleneck is not None:
        return bottleneck
    factor = reduction_factor if reduction_factor is not None else DEFAULT_REDUCTION
    width = features // factor
    if width < 1:
        raise ConfigError(f"{who}: reduction_factor={factor} leaves no bottleneck at {site} "
                          f"({features} features // {factor} = 0). Way out: a smaller "
                          f"reduction_factor, or bottleneck=<width>.")
    return width


class BottleneckProjection(AdapterModule):
    """One linear projection of a bottleneck adapter: ``x @ weight.T + bias``.

    ``forward(x)``: ``(..., in_features) → (..., out_features)``. While ``active`` is
    ``False`` it returns zeros of that shape (in ``x``'s dtype) without computing anything,
    so an inactive adapter contributes exactly nothing.

    Args:
        in_features / out_features: the weight is ``(out_features, in_features)``, the bias
            ``(out_features,)``.
        zero_init: start weight and bias at zero (the ``up`` projection); otherwise
            ``nn.Linear``'s default initialisation (Kaiming-uniform weight with
            ``a = sqrt(5)``, bias uniform in ``±1/sqrt(in_features)``).
        pass_name: the pass that inserted the adapter this projection belongs to.
    """

    def __init__(self, in_features: int, out_features: int, *, zero_init: bool, pass_name: str,
                 site: str, adapter_name: str, role: str | None, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__(site=site, adapter_name=adapter_name, role=role)
        self.pass_name = pass_name
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype,
                                               device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device))
        if zero_init:
            nn.init.zeros_(self.weight)
            nn.init.zeros_(self.bias)
        else:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            bound = 1.0 / math.sqrt(in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {super().extra_repr()}"


class BottleneckAdapter(AdapterModule):
    """A bottleneck adapter: ``down`` → ``act`` → ``up``, with ``up`` zero at init.

    ``forward(x)`` returns the branch ``scaling · up(act(down(x)))``, shape
    ``(..., in_features) → (..., out_features)``, without any residual; the passes add the
    residual (serial) or the sub-layer's output (parallel) as separate graph nodes, and call
    the three children from the graph directly.

    Setting ``active`` sets it on ``down`` and ``up`` too: an inactive adapter's branch is
    exactly zero, so the model computes what it computed without the adapter, bit for bit.

    Args:
        in_features: width of the input read by ``down``.
        bottleneck: the bottleneck width ``m``.
        out_features: width of the output of ``up``; equal to ``in_features`` for a serial
            adapter.
        activation: ``"gelu"``, ``"relu"``, ``"silu"`` or ``"tanh"``.
        scaling: factor on the branch (He et al.'s ``s``; 1 for a serial adapter).
        pass_name: ``"serial_adapter"`` or ``"parallel_adapter"``.
        site, adapter_name, role: see :class:`surgery.sites.marker.AdapterModule`.
        dtype / device: of the adapted layer's weight.

    Raises:
        ConfigError: an unknown activation or a non-positive width.
    """

    def __init__(self, in_features: int, bottleneck: int, out_features: int, *, activation: str,
                 scaling: float, pass_name: str, site: str, adapter_name: str, role: str | None,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(site=site, adapter_name=adapter_name, role=role)
        for what, val in (("in_features", in_features), ("bottleneck", bottleneck),
                          ("out_features", out_features)):
            if val < 1:
                raise ConfigError(f"BottleneckAdapter at {site}: {what} must be >= 1, got {val}")
        self.pass_name = pass_name
        self.in_features = in_features
        self.bottleneck = bottleneck
        self.out_features = out_features
        self.activation = activation
        self.scaling = scaling
        common = dict(pass_name=pass_name, site=site, adapter_name=adapter_name, role=role,
                      dtype=dtype, device=device)
        self.down = BottleneckProjection(in_features, bottleneck, zero_init=False, **common)
        self.act = make_activation(activation)
        self.up = BottleneckProjection(bottleneck, out_features, zero_init=True, **common)

    @property
    def active(self) -> bool:
        """Whether the adapter is used; setting it sets ``down.active`` and ``up.active``."""
        return self.__dict__.get("_active", True)

    @active.setter
    def active(self, value: bool) -> None:
        self.__dict__["_active"] = bool(value)
        for child in self._modules.values():
            if isinstance(child, AdapterModule):
                child.active = bool(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.up(self.act(self.down(x)))
        return out if self.scaling == 1.0 else out * self.scaling

    def extra_repr(self) -> str:
        return (f"{self.in_features} -> {self.bottleneck} -> {self.out_features}, "
                f"activation={self.activation!r}, scaling={self.scaling:g}, "
                f"{super().extra_repr()}")
