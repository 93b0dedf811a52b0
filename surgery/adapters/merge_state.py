"""What a merge keeps, where it keeps it, and which adapters a model carries.

The merge state of a layer lives in its site graph: the node carrying the base result
(``site_graph.base_node``) holds ``node.meta[MERGED_KEY]``, a tuple of :class:`MergeRecord`
(oldest first). Like every ``node.meta["surgery*"]`` entry it survives ``copy.deepcopy``,
``pickle`` and ``torch.save`` / ``torch.load`` of the model, so a copy of a merged model
knows what is merged and can unmerge it; and :func:`surgery.apply_passes` rolls it back with
the graph when a pass fails. Only the merge engines (:mod:`surgery.adapters.fold`,
:mod:`surgery.adapters.unfold`) write it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from surgery.errors import AdapterNotFoundError, MergeError
from surgery.sites.marker import AdapterModule
from surgery.sites.site_graph import SiteGraph, site_graphs

__all__ = [
    "MERGED_KEY",
    "KIND_LABEL",
    "MERGE_PASS",
    "UNMERGE_PASS",
    "merged_refusal",
    "WHY_NOT_LINEAR",
    "NodeRef",
    "NodeSpec",
    "MergeRecord",
    "read_records",
    "write_records",
    "merged_adapters",
    "adapter_inventory",
    "inactive_adapters",
    "describe_present",
    "label",
    "not_mergeable_error",
    "resolve_names",
]

MERGED_KEY = "surgery_merged"
"""``node.meta`` key, on a site graph's base node, holding its :class:`MergeRecord` tuple."""

KIND_LABEL = {"lora": "LoRA", "ia3": "IA³"}
"""Adapter kind (the pass name its modules carry) → how messages name it."""
MERGE_PASS = {"lora": "MergeLoRAPass", "ia3": "MergeIA3Pass"}
UNMERGE_PASS = {"lora": "UnmergeLoRAPass", "ia3": "UnmergeIA3Pass"}


def merged_refusal(who: str, name: str, where: Sequence[str], why: str, then: str = ""
                   ) -> MergeError:
    """The error for an operation that a merged adapter does not allow.

    Args:
        who: the function refusing; name: the adapter; where: its ``"kind@site"`` merge
            records (:func:`surgery.adapters.active.merged_names`); why: what the operation
            would do wrong; then: what to do after unmerging (``"then delete it"``).
    """
    kinds = sorted({w.partition("@")[0] for w in where})
    unmerge = ", ".join(f"{UNMERGE_PASS.get(k, 'an unmerge pass')}(names=[{name!r}])"
                        for k in kinds)
    more = f" and {len(where) - 1} more" if len(where) > 1 else ""
    return MergeError(f"{who}: adapter {name!r} is merged into the weights "
                      f"({where[0].partition('@')[2]}{more}); {why}. Way out: unmerge it "
                      f"first, apply_passes(model, [{unmerge}])" + (f", {then}." if then else "."))
WHY_NOT_LINEAR = (
    "it is not linear in the base weights, so no merged weight W' computes what it does (a "
    "bottleneck adapter applies a non-linearity between its projections; a prefix changes the "
    "keys and values an attention op sees); only LoRA and IA³ fold into a weight")


def label(kind: str, name: str) -> str:
    """``"LoRA 'default'"``: an adapter as messages name it."""
    return f"{KIND_LABEL.get(kind, kind)} {name!r}"


# --------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeRef:
    """A reference, by name, from a removed node to another node of the same graph."""

    name: str


@dataclass(frozen=True, eq=False)
class NodeSpec:
    """One graph node a merge removed, kept so that unmerge can put it back as it was.

    Attributes:
        name: the node's name.
        op: ``"call_module"``, ``"call_function"``, ...
        target: module path relative to the site graph, or the function.
        args / kwargs: the node's arguments, with other nodes as :class:`NodeRef`.
        meta: its ``surgery*`` metadata.
        after: name of the node right before it in the graph when it was removed.
    """

    name: str
    op: str
    target: Any
    args: tuple
    kwargs: dict
    meta: dict
    after: str


@dataclass(frozen=True, eq=False)
class MergeRecord:
    """What one merge of one adapter into one layer replaced.

    Attributes:
        kind: the adapter's kind (``"lora"``, ``"ia3"``: the pass name of its modules).
        adapter: adapter name.
        site: qualified name of the layer.
        mode: how it folded (``"add"``, ``"output"``, ``"input"``).
        inplace: whether the merge wrote into the existing storage.
        weight: the replaced weight: the original ``Parameter`` itself (``inplace=False``)
            or an exact copy of the overwritten values (``inplace=True``).
        bias: the same for the bias, when the merge rewrote it (IA³ output scaling).
        weight_grad / bias_grad: ``requires_grad`` of the replaced parameters.
        nodes: the removed nodes, in graph order.
        main: name of the removed node on the layer's path (LoRA's ``add``, the IA³
            scaling); its first argument is what the path read instead once it was gone.
        adapter_grads: ``(name relative to the layer, requires_grad)`` of every parameter of
            the merged adapter's modules (``lora_A.default.weight``, ...) before the merge
            froze them; unmerge puts these flags back.
        param: the name, on the site graph, of the parameter ``weight`` was
            (``"weight"``; ``"gate_up_proj"`` for a fold into a named parameter, see
            :mod:`surgery.adapters.fold_params`).

    Records are immutable and shared, never copied, when a model is deep-copied: the
    tensors they hold are never written (so a deep copy of a merged model, once unmerged,
    views the same base-weight storage as the original, as every model
    :func:`surgery.apply_passes` makes does). ``pickle`` and ``torch.save`` store them with
    the model.
    """

    kind: str
    adapter: str
    site: str
    mode: str
    inplace: bool
    weight: Tensor
    bias: Tensor | None
    weight_grad: bool
    bias_grad: bool
    nodes: tuple[NodeSpec, ...] = field(default=())
    main: str = ""
    adapter_grads: tuple[tuple[str, bool], ...] = field(default=())
    param: str = "weight"

    @property
    def label(self) -> str:
        """``"lora:default"``."""
        return f"{self.kind}:{self.adapter}"

    def __deepcopy__(self, memo: dict) -> MergeRecord:
        return self


def read_records(sg: SiteGraph) -> tuple[MergeRecord, ...]:
    """The merge records of a site graph, oldest first (``()`` when nothing is merged)."""
    return sg.base_node.meta.get(MERGED_KEY, ())


def write_records(sg: SiteGraph, records: tuple[MergeRecord, ...]) -> None:
    """Store ``records`` on the site graph (and drop the key when empty)."""
    if records:
        sg.base_node.meta[MERGED_KEY] = records
    else:
        sg.base_node.meta.pop(MERGED_KEY, None)


def merged_adapters(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Layers with merged adapters: qualified name → ``("lora:default", ...)``, oldest first.

    A site graph shared under several names is listed under its first name.
    """
    out: dict[str, tuple[str, ...]] = {}
    for qname, sg in site_graphs(model):
        records = read_records(sg)
        if records:
            out[qname] = tuple(r.label for r in records)
    return out


# --------------------------------------------------------------------------------------
# Inventory: which adapters the model carries, and where
# --------------------------------------------------------------------------------------


def adapter_inventory(model: nn.Module) -> dict[str, dict[str, list[str]]]:
    """Adapter name → kind → qualified names of the layers carrying it (model order)."""
    out: dict[str, dict[str, list[str]]] = {}
    for _, mod in model.named_modules():
        if isinstance(mod, AdapterModule):
            sites = out.setdefault(mod.adapter_name, {}).setdefault(mod.pass_name, [])
            if mod.site not in sites:
                sites.append(mod.site)
    return out


def inactive_adapters(model: nn.Module, kind: str | None = None) -> set[str]:
    """Names of the adapters (of ``kind``, or any) with a module switched off.

    An inactive adapter (:func:`surgery.set_active`) contributes nothing to the outputs.
    """
    return {mod.adapter_name for _, mod in model.named_modules()
            if isinstance(mod, AdapterModule) and (kind is None or mod.pass_name == kind)
            and not getattr(mod, "active", True)}


def describe_present(inv: dict[str, dict[str, list[str]]]) -> str:
    """``"adapters present: 'a' (LoRA), 'b' (IA³)"`` for messages."""
    if not inv:
        return "the model carries no adapter"
    return "adapters present: " + ", ".join(
        f"{name!r} ({'/'.join(KIND_LABEL.get(k, k) for k in kinds)})"
        for name, kinds in sorted(inv.items()))


def not_mergeable_error(who: str, name: str, kinds: Sequence[str]) -> MergeError:
    """The error for an adapter that no merge can fold into the weights."""
    return MergeError(
        f"{who}: adapter {name!r} ({', '.join(kinds)}) cannot be merged: {WHY_NOT_LINEAR}. "
        f"Way out: keep it as a module, or merge only the LoRA / IA³ adapters by name.")


def resolve_names(who: str, kind: str, names: tuple[str, ...] | None,
                  inv: dict[str, dict[str, list[str]]]) -> list[str]:
    """The adapter names a merge or unmerge of ``kind`` acts on.

    Raises:
        AdapterNotFoundError: a name the model does not carry.
        MergeError: a named adapter is of another kind, or cannot be merged at all.
    """
    if names is None:
        return sorted(n for n, kinds in inv.items() if kind in kinds)
    for name in names:
        if name not in inv:
            raise AdapterNotFoundError(f"{who}: the model has no adapter named {name!r}; "
                                       f"{describe_present(inv)}.")
        kinds = list(inv[name])
        if kind not in kinds:
            other = [k for k in kinds if k in KIND_LABEL]
            if other:
                raise MergeError(
                    f"{who}: adapter {name!r} is an {KIND_LABEL[other[0]]} adapter, not "
                    f"{KIND_LABEL[kind]}. Way out: use {MERGE_PASS[other[0]]} / "
                    f"{UNMERGE_PASS[other[0]]} for it.")
            raise not_mergeable_error(who, name, kinds)
    return list(dict.fromkeys(names))
