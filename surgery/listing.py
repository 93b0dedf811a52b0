"""Discovery beside selection: every candidate site of a model, as a printable table."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from surgery.errors import TraceError
from surgery.map.graphs import call_sites
from surgery.map.leaves import is_leaf_type
from surgery.map.roles import ModelRoles
from surgery.map.wrappers import unwrap
from surgery.sites.features import layer_features
from surgery.sites.marker import AdapterModule
from surgery.targets import _role_of, candidate_sites, model_map, model_roles

__all__ = ["Target", "TargetList", "adapters_on", "list_targets"]



@dataclass(frozen=True)
class Target:
    """A candidate site: a layer of the model that a pass could adapt.

    Attributes:
        qname: qualified module name.
        type: class name (``"Linear"``, ``"Conv1D"``).
        role: role label (``"query"``, ``"qkv (fused)"``) or ``""``.
        shape: weight shape as stored, which depends on the layer type: ``(out, in)`` for
            ``nn.Linear``, ``(in, out)`` for transformers' ``Conv1D``,
            ``(3 * embed_dim, embed_dim)`` (``in_proj_weight``) for ``nn.MultiheadAttention``.
        calls: number of calls in the map (more than one when weights are shared); the
            number of names it sits under when the map could not be traced.
        adapters: adapters already attached (``"lora:default"``).
        in_features / out_features: the layer's input and output sizes, the same way round
            for every type (channels for convolutions, vocabulary and dimension for
            embeddings); ``None`` when unknown.
    """

    qname: str
    type: str
    role: str
    shape: tuple[int, ...]
    calls: int
    adapters: tuple[str, ...]
    in_features: int | None = None
    out_features: int | None = None

    @property
    def features(self) -> str:
        """``"64 → 192"``: input and output size, or ``""`` when unknown."""
        if self.in_features is None or self.out_features is None:
            return ""
        return f"{self.in_features} → {self.out_features}"


class TargetList(list):
    """A list of :class:`Target` that prints as a table.

    The ``in → out`` column reads the same for every layer type; the markdown and rich
    tables also show the weight shape as stored. ``note`` says why roles are missing, when
    the map could not be traced.
    """

    note: str = ""

    def to_markdown(self) -> str:
        """The targets as a GitHub-flavoured markdown table."""
        rows = ["| name | type | role | in → out | weight shape | calls | adapters |",
                "|---|---|---|---|---|---|---|"]
        for t in self:
            rows.append(f"| {t.qname} | {t.type} | {t.role} | {t.features} | {tuple(t.shape)} | "
                        f"{t.calls} | {', '.join(t.adapters)} |")
        return "\n".join(rows) + (f"\n\n{self.note}" if self.note else "")

    def __str__(self) -> str:
        width = max([len(t.qname) for t in self] + [4])
        lines = [f"{'name':<{width}}  {'type':<20} {'role':<14} {'in → out':<14} calls"]
        for t in self:
            lines.append(f"{t.qname:<{width}}  {t.type:<20} {t.role:<14} "
                         f"{t.features:<14} {t.calls}")
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)

    def __rich__(self) -> Any:
        from rich.table import Table

        table = Table(title="candidate sites", caption=self.note or None)
        for col in ("name", "type", "role", "in → out", "weight shape", "calls", "adapters"):
            table.add_column(col)
        for t in self:
            table.add_row(t.qname, t.type, t.role, t.features, str(tuple(t.shape)),
                          str(t.calls), ", ".join(t.adapters))
        return table


def adapters_on(module: nn.Module) -> tuple[str, ...]:
    """``"<pass>:<adapter>"`` for every adapter module registered directly under ``module``."""
    found = []
    for _, holder in module.named_children():
        if isinstance(holder, AdapterModule):  # a slot that is one adapter's (lora_embedding_A)
            found.append(f"{holder.pass_name}:{holder.adapter_name}")
        elif isinstance(holder, nn.ModuleDict):
            for name, sub in holder.items():
                if isinstance(sub, AdapterModule):
                    found.append(f"{sub.pass_name}:{name}")
    return tuple(dict.fromkeys(found))


def list_targets(model: nn.Module, example_inputs: tuple | None = None,
                 example_kwargs: Mapping[str, Any] | None = None, *,
                 leaf_modules: Collection[str | type] = ()) -> TargetList:
    """Every candidate site of ``model``: name, type, role, ``in → out`` sizes and weight shape.

    Candidates are the linear-like layers and attention modules, in module order. Roles and
    call counts come from the map; when it cannot be traced (a transformers model without
    ``example_inputs``), the list has no roles and says so in ``.note``. ``model`` is not
    changed. A ``torch.compile`` or DDP wrapper is looked through: names are the bare
    model's, as :func:`surgery.apply_passes` uses them.
    """
    model = unwrap(model)[0]
    out = TargetList()
    roles: ModelRoles | None = None
    calls: dict[str, list] = {}
    try:
        graph_map = model_map(model, example_inputs, example_kwargs, leaf_modules=leaf_modules)
        roles = model_roles(model, example_inputs, example_kwargs, leaf_modules=leaf_modules)
        calls = call_sites(graph_map)
    except TraceError as exc:
        out.note = (f"roles not shown: the model's map could not be traced "
                    f"({str(exc).splitlines()[0]}); pass example_inputs= to see them.")
    for qname, site in candidate_sites(model, is_leaf_type).items():
        base = site.base
        weight = getattr(base, "weight", None)
        if weight is None:
            weight = getattr(base, "in_proj_weight", None)
        info = _role_of(roles, site) if roles is not None else None
        feats = layer_features(base)
        n_calls = sum(len(calls.get(a, [])) for a in site.aliases) if calls else len(site.aliases)
        out.append(Target(qname, type(base).__name__, info.label if info else "",
                          tuple(weight.shape) if weight is not None else (),
                          n_calls, adapters_on(site.module),
                          feats[0] if feats else None, feats[1] if feats else None))
    return out
