"""Helpers shared by test modules (import as ``from helpers import ...``)."""

from __future__ import annotations

import torch
from torch import nn

from passes.modules import IA3Vector, LoRAProjection


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
            elif isinstance(mod, IA3Vector):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=gen) + 0.5)


PROJECTION_ROLES = ("query", "key", "value", "attn_out", "ffn_up", "ffn_gate", "ffn_down")
"""Every projection role; a model plays some of them (GPT-2 and BERT have no ``ffn_gate``)."""


def projection_roles(model: nn.Module) -> list[str]:
    """The roles of :data:`PROJECTION_ROLES` that some module of the traced ``model`` plays,
    for ``LoRAPass(role=...)`` on every projection (a role in a list must match something)."""
    from surgery.roles import find_roles

    played = set().union(*(info.roles for info in find_roles(model).modules.values()))
    return [role for role in PROJECTION_ROLES if role in played]
