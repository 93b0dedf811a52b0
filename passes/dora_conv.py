"""DoRA on ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``: the norm, the base product and the
merged weight (Liu et al. 2024, as PEFT's ``DoraConv1d/2d/3dLayer``).

A convolution's weight is ``(out, in / groups, *kernel)``; DoRA's norm is taken per output
channel over every other dimension, and the magnitude has PEFT's shape
``(1, out, 1, ..., 1)`` (as many dimensions as the weight), so PEFT's files hold it as is.
The LoRA update of the branch is ``ΔW = s · B ∘ A`` (:mod:`passes.lora_conv`): with
``groups = 1`` it is ``(B (out, r) @ A (r, in · kernel))`` reshaped to the weight, as PEFT
computes it, so the norms agree bit for bit.

With ``groups > 1`` the update reads every input channel while the weight reads only those
of each output channel's group: the adapted layer is the dense convolution ``V`` whose
diagonal blocks hold ``W`` and whose whole is ``+ s · B_bd A`` (``B_bd`` the block-diagonal
``(out, r)`` matrix of the grouped ``1×…×1`` ``lora_B``). The norm here is ``‖V‖`` per output
channel. PEFT 0.21 computes ``B.view(-1, r) @ A.view(r, -1)`` reshaped to the grouped
weight's shape instead, which is not that layer's update, so grouped outputs equal PEFT's
only while ``B`` is zero (at init). A grouped DoRA branch cannot be merged (as plain LoRA).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgery.adapters.merge_math import compute_dtype, conv_lora_delta

__all__ = ["ConvGeometry", "conv_dora_fold", "conv_dora_norm", "conv_weight_norm"]

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class ConvGeometry:
    """What the base product of a convolution needs: its dimension count, stride, padding,
    dilation, groups and padding mode (read from ``conv``; the weight is passed in)."""

    def __init__(self, conv: nn.Module) -> None:
        self.dims = len(conv.kernel_size)
        self.stride = tuple(conv.stride)
        self.padding: Any = conv.padding
        self.dilation = tuple(conv.dilation)
        self.groups = int(conv.groups)
        self.padding_mode = str(conv.padding_mode)
        self.pad = tuple(conv._reversed_padding_repeated_twice)

    def product(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``W ⋆ x`` without bias: ``(N, in, *spatial)`` (or unbatched) to
        ``(N, out, *spatial')``, as the layer computes it."""
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self.pad, mode=self.padding_mode)
            padding = 0
        return _CONV_FN[self.dims](x, weight, None, self.stride, padding, self.dilation,
                                   self.groups)

    def __repr__(self) -> str:
        return f"conv{self.dims}d(stride={self.stride}, groups={self.groups})"


def conv_weight_norm(weight: torch.Tensor) -> torch.Tensor:
    """``‖W‖`` per output channel, shape ``(1, out, 1, ..., 1)``: DoRA's magnitude at init
    (PEFT's value bit for bit)."""
    dims = tuple(range(1, weight.dim()))
    return weight.norm(p=2, dim=dims, keepdim=True).transpose(1, 0)


def _dense(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The grouped weight ``(out, in / g, *k)`` as the dense ``(out, in, *k)`` it acts as
    (zero outside each output channel's group)."""
    out, per_in = int(weight.shape[0]), int(weight.shape[1])
    kernel = tuple(weight.shape[2:])
    blocks = weight.reshape(groups, out // groups, per_in, -1)
    dense = weight.new_zeros(groups, out // groups, groups, per_in, blocks.shape[-1])
    idx = torch.arange(groups, device=weight.device)
    dense[idx, :, idx] = blocks
    return dense.reshape(out, groups * per_in, *kernel)


def conv_dora_norm(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                   scaling: float, groups: int) -> torch.Tensor:
    """``‖W + s · B ∘ A‖`` per output channel, shape ``(1, out, 1, ..., 1)``, not detached.

    Args:
        weight: ``(out, in / groups, *kernel)``.
        lora_a: ``(r, in, *kernel)``; lora_b: ``(out, r / groups, 1, ..., 1)``; in
            ``weight``'s dtype.
        scaling: the branch's scaling.
        groups: the layer's ``groups``.
    """
    rank = int(lora_a.shape[0])
    if groups == 1:
        delta = (lora_b.reshape(-1, rank) @ lora_a.reshape(rank, -1)).reshape(weight.shape)
        return conv_weight_norm(weight + scaling * delta)
    dense_b = torch.block_diag(*lora_b.flatten(1).chunk(groups))
    delta = (dense_b @ lora_a.flatten(1)).reshape(weight.shape[0], *lora_a.shape[1:])
    return conv_weight_norm(_dense(weight, groups) + scaling * delta)


def conv_dora_fold(weight: torch.Tensor, magnitude: torch.Tensor, lora_a: torch.Tensor,
                   lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The merged weight ``m / ‖W + ΔW‖ · (W + ΔW)`` of a convolution without groups,
    ``ΔW = s · B ∘ A`` (:func:`~surgery.adapters.merge_math.conv_lora_delta`), computed in
    at least float32 and cast once to ``weight``'s dtype.

    Args:
        weight: ``(out, in, *kernel)``; magnitude: ``(1, out, 1, ..., 1)``.
        lora_a / lora_b: ``(r, in, *kernel)`` / ``(out, r, 1, ..., 1)``.

    Returns:
        A new tensor of ``weight``'s shape and dtype.
    """
    dtype = compute_dtype(weight.dtype)
    adapted = weight.to(dtype) + conv_lora_delta(lora_a, lora_b, scaling, dtype=dtype)
    factor = magnitude.to(dtype) / conv_weight_norm(adapted)
    return (factor.transpose(0, 1) * adapted).to(weight.dtype)
