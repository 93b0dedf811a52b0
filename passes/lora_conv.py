"""LoRA on ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``, as PEFT's ``lora.Conv1d/2d/3d``.

``lora_A.<adapter>`` is a convolution of the layer's kind with its kernel size, stride,
padding, dilation and padding mode, from ``in_channels`` to ``rank`` channels, without groups
or bias; ``lora_B.<adapter>`` a ``1×…×1`` convolution from ``rank`` to ``out_channels`` with
the layer's ``groups`` (the rank must be a multiple of it). Parameters
``<site>.lora_A.<adapter>.weight`` ``(rank, in, *kernel)`` and
``<site>.lora_B.<adapter>.weight`` ``(out, rank / groups, 1, ...)``; ``A`` Kaiming-uniform (or
normal), ``B`` zero, so the layer is unchanged at init. (PEFT's ``lora_A`` takes neither the
dilation nor the padding mode; following the layer keeps a merge exact.)

Before and after, the site graph of ``conv`` (an ``nn.Conv2d`` with stride 2, groups 2)::

    conv2d = torch.conv2d(input, weight, bias, (2, 2), (1, 1), (1, 1), 2)
    return conv2d

    conv2d = torch.conv2d(input, weight, bias, (2, 2), (1, 1), (1, 1), 2)
    d = self.lora_dropout.default(input)
    a = self.lora_A.default(d)          # (N, in, H, W) -> (N, rank, H', W')
    b = self.lora_B.default(a)          # (N, rank, H', W') -> (N, out, H', W'), zero at init
    return conv2d + b * scaling

Merge folds ``ΔW = scaling · B ∘ A`` (the two convolutions composed,
:func:`surgery.adapters.merge_math.conv_lora_delta`) into the weight, in at least float32,
cast once. A convolution with ``groups > 1`` cannot take its update into its weight (``A``
reads every input channel, the weight only those of each group): merge refuses it, as PEFT
does.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from passes.lora_init import init_factor
from passes.modules import LoRADropout, routed_update
from surgery.adapters.merge_math import compute_dtype, conv_lora_delta, merge_delta
from surgery.errors import ConfigError, MergeError
from surgery.sites.marker import AdapterModule
from surgery.sites.site_graph import base_module

__all__ = ["LoRAConvFactor"]

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class LoRAConvFactor(AdapterModule):
    """One factor of LoRA on a convolution: ``A`` or ``B`` (see the module docstring).

    ``forward(x)``: ``A`` maps ``(N, in, *spatial)`` to ``(N, rank, *spatial')`` with the
    layer's geometry, ``B`` maps ``(N, rank, *spatial')`` to ``(N, out, *spatial')``
    (unbatched inputs, without ``N``, too). ``lora_B`` carries ``rank``, ``alpha`` and
    ``scaling``, and heads the adapter in the fold protocol.

    Args:
        conv: the layer adapted (read for its sizes and geometry only).
        factor: ``"A"`` or ``"B"``.
        rank, alpha, scaling: the update's hyper-parameters.
        init: ``"kaiming"`` or ``"gaussian"`` for ``A``; ``B`` starts at zero.
        site, adapter_name, role: see :class:`~surgery.sites.marker.AdapterModule`.
        dtype, device: of the new weight.

    Inactive, no convolution runs: ``A`` returns a zero scalar and ``B`` ``-0.0`` (a
    0-dimensional tensor), which the branch's add broadcasts, so ``y + (-0.0)`` is ``y``
    bit for bit. Under per-sample routing ``B`` keeps its output for the routed samples
    and gives ``-0.0`` for the others.
    """

    pass_name = "lora"
    routes_samples: ClassVar[bool] = True
    dora: bool = False  # a class default: set on the factors of a DoRA branch (passes.dora)

    def __init__(self, conv: nn.Module, *, factor: str, rank: int, alpha: float,
                 scaling: float, init: str, site: str, adapter_name: str, role: str | None,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(site=site, adapter_name=adapter_name, role=role)
        dims = len(conv.kernel_size)
        self.dims, self.factor, self.rank = dims, factor, rank
        self.alpha, self.scaling = alpha, scaling
        self.layer_groups = int(conv.groups)
        ones = (1,) * dims
        if factor == "A":
            self.in_channels, self.out_channels = int(conv.in_channels), rank
            shape = (rank, self.in_channels, *conv.kernel_size)
            self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
            self.padding_mode = conv.padding_mode
            self.pad = tuple(conv._reversed_padding_repeated_twice)
            self.groups = 1
        else:
            self.in_channels, self.out_channels = rank, int(conv.out_channels)
            shape = (self.out_channels, rank // self.layer_groups, *ones)
            self.stride, self.padding, self.dilation = ones, (0,) * dims, ones
            self.padding_mode, self.pad = "zeros", ()
            self.groups = self.layer_groups
        self.weight = nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
        self.route: torch.Tensor | None = None
        init_factor(self.weight, factor=factor, init=init, rank=rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:  # -0.0: the branch's add then returns its other operand exactly
            return x.new_full((), -0.0 if self.factor == "B" else 0.0)
        padding: Any = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self.pad, mode=self.padding_mode)
            padding = 0
        out = _CONV_FN[self.dims](x, self.weight, None, self.stride, padding, self.dilation,
                                  self.groups)
        return routed_update(self, out) if self.factor == "B" else out

    def extra_repr(self) -> str:
        return (f"{self.factor}: conv{self.dims}d {self.in_channels} -> {self.out_channels}, "
                f"kernel={tuple(self.weight.shape[2:])}, groups={self.groups}, rank={self.rank}, "
                f"alpha={self.alpha}, scaling={self.scaling:g}, {super().extra_repr()}")

    # Fold protocol: ``lora_B`` heads the adapter; ``lora_A`` is at ``site.lora_A[<name>]``.

    @property
    def fold_mode(self) -> str | None:
        """``"add"`` for ``lora_B``; ``None`` for ``lora_A`` and for the factors of a DoRA
        branch (its magnitude vector heads it)."""
        return "add" if self.factor == "B" and not self.dora else None

    def _factors(self, site: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return site._modules["lora_A"][self.adapter_name].weight, self.weight

    def low_rank(self, site: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(A (rank, in · kernel), B (out, rank), scaling)``: views of the factors with
        the kernel flattened, ``ΔW.flatten(1) = scaling · B A``; with ``groups > 1``, ``B``
        is the dense block-diagonal ``(out, rank)`` matrix (a new tensor) of the grouped
        ``1×…×1`` convolution. ``None`` for ``lora_A``."""
        if self.factor != "B":
            return None
        lora_a, lora_b = self._factors(site)
        groups = self.layer_groups
        if groups == 1:
            return lora_a.flatten(1), lora_b.flatten(1), self.scaling
        return lora_a.flatten(1), torch.block_diag(*lora_b.flatten(1).chunk(groups)), self.scaling

    def fold(self, site: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``W + scaling · B ∘ A``, in at least float32, cast once; the bias is unchanged.

        Raises:
            MergeError: the layer has ``groups > 1``: the update connects every input
                channel to every output channel, which its weight cannot hold.
        """
        if self.layer_groups != 1:
            kind = type(base_module(site)).__name__
            raise MergeError(
                f"LoRA {self.adapter_name!r} at {self.site or 'the model'} ({kind}, groups="
                f"{self.layer_groups}) cannot be merged: its lora_A reads every input channel, "
                f"while the layer's weight connects each output channel to the input channels "
                f"of its own group only, so the update does not fit the weight (PEFT refuses "
                f"this merge too). Way out: keep this adapter unmerged (it computes exactly).")
        lora_a, lora_b = self._factors(site)
        delta = conv_lora_delta(lora_a.detach(), lora_b.detach(), self.scaling,
                                dtype=compute_dtype(weight.dtype))
        return merge_delta(weight.detach(), delta), bias

    def fold_detail(self, site: nn.Module) -> str:
        return f"W + {self.scaling:g}·(B ∘ A) of LoRA {self.adapter_name!r} (convolution)"

    def from_low_rank(self, site: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor, *,
                      adapter_name: str) -> dict[str, AdapterModule]:
        """New ``lora_A`` / ``lora_B`` convolutions holding ``A`` ``(rank, in · kernel)``
        and ``B`` ``(out, rank)`` reshaped to the layer's kernel (scaling 1), and a
        ``lora_dropout`` with this adapter's probability.

        Raises:
            ConfigError: the layer has ``groups > 1`` (a combined ``B`` would not be
                grouped).
        """
        conv = base_module(site)
        if self.layer_groups != 1:
            raise ConfigError(
                f"combine_adapters: {self.site} ({type(conv).__name__}, groups="
                f"{self.layer_groups}) carries LoRA {self.adapter_name!r}, whose lora_B is a "
                f"grouped convolution; a combined B would connect every rank channel to every "
                f"output channel, which a grouped lora_B cannot hold. Way out: combine "
                f"adapters that do not sit on grouped convolutions.")
        rank = int(lora_a.shape[0])
        common = dict(rank=rank, alpha=float(rank), scaling=1.0, init="kaiming", site=self.site,
                      adapter_name=adapter_name, role=self.role, device=lora_a.device)
        new_a = LoRAConvFactor(conv, factor="A", dtype=lora_a.dtype, **common)
        new_b = LoRAConvFactor(conv, factor="B", dtype=lora_b.dtype, **common)
        with torch.no_grad():
            new_a.weight.copy_(lora_a.reshape(new_a.weight.shape))
            new_b.weight.copy_(lora_b.reshape(new_b.weight.shape))
        p = site._modules["lora_dropout"][self.adapter_name].p
        drop = LoRADropout(p, site=self.site, adapter_name=adapter_name, role=self.role)
        return {"lora_dropout": drop, "lora_A": new_a, "lora_B": new_b}
