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

Where the reference library keeps an adapter's tensor as a parameter named after the adapter
(PEFT's IA³: ``k_proj.ia3_l.<adapter>``), the site graph holds it in an
:class:`AdapterParameters` slot, one parameter per adapter, and the adapter's module reads it
from there (a ``get_attr`` node of the site graph). Such a parameter belongs to the adapter it
is named after, of the slot's pass: :func:`slot_parameters` lists them for the generic code
(freezing, the audit, checkpoints, deletion, the pictures).
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor, nn

from surgery.errors import AlreadyAdaptedError, ConfigError

__all__ = ["AdapterModule", "AdapterParameters", "FOLD_MODES", "slot_parameters"]

FOLD_MODES = ("add", "output", "input", "dora", "param")
"""The ways an adapter folds into a layer ``y = W x + b``:

* ``"add"``: a branch beside the layer reading the layer's input, ``y + ΔW x``, folds as
  ``W' = W + ΔW``; such branches commute with each other.
* ``"output"``: scales the layer's output, ``l ⊙ y``: ``W' = diag(l) W``, ``b' = l ⊙ b``.
* ``"input"``: scales the layer's input, ``W (l ⊙ x) + b``: ``W' = W diag(l)``.
* ``"param"``: one of several branches, each beside the call that reads one named
  parameter of the site other than ``weight`` (LoRA on fused expert weights); the head
  names it (``fold_param``) and computes its merged value (``fold_value(site, value)``),
  see :mod:`surgery.adapters.fold_params`.
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


class AdapterParameters(nn.Module):
    """A slot of a site graph owning one parameter per adapter, named after the adapter.

    It keeps PEFT's parameter names where PEFT holds an adapter's tensor in an
    ``nn.ParameterDict`` (IA³: ``k_proj.ia3_l.<adapter>``, no ``.weight``). The slot computes
    nothing: each adapter's :class:`AdapterModule` reads its parameter through a ``get_attr``
    node. The parameter ``<slot>.<name>`` belongs to adapter ``name`` of pass ``pass_name``.

    Args:
        pass_name: the stable name of the pass whose adapters the slot holds (``"ia3"``).
    """

    def __init__(self, *, pass_name: str) -> None:
        super().__init__()
        self.pass_name = pass_name

    def add(self, adapter_name: str, param: nn.Parameter, *, who: str, site: str,
            slot: str) -> None:
        """Register ``param`` under ``adapter_name``.

        Raises:
            AlreadyAdaptedError: the slot already holds a parameter of that adapter.
            ConfigError: ``adapter_name`` names an attribute of the slot (``"training"``,
                ``"forward"``, ...), which a parameter cannot take.
        """
        where = f"{site}.{slot}" if site else slot
        if adapter_name in self._parameters:
            raise AlreadyAdaptedError(
                f"{who}: {site or 'the model'} already has an adapter named {adapter_name!r} "
                f"in {where}. Way out: give the pass another name=..., or exclude this site "
                f"with exclude=[{site!r}].")
        if hasattr(self, adapter_name):
            raise ConfigError(
                f"{who}: adapter name {adapter_name!r} cannot name a parameter of {where} "
                f"({where}.{adapter_name}): it is an attribute of the module holding it. Way "
                f"out: name=... with another name.")
        self.register_parameter(adapter_name, param)

    def extra_repr(self) -> str:
        return f"pass={self.pass_name!r}, adapters={list(self._parameters)}"


def slot_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, str, str]]:
    """``(qualified name, parameter, pass name, adapter name)`` of every parameter held in an
    :class:`AdapterParameters` slot of ``model`` (each slot once), in module order."""
    for qname, mod in model.named_modules():
        if isinstance(mod, AdapterParameters):
            for name, param in mod._parameters.items():
                if param is not None:
                    yield (f"{qname}.{name}" if qname else name), param, mod.pass_name, name
