"""The arithmetic of merging adapters into weights, as pure tensor functions.

Nothing here touches a module or a graph: the passes in :mod:`passes.merge` and
:func:`surgery.adapters.unload` call these functions, then swap or write the results.

Every merge is computed in a compute dtype of at least float32 (float32 for float16,
bfloat16 and float32 weights; float64 stays float64) and cast **once** to the weight's
dtype, so a bfloat16 weight merges to exactly ``bf16(fp32(W) + fp32(ΔW))``.

Weight layouts:

* ``nn.Linear`` stores its weight ``(out_features, in_features)``;
* transformers' ``Conv1D`` stores it transposed, ``(in_features, out_features)``
  (``transposed=True`` below). A square-only test would hide a missing transpose;
* ``nn.Embedding`` stores ``(num_embeddings, embedding_dim)``: a lookup is the product of a
  one-hot row with it, so it is a transposed layer from the vocabulary to the embedding;
* ``nn.Conv1d/2d/3d`` store ``(out_channels, in_channels / groups, *kernel)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from surgery.errors import MergeError

__all__ = [
    "compute_dtype",
    "conv_lora_delta",
    "lora_delta",
    "merge_delta",
    "ia3_fold",
    "is_finite",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype merges are computed in: ``dtype`` promoted to at least float32."""
    return torch.promote_types(dtype, torch.float32)


def lora_delta(lora_A: Tensor, lora_B: Tensor, scaling: float, *, transposed: bool = False,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """The dense update of a LoRA branch, ``ΔW = scaling · B @ A`` (Hu et al. 2021).

    Args:
        lora_A: ``(rank, in_features)``, any floating dtype.
        lora_B: ``(out_features, rank)``, any floating dtype.
        scaling: ``alpha / rank`` (or ``alpha / sqrt(rank)`` for rsLoRA).
        transposed: return ``ΔW.T``, ``(in_features, out_features)``, for weights stored
            transposed (transformers' ``Conv1D``).
        dtype: the compute dtype (float32 unless the weight is float64).

    Returns:
        ``ΔW`` in ``dtype``: ``(out_features, in_features)``, or its transpose.

    Raises:
        MergeError: the factors' inner dimensions differ.
    """
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_B.shape[1] != lora_A.shape[0]:
        raise MergeError(f"LoRA factors do not chain: B {tuple(lora_B.shape)} @ A "
                         f"{tuple(lora_A.shape)}; B must be (out, rank) and A (rank, in).")
    delta = (lora_B.to(dtype) @ lora_A.to(dtype)) * scaling
    return delta.T if transposed else delta


def conv_lora_delta(lora_A: Tensor, lora_B: Tensor, scaling: float, *,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """The dense update of a LoRA branch on a convolution without groups.

    The branch is ``B(A(x))``: ``A`` a convolution with the layer's kernel, stride, padding
    and dilation from ``in`` to ``rank`` channels, ``B`` a ``1×…×1`` convolution from
    ``rank`` to ``out`` channels. Their composition is one convolution with
    ``ΔW[o, i, *k] = scaling · Σ_j B[o, j] A[j, i, *k]`` (PEFT's ``get_delta_weight`` for
    ``_ConvNd``, computed here as one matrix product on the flattened factors).

    Args:
        lora_A: ``(rank, in_channels, *kernel)``.
        lora_B: ``(out_channels, rank, 1, ..., 1)``.
        scaling: ``alpha / rank`` (or ``alpha / sqrt(rank)``).
        dtype: the compute dtype.

    Returns:
        ``ΔW`` in ``dtype``, ``(out_channels, in_channels, *kernel)``.

    Raises:
        MergeError: the factors do not chain (``B`` not ``1×…×1``, or ranks differ).
    """
    if (lora_A.dim() < 3 or lora_B.dim() != lora_A.dim() or lora_B.shape[1] != lora_A.shape[0]
            or any(k != 1 for k in lora_B.shape[2:])):
        raise MergeError(f"convolution LoRA factors do not chain: B {tuple(lora_B.shape)} after "
                         f"A {tuple(lora_A.shape)}; B must be (out, rank, 1, ...) and A "
                         f"(rank, in, *kernel).")
    delta = (lora_B.flatten(1).to(dtype) @ lora_A.flatten(1).to(dtype)) * scaling
    return delta.view(lora_B.shape[0], *lora_A.shape[1:])


def merge_delta(weight: Tensor, delta: Tensor) -> Tensor:
    """``W + ΔW`` computed in ``delta``'s dtype and cast once to ``weight.dtype``.

    Args:
        weight: the base weight, as stored (``(out, in)``, or ``(in, out)`` for Conv1D).
        delta: the update, same shape as ``weight``, in the compute dtype.

    Returns:
        A new tensor of ``weight``'s shape, dtype and device; ``weight`` is not changed.

    Raises:
        MergeError: the shapes differ (typically a missing transpose).
    """
    if tuple(delta.shape) != tuple(weight.shape):
        raise MergeError(f"update of shape {tuple(delta.shape)} does not fit a weight of shape "
                         f"{tuple(weight.shape)}")
    return (weight.to(delta.dtype) + delta).to(weight.dtype)


def ia3_fold(weight: Tensor, bias: Tensor | None, vector: Tensor, *, mode: str,
             transposed: bool = False, groups: int = 1) -> tuple[Tensor, Tensor | None]:
    """Fold an IA³ scaling vector into a linear or convolution layer (Liu et al. 2022).

    Output scaling ``l ⊙ (W x + b)`` becomes ``W' = diag(l) W``, ``b' = l ⊙ b`` (rows of an
    ``(out, in)`` weight, columns of a transposed ``(in, out)`` one, output channels of a
    convolution). Input scaling ``W (l ⊙ x) + b`` becomes ``W' = W diag(l)`` (columns of
    ``(out, in)``, rows of ``(in, out)``; for a convolution with ``groups``, input channel
    ``i`` of the group of output channel ``o`` is scaled by ``l[group(o) · in / groups + i]``,
    as PEFT's ``_get_ia3_scaling_for_weight``); the bias is unchanged. Per-channel scaling
    commutes with any padding mode, so a convolution folds exactly.

    Args:
        weight: ``(out, in)``, ``(in, out)`` with ``transposed``, or a convolution's
            ``(out, in / groups, *kernel)``.
        bias: ``(out,)`` or ``None``.
        vector: ``(out,)`` for ``mode="output"``, ``(in,)`` for ``mode="input"``.
        mode: ``"output"`` or ``"input"``.
        transposed: the weight is stored ``(in, out)`` (transformers' ``Conv1D``).
        groups: the convolution's ``groups`` (1 for a linear layer).

    Returns:
        ``(W', b')``: new tensors in the dtypes of ``weight`` and ``bias``, each computed in
        at least float32 and cast once; ``b'`` is ``bias`` itself for input scaling.

    Raises:
        MergeError: ``mode`` is unknown or the vector does not fit the weight.
    """
    if mode not in ("output", "input"):
        raise MergeError(f"IA³ mode must be 'output' or 'input', got {mode!r}")
    conv = weight.dim() > 2
    out_axis = 1 if transposed and not conv else 0
    axis = out_axis if mode == "output" else 1 - out_axis
    width = weight.shape[axis] * (groups if conv and mode == "input" else 1)
    if vector.dim() != 1 or weight.dim() < 2 or vector.shape[0] != width:
        raise MergeError(f"IA³ vector of shape {tuple(vector.shape)} does not fit a weight of "
                         f"shape {tuple(weight.shape)} ({mode} scaling"
                         f"{f', groups={groups}' if groups != 1 else ''})")
    dtype = compute_dtype(weight.dtype)
    scale = vector.to(dtype)
    if conv and mode == "input" and groups > 1:  # (out, in / groups): each group its slice
        per_in = weight.shape[1]
        scale = scale.view(groups, 1, per_in).expand(groups, weight.shape[0] // groups, per_in)
        scale = scale.reshape(weight.shape[0], per_in)
    elif axis == 0:
        scale = scale[:, None]
    else:
        scale = scale[None, :]
    scale = scale.reshape(*scale.shape, *([1] * (weight.dim() - 2)))
    new_weight = (weight.to(dtype) * scale).to(weight.dtype)
    if mode == "input" or bias is None:
        return new_weight, bias
    new_bias = (bias.to(compute_dtype(bias.dtype)) * vector.to(compute_dtype(bias.dtype))).to(bias.dtype)
    return new_weight, new_bias


def is_finite(tensor: Tensor) -> bool:
    """True when every element of ``tensor`` is finite (no ``inf``, no ``nan``)."""
    return bool(torch.isfinite(tensor).all())
