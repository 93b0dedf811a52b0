"""Resolving a pass's selection (pattern / role / exclude) to concrete sites.

A *site* is a module called through at least one ``call_module`` node, of a type the pass
can adapt. Every pass resolves its selection here, so every pass speaks the same selection
language and raises the same errors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from surgery.adapter_base import AdapterModule
from surgery.errors import NoMatchError, UnsupportedSiteError
from surgery.graphs import CallSite, call_sites
from surgery.roles import ModelRoles, RoleInfo, find_roles, normalize_roles
from surgery.select import Selector, as_patterns, select_names

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
        # a pattern that names exactly a module of the wrong type gets a type error
        for pat in patterns:
            exact = [n for n in all_called if n == pat and n not in cands]
            if exact and not any(n == pat for n in cands):
                mod = model.get_submodule(exact[0])
                raise UnsupportedSiteError(
                    f"{pass_name}: {exact[0]} is a {type(mod).__name__}; {pass_name} adapts "
                    f"{accepted_types}. Way out: select the layers inside it, e.g. "
                    f"pattern='{exact[0]}.*', or see surgery.list_targets(model).")
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
            raise NoMatchError(
                f"{pass_name}: no {accepted_types} module plays {how}(s) {list(use)}. "
                f"{_roles_found(roles)} Way out: select sites by name with pattern=..., "
                f"see surgery.list_targets(model).")
        if exclude is not None:
            names = select_names(names, None, exclude, pass_name=pass_name, all_names=all_names)
    return [Site(n, cands[n][0].owner.get_submodule(str(cands[n][0].node.target)),
                 tuple(cands[n]), roles.role_of(n)) for n in names]


def _roles_found(roles: ModelRoles) -> str:
    found = sorted({r for info in roles.modules.values() for r in info.roles})
    if not found:
        return ("No structural roles were found in this model (no attention op or "
                "feed-forward block was recognised).")
    return "Roles found in this model: " + ", ".join(found) + "."
