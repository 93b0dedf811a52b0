"""The small modules that passes insert into a traced model.

Each derives from :class:`surgery.adapter_base.AdapterModule`, so adapters are found by
type, never by name. Their parameters are created on the device and in the dtype of the
weight they adapt.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from surgery.adapter_base import AdapterModule

__all__ = ["LoRAProjection", "LoRADropout", "IA3Vector"]


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
            ``"gaussian"`` (A normal with std ``1/rank``); B always starts at zero.
    """

    pass_name = "lora"

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
        if factor == "B":
            nn.init.zeros_(self.weight)
        elif init == "gaussian":
            nn.init.normal_(self.weight, std=1.0 / rank)
        else:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return (f"{self.factor}: {self.in_features} -> {self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha}, scaling={self.scaling:g}, {super().extra_repr()}")


class LoRADropout(AdapterModule):
    """Dropout on the input of a LoRA branch (identity when ``p == 0``)."""

    pass_name = "lora"

    def __init__(self, p: float, *, site: str, adapter_name: str, role: str | None) -> None:
        super().__init__(site=site, adapter_name=adapter_name, role=role)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0:
            return x
        return F.dropout(x, self.p, self.training)


class IA3Vector(AdapterModule):
    """An IA³ scaling vector (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is
    Better and Cheaper than In-Context Learning").

    ``forward(x)`` returns ``x * l`` over the last dimension, ``(..., width) → (..., width)``.
    ``l`` starts at ones. With ``parts`` (a fused projection), only those feature slices are
    learned and the rest of the vector is fixed at one.

    Args:
        width: size of the scaled dimension.
        parts: ``[(start, stop)]`` slices that are learned; ``None`` = all of them.
        mode: ``"output"`` (scales a layer's output) or ``"input"`` (scales its input).
    """

    pass_name = "ia3"

    def __init__(self, width: int, *, parts: list[tuple[int, int]] | None, mode: str, site: str,
                 adapter_name: str, role: str | None, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__(site=site, adapter_name=adapter_name, role=role)
        self.width = width
        self.mode = mode
        self.parts = sorted(parts) if parts else [(0, width)]
        learned = sum(stop - start for start, stop in self.parts)
        self.weight = nn.Parameter(torch.ones(learned, dtype=dtype, device=device))

    def vector(self) -> torch.Tensor:
        """The full scaling vector, shape ``(width,)``: learned slices, ones elsewhere."""
        if self.parts == [(0, self.width)]:
            return self.weight
        pieces = []
        pos = 0
        offset = 0
        for start, stop in self.parts:
            if start > pos:
                pieces.append(self.weight.new_ones(start - pos))
            pieces.append(self.weight[offset: offset + stop - start])
            offset += stop - start
            pos = stop
        if pos < self.width:
            pieces.append(self.weight.new_ones(self.width - pos))
        return torch.cat(pieces)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.vector()

    def extra_repr(self) -> str:
        return f"{self.mode} scaling, width={self.width}, parts={self.parts}, {super().extra_repr()}"
