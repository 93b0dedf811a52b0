"""The small modules that passes insert into a site graph.

Each derives from :class:`surgery.sites.marker.AdapterModule`, so adapters are found by
type, never by name. Their parameters are created on the device and in the dtype of the
weight they adapt.

Two run-time switches, both set by :mod:`surgery.adapters.active` and :class:`passes.stack.AdapterStack`
rather than by hand, and neither of which re-traces anything:

* ``active`` (``True`` at creation): an inactive module contributes exactly nothing. A LoRA
  branch then adds ``-0.0`` (``y + (-0.0)`` is ``y`` bit for bit, signed zeros included)
  without computing ``B A x``; an IA³ vector returns its input itself; LoRA dropout draws no
  random numbers.
* ``route`` (``None`` outside per-sample routing): a boolean tensor of shape ``(batch,)``.
  The contribution is kept, bit for bit, for the samples marked ``True`` and dropped for the
  others (``torch.where`` along the leading dimension), so one batch can hold samples meant
  for different adapters.

A merged adapter (:class:`passes.merge.MergeLoRAPass`) is in the weights and its modules are
no longer called, so their flags change nothing; :func:`surgery.adapters.active.set_active` refuses
to switch a merged adapter off (unmerge it first).

``LoRAProjection`` (as ``lora_B``) and ``IA3Vector`` implement the fold protocol of
:class:`~surgery.sites.marker.AdapterModule`, through which :mod:`surgery.adapters` merges,
unloads and combines them without knowing these classes.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from passes.lora_init import init_factor
from surgery.adapters.merge_math import compute_dtype, ia3_fold, lora_delta, merge_delta
from surgery.errors import ConfigError
from surgery.map.leaves import is_hf_conv1d
from surgery.sites.marker import AdapterModule
from surgery.sites.site_graph import base_module

__all__ = ["LoRAProjection", "LoRADropout", "IA3Vector", "IA3_MODULES", "IA3_SLOT", "ia3_shape",
           "route_mask"]


def _transposed(site: nn.Module) -> bool:
    """Whether the layer at ``site`` stores its weight ``(in, out)`` (transformers' ``Conv1D``)."""
    return is_hf_conv1d(base_module(site))


def route_mask(module: AdapterModule, out: torch.Tensor) -> torch.Tensor | None:
    """The module's per-sample routing mask, shaped to broadcast over ``out``.

    Args:
        module: an adapter module; its ``route`` attribute is ``None`` or a boolean tensor
            of shape ``(batch,)``.
        out: the tensor the mask selects rows of; its leading dimension is the batch.

    Returns:
        ``None`` when the module is not being routed, else a boolean tensor of shape
        ``(batch, 1, ..., 1)`` with ``out.ndim`` dimensions, on ``out``'s device.

    Raises:
        ConfigError: ``out``'s leading dimension is not the batch size (a layer called on a
            flattened ``(batch · seq, features)`` input cannot be routed per sample).
    """
    route = getattr(module, "route", None)
    if route is None:
        return None
    if out.ndim == 0 or out.shape[0] != route.shape[0]:
        raise ConfigError(
            f"per-sample routing: {module.site} ({type(module).__name__}, adapter "
            f"{module.adapter_name!r}) sees a tensor of shape {tuple(out.shape)} whose leading "
            f"dimension is not the batch size {route.shape[0]}; samples cannot be told apart "
            f"there. Way out: run one adapter at a time (adapter_id=k) for this model.")
    return route.to(out.device).view((-1,) + (1,) * (out.ndim - 1))


def routed_update(module: AdapterModule, out: torch.Tensor) -> torch.Tensor:
    """A branch's update ``out`` kept for the samples routed to ``module``'s adapter and
    ``-0.0`` for the others (the branch's add then returns the base output exactly)."""
    mask = route_mask(module, out)
    return out if mask is None else torch.where(mask, out, -0.0)


class LoRAProjection(AdapterModule):
    """One factor of a LoRA update: ``A`` (``rank × in``) or ``B`` (``out × rank``).

    ``forward(x)`` computes ``x @ weight.T``: ``(..., in_features) → (..., out_features)``.
    ``lora_B`` also carries the update's ``rank``, ``alpha`` and ``scaling`` so the merge
    math and the audit can read them.

    Args:
        in_features / out_features: the factor's shape is ``(out_features, in_features)``.
        factor: ``"A"`` or ``"B"``.
        rank, alpha, scaling: the LoRA hyper-parameters of the update this factor belongs to.
        init: ``"kaiming"`` (A Kaiming-uniform with ``a = sqrt(5)``, as ``nn.Linear``),
            ``"gaussian"`` (A normal with std ``1/rank``); B starts at zero, except with
            ``"random"`` (B Kaiming-uniform too). Other names initialise A as ``"kaiming"``
            and B at zero, then overwritten (``"orthogonal"`` by
            :func:`passes.lora_layers.lora_branch`, PiSSA / OLoRA by
            :func:`passes.lora_init.rewrite_base`).

    Inactive (``active = False``), no product is computed: ``A`` returns zeros and ``B``
    returns ``-0.0`` of shape ``(..., out_features)`` (a broadcast view, no allocation), so
    the branch's ``y + scaling · B(...)`` is ``y`` bit for bit. Under per-sample routing
    ``B`` returns its product for the routed samples and ``-0.0`` for the others.
    """

    pass_name = "lora"
    routes_samples: ClassVar[bool] = True  # reads ``route`` itself (see the module docstring)
    dora: bool = False  # a class default: set on the factors of a DoRA branch (passes.dora)

    def __init__(self, in_features: int, out_features: int, *, factor: str, rank: int,
                 alpha: float, scaling: float, init: str, site: str, adapter_name: str,
                 role: str | None, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(site=site, adapter_name=adapter_name, role=role)
        self.in_features = in_features
        self.out_features = out_features
        self.factor = factor
        self.rank = rank
        self.alpha = alpha
        self.scaling = scaling
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype,
                                               device=device))
        self.route: torch.Tensor | None = None
        init_factor(self.weight, factor=factor, init=init, rank=rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:  # -0.0: the branch's add then returns its other operand exactly
            fill = -0.0 if self.factor == "B" else 0.0
            return x.new_full((), fill).expand(*x.shape[:-1], self.out_features)
        out = F.linear(x, self.weight)
        return routed_update(self, out) if self.factor == "B" else out

    def extra_repr(self) -> str:
        return (f"{self.factor}: {self.in_features} -> {self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha}, scaling={self.scaling:g}, {super().extra_repr()}")

    # Fold protocol (surgery.sites.marker): ``lora_B`` heads the adapter; ``lora_A`` is read
    # from the site graph, at ``site.lora_A[<adapter name>]``.

    @property
    def fold_mode(self) -> str | None:
        """``"add"`` for ``lora_B`` (``W' = W + scaling · B A``); ``None`` for ``lora_A``
        and for the factors of a DoRA branch (its magnitude vector heads it)."""
        return "add" if self.factor == "B" and not self.dora else None

    def low_rank(self, site: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(A (rank, in), B (out, rank), scaling)`` for ``lora_B``; ``None`` for ``lora_A``."""
        if self.factor != "B":
            return None
        return site._modules["lora_A"][self.adapter_name].weight, self.weight, self.scaling

    def fold(self, site: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``W + scaling · B A`` (``(B A)ᵀ`` for a ``Conv1D`` weight), in at least float32,
        cast once to the weight's dtype; the bias is unchanged."""
        lora_a, lora_b, scaling = self.low_rank(site)
        delta = lora_delta(lora_a.detach(), lora_b.detach(), scaling,
                           transposed=_transposed(site), dtype=compute_dtype(weight.dtype))
        return merge_delta(weight.detach(), delta), bias

    def fold_detail(self, site: nn.Module) -> str:
        t = "ᵀ" if _transposed(site) else ""
        return f"W + {self.scaling:g}·(B A){t} of LoRA {self.adapter_name!r}"

    def from_low_rank(self, site: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor, *,
                      adapter_name: str) -> dict[str, AdapterModule]:
        """New ``lora_A`` / ``lora_B`` holding the given factors (``alpha = rank``, scaling
        1) and a ``lora_dropout`` with this adapter's probability. ``A``'s initialisation
        draws from the global random generator before being overwritten."""
        rank = int(lora_a.shape[0])
        common = dict(rank=rank, alpha=float(rank), scaling=1.0, init="kaiming", site=self.site,
                      adapter_name=adapter_name, role=self.role, device=lora_a.device)
        new_a = LoRAProjection(int(lora_a.shape[1]), rank, factor="A", dtype=lora_a.dtype, **common)
        new_b = LoRAProjection(rank, int(lora_b.shape[0]), factor="B", dtype=lora_b.dtype, **common)
        with torch.no_grad():
            new_a.weight.copy_(lora_a)
            new_b.weight.copy_(lora_b)
        p = site._modules["lora_dropout"][self.adapter_name].p
        drop = LoRADropout(p, site=self.site, adapter_name=adapter_name, role=self.role)
        return {"lora_dropout": drop, "lora_A": new_a, "lora_B": new_b}


class LoRADropout(AdapterModule):
    """Dropout on the input of a LoRA branch (identity when ``p == 0`` or inactive).

    Inactive, it returns ``x`` without drawing random numbers, so switching an adapter off
    leaves the random stream of the rest of the model as it would be without the adapter.
    """

    pass_name = "lora"
    routes_samples: ClassVar[bool] = True  # nothing to select: ``lora_B`` does it

    def __init__(self, p: float, *, site: str, adapter_name: str, role: str | None) -> None:
        super().__init__(site=site, adapter_name=adapter_name, role=role)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.active:
            return x
        return F.dropout(x, self.p, self.training)


IA3_SLOT = "ia3_l"
"""Where a site graph keeps its IA³ vectors, one parameter per adapter (PEFT's name)."""

IA3_MODULES = "ia3"
"""Where a site graph keeps its :class:`IA3Vector` modules, one per adapter."""


def ia3_shape(learned: int, *, mode: str, spatial: int) -> tuple[int, ...]:
    """The shape of an IA³ parameter holding ``learned`` scales, as PEFT's ``ia3_l``:
    ``(learned, 1)`` for output scaling, ``(1, learned)`` for input scaling (a feed-forward
    layer), ``(1, learned, 1, ...)`` with ``spatial`` ones on a convolution."""
    if spatial:
        return (1, learned, *(1,) * spatial)
    return (1, learned) if mode == "input" else (learned, 1)


class IA3Vector(AdapterModule):
    """An IA³ scaling vector (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is
    Better and Cheaper than In-Context Learning").

    The vector ``l`` is not this module's own parameter: it is the parameter
    ``<site>.ia3_l.<adapter>`` of the site graph (an
    :class:`~surgery.sites.marker.AdapterParameters` slot, PEFT's name and shape: ``(out,
    1)`` for output scaling, ``(1, in)`` for input scaling, ``(1, channels, 1, ...)`` on a
    convolution), read by a ``get_attr`` node and passed in. This module holds the
    adapter's behaviour: its flag, its routing, its learned slices, its fold.

    ``forward(x, l)`` returns ``x * l`` over the last dimension, ``(..., width) → (...,
    width)``, or, on a convolution (``spatial`` > 0), over the channel dimension,
    ``(N, width, *spatial) → (N, width, *spatial)`` (unbatched ``(width, *spatial)`` too).
    ``l`` starts at ones. With ``parts`` (a fused projection), ``l`` holds only those feature
    slices and the rest of the vector is fixed at one.

    Args:
        width: size of the scaled dimension.
        parts: ``[(start, stop)]`` slices that are learned; ``None`` = all of them.
        mode: ``"output"`` (scales a layer's output) or ``"input"`` (scales its input).
        spatial: the number of spatial dimensions after the channel dimension (2 for
            ``nn.Conv2d``, 3 for ``nn.Conv3d``); 0 for a linear layer.

    Inactive (``active = False``), ``forward`` returns ``x`` itself. Under per-sample
    routing it returns ``x * l`` for the routed samples and ``x`` for the others.
    """

    pass_name = "ia3"
    routes_samples: ClassVar[bool] = True

    def __init__(self, width: int, *, parts: list[tuple[int, int]] | None, mode: str, site: str,
                 adapter_name: str, role: str | None, spatial: int = 0) -> None:
        super().__init__(site=site, adapter_name=adapter_name, role=role)
        self.width = width
        self.mode = mode
        self.spatial = spatial
        self.parts = sorted(parts) if parts else [(0, width)]
        self.route: torch.Tensor | None = None

    @property
    def learned(self) -> int:
        """The number of scales learned (``width`` unless ``parts`` leaves some at one)."""
        return sum(stop - start for start, stop in self.parts)

    def new_parameter(self, *, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
        """A new vector of ones, shaped by :func:`ia3_shape`, for the site graph's slot."""
        shape = ia3_shape(self.learned, mode=self.mode, spatial=self.spatial)
        return nn.Parameter(torch.ones(shape, dtype=dtype, device=device))

    def parameter(self, site: nn.Module) -> nn.Parameter:
        """This adapter's parameter in the site graph ``site`` (``site.ia3_l.<adapter>``)."""
        return site._modules[IA3_SLOT]._parameters[self.adapter_name]

    def vector(self, scales: torch.Tensor) -> torch.Tensor:
        """The full scaling vector, shape ``(width,)``, from the parameter ``scales`` (``l``,
        any of the shapes of :func:`ia3_shape`): learned slices, ones elsewhere."""
        flat = scales.reshape(-1)
        if self.parts == [(0, self.width)]:
            return flat
        pieces = []
        pos = 0
        offset = 0
        for start, stop in self.parts:
            if start > pos:
                pieces.append(flat.new_ones(start - pos))
            pieces.append(flat[offset: offset + stop - start])
            offset += stop - start
            pos = stop
        if pos < self.width:
            pieces.append(flat.new_ones(self.width - pos))
        return torch.cat(pieces)

    def forward(self, x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        vec = self.vector(scales)
        if self.spatial:  # over the channel dimension, before the spatial ones
            vec = vec.view(-1, *(1,) * self.spatial)
        out = x * vec
        mask = route_mask(self, out)
        return out if mask is None else torch.where(mask, out, x)

    def extra_repr(self) -> str:
        spatial = f", channels of {self.spatial}-d maps" if self.spatial else ""
        return (f"{self.mode} scaling, width={self.width}{spatial}, parts={self.parts}, "
                f"{super().extra_repr()}")

    # Fold protocol (surgery.sites.marker): the vector is its adapter's only module.

    @property
    def fold_mode(self) -> str | None:
        """``"output"`` or ``"input"``: the scaling this vector applies."""
        return self.mode

    def fold(self, site: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``W' = diag(l) W``, ``b' = l ⊙ b`` (output) or ``W' = W diag(l)`` (input), with
        the full vector (ones outside learned slices), in at least float32, cast once; on a
        convolution, per output or input channel (within each group)."""
        return ia3_fold(weight.detach(), bias, self.vector(self.parameter(site)).detach(),
                        mode=self.mode, transposed=_transposed(site),
                        groups=int(getattr(base_module(site), "groups", 1)))

    def fold_detail(self, site: nn.Module) -> str:
        return f"IA³ {self.adapter_name!r} folded ({self.mode} scaling)"
