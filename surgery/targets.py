"""Resolving a pass's selection (pattern / role / exclude) to sites of the user's model.

A *site* is a module of the model (by qualified name) of a type the pass can adapt. Selection
by pattern reads only module names and types (no tracing); selection by structural role
reads the map (:func:`model_map`), built once and cached on the adapted model. Every pass
resolves its selection here, so every pass speaks the same selection language and raises
the same errors. :func:`surgery.listing.list_targets` shows the candidates.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from surgery.errors import (
    ConfigError,
    NoMatchError,
    TraceError,
    UnsupportedSiteError,
    few,
    near_matches,
)
from surgery.map.blocks import one_of_each_block, spread_roles
from surgery.map.example_inputs import made_up_note, synthesize_inputs
from surgery.map.roles import ModelRoles, RoleInfo, find_roles, normalize_roles
from surgery.map.trace import trace
from surgery.select import Selector, as_patterns, matches, select_names
from surgery.sites.marker import AdapterModule
from surgery.sites.site_graph import base_module, plain_weight_free

__all__ = [
    "Site",
    "candidate_sites",
    "model_map",
    "model_roles",
    "resolve_sites",
    "with_roles",
]


@dataclass(frozen=True)
class Site:
    """One module a pass adapts.

    Attributes:
        qname: qualified module name (``""`` for a model that is itself one layer).
        module: the module in the model being adapted: the plain module, or the
            :class:`~surgery.sites.site_graph.SiteGraph` an earlier pass installed there.
        aliases: every qualified name the module sits under (several when shared).
        role: its structural role, if it plays one (known once the map was built).
    """

    qname: str
    module: nn.Module
    aliases: tuple[str, ...]
    role: RoleInfo | None = None

    @property
    def base(self) -> nn.Module:
        """The module as the user wrote it (for a site graph, its weight-free template)."""
        return base_module(self.module)

    @property
    def label(self) -> str | None:
        """The role label (``"query"``, ``"qkv (fused)"``), or ``None``."""
        return self.role.label if self.role else None


# --------------------------------------------------------------------------- the map


def model_map(model: nn.Module, example_inputs: tuple | None = None,
              example_kwargs: Mapping[str, Any] | None = None, *,
              leaf_modules: Collection[str | type] = ()) -> nn.Module:
    """The map of ``model``: its whole-model graph tree, for analysis only.

    On a model carrying surgery (``model._surgery``) the map is built once, from a
    weight-free view of the model as the user wrote it (site graphs read as the modules they
    replaced), with the example inputs the state recorded, and cached there; otherwise it
    is traced from ``model`` with the inputs given here. A transformers model given no
    inputs at all is traced with inputs made up from its config
    (:func:`surgery.map.example_inputs.synthesize_inputs`); a note says so, in the state's
    ``notes`` (kept with the made-up inputs) or in the map's ``._surgery_map.notes``.

    Raises:
        TraceError: the model cannot be traced (see :func:`surgery.map.trace.trace`).
    """
    state = getattr(model, "_surgery", None)
    if state is None:
        example_inputs, example_kwargs, note = _inputs_for(model, example_inputs, example_kwargs)
        traced = _trace_noted(plain_weight_free(model), example_inputs, example_kwargs,
                              leaf_modules, note)
        if note:
            traced._surgery_map.notes.append(note)
        return traced
    if state.cached_map is None:
        example_inputs, example_kwargs = _state_inputs(model, state, example_inputs,
                                                       example_kwargs)
        state.cached_map = _trace_noted(plain_weight_free(model), example_inputs,
                                        example_kwargs, state.leaf_modules or leaf_modules,
                                        made_up_note(state.notes))
    return state.cached_map


def _inputs_for(model: nn.Module, example_inputs: tuple | None,
                example_kwargs: Mapping[str, Any] | None
                ) -> tuple[tuple | None, Mapping[str, Any] | None, str]:
    """The inputs given, or, when none are given and ``model`` is a transformers model,
    inputs made up from its config (:func:`surgery.map.example_inputs.synthesize_inputs`)
    and the note saying so (``""`` when nothing was made up)."""
    if example_inputs is not None or example_kwargs:
        return example_inputs, example_kwargs, ""
    made = synthesize_inputs(model)
    if made is None:
        return example_inputs, example_kwargs, ""
    return made.args, made.kwargs, made.note


def _state_inputs(model: nn.Module, state: Any, example_inputs: tuple | None,
                  example_kwargs: Mapping[str, Any] | None
                  ) -> tuple[tuple | None, Mapping[str, Any] | None]:
    """The inputs to trace an adapted model's map with: those given here, else those the
    state recorded, else made-up ones, recorded on the state with a note in its ``notes``."""
    if example_inputs is None and not example_kwargs:
        example_inputs, example_kwargs = state.example_inputs, state.example_kwargs
    if example_inputs is None and not example_kwargs:
        example_inputs, example_kwargs, note = _inputs_for(model, None, None)
        if note:
            state.example_inputs, state.example_kwargs = example_inputs, dict(example_kwargs)
            state.notes.append(note)
    return example_inputs, example_kwargs


def _trace_noted(view: nn.Module, example_inputs: tuple | None,
                 example_kwargs: Mapping[str, Any] | None, leaf_modules: Collection[str | type],
                 note: str) -> nn.Module:
    """:func:`trace`, with a failure on made-up inputs saying they were made up."""
    try:
        return trace(view, example_inputs, example_kwargs, leaf_modules=leaf_modules)
    except TraceError as exc:
        if not note:
            raise
        raise TraceError(f"{exc}\n({note})") from exc


def model_roles(model: nn.Module, example_inputs: tuple | None = None,
                example_kwargs: Mapping[str, Any] | None = None, *,
                leaf_modules: Collection[str | type] = ()) -> ModelRoles:
    """Structural roles of ``model``'s modules, cached on an adapted model.

    Roles are structural, so they are found on a weight-free copy that keeps one block of
    each kind of every repeated ``nn.ModuleList`` (one decoder layer stands for all of its
    copies: the cost does not grow with depth) and spread to the copies. Where that copy
    cannot be traced, the whole map is. Inputs are found as in :func:`model_map`.

    Raises:
        TraceError: the model cannot be traced.
    """
    state = getattr(model, "_surgery", None)
    if state is not None:
        if state.cached_roles is not None:
            return state.cached_roles
        if state.cached_map is not None:
            state.cached_roles = find_roles(state.cached_map)
            return state.cached_roles
        example_inputs, example_kwargs = _state_inputs(model, state, example_inputs,
                                                       example_kwargs)
        leaf_modules = state.leaf_modules or leaf_modules
    else:
        example_inputs, example_kwargs, _ = _inputs_for(model, example_inputs, example_kwargs)
    roles = None
    view, reps = one_of_each_block(plain_weight_free(model))
    if reps.copies:
        try:
            small = trace(view, example_inputs, example_kwargs, leaf_modules=leaf_modules)
            roles = spread_roles(find_roles(small), reps)
        except Exception:  # a model that needs all its blocks (indexes them by number)
            roles = None
    if roles is None:
        roles = find_roles(model_map(model, example_inputs, example_kwargs,
                                     leaf_modules=leaf_modules))
    if state is not None:
        state.cached_roles = roles
    return roles


# --------------------------------------------------------------------------- candidates


def _inside_adapter_names(model: nn.Module) -> set[str]:
    """Qualified names of adapter modules and everything inside them."""
    out: set[str] = set()
    for qname, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, AdapterModule):
            out.update(qualify(qname, n) for n, _ in mod.named_modules(remove_duplicate=False))
    return out


def qualify(prefix: str, name: str) -> str:
    """Join a module prefix and a relative name."""
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def _inside_mha(model: nn.Module) -> dict[str, str]:
    """Modules inside an ``nn.MultiheadAttention`` (which reads their weights directly
    instead of calling them), mapped to the attention module's name."""
    out = {}
    for qname, mod in model.named_modules(remove_duplicate=False):
        if isinstance(base_module(mod), nn.MultiheadAttention):
            for n, _ in mod.named_modules(remove_duplicate=False):
                if n:
                    out[qualify(qname, n)] = qname
    return out


def candidate_sites(model: nn.Module, accept: Callable[[nn.Module], bool]) -> dict[str, Site]:
    """Modules of ``model`` that ``accept`` takes (judged by their base module), by name.

    Adapters' own modules and the layers inside an ``nn.MultiheadAttention`` (never called
    as modules) are left out. A module shared under several names is one candidate, under
    its first name, with every name in :attr:`Site.aliases`.
    """
    skip = _inside_adapter_names(model) | set(_inside_mha(model))
    found: dict[int, tuple[str, nn.Module, list[str]]] = {}
    for qname, mod in model.named_modules(remove_duplicate=False):
        if qname in skip:
            continue
        if id(mod) in found:
            found[id(mod)][2].append(qname)
        elif accept(base_module(mod)):
            found[id(mod)] = (qname, mod, [qname])
    return {q: Site(q, m, tuple(names)) for q, m, names in found.values()}


# --------------------------------------------------------------------------- resolution


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
) -> list[Site]:
    """Resolve a selection to sites, in module order.

    ``pattern`` and ``role`` may be combined (both must hold). With neither, the sites
    playing ``default_roles`` are selected. A pattern alone never traces the model; a role
    (or the default) reads the map.

    Raises:
        NoMatchError: a pattern or a role (each one of a list) selects nothing, or
            ``exclude`` leaves nothing; the message lists near matches.
        UnsupportedSiteError: a pattern names only modules the pass cannot adapt.
        ConfigError: ``pattern``, ``exclude`` or ``role`` is not a string or a list of
            strings, or is an empty list.
        TraceError: a role is needed and the map cannot be traced.
    """
    cands = candidate_sites(model, accept)
    all_names = [n for n, _ in model.named_modules() if n]
    patterns = as_patterns(pattern)
    as_patterns(exclude)
    wanted_roles = _wanted_roles(role, pass_name)
    if patterns:
        canonical = {alias: q for q, site in cands.items() for alias in site.aliases}
        for pat in patterns:
            if not any(matches(pat, n) for n in canonical):
                _explain_unsupported(model, pat, all_names, pass_name, accepted_types)
        picked = select_names(list(canonical), patterns, exclude, pass_name=pass_name,
                              all_names=all_names)
        names = list(dict.fromkeys(canonical[n] for n in picked))
        roles = _roles_for(model, pass_name) if wanted_roles else None
        if roles is not None:
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
        roles = _roles_for(model, pass_name)
        use = wanted_roles or normalize_roles(tuple(default_roles))
        names = [n for n in cands if (info := _role_of(roles, cands[n])) is not None
                 and any(info.plays(r) for r in use)]
        if not names:
            how = "role" if wanted_roles else "default role"
            mha = roles.with_role(["attention"])
            if mha and set(use) & _PROJECTION_ROLES:
                raise UnsupportedSiteError(
                    f"{pass_name}: no {accepted_types} module plays {how}(s) {list(use)}: the "
                    f"attention of this model is nn.MultiheadAttention ({', '.join(mha[:5])}). "
                    f"{_MHA_WHY} Way out: {_MHA_WAY_OUT}")
            raise NoMatchError(
                f"{pass_name}: no {accepted_types} module of this {type(model).__name__} "
                f"plays {how}(s) {list(use)}. {_roles_found(roles)} Way out: select sites by "
                f"name with pattern=...; {_candidate_hint(list(cands), use)} See "
                f"surgery.list_targets(model).")
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
    if roles is None and _state_has_roles(model):
        roles = model_roles(model)
    return [Site(n, cands[n].module, cands[n].aliases,
                 _role_of(roles, cands[n]) if roles is not None else None) for n in names]


def with_roles(model: nn.Module, sites: list[Site], *, pass_name: str, why: str,
               required: bool) -> list[Site]:
    """``sites`` with their structural roles filled in from the map.

    For a pass that needs roles beyond selection (IA³ tells feed-forward output layers and
    fused projections by role). With ``required``, a map that cannot be traced raises;
    otherwise the sites come back as they are.

    Raises:
        TraceError: ``required`` and the map cannot be traced; the message says ``why`` the
            pass needs roles.
    """
    if all(s.role is not None for s in sites):
        return sites
    try:
        roles = model_roles(model)
    except TraceError as exc:
        if not required:
            return sites
        raise TraceError(f"{pass_name}: {why}, which needs the model's map, and it could not "
                         f"be traced.\n{exc}") from exc
    return [s if s.role is not None else Site(s.qname, s.module, s.aliases, _role_of(roles, s))
            for s in sites]


def _state_has_roles(model: nn.Module) -> bool:
    state = getattr(model, "_surgery", None)
    return state is not None and (state.cached_map is not None or state.cached_roles is not None)


def _roles_for(model: nn.Module, pass_name: str) -> ModelRoles:
    """The model's roles, or a :class:`TraceError` that says selection by name needs none."""
    try:
        return model_roles(model)
    except TraceError as exc:
        raise TraceError(
            f"{pass_name}: selecting by structural role (role=..., or the pass's default "
            f"roles) needs the model's map, and it could not be traced. Way out: select by "
            f"name with pattern=... (needs no tracing), or pass example_inputs= (and "
            f"example_kwargs=) to apply_passes.\n{exc}") from exc


def _role_of(roles: ModelRoles, site: Site) -> RoleInfo | None:
    for name in site.aliases:
        info = roles.role_of(name)
        if info is not None:
            return info
    return None


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
    return info is not None and info.plays(role)


def _candidate_hint(names: Sequence[str], roles: Sequence[str]) -> str:
    """The candidate layers as patterns (layer numbers collapsed to ``*``), those nearest to
    the wanted roles' names first, and an example ``pattern=``."""
    import re

    shapes = list(dict.fromkeys(re.sub(r"(?<=\.)\d+(?=\.|$)", "*", n) for n in names if n))
    if not shapes:
        return "this model has no layer the pass can adapt."
    words = [w for r in roles for w in (r, r.split("_")[-1][0], r.split("_")[-1])]
    tails = {s: s.rsplit(".", 1)[-1] for s in shapes}
    nearest = [t for w in words for t in near_matches(w, tails.values(), n=2)]
    ordered = sorted(shapes, key=lambda s: (tails[s] not in nearest,
                                            nearest.index(tails[s]) if tails[s] in nearest
                                            else 0))
    example = list(dict.fromkeys(tails[s] for s in ordered))[:2]
    return (f"the candidate layers are {few(ordered, 8)}; e.g. pattern={example!r}.")


def _roles_found(roles: ModelRoles) -> str:
    found = sorted({r for info in roles.modules.values() for r in info.roles})
    if not found:
        return ("No structural roles were found in this model (no attention op or "
                "feed-forward block was recognised).")
    return "Roles found in this model: " + ", ".join(found) + "."


_PROJECTION_ROLES = {"query", "key", "value", "attn_out"}
_MHA_WHY = ("nn.MultiheadAttention computes query, key and value with one matrix product on "
            "its in_proj_weight and reads out_proj.weight directly instead of calling out_proj, "
            "so there is no call of a projection layer to branch around; the module is kept "
            "whole (role 'attention').")
_MHA_WAY_OUT = ("adapt the feed-forward layers instead (pattern='linear*' selects linear1 and "
                "linear2 of nn.TransformerEncoderLayer), or write the attention with separate "
                "nn.Linear projections and F.scaled_dot_product_attention.")


def _explain_unsupported(model: nn.Module, pat: str, all_names: list[str], pass_name: str,
                         accepted_types: str) -> None:
    """Raise :class:`UnsupportedSiteError` when ``pat`` selects only modules the pass cannot
    adapt, because of their type or because an ``nn.MultiheadAttention`` reads them."""
    inside_mha = _inside_mha(model)
    adapters = _inside_adapter_names(model)
    hits = [n for n in all_names if matches(pat, n) and n not in adapters]
    for hit in hits:
        is_mha = isinstance(base_module(model.get_submodule(hit)), nn.MultiheadAttention)
        if hit in inside_mha or is_mha:
            what = hit if is_mha else f"{hit} (inside {inside_mha[hit]})"
            raise UnsupportedSiteError(
                f"{pass_name}: pattern {pat!r} selects {what}, part "
                f"of an nn.MultiheadAttention; {pass_name} adapts {accepted_types} layers that "
                f"the model calls. {_MHA_WHY} Way out: {_MHA_WAY_OUT}")
    for hit in hits:
        mod = base_module(model.get_submodule(hit))
        if ".quantized." in type(mod).__module__:  # torch.ao.nn.quantized(.dynamic), ...
            raise UnsupportedSiteError(
                f"{pass_name}: pattern {pat!r} selects {hit}, a quantized "
                f"{type(mod).__module__}.{type(mod).__name__}; its weight is packed integers, "
                f"not a parameter, so no adapter can be placed beside it or merged into it. "
                f"Way out: adapt the floating-point model before quantizing it, or "
                f"exclude=[{hit!r}].")
        inside = any(n.startswith(hit + ".") for n in all_names)
        way_out = (f"select the layers inside it, e.g. pattern='{hit}.*', or see "
                   f"surgery.list_targets(model)" if inside else
                   "select layers of those types; surgery.list_targets(model) lists them")
        raise UnsupportedSiteError(
            f"{pass_name}: pattern {pat!r} selects {hit}, a {type(mod).__name__}; "
            f"{pass_name} adapts {accepted_types}. Way out: {way_out}.")


