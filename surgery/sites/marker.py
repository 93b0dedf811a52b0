"""The marker type every module inserted by a pass derives from, and the fold protocol.

Adapters are found structurally, by this type, never by a substring of a parameter name:
``trainable_parameters``, the audit and the renderer all ask ``isinstance(m, AdapterModule)``.

An adapter at one site may span several modules (LoRA: ``lora_dropout``, ``lora_A``,
``lora_B``). The operations on adapters already in a model (:mod:`surgery.adapters`: merge,
unmerge, unload, combine) never import a concrete pass; they ask the adapter's modules
through the small **fold protocol** declared here. One module of a foldable adapter, its
*head*, answers for the whole adapter:

* :attr:`AdapterModule.fold_mode`: how the adapter goes into the weight of its layer
  (``"add"``, ``"output"``, ``"input"``, ``"dora"``), or ``None``;
* :meth:`AdapterModule.fold`: the layer's weight and bias with the adapter folded in;
* :meth:`AdapterModule.low_rank` / :meth:`AdapterModule.from_low_rank`: the factors of a
  low-rank update, and new modules for an adapter built from given factors (combine).

Unfolding needs nothing from the modules: a merge keeps the exact tensors it replaced, and
unmerge puts them back (bit for bit, whatever the dtype).
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["AdapterModule", "FOLD_MODES"]

FOLD_MODES = ("add", "output", "input", "dora")
"""The ways an adapter folds into a layer ``y = W x + b``:

* ``"add"``: a branch beside the layer reading the layer's input, ``y + ΔW x``, folds as
  ``W' = W + ΔW``; such branches commute with each other.
* ``"output"``: scales the layer's output, ``l ⊙ y``: ``W' = diag(l) W``, ``b' = l ⊙ b``.
* ``"input"``: scales the layer's input, ``W (l ⊙ x) + b``: ``W' = W diag(l)``.
* ``"dora"``: a weight-decomposed branch (DoRA) reading the layer's input and its weight,
  ``W' = diag(m / ‖W + ΔW‖) (W + ΔW)``, bias unchanged. It reads the weight, so nothing
  else may fold into that weight while it is unmerged.
"""


class AdapterModule(nn.Module):
    """Base class of modules that passes insert (LoRA branches, IA³ vectors, ...).

    Attributes:
        pass_name: stable name of the pass that inserts this kind of module.
        site: qualified name of the module this adapter adapts.
        adapter_name: the adapter's name (``"default"`` unless the pass was given ``name=``).
        role: structural role of the site, if known.
        active: ``False`` switches the module's contribution off (``surgery.set_active``).
    """

    pass_name: str = "adapter"  # a class default; modules shared by two passes set it per instance

    def __init__(self, *, site: str, adapter_name: str, role: str | None = None) -> None:
        super().__init__()
        self.site = site
        self.adapter_name = adapter_name
        self.role = role
        self.active = True

    def extra_repr(self) -> str:
        return f"site={self.site!r}, adapter={self.adapter_name!r}"

    # ------------------------------------------------------------------ fold protocol

    @property
    def fold_mode(self) -> str | None:
        """How the adapter this module heads folds into its layer's weight: one of
        :data:`FOLD_MODES`, or ``None`` when this module heads no foldable adapter (it is a
        part of an adapter headed by another module, or its adapter is not linear in the
        weights: a bottleneck adapter, a prefix)."""
        return None

    def fold(self, site: nn.Module, weight: Tensor, bias: Tensor | None
             ) -> tuple[Tensor, Tensor | None]:
        """The layer's weight and bias with this module's adapter folded in.

        Called only on a head (:attr:`fold_mode` not ``None``), under ``torch.no_grad()``.

        Args:
            site: the site graph holding the adapter's modules (its siblings live there).
            weight: the layer's weight as stored (``(out, in)``; ``(in, out)`` for
                transformers' ``Conv1D``; ``(out, in / groups, *kernel)`` for a convolution;
                ``(num_embeddings, dim)`` for an embedding), not changed.
            bias: the layer's bias ``(out,)`` or ``None``, not changed.

        Returns:
            ``(weight', bias')``: new tensors in the dtypes of ``weight`` and ``bias``,
            computed in at least float32 and cast once; ``bias'`` is ``bias`` itself when
            the fold leaves it alone.

        Raises:
            NotImplementedError: the module heads no foldable adapter.
        """
        raise NotImplementedError(f"{type(self).__name__} ({self.site}, adapter "
                                  f"{self.adapter_name!r}) does not fold into a weight")

    def fold_detail(self, site: nn.Module) -> str:
        """One line saying what :meth:`fold` computes, for change records and diagrams."""
        return f"{self.pass_name} {self.adapter_name!r} folded ({self.fold_mode})"

    def low_rank(self, site: nn.Module) -> tuple[Tensor, Tensor, float] | None:
        """``(A, B, scaling)`` of the low-rank update ``ΔW = scaling · B A`` this module
        heads: ``A`` is ``(rank, in)``, ``B`` is ``(out, rank)``; ``None`` for any other
        module. The tensors are the parameters themselves (not copies), or views of them
        (a convolution's factors with the kernel flattened into ``in``: ``ΔW.flatten(1) =
        scaling · B A``); an embedding's update is ``(scaling · B A)ᵀ`` (its table is
        ``(num_embeddings, dim)``)."""
        return None

    def from_low_rank(self, site: nn.Module, lora_a: Tensor, lora_b: Tensor, *,
                      adapter_name: str) -> dict[str, AdapterModule]:
        """Modules of a new adapter of this module's kind whose update is ``B A``
        (scaling 1), with this adapter's other settings (dropout, role, site).

        Args:
            site: the site graph the new adapter will be registered on.
            lora_a: ``(rank, in)``; lora_b: ``(out, rank)``; copied into new parameters.
            adapter_name: the new adapter's name.

        Returns:
            Slot name → new module (``{"lora_A": ..., "lora_B": ..., "lora_dropout": ...}``),
            not yet registered; the new head's :meth:`low_rank` reports scaling 1.

        Raises:
            NotImplementedError: the module heads no low-rank adapter.
        """
        raise NotImplementedError(f"{type(self).__name__} ({self.site}) heads no low-rank "
                                  f"adapter")
