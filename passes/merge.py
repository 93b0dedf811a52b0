"""Merging adapters into base weights and taking them out again, as site-graph rewrites.

LoRA merge (Hu et al. 2021), in the site graph of an adapted layer. Before::

    linear = torch._C._nn.linear(input, self.weight, self.bias)
    d = self.lora_dropout.default(input)
    a = self.lora_A.default(d)
    b = self.lora_B.default(a)
    return linear + b * scaling

After (``self.weight`` now holds ``W + (alpha / r) · B A``)::

    linear = torch._C._nn.linear(input, self.weight, self.bias)
    return linear

IA³ fold (Liu et al. 2022): ``self.ia3.default(linear, self.ia3_l.default)`` goes (the
vector ``l`` is the parameter ``ia3_l.default``, PEFT's name) and ``W' = diag(l) W``,
``b' = l ⊙ b`` (output scaling); an input scaling ``self.ia3.default(input, l)`` before the
layer goes and ``W' = W diag(l)``. Weights stored ``(in, out)`` (transformers' ``Conv1D``)
are handled transposed. The arithmetic is the adapters' own (:meth:`AdapterModule.fold
<surgery.sites.marker.AdapterModule.fold>`, on :mod:`surgery.adapters.merge_math`): at
least float32, cast once to the weight's dtype.

A merged adapter's modules stay (unused) so that unmerge can put its nodes back; their
parameters are frozen by the merge (the update is in the weight, so nothing of it trains)
and get their ``requires_grad`` flags back on unmerge.

**Exact round trips.** Subtracting ``ΔW`` again cannot give the original weight back bit
for bit in bfloat16 (or even float32), so a merge keeps what it replaced:

* ``inplace=False`` (default): the site graph's ``weight`` becomes a new ``Parameter``
  holding the merged weight; the merge keeps a reference to the original tensor, which still
  is the caller's storage, so it costs no memory beyond the new weight. Unmerge puts the
  original tensor back.
* ``inplace=True``: the merged values are written into the existing storage, which is
  shared with the caller's model and with every model :func:`surgery.apply_passes` made
  from it (their outputs change accordingly); the merge keeps an exact copy of the
  overwritten values (one copy of the weight per adapter merged, plus the bias for IA³
  output scaling). Unmerge writes that copy back into the same storage, which restores
  every model sharing it. Both writes must be asked for twice, by the pass and by
  :func:`surgery.apply_passes`, and the pass must come last::

      apply_passes(adapted, [MergeLoRAPass(inplace=True)], inplace=True)
      apply_passes(adapted, [UnmergeLoRAPass(inplace=True)], inplace=True)

Either way unmerge restores the base weight bit for bit, in every dtype, however many
merge/unmerge cycles and however much training of the adapters happen in between.

**Order.** An adapter folds only when the layer's weight sees it alone: a LoRA branch whose
add reads the layer's result (possibly through other LoRA adds) and whose input is the
layer's input; an IA³ vector right at the layer. IA³ scales a layer as LoRA adapted it, so
on a layer carrying both, LoRA merges first and unmerges last::

    merged = apply_passes(adapted, [MergeLoRAPass(), MergeIA3Pass()])
    back = apply_passes(merged, [UnmergeIA3Pass(), UnmergeLoRAPass()])

**Merge state** lives in the site graph: its base node carries
``node.meta["surgery_merged"]``, a tuple of :class:`MergeRecord` (oldest first), which
survives ``copy.deepcopy``, ``pickle`` and ``torch.save``/``torch.load``: a copy of a merged
model is still merged and can be unmerged. Only these passes change it; ``train()`` /
``eval()`` never merge or unmerge. Merges at one layer are undone last-in, first-out.

The engines live in :mod:`surgery.adapters.fold` and :mod:`surgery.adapters.unfold` (shared
with :func:`surgery.unload`); this module holds the four passes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from surgery.adapters.fold import merge
from surgery.adapters.merge_state import MERGED_KEY, MergeRecord, merged_adapters
from surgery.adapters.unfold import unmerge
from surgery.errors import ConfigError
from surgery.pass_base import Change, Pass, PassResult
from surgery.sites.params import share_weights_copy

__all__ = [
    "MERGED_KEY",
    "MergeRecord",
    "MergeLoRAPass",
    "UnmergeLoRAPass",
    "MergeIA3Pass",
    "UnmergeIA3Pass",
    "merged_adapters",
]


def check_names(who: str, names: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """Validate a pass's ``names`` setting: ``None``, one name or a sequence of names.

    Raises:
        ConfigError: anything else, or an empty sequence.
    """
    if names is None:
        return None
    if isinstance(names, str):
        names = (names,)
    out = tuple(names)
    if not out or not all(isinstance(n, str) for n in out):
        raise ConfigError(f"{who}: names must be None (all adapters) or adapter names, got "
                          f"{names!r}")
    return out


def dry_run(model: nn.Module, run: Callable[[nn.Module], PassResult]) -> list[Change]:
    """The changes ``run`` makes on a private copy of ``model`` that shares its storage.

    ``run`` must not write into storage (the engines' ``dry=True``); the copy is dropped.
    """
    work = share_weights_copy(model)
    state = getattr(model, "_surgery", None)
    if state is not None and getattr(work, "_surgery", None) is None:
        work.__dict__["_surgery"] = copy.copy(state)
    return list(run(work).changes)


@dataclass(frozen=True, kw_only=True)
class _MergeStep(Pass):
    """What the four passes share: the adapter ``names``, the in-place option, dry runs."""

    kind: ClassVar[str] = ""

    names: tuple[str, ...] | None = None
    inplace: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", check_names(type(self).__name__, self.names))

    @property
    def writes_in_place(self) -> bool:
        """``inplace``: the pass writes into storage shared with the caller's model."""
        return self.inplace

    def run(self, model: nn.Module) -> PassResult:
        return self._engine(model, dry=False)

    def plan(self, model: nn.Module) -> list[Change]:
        """The changes :meth:`run` would make, on a private copy; nothing is written, also
        with ``inplace`` (the merged values then go into new tensors of the copy)."""
        return dry_run(model, lambda work: self._engine(work, dry=True))

    def _engine(self, model: nn.Module, *, dry: bool) -> PassResult:
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class _Merge(_MergeStep):
    """A merge: ``safe`` and :func:`surgery.adapters.fold.merge`."""

    safe: bool = True

    def _engine(self, model: nn.Module, *, dry: bool) -> PassResult:
        changes = merge(model, kind=self.kind, names=self.names, safe=self.safe,
                        inplace=self.inplace, who=type(self).__name__, pass_name=self.name,
                        dry=dry)
        return PassResult(model, True, tuple(changes), self.name)


@dataclass(frozen=True, kw_only=True)
class _Unmerge(_MergeStep):
    """An unmerge: :func:`surgery.adapters.unfold.unmerge`."""

    def _engine(self, model: nn.Module, *, dry: bool) -> PassResult:
        changes = unmerge(model, kind=self.kind, names=self.names, inplace=self.inplace,
                          who=type(self).__name__, pass_name=self.name, dry=dry)
        return PassResult(model, True, tuple(changes), self.name)


@dataclass(frozen=True, kw_only=True)
class MergeLoRAPass(_Merge):
    """Fold LoRA branches into their base weights and remove the branch nodes.

    ``W' = W + (alpha / r) · B A`` (``(B A)ᵀ`` for weights stored ``(in, out)``, such as
    transformers' ``Conv1D``), computed in float32 (float64 for float64 weights) and cast
    once to the weight's dtype. Where several branches sit on one layer they fold innermost
    first. Dropout on the branch input is dropped (the merged model computes the branch as
    in evaluation mode). The ``lora_A`` / ``lora_B`` modules stay, unused, so that
    :class:`UnmergeLoRAPass` can put the branch back; their parameters are frozen
    (``requires_grad=False``, so :func:`surgery.trainable_parameters` leaves them out) and
    get their flags back on unmerge.

    Memory: with ``inplace=False`` (default) each merged layer gets a new weight tensor and
    the original (the caller's storage) is kept for unmerge, at no extra cost. With
    ``inplace=True`` the merged values are written into the existing storage, which is
    shared with the caller's model and every copy :func:`surgery.apply_passes` made of it,
    and an exact copy of the overwritten values is kept for unmerge: one extra copy of each
    merged weight per adapter. Such a pass :attr:`writes_in_place`: run it alone or last,
    on the adapted model itself::

        apply_passes(adapted, [MergeLoRAPass(inplace=True)], inplace=True)

    Args:
        names: adapter names to merge; ``None`` = every active LoRA adapter not merged yet
            (an adapter switched off by :func:`surgery.set_active` adds nothing now, and
            merging it would add its update).
        safe: check that every merged weight is finite before changing anything.
        inplace: write into the existing weight storage instead of a new tensor.

    Raises:
        AdapterNotFoundError: a name the model does not carry (the message lists those it does).
        MergeError: nothing to merge (no LoRA adapter, or all merged already or switched
            off); a named adapter is already merged or switched off; a named adapter is not
            LoRA (IA³: use :class:`MergeIA3Pass`; bottleneck adapters and prefixes cannot be
            merged, they are not linear in the weights); an adapter not being merged lies
            between the layer and the branch; a merged weight is not finite (``safe=True``);
            ``inplace=True`` on a tied weight. Nothing is changed when it raises.
    """

    name: ClassVar[str] = "merge_lora"
    kind: ClassVar[str] = "lora"


@dataclass(frozen=True, kw_only=True)
class UnmergeLoRAPass(_Unmerge):
    """Take merged LoRA branches out of their base weights and put the branch nodes back.

    The base weight comes back bit for bit (the tensor the merge replaced, or its exact
    copy written back into the same storage after an in-place merge), the branch nodes
    come back with their names and meta, reading what they read before the merge, whatever
    was added to the site graph since (so the model computes what the merged one did), and
    the ``lora_A`` / ``lora_B`` parameters get back the ``requires_grad`` flags they had
    before the merge.

    An in-place merge is undone in place only: the saved values are written into the
    storage the merge wrote (shared with the caller's model), so this pass needs
    ``inplace=True`` then, and :attr:`writes_in_place` says so to :func:`surgery.apply_passes`::

        apply_passes(adapted, [UnmergeLoRAPass(inplace=True)], inplace=True)

    Args:
        names: adapter names to unmerge; ``None`` = every merged LoRA adapter.
        inplace: allow writing the saved values of in-place merges back into their storage.

    Raises:
        AdapterNotFoundError: a name the model does not carry.
        MergeError: nothing is merged; a named adapter is not merged or not LoRA; another
            adapter merged into the same layer later stays merged (unmerge last-in,
            first-out); an adapter was merged in place and ``inplace`` is off. Nothing is
            changed when it raises.
    """

    name: ClassVar[str] = "unmerge_lora"
    kind: ClassVar[str] = "lora"


@dataclass(frozen=True, kw_only=True)
class MergeIA3Pass(_Merge):
    """Fold IA³ vectors into their layers' weights and remove the scaling nodes.

    Output scaling: ``W' = diag(l) W``, ``b' = l ⊙ b`` (rows of an ``(out, in)`` weight,
    columns of a ``Conv1D`` ``(in, out)`` one). Input scaling (feed-forward output layers):
    ``W' = W diag(l)``. A vector on a fused projection (GPT-2's ``c_attn``) folds as its full
    width, ones outside the learned key and value slices. Computed in float32 and cast once;
    memory as :class:`MergeLoRAPass` (plus the bias for output scaling), and likewise the
    merged vectors are frozen until unmerge, and ``inplace=True`` writes into storage shared
    with the caller's model: ``apply_passes(adapted, [MergeIA3Pass(inplace=True)],
    inplace=True)``.

    IA³ scales a layer as LoRA adapted it (``(W x + s·B A x) · l``), so on a layer carrying
    both, the LoRA branch folds first: ``apply_passes(model, [MergeLoRAPass(),
    MergeIA3Pass()])``; the other order raises and says so.

    Args:
        names: adapter names to fold; ``None`` = every active IA³ adapter not merged yet.
        safe: check that every folded weight and bias is finite before changing anything.
        inplace: write into the existing storage instead of new tensors.

    Raises:
        AdapterNotFoundError, MergeError: as :class:`MergeLoRAPass`.
    """

    name: ClassVar[str] = "merge_ia3"
    kind: ClassVar[str] = "ia3"


@dataclass(frozen=True, kw_only=True)
class UnmergeIA3Pass(_Unmerge):
    """Take folded IA³ vectors out of their layers and put the scaling nodes back.

    Weight, bias and the vectors' ``requires_grad`` flags come back as with
    :class:`UnmergeLoRAPass`, and an in-place fold is undone in place only
    (``inplace=True``, under ``apply_passes(..., inplace=True)``).

    Args:
        names: adapter names; ``None`` = every merged IA³ adapter.
        inplace: allow writing the saved values of in-place merges back into their storage.

    Raises:
        AdapterNotFoundError, MergeError: as :class:`UnmergeLoRAPass`.
    """

    name: ClassVar[str] = "unmerge_ia3"
    kind: ClassVar[str] = "ia3"
