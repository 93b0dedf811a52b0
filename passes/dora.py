"""DoRA: the magnitude vector of a weight-decomposed LoRA branch (Liu et al. 2024, "DoRA:
Weight-Decomposed Low-Rank Adaptation").

DoRA writes the adapted weight as a magnitude times a direction, ``W' = m ⊙ (W + s·B A) /
‖W + s·B A‖``, with the norm taken per output feature over the input dimension and ``m``
(shape ``(out,)``) learned, starting at ``‖W‖`` so that the adapted layer starts as the
layer (up to rounding: ``m / ‖W‖`` is one only to within an ulp). As in the paper (§4.3)
and in PEFT, the norm is treated as a constant: no gradient flows through it.

On a layer ``y = W x + b`` the branch's output is

    y' = y + (m / ‖W + s·B A‖ − 1) · W d + m / ‖W + s·B A‖ · s · B A d

with ``d`` the branch's dropout of ``x``, the sum PEFT computes for ``use_dora=True``. As
PEFT does, ``W d`` is read off the layer's result, ``y − b``, when ``d`` is ``x`` (no
dropout, or not training): no second product with ``W`` in the forward or the backward
pass. The site graph hands the magnitude the layer's own node, which
:func:`surgery.sites.rewrite.replace_uses_after` leaves in place when later adapters go on
the layer's path, so a second adapter on the layer does not leak into ``W d`` (PEFT reads
its running result there). While dropout draws, ``W d`` is computed from ``d``. Merged, it
is ``W' = m / ‖W + s·B A‖ · (W + s·B A)`` with the bias unchanged.

The norm is computed as PEFT computes it (``B A`` formed, ``‖W + s·B A‖``): with rank 8 on a
256 × 256 weight that takes about 0.1 ms per layer on one CPU thread, under 0.5% of the
LLaMA-4 train step of ``benchmarks/bench_dora.py``, and keeping PEFT's order of operations
keeps the outputs equal to PEFT's bit for bit.

:class:`DoRAMagnitude` holds ``m`` as ``lora_magnitude_vector.<adapter>.weight`` (PEFT's
key without ``base_model.model.`` and with the adapter's name, as every LoRA key) and
computes the update above from the layer's weight and the factors, which the site graph
hands it (``get_attr`` nodes of the branch, part ``dora_weight``); an ``add`` puts it on the
layer's path. It heads its adapter in the fold protocol of
:class:`~surgery.sites.marker.AdapterModule` (``fold_mode == "dora"``).

On ``nn.Conv1d/2d/3d`` (:mod:`passes.dora_conv`) the norm runs over every dimension of the
weight but the output channel, ``W d`` is the layer's result less its bias (or, under
dropout, its convolution of ``d`` without bias), and the magnitude has PEFT's shape
``(1, out, 1, ..., 1)``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from passes.dora_conv import ConvGeometry, conv_dora_fold, conv_dora_norm, conv_weight_norm
from passes.lora_layers import is_plain_conv
from passes.modules import routed_update
from surgery.adapters.merge_math import compute_dtype, lora_delta
from surgery.errors import MergeError, UnsupportedSiteError
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

    ``forward(lora_out, d, weight, lora_a, lora_b, result=None, bias=None)`` returns what
    the branch adds to the layer's path,
    ``(m / ‖W + s·B A‖ − 1) · W d + m / ‖W + s·B A‖ · s · lora_out``, shape ``(..., out)``
    (see :mod:`passes.dora`): ``lora_out = B A d`` ``(..., out)`` (unscaled); ``d`` the
    branch's dropout of the layer's input ``(..., in)``; ``weight`` the layer's own;
    ``lora_a`` / ``lora_b`` the factors; ``result`` the layer's own result ``W x + b`` (the
    site graph keeps this read on the layer's node, whatever later passes put on its path)
    and ``bias`` its bias. When ``d`` is the input (no dropout, or not training), ``W d`` is
    ``result - bias``, as PEFT takes it, with no second product with ``W``; otherwise (or
    without ``result``) it is computed from ``d``.

    Args:
        weight: the layer's weight, ``(out, in)`` (``(in, out)`` for ``Conv1D``;
            ``(out, in / groups, *kernel)`` for a convolution).
        transposed: whether it is stored ``(in, out)``.
        scaling: the branch's ``alpha / rank`` (or ``alpha / sqrt(rank)``).
        conv: the convolution adapted (read for its geometry), or ``None`` for a linear
            layer. On a convolution ``lora_out`` and the result are ``(N, out, *spatial)``
            and the magnitude is ``(1, out, 1, ..., 1)`` (PEFT's shape).
        dropout: the branch's dropout probability: while it draws (training, ``p > 0``),
            ``W d`` is computed from ``d``; otherwise it is read off the layer's result.

    The magnitude starts at ``‖W‖`` (``B`` is zero), computed as PEFT does it, so files
    cross both ways. Inactive, ``forward`` returns ``-0.0`` (a broadcast view: the add then
    returns the layer's path bit for bit); routed per sample, ``-0.0`` for the samples not
    routed to it.
    """

    pass_name = "lora"
    routes_samples: ClassVar[bool] = True

    def __init__(self, weight: torch.Tensor, *, transposed: bool, scaling: float, site: str,
                 adapter_name: str, role: str | None, conv: nn.Module | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__(site=site, adapter_name=adapter_name, role=role)
        self.transposed = transposed
        self.dropout = dropout
        self.scaling = scaling
        self.conv = None if conv is None else ConvGeometry(conv)
        with torch.no_grad():
            w = weight.T if transposed else weight
            if self.conv is not None:
                shape = (1, w.shape[0], *(1,) * (w.dim() - 2))
                init = (torch.empty(shape, dtype=w.dtype, device=w.device)
                        if w.device.type == "meta" else conv_weight_norm(w))
            else:
                init = (torch.empty(w.shape[0], dtype=w.dtype, device=w.device)
                        if w.device.type == "meta" else torch.linalg.norm(w, dim=1).to(w.dtype))
        self.weight = nn.Parameter(init)
        self.route: torch.Tensor | None = None

    def forward(self, lora_out: torch.Tensor, d: torch.Tensor, weight: torch.Tensor,
                lora_a: torch.Tensor, lora_b: torch.Tensor, result: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        if not self.active:  # -0.0: the branch's add then returns its other operand exactly
            return lora_out.new_full((), -0.0).expand(lora_out.shape)
        weight = weight.to(d.dtype)
        lora_a, lora_b = lora_a.detach().to(d.dtype), lora_b.detach().to(d.dtype)
        conv = self.conv
        if conv is not None:
            norm = conv_dora_norm(weight, lora_a, lora_b, self.scaling, conv.groups)
            # (out, 1, ..., 1): broadcasts over batched and unbatched outputs alike
            factor = (self.weight / norm.detach()).transpose(0, 1).flatten(1)
            factor = factor.view(-1, *(1,) * (weight.dim() - 2))
        else:
            norm = dora_norm(weight, lora_a, lora_b, self.scaling, transposed=self.transposed)
            factor = self.weight / norm.detach()
        if result is not None and (self.dropout == 0.0 or not self.training):
            # d is the layer's input: W d is the layer's result less its bias (as PEFT)
            base = result if bias is None else result - (
                bias if conv is None else bias.view(-1, *(1,) * (weight.dim() - 2)))
        elif conv is not None:
            base = conv.product(d, weight)
        else:
            base = F.linear(d, weight.T if self.transposed else weight)
        return routed_update(self, (factor - 1) * base + factor * lora_out * self.scaling)

    def extra_repr(self) -> str:
        kind = "" if self.conv is None else f"{self.conv!r}, "
        return (f"out={self.weight.numel()}, {kind}scaling={self.scaling:g}, "
                f"{super().extra_repr()}")

    # Fold protocol (surgery.sites.marker): the magnitude heads a DoRA adapter; its factors
    # are read from the site graph, at ``site.lora_A[<name>]`` / ``site.lora_B[<name>]``.

    @property
    def fold_mode(self) -> str | None:
        """``"dora"``: ``W' = m / ‖W + s·B A‖ · (W + s·B A)``, bias unchanged."""
        return "dora"

    def low_rank(self, site: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(A (rank, in), B (out, rank), scaling)`` of the branch this magnitude rescales
        (on a convolution, ``lora_B``'s views with the kernel flattened, see
        :meth:`passes.lora_conv.LoRAConvFactor.low_rank`)."""
        lora_b = site._modules["lora_B"][self.adapter_name]
        if self.conv is not None:
            return lora_b.low_rank(site)
        return site._modules["lora_A"][self.adapter_name].weight, lora_b.weight, self.scaling

    def fold(self, site: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:func:`dora_fold` of the layer's weight (:func:`passes.dora_conv.conv_dora_fold`
        on a convolution); the bias is unchanged.

        Raises:
            MergeError: a convolution with ``groups > 1`` (its update does not fit its
                weight, as for plain LoRA).
        """
        if self.conv is not None:
            if self.conv.groups != 1:
                raise MergeError(
                    f"DoRA {self.adapter_name!r} at {self.site or 'the model'} "
                    f"({type(base_module(site)).__name__}, groups={self.conv.groups}) cannot "
                    f"be merged: its lora_A reads every input channel, while the layer's "
                    f"weight connects each output channel to its own group only (PEFT refuses "
                    f"this merge too). Way out: keep this adapter unmerged.")
            lora_a = site._modules["lora_A"][self.adapter_name].weight
            lora_b = site._modules["lora_B"][self.adapter_name].weight
            return conv_dora_fold(weight.detach(), self.weight.detach(), lora_a.detach(),
                                  lora_b.detach(), self.scaling), bias
        lora_a, lora_b, scaling = self.low_rank(site)
        transposed = is_hf_conv1d(base_module(site))
        return dora_fold(weight.detach(), self.weight.detach(), lora_a.detach(),
                         lora_b.detach(), scaling, transposed=transposed), bias

    def fold_detail(self, site: nn.Module) -> str:
        return (f"m / ‖W + {self.scaling:g}·B A‖ · (W + {self.scaling:g}·B A) of DoRA "
                f"{self.adapter_name!r}")


def refuse_dora_sites(sites: list[Site]) -> None:
    """DoRA is computed here on ``nn.Linear``, ``Conv1D`` and ``nn.Conv1d/2d/3d``.

    Raises:
        UnsupportedSiteError: naming the first other site (an embedding) and its type, and
            the way out.
    """
    other = [s for s in sites if not (is_dense_linear(base_module(s.base))
                                      or is_plain_conv(base_module(s.base)))]
    if other:
        names = ", ".join(s.qname for s in other[:5])
        kind = type(base_module(other[0].base)).__name__
        raise UnsupportedSiteError(
            f"LoRAPass(use_dora=True): {other[0].qname} is a {kind}; "
            f"DoRA is supported on nn.Linear, transformers' Conv1D and nn.Conv1d/2d/3d, not "
            f"on embeddings (selected: {names}). Way out: exclude them "
            f"(exclude=[...]) or adapt them with a second LoRAPass without use_dora.")
