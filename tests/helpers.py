"""Helpers shared by test modules (import as ``from helpers import ...``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from passes.modules import LoRAProjection
from surgery.sites.marker import AdapterParameters


def ia3_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every IA³ vector of ``model`` (the parameters ``<layer>.ia3_l.<adapter>``), found by
    the type of the slot holding them, in model order."""
    return [p for mod in model.modules()
            if isinstance(mod, AdapterParameters) and mod.pass_name == "ia3"
            for p in mod.parameters(recurse=False)]


def randomize_adapters(model: nn.Module, seed: int = 0) -> None:
    """Give adapters values far from their initialisation, in place and reproducibly.

    LoRA factors ~ N(0, 0.1²) (so ``B ≠ 0`` and the branch contributes), IA³ vectors
    ~ U(0.5, 1.5). Base parameters are not touched. Adapter modules are found by type.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, mod in model.named_modules():
            if isinstance(mod, LoRAProjection):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * 0.1)
            elif isinstance(mod, AdapterParameters) and mod.pass_name == "ia3":
                for param in mod.parameters(recurse=False):
                    param.copy_(torch.rand(param.shape, generator=gen) + 0.5)


PROJECTION_ROLES = ("query", "key", "value", "attn_out", "ffn_up", "ffn_gate", "ffn_down")
"""Every projection role; a model plays some of them (GPT-2 and BERT have no ``ffn_gate``)."""


def projection_roles(model: nn.Module) -> list[str]:
    """The roles of :data:`PROJECTION_ROLES` that some module of the traced ``model`` plays,
    for ``LoRAPass(role=...)`` on every projection (a role in a list must match something)."""
    from surgery.map.roles import find_roles

    played = set().union(*(info.roles for info in find_roles(model).modules.values()))
    return [role for role in PROJECTION_ROLES if role in played]


class MaskedMLP(nn.Module):
    """``if attention_mask is not None`` and a float option: when not given as example
    inputs, tracing fixes them to their defaults (``None``, ``1.0``).

    Input: float32 ``x`` ``(batch, seq, 8)``, optional ``attention_mask`` ``(batch, seq)``.
    Output: float32 ``(batch, seq, 8)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                scale: float = 1.0) -> torch.Tensor:
        h = self.up(x) * scale
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        return self.down(F.gelu(h))


class Shared(nn.Module):
    """``head(proj(relu(proj(x))))``: ``proj`` is called twice with the same weights.

    Input: float32 ``(batch, 8)``. Output: float32 ``(batch, 3)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(torch.relu(self.proj(x))))


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """``torch.set_num_threads(count)`` inside the block, the previous setting after it (tiny
    models run faster on one thread than on a pool on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
