"""LoRA on each kind of layer: which factor modules a branch has, and where they go.

:class:`passes.lora.LoRAPass` builds every branch the same way (``lora_A → lora_B → ×
scaling → +`` beside the layer, see :mod:`passes.lora`); what differs from layer type to
layer type is the factor modules, their names, their forward and their fold:

=========================  ========================================  =========================
layer                      factors (parameter names)                 modules
=========================  ========================================  =========================
``nn.Linear``, ``Conv1D``  ``lora_A.<a>.weight`` ``(r, in)``,          :class:`~passes.modules.
                           ``lora_B.<a>.weight`` ``(out, r)``          LoRAProjection`
``nn.Conv1d/2d/3d``        ``lora_A.<a>.weight`` ``(r, in, *k)``,      :mod:`passes.lora_conv`
                           ``lora_B.<a>.weight`` ``(out, r/g, 1..)``
``nn.Embedding``           ``lora_embedding_A.<a>`` ``(r, vocab)``,    :mod:`passes.lora_embedding`
                           ``lora_embedding_B.<a>`` ``(dim, r)``
=========================  ========================================  =========================

The names are PEFT's without ``base_model.model.``, so PEFT's files map onto them by prefix.
"""

from __future__ import annotations

import torch
from torch import nn

from passes.lora_conv import LoRAConvFactor
from passes.lora_embedding import LoRAEmbeddingFactor, register_slot
from passes.lora_init import is_linear_only, orthogonal_factors
from passes.modules import LoRADropout, LoRAProjection
from surgery.errors import ConfigError
from surgery.map.leaves import is_hf_conv1d
from surgery.sites.marker import AdapterModule
from surgery.sites.rewrite import register_adapter

__all__ = ["Slot", "is_plain_conv", "is_plain_embedding", "lora_branch", "register_branch"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_plain_conv(module: nn.Module) -> bool:
    """An ``nn.Conv1d/2d/3d`` (or a subclass) running torch's own forward."""
    cls = type(module)
    return isinstance(module, _CONVS) and cls.forward in tuple(c.forward for c in _CONVS)


def is_plain_embedding(module: nn.Module) -> bool:
    """An ``nn.Embedding`` (or a subclass) running torch's own forward: a subclass that
    scales its output (Gemma's) would need the scale on the branch too."""
    return isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward


Slot = tuple[str, str, bool, AdapterModule]
"""``(part, slot, keyed, module)``: the node part, the slot on the site graph, whether the
module sits in a ``ModuleDict`` under its adapter's name (``lora_A.<adapter>``) or is the
slot itself (``lora_embedding_A``), and the module."""


def lora_branch(layer: nn.Module, *, rank: int, alpha: float, scaling: float, init: str,
                dropout: float, site: str, adapter_name: str, role: str | None,
                dtype: torch.dtype, device: torch.device) -> list[Slot]:
    """The modules of one LoRA branch on ``layer``, in the order the branch calls them.

    Args:
        layer: the module as the user wrote it: ``nn.Linear``, transformers' ``Conv1D``,
            ``nn.Conv1d/2d/3d`` or ``nn.Embedding``.
        rank, alpha, scaling, init, dropout: the branch's settings.
        site, adapter_name, role: the adapter's identity.
        dtype, device: of the new parameters (the layer's weight).

    Returns:
        ``[(part, slot, keyed, module)]`` (see :data:`Slot`).

    Raises:
        ConfigError: a convolution whose ``groups`` does not divide ``rank`` (PEFT refuses
            it too), an embedding adapter name a parameter cannot take, an ``init`` of
            :func:`passes.lora_init.is_linear_only` on a convolution or an embedding, or
            ``init="orthogonal"`` with an odd rank.
    """
    common = dict(rank=rank, alpha=float(alpha), scaling=scaling, site=site,
                  adapter_name=adapter_name, role=role, dtype=dtype, device=device)
    if is_linear_only(init) and (is_plain_embedding(layer) or is_plain_conv(layer)):
        raise ConfigError(
            f"LoRAPass(init={init!r}): {site} is a {type(layer).__name__}; this init is "
            f"offered on nn.Linear and transformers' Conv1D only. Way out: exclude it, or "
            f"adapt it with a second LoRAPass with init='kaiming' or 'gaussian'.")
    if is_plain_embedding(layer):
        return [("lora_A", "lora_embedding_A", False,
                 LoRAEmbeddingFactor(layer, factor="A", init=init, **common)),
                ("lora_B", "lora_embedding_B", False,
                 LoRAEmbeddingFactor(layer, factor="B", init=init, **common))]
    drop = LoRADropout(float(dropout), site=site, adapter_name=adapter_name, role=role)
    if is_plain_conv(layer):
        if rank % layer.groups:
            raise ConfigError(
                f"LoRAPass: {site} ({type(layer).__name__}, groups={layer.groups}) needs a "
                f"rank that groups divides (lora_B is a grouped 1×…×1 convolution, as in "
                f"PEFT), got rank {rank}. Way out: rank_for={{{site!r}: "
                f"{max(layer.groups, rank - rank % layer.groups)}}}, or exclude it.")
        a = LoRAConvFactor(layer, factor="A", init=init, **common)
        b = LoRAConvFactor(layer, factor="B", init=init, **common)
    else:
        weight = layer.weight
        in_f, out_f = ((int(weight.shape[0]), int(weight.shape[1])) if is_hf_conv1d(layer)
                       else (int(weight.shape[1]), int(weight.shape[0])))
        a = LoRAProjection(in_f, rank, factor="A", init=init, **common)
        b = LoRAProjection(rank, out_f, factor="B", init=init, **common)
        if init == "orthogonal":
            lora_a, lora_b = orthogonal_factors(in_f, out_f, rank, dtype=dtype)
            with torch.no_grad():
                a.weight.copy_(lora_a)
                b.weight.copy_(lora_b)
    return [("lora_dropout", "lora_dropout", True, drop), ("lora_A", "lora_A", True, a),
            ("lora_B", "lora_B", True, b)]


def register_branch(site_module: nn.Module, slots: list[Slot], adapter_name: str, *,
                    site: str) -> list[tuple[str, str, AdapterModule]]:
    """Register the modules of a branch on its site graph; return ``[(part, call target,
    module)]`` in call order (``"lora_A.default"``; ``"lora_embedding_A"``).

    The modules are registered ``lora_A``, ``lora_B``, then ``lora_dropout`` (the module
    order, and so the state-dict order, LoRA has always had).

    Raises:
        AlreadyAdaptedError: a slot already holds an adapter of that name (an embedding's
            slot: any adapter).
    """
    for part, slot, keyed, mod in sorted(slots, key=lambda s: s[0] == "lora_dropout"):
        if keyed:
            register_adapter(site_module, slot, adapter_name, mod, pass_name="LoRAPass",
                             site=site)
        else:
            register_slot(site_module, slot, mod, pass_name="LoRAPass", site=site)
    return [(part, f"{slot}.{adapter_name}" if keyed else slot, mod)
            for part, slot, keyed, mod in slots]
