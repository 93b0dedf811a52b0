"""What a merge keeps, which adapters a model carries, and the merge passes' errors.

The merge state lives in the graph: every call node of a merged layer carries
``node.meta[MERGED_KEY]``, a tuple of :class:`MergeRecord` (oldest first), the same tuple
on every call of a shared layer. The passes of :mod:`passes.merge` are the only writers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from surgery.sites.marker import AdapterModule
from surgery.errors import AdapterNotFoundError, ConfigError, MergeError
from surgery.map.graphs import CallSite, call_sites

__all__ = [
    "MERGED_KEY",
    "KIND_LABEL",
    "MERGE_PASS",
    "UNMERGE_PASS",
    "WHY_NOT_LINEAR",
    "NodeSpec",
    "CallSpec",
    "MergeRecord",
    "merged_adapters",
    "read_records",
    "write_records",
    "adapter_inventory",
    "inactive_adapters",
    "describe_present",
    "not_mergeable_error",
    "resolve_names",
    "check_names",
]

MERGED_KEY = "surgery_merged"
"""``node.meta`` key, on a merged layer's call nodes, holding its :class:`MergeRecord` tuple."""

KIND_LABEL = {"lora": "LoRA", "ia3": "IA³"}
"""Pass name → how messages name the adapter kind."""
MERGE_PASS = {"lora": "MergeLoRAPass", "ia3": "MergeIA3Pass"}
UNMERGE_PASS = {"lora": "UnmergeLoRAPass", "ia3": "UnmergeIA3Pass"}
WHY_NOT_LINEAR = (
    "it is not linear in the base weights, so no merged weight W' computes what it does (a "
    "bottleneck adapter applies a non-linearity between its projections; a prefix changes the "
    "keys and values an attention op sees); only LoRA and IA³ fold into a weight")


# --------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class NodeSpec:
    """One graph node a merge removed, kept so that unmerge can put it back as it was.

    Attributes:
        name: the node's name.
        target: module target (relative to the graph owner) or function.
        op: ``"call_module"`` or ``"call_function"``.
        part: ``lora_dropout`` / ``lora_A`` / ``lora_B`` / ``scale`` / ``add`` / ``ia3_l``.
        meta: a copy of ``node.meta``.
        const: the constant operand of the ``scale`` node (LoRA's ``scaling``).
    """

    name: str
    target: Any
    op: str
    part: str
    meta: dict
    const: Any = None


@dataclass(frozen=True, eq=False)
class CallSpec:
    """The nodes a merge removed at one call of the layer.

    Attributes:
        prefix: qualified name of the module owning the graph ("" for the root).
        base: name of the layer's ``call_module`` node.
        anchor: name of the node the LoRA ``add`` read (the base call or another LoRA add).
        nodes: removed nodes, in graph order.
    """

    prefix: str
    base: str
    anchor: str
    nodes: tuple[NodeSpec, ...]


@dataclass(frozen=True, eq=False)
class MergeRecord:
    """What one merge of one adapter into one layer replaced.

    Attributes:
        kind: ``"lora"`` or ``"ia3"``.
        adapter: adapter name.
        site: qualified name of the layer.
        mode: ``"lora"``, or ``"output"`` / ``"input"`` for IA³.
        inplace: whether the merge wrote into the existing storage.
        weight: the replaced weight: the original ``Parameter`` itself (``inplace=False``)
            or an exact copy of the overwritten values (``inplace=True``).
        bias: the same for the bias, when the merge rewrote it (IA³ output scaling).
        weight_grad / bias_grad: ``requires_grad`` of the replaced parameters.
        calls: the removed nodes, one :class:`CallSpec` per call of the layer.
        adapter_grads: ``(name relative to the layer, requires_grad)`` of every parameter of
            the merged adapter's modules (``lora_A.default.weight``, ...) before the merge
            froze them; unmerge puts these flags back.

    Records are immutable and shared, never copied, when a model is copied: the tensors
    they hold are never written.
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
    calls: tuple[CallSpec, ...] = field(default=())
    adapter_grads: tuple[tuple[str, bool], ...] = field(default=())

    @property
    def label(self) -> str:
        """``"lora:default"``."""
        return f"{self.kind}:{self.adapter}"

    def __deepcopy__(self, memo: dict) -> MergeRecord:
        return self


def merged_adapters(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Layers with merged adapters: qualified name → ``("lora:default", ...)``, oldest first."""
    out: dict[str, tuple[str, ...]] = {}
    for qname, calls in call_sites(model).items():
        records = calls[0].node.meta.get(MERGED_KEY, ())
        if records:
            out[qname] = tuple(r.label for r in records)
    return out


def read_records(calls: Sequence[CallSite], site: str) -> tuple[MergeRecord, ...]:
    """The records of a layer, oldest first.

    Raises:
        MergeError: the calls of a shared layer disagree (the graph was edited by hand).
    """
    records = calls[0].node.meta.get(MERGED_KEY, ())
    for call in calls[1:]:
        if call.node.meta.get(MERGED_KEY, ()) != records:
            raise MergeError(f"the calls of {site} disagree on what is merged into it; the "
                             f"graph was edited outside the merge passes")
    return records


def write_records(calls: Sequence[CallSite], records: tuple[MergeRecord, ...]) -> None:
    """Store ``records`` on every call of a layer (and drop the key when empty)."""
    for call in calls:
        if records:
            call.node.meta[MERGED_KEY] = records
        else:
            call.node.meta.pop(MERGED_KEY, None)


# --------------------------------------------------------------------------------------
# Inventory: which adapters the model carries, and where
# --------------------------------------------------------------------------------------


def adapter_inventory(model: nn.Module) -> dict[str, dict[str, list[str]]]:
    """Adapter name → pass name → qualified names of the layers carrying it (model order)."""
    out: dict[str, dict[str, list[str]]] = {}
    for _, mod in model.named_modules():
        if isinstance(mod, AdapterModule):
            sites = out.setdefault(mod.adapter_name, {}).setdefault(mod.pass_name, [])
            if mod.site not in sites:
                sites.append(mod.site)
    return out


def inactive_adapters(model: nn.Module, kind: str | None = None) -> set[str]:
    """Names of the adapters (of pass ``kind``, or any) with a module switched off.

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
    """The adapter names a pass of ``kind`` acts on.

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
