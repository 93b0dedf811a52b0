"""Resolving a pass's selection (pattern / role / exclude) to concrete sites.

A *site* is a module called through at least one ``call_module`` node, of a type the pass
can adapt. Every pass resolves its selection here, so every pass speaks the same selection
language and raises the same errors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import fx, nn

from surgery.adapter_base import AdapterModule
from surgery.errors import NoMatchError, UnsupportedSiteError
from surgery.graphs import CallSite, call_sites
from surgery.roles import ModelRoles, RoleInfo, find_roles, normalize_roles
from surgery.select import Selector, as_patterns, matches, select_names

__all__ = ["Site", "resolve_sites", "candidate_sites"]


@dataclass(frozen=True)
class Site:
    """One module a pass adapts.

    Attributes:
        qname: qualified module name.
        module: the module object (in the traced model).
        calls: every ``call_module`` node calling it (several when weights are shared).
        role: its structural role, if it plays one.
    """

    qname: str
    module: nn.Module
    calls: tuple[CallSite, ...]
    role: RoleInfo | None


def _inside_adapter(model: nn.Module, qname: str) -> bool:
    mod: nn.Module = model
    for part in qname.split("."):
        if isinstance(mod, AdapterModule):
            return True
        mod = getattr(mod, part)
    return isinstance(mod, AdapterModule)


def candidate_sites(model: nn.Module, accept: Callable[[nn.Module], bool]) -> dict[str, list[CallSite]]:
    """Called modules of ``model`` that ``accept`` takes, excluding adapters' own modules."""
    out = {}
    for qname, calls in call_sites(model).items():
        if _inside_adapter(model, qname):
            continue
        if accept(calls[0].owner.get_submodule(str(calls[0].node.target))):
            out[qname] = calls
    return out


def resolve_sites(
    model: nn.Module,
    *,
    pass_name: str,
    pattern: Selector,
    role: str | Sequence[str] | None,
    exclude: Selector,
    default_roles: Sequence[str],
    accept: Callable[[nn.Module], bool],
    accepted_types: str,
    roles: ModelRoles | None = None,
) -> list[Site]:
    """Resolve a selection to sites, in graph order.

    ``pattern`` and ``role`` may be combined (both must hold). With neither, the sites
    playing ``default_roles`` are selected.

    Raises:
        NoMatchError: a pattern or role selects nothing; the message lists near matches.
        UnsupportedSiteError: a pattern names a module the pass cannot adapt.
    """
    roles = roles if roles is not None else find_roles(model)
    cands = candidate_sites(model, accept)
    all_called = call_sites(model)
    all_names = [n for n, _ in model.named_modules() if n]
    patterns = as_patterns(pattern)
    wanted_roles = normalize_roles(role) if role is not None else ()
    if patterns:
        for pat in patterns:
            if not any(matches(pat, n) for n in cands):
                _explain_unsupported(model, pat, all_called, all_names, pass_name, accepted_types)
        names = select_names(cands, patterns, exclude, pass_name=pass_name, all_names=all_names)
        if wanted_roles:
            names = [n for n in names if roles.role_of(n) and roles.role_of(n).roles & set(wanted_roles)]
            if not names:
                raise NoMatchError(
                    f"{pass_name}: no module matched by {list(patterns)} plays role(s) "
                    f"{list(wanted_roles)}. {_roles_found(roles)}")
    else:
        use = wanted_roles or normalize_roles(tuple(default_roles))
        names = [n for n in cands if roles.role_of(n) and roles.role_of(n).roles & set(use)]
        if not names:
            how = "role" if wanted_roles else "default role"
            mha = roles.with_role(["attention"])
            if mha and set(use) & _PROJECTION_ROLES:
                raise UnsupportedSiteError(
                    f"{pass_name}: no {accepted_types} module plays {how}(s) {list(use)}: the "
                    f"attention of this model is nn.MultiheadAttention ({', '.join(mha[:5])}). "
                    f"{_MHA_WHY} Way out: {_MHA_WAY_OUT}")
            raise NoMatchError(
                f"{pass_name}: no {accepted_types} module plays {how}(s) {list(use)}. "
                f"{_roles_found(roles)} Way out: select sites by name with pattern=..., "
                f"see surgery.list_targets(model).")
        if exclude is not None:
            names = select_names(names, None, exclude, pass_name=pass_name, all_names=all_names)
    return [Site(n, cands[n][0].owner.get_submodule(str(cands[n][0].node.target)),
                 tuple(cands[n]), roles.role_of(n)) for n in names]


_PROJECTION_ROLES = {"query", "key", "value", "attn_out"}
_MHA_WHY = ("nn.MultiheadAttention computes query, key and value with one matrix product on "
            "its in_proj_weight and reads out_proj.weight directly instead of calling out_proj, "
            "so no call of a projection layer exists in the graph to branch around; the module "
            "is kept whole (role 'attention').")
_MHA_WAY_OUT = ("adapt the feed-forward layers instead (pattern='linear*' selects linear1 and "
                "linear2 of nn.TransformerEncoderLayer), or write the attention with separate "
                "nn.Linear projections and F.scaled_dot_product_attention.")


def _opaque_owner(model: nn.Module, qname: str, called: dict[str, list[CallSite]]) -> str | None:
    """The module called from a graph as one opaque unit that is ``qname`` or holds it."""
    parts = qname.split(".")
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if prefix in called and not isinstance(getattr(model.get_submodule(prefix), "graph", None),
                                               fx.Graph):
            return prefix
    return None


def _mha_holding(model: nn.Module, qname: str) -> str | None:
    """The ``nn.MultiheadAttention`` (kept whole or decomposed by export) that is or holds
    ``qname``."""
    parts = qname.split(".")
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        mod = model.get_submodule(prefix)
        if isinstance(mod, nn.MultiheadAttention) or str(getattr(mod, "_ty", "")).endswith(
                ".MultiheadAttention"):
            return prefix
    return None


def _explain_unsupported(model: nn.Module, pat: str, called: dict[str, list[CallSite]],
                         all_names: list[str], pass_name: str, accepted_types: str) -> None:
    """Raise :class:`UnsupportedSiteError` when ``pat`` selects only modules the pass cannot
    adapt because of their type or because they run inside an opaque module."""
    hits = [n for n in all_names if matches(pat, n)]
    for hit in hits:
        mha = _mha_holding(model, hit)
        if mha is not None and not isinstance(model.get_submodule(mha), nn.MultiheadAttention):
            what = hit if hit == mha else f"{hit} (inside {mha})"
            raise UnsupportedSiteError(
                f"{pass_name}: pattern {pat!r} selects {what}, part of an "
                f"nn.MultiheadAttention that torch.export decomposed into plain operations (it is "
                f"called with different arguments at different calls, so its signature could not "
                f"be kept); its projections are matrix products on in_proj_weight and "
                f"out_proj.weight, not calls of a layer. Way out: {_MHA_WAY_OUT}")
        owner = _opaque_owner(model, hit, called)
        if owner is None:
            continue
        owner_mod = model.get_submodule(owner)
        if isinstance(owner_mod, nn.MultiheadAttention):
            what = hit if hit == owner else f"{hit} (inside {owner})"
            raise UnsupportedSiteError(
                f"{pass_name}: pattern {pat!r} selects {what}, part of an "
                f"nn.MultiheadAttention; {pass_name} adapts {accepted_types} layers called from "
                f"the graph. {_MHA_WHY} Way out: {_MHA_WAY_OUT}")
        if hit == owner:
            inside = any(n.startswith(hit + ".") for n in all_names)
            way_out = (f"select the layers inside it, e.g. pattern='{hit}.*', or see "
                       f"surgery.list_targets(model)" if inside else
                       "select layers of those types; surgery.list_targets(model) lists them")
            raise UnsupportedSiteError(
                f"{pass_name}: pattern {pat!r} selects {hit}, a {type(owner_mod).__name__}; "
                f"{pass_name} adapts {accepted_types}. Way out: {way_out}.")
        if not _inside_adapter(model, hit):
            raise UnsupportedSiteError(
                f"{pass_name}: pattern {pat!r} selects {hit}, which runs inside {owner} "
                f"({type(owner_mod).__name__}); the traced graph calls {owner} as one opaque "
                f"module, so there is no call of {hit} to adapt. Way out: trace without "
                f"{owner!r} in leaf_modules=, or select another layer "
                f"(surgery.list_targets(model) lists them).")


def _roles_found(roles: ModelRoles) -> str:
    found = sorted({r for info in roles.modules.values() for r in info.roles})
    if not found:
        return ("No structural roles were found in this model (no attention op or "
                "feed-forward block was recognised).")
    return "Roles found in this model: " + ", ".join(found) + "."
