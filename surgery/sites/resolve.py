"""Resolving a pass's selection (pattern / role / exclude) to concrete sites.

A *site* is a module called through at least one ``call_module`` node, of a type the pass
can adapt. Every pass resolves its selection here, so every pass speaks the same selection
language and raises the same errors.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from torch import fx, nn

from surgery.sites.marker import AdapterModule
from surgery.errors import ConfigError, NoMatchError, UnsupportedSiteError
from surgery.map.graphs import CallSite, call_sites
from surgery.map.leaves import is_hf_conv1d
from surgery.map.roles import ModelRoles, RoleInfo, find_roles, normalize_roles
from surgery.select import Selector, as_patterns, matches, select_names

__all__ = ["Site", "resolve_sites", "candidate_sites", "inside_adapter", "layer_features",
           "warn_rank_exceeds"]


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


def inside_adapter(model: nn.Module, qname: str) -> bool:
    """True when ``qname`` names an adapter module of ``model`` or a module inside one.

    Args:
        model: the (traced) model holding ``qname``.
        qname: a qualified module name of ``model``.

    Raises:
        AttributeError: ``qname`` names no module of ``model``.
    """
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
        if inside_adapter(model, qname):
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
        NoMatchError: a pattern or a role (each one of a list) selects nothing, or
            ``exclude`` leaves nothing; the message lists near matches.
        UnsupportedSiteError: a pattern names a module the pass cannot adapt.
        ConfigError: ``pattern``, ``exclude`` or ``role`` is not a string or a list of
            strings, or is an empty list.
    """
    roles = roles if roles is not None else find_roles(model)
    cands = candidate_sites(model, accept)
    all_called = call_sites(model)
    all_names = [n for n, _ in model.named_modules() if n]
    patterns = as_patterns(pattern)
    as_patterns(exclude)
    wanted_roles = _wanted_roles(role, pass_name)
    if patterns:
        for pat in patterns:
            if not any(matches(pat, n) for n in cands):
                _explain_unsupported(model, pat, all_called, all_names, pass_name, accepted_types)
        names = select_names(cands, patterns, exclude, pass_name=pass_name, all_names=all_names)
        if wanted_roles:
            for wanted in wanted_roles:  # each role must select something, like each pattern
                if not any(_plays(roles, n, wanted) for n in names):
                    raise NoMatchError(
                        f"{pass_name}: role {wanted!r} matches no module selected by "
                        f"pattern {list(patterns) if len(patterns) > 1 else patterns[0]!r}"
                        + (f" and exclude={exclude!r}" if exclude is not None else "")
                        + f". {_roles_found(roles)} Way out: drop {wanted!r} from role=, or "
                        f"widen the pattern; see surgery.list_targets(model).")
            names = [n for n in names if any(_plays(roles, n, r) for r in wanted_roles)]
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
        if len(wanted_roles) > 1:
            for wanted in wanted_roles:  # each role in a list must select something
                if not any(_plays(roles, n, wanted) for n in names):
                    raise NoMatchError(
                        f"{pass_name}: role {wanted!r} (of role={list(wanted_roles)}) matches "
                        f"no {accepted_types} module. {_roles_found(roles)} Way out: drop "
                        f"{wanted!r} from role=, or select sites by name with pattern=...; see "
                        f"surgery.list_targets(model).")
        if exclude is not None:
            names = select_names(names, None, exclude, pass_name=pass_name, all_names=all_names)
    return [Site(n, cands[n][0].owner.get_submodule(str(cands[n][0].node.target)),
                 tuple(cands[n]), roles.role_of(n)) for n in names]


def _wanted_roles(role: str | Sequence[str] | None, pass_name: str) -> tuple[str, ...]:
    """Canonical role names of ``role``; ``()`` for ``None``."""
    if role is None:
        return ()
    if not isinstance(role, (str, list, tuple, set, frozenset)) or (
            not isinstance(role, str) and not all(isinstance(r, str) for r in role)):
        raise ConfigError(f"{pass_name}: role must be a role name or a list of role names "
                          f"(role='query', role=['query', 'value']), got {role!r}.")
    if not isinstance(role, str) and not role:
        raise ConfigError(f"{pass_name}: role=[] names no role. Way out: give at least one "
                          f"role, or role=None for the pass's default roles.")
    return normalize_roles(role)


def _plays(roles: ModelRoles, qname: str, role: str) -> bool:
    info = roles.role_of(qname)
    return info is not None and role in info.roles


def layer_features(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a layer, whatever its weight layout.

    ``nn.Linear`` stores its weight ``(out, in)``, transformers' ``Conv1D`` ``(in, out)``,
    ``nn.Conv*`` ``(out, in / groups, *kernel)``, ``nn.Embedding`` ``(num_embeddings, dim)``
    (in = the vocabulary); ``nn.MultiheadAttention`` maps ``embed_dim`` to ``embed_dim``.
    Returns ``None`` for a module without a recognisable weight.
    """
    if is_hf_conv1d(module):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim, module.embed_dim
    weight = getattr(module, "weight", None)
    if weight is not None and getattr(weight, "dim", lambda: 0)() == 2:
        return int(weight.shape[1]), int(weight.shape[0])
    return None


def warn_rank_exceeds(sites: Iterable[Site], rank: int, *, pass_name: str) -> None:
    """Warn when ``rank`` is larger than ``min(in_features, out_features)`` of a site.

    A low-rank update ``B A`` of such a layer cannot have a rank above that minimum, so the
    extra rank only adds parameters. This is a warning, not an error: the result is still a
    correct (if wasteful) adapter.
    """
    over = []
    for site in sites:
        feats = layer_features(site.module)
        if feats is not None and rank > min(feats):
            over.append(f"{site.qname} ({type(site.module).__name__}, {feats[0]} -> {feats[1]})")
    if over:
        shown = ", ".join(over[:5]) + (f", ... ({len(over)} layers)" if len(over) > 5 else "")
        warnings.warn(
            f"{pass_name}: rank {rank} is larger than min(in_features, out_features) of {shown}; "
            f"the update B A there cannot have a rank above that minimum, so the extra rank only "
            f"adds parameters. Way out: a smaller rank, or exclude=... those layers.",
            UserWarning, stacklevel=_user_stacklevel())


def _user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning raised in the caller at the first frame
    outside this package and ``passes`` (the user's ``apply_passes(...)`` line)."""
    here = os.path.dirname(os.path.abspath(__file__))
    roots = (here + os.sep, os.path.join(os.path.dirname(here), "passes") + os.sep)
    frame = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(roots):
        frame = frame.f_back
        level += 1
    return level


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
        if not inside_adapter(model, hit):
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
