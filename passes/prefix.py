"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
Generation"), with LLaMA-Adapter's zero-init gate (Zhang et al. 2023), in the user's model.

The learned keys and values reach the attention op while the model runs eagerly:

- **transformers models**: the attention modules that call transformers'
  attention-function interface keep their code; the adapted copy's config names a
  registered function that wraps SDPA or eager attention, prepends the prefix after the KV
  cache update and extends the mask (:mod:`passes.prefix_hf`). ``generate`` with the
  cache, padding, ``labels=`` and attention dropout all work as before.
- **hand-written modules** (``F.scaled_dot_product_attention``, eager ``softmax(q k^T) v``,
  ``nn.MultiheadAttention``): the module whose ``forward`` holds the op, found on the map,
  is replaced by its site graph, and the op is rewritten there (:mod:`passes.prefix_graph`).

``mode="sequence"`` instead prepends ``P`` learned vectors to the first input of selected
modules (:mod:`passes.prefix_sequence`). ``reparameterize=True`` produces the prefix with Li
& Liang's MLP while training; :class:`EjectPrefixPass` (or ``module.eject()``) folds it
into plain tensors, bitwise.

Without the gate the pass changes the model's outputs at init; it says so in the
``detail`` of its :class:`Change` records (``"changes outputs at init (no zero gate)"``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from passes.prefix_graph import GraphPrefix, Layout
from passes.prefix_hf import (
    base_implementation,
    interface_modules,
    kv_layout,
    switch_implementation,
)
from passes.prefix_holders import holder_site_graph, traceable
from passes.prefix_modules import AttentionPrefix, LearnedPrefix, PrefixGate
from passes.prefix_sequence import run_sequence
from passes.prefix_sites import (
    SDPA_ARGS,
    MapAttention,
    attention_owners,
    call_arg,
    dtype_device,
    heads_at,
    map_attention,
    site_ops,
)
from surgery.adapters.names import check_adapter_name
from surgery.errors import ConfigError, NoMatchError, UnsupportedSiteError
from surgery.map.roles import ModelRoles, normalize_roles
from surgery.pass_base import Change, Pass, PassResult
from surgery.select import Selector, as_patterns, select_names
from surgery.sites.rewrite import freeze_site, register_adapter
from surgery.sites.site_graph import SiteGraph, base_module, site_graph_at
from surgery.targets import model_map

__all__ = ["CHANGES_OUTPUTS", "IDENTITY", "EjectPrefixPass", "PrefixPass", "attention_owners"]

CHANGES_OUTPUTS = "changes outputs at init (no zero gate)"
IDENTITY = "identity at init (zero gate)"


@dataclass(frozen=True, kw_only=True)
class PrefixPass(Pass):
    """Prepend ``P`` learned keys and values to every selected attention op.

    Where the keys and values meet the attention op, in the user's own model running
    eagerly (see the module docstring): through transformers' attention-function interface
    for modules that call it, and in the site graph of the module holding the op otherwise.

    Args:
        length: ``P``, the number of prefix positions (0 leaves outputs bitwise unchanged).
        pattern: glob(s) or ``re:`` regex over the names of the modules holding the
            attention ops (``"layers.*.attn"``, ``"self_attn"``, ``"attention.self"``; in a
            transformers model, the modules calling its attention interface), or of
            ``nn.MultiheadAttention`` modules; ``None`` = every attention op. With
            ``mode="sequence"``: the modules whose first input gets the prefix (required;
            modules whose sequence length flows to the output, e.g. an
            ``nn.TransformerEncoder`` called without masks).
        role: ``"attention"`` (the same as no pattern); prefix sites have no other role.
        exclude: patterns removed from the selection.
        reparameterize: train the prefix through Li & Liang's MLP (embedding ``(P, d)`` →
            ``Linear(d, reparam_hidden)`` → tanh → ``Linear(reparam_hidden, 2·H·hd)``);
            :class:`EjectPrefixPass` or ``module.eject()`` folds it back, bitwise.
        reparam_hidden: hidden width of that MLP.
        gate: ``None`` (the prefix joins the original softmax; outputs change at init) or
            ``"zero"`` (LLaMA-Adapter: a separate softmax over the prefix, scaled per head by
            a gate starting at 0; bitwise identity at init).
        mode: ``"attention"`` (keys and values) or ``"sequence"`` (``(B, L, d) →
            (B, P + L, d)`` at the first input of each selected module).
        init_std: standard deviation of the normal initialisation of stored prefixes.
        name: adapter name, any string without ``"."`` as in PEFT (``"test-adapter"``).

    Shapes: per attention op, ``key`` and ``value`` are ``(heads, P, head_dim)``, where
    ``heads`` is the number of heads at the op's key input: in a transformers model the
    key/value heads (grouped-query attention repeats them after the prefix, as it does the
    keys); in a rewritten graph the heads the op sees (after any ``repeat_kv``; the
    key/value heads when the op itself groups queries, ``enable_gqa``); for
    ``nn.MultiheadAttention`` they are ``(P, kdim)`` and ``(P, vdim)`` inputs; in sequence
    mode ``vectors`` is ``(P, d)``. Parameters live at ``<owner>.prefix.<name>.key``
    (``.value``, ``.vectors``, ``.encoder.*``) and ``<owner>.prefix_gate.<name>.weight``,
    in the dtype and on the device of the attention's key projection.

    Masks: boolean (``True`` = attend) and additive masks get ``P`` leading columns every
    query sees; ``is_causal=True`` becomes an explicit mask (prefix visible, causal part
    intact) with ``is_causal=False``; a missing mask stays missing (except where SDPA
    would apply causality itself: that mask is built, prefix visible).

    Raises:
        ConfigError: invalid length, gate, mode or role (at construction).
        NoMatchError: the selection matches nothing, or the model has no attention op.
        UnsupportedSiteError: an attention op whose layout the pass cannot extend, a
            holder torch.fx cannot trace, a transformers attention implementation other
            than SDPA or eager; in sequence mode, a module whose input on the example
            inputs is not floating-point ``(batch, seq, d)`` (token ids, masks, no example
            inputs), or whose longer output cannot reach the model's output (the dry run on
            the example inputs fails; the error is chained).
        TraceError: a hand-written model whose map cannot be traced.
        AlreadyAdaptedError: an op already carries a prefix of this name.
    """

    name: ClassVar[str] = "prefix"

    length: int = 0
    pattern: Selector = None
    role: str | Sequence[str] | None = None
    exclude: Selector = None
    reparameterize: bool = False
    reparam_hidden: int = 512
    gate: str | None = None
    mode: str = "attention"
    init_std: float = 1.0
    adapter_name: str = "default"

    def __init__(self, *, length: int, pattern: Selector = None,
                 role: str | Sequence[str] | None = None, exclude: Selector = None,
                 reparameterize: bool = False, reparam_hidden: int = 512,
                 gate: str | None = None, mode: str = "attention", init_std: float = 1.0,
                 name: str = "default") -> None:
        for key, val in (("length", length), ("pattern", pattern), ("role", role),
                         ("exclude", exclude), ("reparameterize", reparameterize),
                         ("reparam_hidden", reparam_hidden), ("gate", gate), ("mode", mode),
                         ("init_std", init_std), ("adapter_name", name)):
            object.__setattr__(self, key, tuple(val) if isinstance(val, list) else val)
        self.__post_init__()

    def __post_init__(self) -> None:
        try:
            as_patterns(self.pattern)
            as_patterns(self.exclude)
        except ConfigError as exc:
            raise ConfigError(f"PrefixPass: {exc}") from exc
        if not isinstance(self.length, int) or isinstance(self.length, bool) or self.length < 0:
            raise ConfigError(f"PrefixPass: length must be an int >= 0, got {self.length!r}. "
                              f"Way out: length=10 (prefix positions per attention layer; 0 "
                              f"adds nothing).")
        if not isinstance(self.reparam_hidden, int) or self.reparam_hidden < 1:
            raise ConfigError(f"PrefixPass: reparam_hidden must be a positive int, got "
                              f"{self.reparam_hidden!r}")
        if self.gate not in (None, "zero"):
            raise ConfigError(f"PrefixPass: gate must be None or 'zero', got {self.gate!r}")
        if self.mode not in ("attention", "sequence"):
            raise ConfigError(f"PrefixPass: mode must be 'attention' or 'sequence', got "
                              f"{self.mode!r}")
        if not isinstance(self.init_std, (int, float)) or not math.isfinite(self.init_std) \
                or self.init_std <= 0:
            raise ConfigError(f"PrefixPass: init_std must be a positive number, got "
                              f"{self.init_std!r}")
        if self.role is not None and set(normalize_roles(self.role)) != {"attention"}:
            raise ConfigError(f"PrefixPass: role must be 'attention' (a prefix adapts attention "
                              f"ops, not projections), got {self.role!r}. Way out: select "
                              f"attention modules by name with pattern=...")
        if self.mode == "sequence":
            if not as_patterns(self.pattern):
                raise ConfigError("PrefixPass(mode='sequence') needs pattern=... naming the "
                                  "modules whose input gets the prefix.")
            if self.gate is not None or self.role is not None:
                raise ConfigError("PrefixPass(mode='sequence') takes no gate= and no role=.")
        check_adapter_name("PrefixPass", self.adapter_name)

    @property
    def identity_at_init(self) -> bool:
        """Whether the adapted model's outputs equal the base model's before training."""
        return self.gate == "zero" or self.length == 0

    @property
    def _detail(self) -> str:
        return IDENTITY if self.identity_at_init else CHANGES_OUTPUTS

    # -- running --------------------------------------------------------------------------

    def _make(self, cls: type[LearnedPrefix], owner: str, **kw: Any) -> LearnedPrefix:
        return cls(length=self.length, reparameterize=self.reparameterize,
                   hidden=self.reparam_hidden, init_std=float(self.init_std), site=owner,
                   adapter_name=self.adapter_name, **kw)

    def _names(self, model: nn.Module, cands: Sequence[str]) -> list[str]:
        all_names = [n for n, _ in model.named_modules() if n]
        return select_names(list(cands), self.pattern, self.exclude, pass_name="PrefixPass",
                            all_names=all_names, kind="attention module")

    def run(self, model: nn.Module) -> PassResult:
        if self.mode == "sequence":
            return run_sequence(model, pattern=self.pattern, exclude=self.exclude,
                                adapter=self.adapter_name, make=self._make)
        hf = interface_modules(model)
        if hf:
            return self._run_interface(model, hf)
        return self._run_graphs(model)

    # -- transformers' attention interface -------------------------------------------------

    def _run_interface(self, model: nn.Module, hf: dict[str, nn.Module]) -> PassResult:
        names = self._names(model, hf)
        plan = {q: (base_implementation(hf[q], q), kv_layout(hf[q], q)) for q in names}
        changes: list[Change] = []
        for qname in names:  # every check passed: now change the model
            mod = hf[qname]
            base, (kv_heads, head_dim, heads) = plan[qname]
            impl = switch_implementation(mod, base)
            ref = next((p for p in mod.parameters() if p.is_floating_point()), None)
            dtype = ref.dtype if ref is not None else torch.get_default_dtype()
            device = ref.device if ref is not None else torch.device("cpu")
            gated = self.gate is not None
            added = [("prefix", self._make(AttentionPrefix, qname, heads=kv_heads,
                                           head_dim=head_dim, dtype=dtype, device=device,
                                           gated=gated, interface=impl))]
            if gated:
                added.append(("prefix_gate", PrefixGate(
                    heads=heads, kind="sdpa", enable_gqa=kv_heads != heads, site=qname,
                    adapter_name=self.adapter_name, dtype=dtype, device=device)))
            for slot, module in added:
                register_adapter(mod, slot, self.adapter_name, module, pass_name="PrefixPass",
                                 site=qname)
                where = f"{qname}.{slot}.{self.adapter_name}"
                changes.append(Change("module_added", self.name, qname, where,
                                      adapter=self.adapter_name, role="attention",
                                      detail=f"read by attention function {impl!r}; "
                                             f"{self._detail}"))
                for pname, param in module.named_parameters():
                    changes.append(Change("param_added", self.name, qname, f"{where}.{pname}",
                                          adapter=self.adapter_name, role="attention",
                                          shape=tuple(param.shape), numel=param.numel(),
                                          trainable=True, detail=self._detail))
            changes.extend(freeze_site(mod, pass_name=self.name, site=qname, role="attention"))
        return PassResult(model, bool(changes), tuple(changes), self.name)

    # -- site graphs of hand-written attention -------------------------------------------------

    def targets(self, model: nn.Module) -> dict[str, list[MapAttention]]:
        """Selected owner name → its attention ops as the map shows them, in graph order
        (hand-written models; transformers models are served by the interface).

        Raises:
            NoMatchError: the model has no attention op, or a pattern matches none.
            TraceError: the map cannot be traced.
        """
        return self._select(model, map_attention(model_map(model))[0])

    def _select(self, model: nn.Module,
                sites: list[MapAttention]) -> dict[str, list[MapAttention]]:
        if not sites:
            raise NoMatchError(
                "PrefixPass: no attention op found (no scaled_dot_product_attention call, "
                "eager softmax(q @ k^T) @ v, nn.MultiheadAttention, or transformers attention "
                "module). Way out: mode='sequence' with pattern=... prepends vectors to a "
                "module's input.")
        cands: dict[str, list[MapAttention]] = {}
        for site in sites:
            cands.setdefault(site.owner, []).append(site)
        return {n: cands[n] for n in self._names(model, cands)}

    def _layout(self, model: nn.Module, graph_map: nn.Module, roles: ModelRoles,
                site: MapAttention) -> Layout | None:
        if site.op.kind == "mha":
            return None
        node = site.node
        if site.op.kind == "eager":
            kv = node.args[1]  # probs @ v: the heads of v
            heads, head_dim = heads_at(graph_map, roles, kv, site, "value")
            query_heads = heads
        else:
            q, kv = call_arg(node, SDPA_ARGS, "query"), call_arg(node, SDPA_ARGS, "key")
            heads, head_dim = heads_at(graph_map, roles, kv, site, "key")
            query_heads = heads_at(graph_map, roles, q, site, "query")[0] \
                if self.gate is not None else heads
        owner = model.get_submodule(site.owner) if site.owner else model
        dtype, device = dtype_device(model, site.op.key + site.op.value, owner, kv)
        return Layout(heads, head_dim, query_heads, dtype, device)

    def _run_graphs(self, model: nn.Module) -> PassResult:
        graph_map = model_map(model)
        sites, roles = map_attention(graph_map)
        chosen = self._select(model, sites)
        layouts = {id(s): self._layout(model, graph_map, roles, s)
                   for sites in chosen.values() for s in sites}  # every check before any edit
        holders: dict[str, list[MapAttention]] = {}
        for sites in chosen.values():
            for s in sites:
                holders.setdefault(s.holder, []).append(s)
        rewrite = GraphPrefix(make=self._make, gate=self.gate, adapter=self.adapter_name,
                              detail=self._detail)
        root = model
        for holder, wanted in holders.items():
            root, sg = _holder_graph(root, holder, wanted)
            ops = site_ops(sg, holder, wanted)
            for op in ops:
                rewrite.adapt(op, layouts[id(op.site)])
            sg.recompile()
            for op in ops:
                rewrite.changes.extend(freeze_site(op.owner_module, pass_name=self.name,
                                                   site=op.owner, role="attention"))
        return PassResult(root, bool(rewrite.changes), tuple(rewrite.changes), self.name)


def _holder_graph(root: nn.Module, holder: str,
                  wanted: list[MapAttention]) -> tuple[nn.Module, SiteGraph]:
    """The site graph of ``holder`` (made if needed), or a prefix-specific error when the
    holder calls an ``nn.MultiheadAttention`` and torch.fx cannot trace it."""
    held = root.get_submodule(holder) if holder else root
    if traceable(held):
        return holder_site_graph(root, holder, who="PrefixPass")
    try:
        return site_graph_at(root, holder, who="PrefixPass")
    except UnsupportedSiteError as exc:
        mha = [w.owner for w in wanted if w.op.kind == "mha"]
        if not mha:
            raise
        raise UnsupportedSiteError(
            f"PrefixPass: {mha[0]} (nn.MultiheadAttention) gets its prefix in the forward of "
            f"the module calling it, {holder or 'the model'} ({type(base_module(held)).__name__}"
            f"), which torch.fx cannot trace ({exc.__cause__ or exc}). Way out: give "
            f"{type(base_module(held)).__name__} a forward torch.fx can trace (no branch on "
            f"its inputs' values or shapes), or exclude={mha[0]!r}.") from exc


# ---- eject ----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EjectPrefixPass(Pass):
    """Fold reparameterised prefixes into plain learned tensors (``LearnedPrefix.eject``).

    The MLP of every reparameterised prefix (of the named adapters, or all) is run once and
    replaced by its output, stored as ``key``/``value`` (``vectors``) parameters: outputs
    are bitwise equal before and after, and the MLP's parameters are gone.

    Args:
        names: adapter name(s) to eject; ``None`` = every reparameterised prefix.

    Raises:
        NoMatchError: no reparameterised prefix (of those names) exists.
    """

    name: ClassVar[str] = "eject_prefix"

    names: str | Sequence[str] | None = None

    def __init__(self, *, names: str | Sequence[str] | None = None) -> None:
        object.__setattr__(self, "names", tuple(names) if isinstance(names, list) else names)

    def run(self, model: nn.Module) -> PassResult:
        wanted = None if self.names is None else (
            {self.names} if isinstance(self.names, str) else set(self.names))
        changes: list[Change] = []
        found = []
        for qname, mod in model.named_modules():
            if isinstance(mod, LearnedPrefix) and mod.encoder is not None and (
                    wanted is None or mod.adapter_name in wanted):
                found.append((qname, mod))
        if not found:
            have = sorted({m.adapter_name for _, m in model.named_modules()
                           if isinstance(m, LearnedPrefix) and m.encoder is not None})
            raise NoMatchError(
                f"EjectPrefixPass: no reparameterised prefix named {sorted(wanted or [])} "
                f"(reparameterised prefixes: {have or 'none'}). Way out: "
                f"PrefixPass(reparameterize=True) creates one.")
        for qname, mod in found:
            removed = [(f"{qname}.encoder.{n}", p) for n, p in mod.encoder.named_parameters()]
            mod.eject()
            for pname, param in removed:
                changes.append(Change("param_removed", self.name, mod.site, pname,
                                      adapter=mod.adapter_name, role=mod.role,
                                      shape=tuple(param.shape), numel=param.numel()))
            for part in mod.shapes:
                param = getattr(mod, part)
                changes.append(Change("param_added", self.name, mod.site, f"{qname}.{part}",
                                      adapter=mod.adapter_name, role=mod.role,
                                      shape=tuple(param.shape), numel=param.numel(),
                                      trainable=param.requires_grad, detail="ejected prefix"))
        return PassResult(model, True, tuple(changes), self.name)
