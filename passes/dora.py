"""DoRA: the magnitude vector of a weight-decomposed LoRA branch (Liu et al. 2024, "DoRA:
Weight-Decomposed Low-Rank Adaptation").

DoRA writes the adapted weight as a magnitude times a direction, ``W' = m ⊙ (W + s·B A) /
‖W + s·B A‖``, with the norm taken per output feature over the input dimension and ``m``
(shape ``(out,)``) learned, starting at ``‖W‖`` so that the adapted layer starts as the
layer (up to rounding: ``m / ‖W‖`` is one only to within an ulp). As in the paper (§4.3)
and in PEFT, the norm is treated as a constant: no gradient flows through it.

On a layer ``y = W x + b`` the branch's output is

    y' = y + (m / ‖W + s·B A‖ − 1) · W d + m / ‖W + s·B A‖ · s · B A d

with ``d`` the branch's dropout of ``x``, the sum PEFT computes for ``use_dora=True`` (PEFT
reads ``W d`` off the layer's result, ``y − b``, when there is no dropout: equal up to
rounding). Merged, it is
``W' = m / ‖W + s·B A‖ · (W + s·B A)`` with the bias unchanged.

:class:`DoRAMagnitude` holds ``m`` as ``lora_magnitude_vector.<adapter>.weight`` (PEFT's
key without ``base_model.model.`` and with the adapter's name, as every LoRA key) and
computes the update above from the layer's weight and the factors, which the site graph
hands it (``get_attr`` nodes of the branch, part ``dora_weight``); an ``add`` puts it on the
layer's path. It heads its adapter in the fold protocol of
:class:`~surgery.sites.marker.AdapterModule` (``fold_mode == "dora"``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from passes.modules import routed_update
from surgery.adapters.merge_math import compute_dtype, lora_delta
from surgery.errors import UnsupportedSiteError
from surgery.map.leaves import is_dense_linear, is_hf_conv1d
from surgery.sites.marker import AdapterModule
from surgery.sites.site_graph import base_module
from surgery.targets import Site

__all__ = ["DoRAMagnitude", "dora_fold", "dora_norm", "refuse_dora_sites"]


def dora_norm(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
              scaling: float, *, transposed: bool) -> torch.Tensor:
    """``‖W + scaling · B A‖`` per output feature, the L2 norm over the input dimension.

    Args:
        weight: ``(out, in)``, or ``(in, out)`` when ``transposed`` (transformers' ``Conv1D``).
        lora_a: ``(rank, in)``; lora_b: ``(out, rank)``; in ``weight``'s dtype.
        scaling: the branch's scaling.
        transposed: whether ``weight`` is stored ``(in, out)``.

    Returns:
        ``(out,)`` in ``weight``'s dtype, not detached (callers detach).
    """
    w = weight.T if transposed else weight
    return torch.linalg.norm(w + scaling * (lora_b @ lora_a), dim=1).to(w.dtype)


def dora_fold(weight: torch.Tensor, magnitude: torch.Tensor, lora_a: torch.Tensor,
              lora_b: torch.Tensor, scaling: float, *, transposed: bool) -> torch.Tensor:
    """The merged weight ``m / ‖W + s·B A‖ · (W + s·B A)`` (per output feature).

    Computed in at least float32 and cast once to ``weight``'s dtype.

    Args:
        weight: ``(out, in)``, or ``(in, out)`` when ``transposed``.
        magnitude: ``(out,)``.
        lora_a / lora_b / scaling: the branch's factors ``(rank, in)`` / ``(out, rank)``.
        transposed: whether ``weight`` is stored ``(in, out)``.

    Returns:
        A new tensor of ``weight``'s shape and dtype.
    """
    dtype = compute_dtype(weight.dtype)
    w = weight.to(dtype)
    w = w.T if transposed else w
    adapted = w + lora_delta(lora_a, lora_b, scaling, dtype=dtype)
    norm = torch.linalg.norm(adapted, dim=1)
    merged = (magnitude.to(dtype) / norm).view(-1, 1) * adapted
    return (merged.T if transposed else merged).to(weight.dtype)


class DoRAMagnitude(AdapterModule):
    """DoRA's learned magnitude ``m``, shape ``(out,)``, and the branch's update.

    ``forward(lora_out, d, weight, lora_a, lora_b)`` returns what the branch adds to the
    layer's path, ``(m / ‖W + s·B A‖ − 1) · W d + m / ‖W + s·B A‖ · s · lora_out``,
    shape ``(..., out)`` (see :mod:`passes.dora`): ``lora_out = B A d`` ``(..., out)``
    (unscaled); ``d`` the branch's dropout of the layer's input ``(..., in)``; ``weight`` the
    layer's own; ``lora_a`` / ``lora_b`` the factors. ``W d`` is computed here, not read off
    the layer's result (which later branches on the same layer rewire): one more product
    with ``W`` than PEFT does without dropout, equal up to rounding.

    Args:
        weight: the layer's weight, ``(out, in)`` (``(in, out)`` for ``Conv1D``).
        transposed: whether it is stored ``(in, out)``.
        scaling: the branch's ``alpha / rank`` (or ``alpha / sqrt(rank)``).

    The magnitude starts at ``‖W‖`` (``B`` is zero), computed as PEFT does it, so files
    cross both ways. Inactive, ``forward`` returns ``-0.0`` (a broadcast view: the add then
    returns the layer's path bit for bit); routed per sample, ``-0.0`` for the samples not
    routed to it.
    """

    pass_name = "lora"
    routes_samples: ClassVar[bool] = True

    def __init__(self, weight: torch.Tensor, *, transposed: bool, scaling: float, site: str,
                 adapter_name: str, role: str | None) -> None:
        super().__init__(site=site, adapter_name=adapter_name, role=role)
        self.transposed = transposed
        self.scaling = scaling
        with torch.no_grad():
            w = weight.T if transposed else weight
            init = (torch.empty(w.shape[0], dtype=w.dtype, device=w.device)
                    if w.device.type == "meta" else torch.linalg.norm(w, dim=1).to(w.dtype))
        self.weight = nn.Parameter(init)
        self.route: torch.Tensor | None = None

    def forward(self, lora_out: torch.Tensor, d: torch.Tensor, weight: torch.Tensor,
                lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
        if not self.active:  # -0.0: the branch's add then returns its other operand exactly
            return lora_out.new_full((), -0.0).expand(lora_out.shape)
        weight = weight.to(d.dtype)
        norm = dora_norm(weight, lora_a.detach().to(d.dtype), lora_b.detach().to(d.dtype),
                         self.scaling, transposed=self.transposed).detach()
        factor = self.weight / norm
        base = F.linear(d, weight.T if self.transposed else weight)
        return routed_update(self, (factor - 1) * base + factor * lora_out * self.scaling)

    def extra_repr(self) -> str:
        return (f"out={self.weight.shape[0]}, scaling={self.scaling:g}, "
                f"{super().extra_repr()}")

    # Fold protocol (surgery.sites.marker): the magnitude heads a DoRA adapter; its factors
    # are read from the site graph, at ``site.lora_A[<name>]`` / ``site.lora_B[<name>]``.

    @property
    def fold_mode(self) -> str | None:
        """``"dora"``: ``W' = m / ‖W + s·B A‖ · (W + s·B A)``, bias unchanged."""
        return "dora"

    def low_rank(self, site: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(A (rank, in), B (out, rank), scaling)`` of the branch this magnitude rescales."""
        return (site._modules["lora_A"][self.adapter_name].weight,
                site._modules["lora_B"][self.adapter_name].weight, self.scaling)

    def fold(self, site: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:func:`dora_fold` of the layer's weight; the bias is unchanged."""
        lora_a, lora_b, scaling = self.low_rank(site)
        transposed = is_hf_conv1d(base_module(site))
        return dora_fold(weight.detach(), self.weight.detach(), lora_a.detach(),
                         lora_b.detach(), scaling, transposed=transposed), bias

    def fold_detail(self, site: nn.Module) -> str:
        return (f"m / ‖W + {self.scaling:g}·B A‖ · (W + {self.scaling:g}·B A) of DoRA "
                f"{self.adapter_name!r}")


def refuse_dora_sites(sites: list[Site]) -> None:
    """DoRA is computed here on ``nn.Linear`` and ``Conv1D`` only.

    Raises:
        UnsupportedSiteError: naming the first other site and its type, and the way out.
    """
    other = [s for s in sites if not is_dense_linear(base_module(s.base))]
    if other:
        names = ", ".join(s.qname for s in other[:5])
        kind = type(base_module(other[0].base)).__name__
        raise UnsupportedSiteError(
            f"LoRAPass(use_dora=True): {other[0].qname} is a {kind}; "
            f"DoRA is supported on nn.Linear and transformers' Conv1D only, not on "
            f"convolutions or embeddings (selected: {names}). Way out: exclude them "
            f"(exclude=[...]) or adapt them with a second LoRAPass without use_dora.")
