"""Repeated blocks: trace one of each kind instead of every copy.

Roles are structural: every decoder layer of a 32-layer model plays the same roles at the
same relative names. :func:`one_of_each_block` keeps, in every ``nn.ModuleList`` whose items
repeat, only the first item of each distinct structure, so the map that finds roles costs
one block per kind whatever the depth; :func:`spread_roles` then gives every copy the roles
found on its representative.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from surgery.map.roles import AttentionOp, ModelRoles, RoleInfo

__all__ = ["Representatives", "one_of_each_block", "spread_roles"]


def _signature(module: nn.Module) -> tuple:
    """The structure of ``module``: names, classes and parameter shapes of everything in it."""
    return tuple((name, type(m).__qualname__, tuple((p, tuple(t.shape)) for p, t in
                                                     m.named_parameters(recurse=False)))
                 for name, m in module.named_modules())


@dataclass
class Representatives:
    """Which item of a repeated ``nn.ModuleList`` stands for which others.

    Attributes:
        copies: ``{"model.layers.0": ["model.layers.0", "model.layers.1", ...]}``: the
            qualified name of each representative (in the truncated model, the same name
            as in the full model) and the names of every item it stands for.
    """

    copies: dict[str, list[str]] = field(default_factory=dict)

    def rep_of(self, qname: str) -> str | None:
        """The representative ``qname`` (a truncated-model name) lies in, or ``None``."""
        for rep in self.copies:
            if qname == rep or qname.startswith(rep + "."):
                return rep
        return None

    def expand(self, qname: str) -> list[str]:
        """Every full-model name ``qname`` (a name in the truncated model) stands for."""
        rep = self.rep_of(qname)
        if rep is None:
            return [qname]
        return [item + qname[len(rep):] for item in self.copies[rep]]


def one_of_each_block(model: nn.Module) -> tuple[nn.Module, Representatives]:
    """Keep only the first item of each distinct structure in every repeated ``ModuleList``.

    Changes ``model`` in place (call it on a private, weight-free copy). Items keep their
    names where they are first (``layers.0``); a later kind is renumbered to follow
    (``layers.1`` standing for ``layers.3, layers.5``) — its names are mapped back by
    :meth:`Representatives.expand`.

    Returns:
        ``(model, representatives)``.
    """
    reps = Representatives()
    lists = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, nn.ModuleList) and len(mod) > 1]
    for name, mlist in lists:
        kinds: dict[tuple, list[int]] = {}
        for i, item in enumerate(mlist):
            kinds.setdefault(_signature(item), []).append(i)
        if all(len(v) == 1 for v in kinds.values()):
            continue
        keep = [members for members in kinds.values()]
        items = [mlist[members[0]] for members in keep]
        for j, members in enumerate(keep):
            reps.copies[f"{name}.{j}" if name else str(j)] = [
                f"{name}.{i}" if name else str(i) for i in members]
        mlist._modules.clear()
        for j, item in enumerate(items):
            mlist._modules[str(j)] = item
    return model, reps


def spread_roles(roles: ModelRoles, reps: Representatives) -> ModelRoles:
    """The roles of the full model from those found on its truncated copy."""
    modules: dict[str, RoleInfo] = {}
    for qname, info in roles.modules.items():
        for full in reps.expand(qname):
            modules[full] = RoleInfo(full, set(info.roles), dict(info.fused))
    attention = []
    for op in roles.attention:
        names = op.query + op.key + op.value + op.out + ([op.prefix] if op.prefix else [])
        hit = {reps.rep_of(n) for n in names} - {None}
        if len(hit) != 1:
            attention.append(op)
            continue
        rep = hit.pop()
        for item in reps.copies[rep]:
            def sub(n: str, rep: str = rep, item: str = item) -> str:
                return item + n[len(rep):] if reps.rep_of(n) == rep else n

            owner, _, node = op.node.rpartition("/")
            attention.append(AttentionOp(f"{sub(owner) if owner else owner}/{node}", op.kind,
                                         sub(op.prefix) if op.prefix else op.prefix,
                                         [sub(n) for n in op.query], [sub(n) for n in op.key],
                                         [sub(n) for n in op.value], [sub(n) for n in op.out],
                                         op.cross))
    return ModelRoles(modules=modules, attention=attention)
