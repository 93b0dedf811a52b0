"""Tiny convolution and embedding models, and their PEFT twins, shared by the tests of LoRA
and IA³ on those layers (tests/passes/test_lora_conv.py, test_lora_embedding.py,
test_ia3_conv.py, tests/surgery/checkpoint/test_peft_layers.py).

PEFT is the reference (a test dependency): :func:`peft_twin` applies PEFT to a copy of the
same model and :func:`copy_into_peft` gives it our adapter values by parameter name (ours
are PEFT's without ``base_model.model.`` and ``.base_layer``, with the same shapes).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from passes.lora_conv import LoRAConvFactor
from passes.lora_embedding import LoRAEmbeddingFactor
from surgery.sites.marker import AdapterParameters

PEFT_PREFIX = "base_model.model."


class Convs(nn.Module):
    """One convolution of each kind, each on its own input.

    ``c1``: ``nn.Conv1d(4, 6, 3, padding=1)`` on ``x1`` ``(2, 4, 7)``; ``c2``:
    ``nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)`` on ``x2`` ``(2, 4, 9, 9)``, then
    ``p``: ``nn.Conv2d(6, 8, 1)`` (a 1×1 convolution); ``c3``: ``nn.Conv3d(2, 4, (1, 3, 3),
    padding=(0, 1, 1))`` on ``x3`` ``(2, 2, 3, 5, 5)``. Output: float32 ``(2, 42 + 200 + 300)``,
    the three results flattened side by side.
    """

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.p = nn.Conv2d(6, 8, 1)
        self.c3 = nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        y1 = self.c1(x1)
        y2 = self.p(torch.relu(self.c2(x2)))
        y3 = self.c3(x3)
        return torch.cat([y1.flatten(1), y2.flatten(1), y3.flatten(1)], dim=1)


def conv_inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x1, x2, x3)`` for :class:`Convs`."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 7, generator=gen), torch.randn(2, 4, 9, 9, generator=gen),
            torch.randn(2, 2, 3, 5, 5, generator=gen))


class Embeds(nn.Module):
    """``head(emb(ids))``: ``emb`` is ``nn.Embedding(20, 8, padding_idx=0)``, ``head``
    ``nn.Linear(8, 5)``. Input: int64 ids ``(2, 6)``; output float32 ``(2, 6, 5)``."""

    def __init__(self, **embedding: Any) -> None:
        super().__init__()
        embedding.setdefault("padding_idx", 0)
        self.emb = nn.Embedding(20, 8, **embedding)
        self.head = nn.Linear(8, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids))


def embed_inputs() -> tuple[torch.Tensor]:
    """Ids for :class:`Embeds`, the padding id 0 among them."""
    return (torch.tensor([[0, 3, 7, 19, 0, 5], [1, 2, 0, 2, 11, 4]]),)


def build(cls: type[nn.Module], seed: int = 0, **kwargs: Any) -> nn.Module:
    """A seeded model in eval mode."""
    torch.manual_seed(seed)
    return cls(**kwargs).eval()


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Random values far from the initialisation in every LoRA factor (N(0, 0.1²)) and IA³
    vector (U(0.5, 1.5)) of the convolution / embedding kinds, found by type."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (LoRAConvFactor, LoRAEmbeddingFactor)):
                for param in mod.parameters():
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
            elif isinstance(mod, AdapterParameters) and mod.pass_name == "ia3":
                for param in mod.parameters(recurse=False):
                    param.copy_(torch.rand(param.shape, generator=gen) + 0.5)


def ours_key(peft_key: str) -> str:
    """Our state-dict key of a PEFT model's key."""
    return peft_key.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


def peft_twin(model: nn.Module, config: Any) -> nn.Module:
    """``peft.get_peft_model`` on a copy of ``model``, in ``model``'s training mode."""
    import peft

    twin = peft.get_peft_model(copy.deepcopy(model), config)
    return twin.train(model.training)


def copy_into_peft(ours: nn.Module, twin: nn.Module) -> None:
    """Give every tensor of the PEFT model ``twin`` our value under the same name; every
    one of our tensors must be used, so the two hold exactly the same adapter."""
    mine = ours.state_dict()
    used = set()
    with torch.no_grad():
        for key, tensor in twin.state_dict(keep_vars=True).items():
            name = ours_key(key)
            assert name in mine, f"PEFT's {key} has no counterpart here ({name})"
            assert mine[name].shape == tensor.shape, (key, mine[name].shape, tensor.shape)
            tensor.copy_(mine[name])
            used.add(name)
    assert used == set(mine), f"not in PEFT's model: {sorted(set(mine) - used)}"


def tolerance(reference: torch.Tensor) -> float:
    """``1e-6 · (1 + max|y|)``."""
    return 1e-6 * (1.0 + reference.abs().max().item())


def assert_close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    err = (ours - reference).abs().max().item()
    assert err <= tolerance(reference), f"max difference {err:.3g} > {tolerance(reference):.3g}"
