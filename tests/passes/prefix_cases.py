"""Small models shared by the prefix tests."""

from __future__ import annotations

import torch
from torch import nn


class Mixer(nn.Module):
    """A position-mixing leaf: ``x + mean over positions``, then a projection."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x + x.mean(dim=1, keepdim=True))


class WithMixer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 16)
        self.mixer = Mixer()
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mixer(self.embed(x)))
