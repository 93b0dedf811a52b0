"""LoRA on ``nn.Embedding``, as PEFT's ``lora.Embedding``.

``A`` ``(rank, num_embeddings)`` starts at zero and ``B`` ``(embedding_dim, rank)`` normal;
the branch is ``F.embedding(ids, Aᵀ, padding_idx, max_norm, ...) @ Bᵀ · scaling``, with no
dropout (ids cannot be dropped, and PEFT applies none). The factors are parameters named as
PEFT's, ``<site>.lora_embedding_A.<adapter>`` and ``<site>.lora_embedding_B.<adapter>``:
each slot is one module owning the parameter named after its adapter, so an embedding holds
one LoRA adapter (:func:`register_slot` refuses a second).

Before and after, the site graph of ``wte``::

    embedding = F.embedding(input, weight, padding_idx=0, ...)
    return embedding

    embedding = F.embedding(input, weight, padding_idx=0, ...)
    a = self.lora_embedding_A(input)    # (...,) ids -> (..., rank), zero at init
    b = self.lora_embedding_B(a)        # (..., rank) -> (..., dim)
    return embedding + b * scaling

Merge folds ``ΔW = scaling · (B A)ᵀ`` into the ``(num_embeddings, dim)`` table, in at least
float32, cast once (refused with ``max_norm``, which renormalises the rows it reads).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from passes.modules import routed_update
from surgery.adapters.merge_math import compute_dtype, lora_delta, merge_delta
from surgery.errors import AlreadyAdaptedError, ConfigError
from surgery.sites.marker import AdapterModule

__all__ = ["LoRAEmbeddingFactor", "register_slot"]


class LoRAEmbeddingFactor(AdapterModule):
    """One factor of LoRA on an ``nn.Embedding``: ``A`` ``(rank, num_embeddings)`` or ``B``
    ``(embedding_dim, rank)``, held as the parameter named after the adapter (PEFT's
    ``lora_embedding_A.<adapter>``), read with :attr:`factor_weight`.

    ``forward``: ``A`` looks ids ``(...)`` up in ``Aᵀ`` with the layer's ``padding_idx``,
    ``max_norm``, ``norm_type`` and ``scale_grad_by_freq``, giving ``(..., rank)`` (with a
    dense gradient even for a ``sparse=True`` layer: a sparse gradient of ``Aᵀ`` cannot be
    transposed back onto ``A``, which makes PEFT's backward fail there); ``B`` maps ``(..., rank)`` to ``(..., embedding_dim)`` as ``a @ Bᵀ``.
    Inactive, nothing is computed: ``A`` returns a zero scalar, ``B`` ``-0.0``; under
    per-sample routing ``B`` gives ``-0.0`` for the samples not routed.

    Args:
        embedding: the layer adapted (read for its sizes and lookup options).
        factor: ``"A"`` (starts at zero) or ``"B"`` (starts normal, std 1), as PEFT.
        rank, alpha, scaling: the update's hyper-parameters.
        site, adapter_name, role: see :class:`~surgery.sites.marker.AdapterModule`.
        dtype, device: of the new parameter.

    Raises:
        ConfigError: ``adapter_name`` is the name of an attribute of the module
            (``"site"``, ``"rank"``, ``"forward"``, ...), which a parameter cannot take.
    """

    pass_name = "lora"
    routes_samples: ClassVar[bool] = True

    def __init__(self, embedding: nn.Embedding, *, factor: str, rank: int, alpha: float,
                 scaling: float, site: str, adapter_name: str, role: str | None,
                 dtype: torch.dtype, device: torch.device, init: str = "kaiming") -> None:
        super().__init__(site=site, adapter_name=adapter_name, role=role)
        self.factor, self.rank, self.alpha, self.scaling = factor, rank, alpha, scaling
        self.num_embeddings = int(embedding.num_embeddings)
        self.embedding_dim = int(embedding.embedding_dim)
        self.padding_idx = embedding.padding_idx
        self.max_norm = embedding.max_norm
        self.norm_type = embedding.norm_type
        self.scale_grad_by_freq = embedding.scale_grad_by_freq
        self.route: torch.Tensor | None = None
        if hasattr(self, adapter_name):
            raise ConfigError(
                f"LoRAPass: adapter name {adapter_name!r} cannot name the LoRA parameters of "
                f"embedding {site} (lora_embedding_A.{adapter_name}): it is an attribute of "
                f"their module. Way out: LoRAPass(name=...) with another name.")
        shape = (rank, self.num_embeddings) if factor == "A" else (self.embedding_dim, rank)
        param = nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
        if factor == "A" and init != "random":  # "random": both normal, as PEFT's False
            nn.init.zeros_(param)
        else:
            nn.init.normal_(param)
        self.register_parameter(adapter_name, param)

    @property
    def factor_weight(self) -> nn.Parameter:
        """The factor: ``A`` ``(rank, num_embeddings)`` or ``B`` ``(embedding_dim, rank)``."""
        return self._parameters[self.adapter_name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.factor_weight
        if not self.active:
            return weight.new_full((), -0.0 if self.factor == "B" else 0.0)
        if self.factor == "A":
            return F.embedding(x, weight.T, self.padding_idx, self.max_norm, self.norm_type,
                               self.scale_grad_by_freq)
        return routed_update(self, x @ weight.T)

    def extra_repr(self) -> str:
        sizes = (f"{self.num_embeddings} -> {self.rank}" if self.factor == "A"
                 else f"{self.rank} -> {self.embedding_dim}")
        return (f"{self.factor}: {sizes}, rank={self.rank}, alpha={self.alpha}, "
                f"scaling={self.scaling:g}, {super().extra_repr()}")

    # Fold protocol: ``lora_embedding_B`` heads the adapter; ``A`` is ``site.lora_embedding_A``.

    @property
    def fold_mode(self) -> str | None:
        """``"add"`` for ``B``; ``None`` for ``A``."""
        return "add" if self.factor == "B" else None

    def low_rank(self, site: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(A (rank, num_embeddings), B (embedding_dim, rank), scaling)``, the parameters
        themselves: the table's update is ``(scaling · B A)ᵀ``. ``None`` for ``A``."""
        if self.factor != "B":
            return None
        return site._modules["lora_embedding_A"].factor_weight, self.factor_weight, self.scaling

    def fold(self, site: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``W + scaling · (B A)ᵀ`` (``W`` is ``(num_embeddings, dim)``), in at least
        float32, cast once."""
        lora_a, lora_b, scaling = self.low_rank(site)
        delta = lora_delta(lora_a.detach(), lora_b.detach(), scaling, transposed=True,
                           dtype=compute_dtype(weight.dtype))
        return merge_delta(weight.detach(), delta), bias

    def fold_detail(self, site: nn.Module) -> str:
        return f"W + {self.scaling:g}·(B A)ᵀ of LoRA {self.adapter_name!r} (embedding)"

    def from_low_rank(self, site: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor, *,
                      adapter_name: str) -> dict[str, AdapterModule]:
        """Refused: an embedding holds one LoRA adapter (see the module docstring).

        Raises:
            ConfigError: always, naming the layer.
        """
        raise ConfigError(
            f"combine_adapters: {self.site} (Embedding) carries LoRA {self.adapter_name!r} "
            f"as lora_embedding_A.{self.adapter_name} / lora_embedding_B.{self.adapter_name} "
            f"(PEFT's names), and an embedding holds one LoRA adapter, so the combined adapter "
            f"cannot be added there. Way out: combine adapters that do not sit on embeddings.")


def register_slot(site_module: nn.Module, slot: str, module: AdapterModule, *,
                  pass_name: str, site: str) -> None:
    """Register ``module`` as ``site_module.<slot>`` itself (PEFT's parameter layout for
    embedding factors, ``lora_embedding_A.<adapter>``), in the site's training mode.

    Raises:
        AlreadyAdaptedError: the slot is taken (by an adapter of any name: the slot holds
            one).
    """
    held = site_module._modules.get(slot)
    if held is not None:
        name = getattr(held, "adapter_name", "?")
        raise AlreadyAdaptedError(
            f"{pass_name}: {site or 'the model'} (Embedding) already has LoRA adapter "
            f"{name!r} in {slot}.{name}; an embedding holds one LoRA adapter (its factors are "
            f"parameters named {slot}.<adapter>, as in PEFT), so adapter "
            f"{module.adapter_name!r} cannot be added. Way out: exclude=[{site!r}] for this "
            f"pass, or merge adapter {name!r} and unload the model first.")
    module.train(site_module.training)
    site_module.add_module(slot, module)
