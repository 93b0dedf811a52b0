"""Prefix tuning as a graph rewrite (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous
Prompts for Generation"), with LLaMA-Adapter's zero-init gate (Zhang et al. 2023).

At every selected ``scaled_dot_product_attention`` call, before::

    y = sdpa(q, k, v, attn_mask=m, is_causal=c)

after (``prefix`` is ``<attention>.prefix.default``, an :class:`AttentionPrefix`)::

    pk = prefix(k, "key")                            # (B, H, P, hd), learned, over the batch
    pv = prefix(v, "value")
    k2 = concat_prefix(pk, k, -2)                    # (B, H, P + S, hd)
    v2 = concat_prefix(pv, v, -2)
    m2 = extend_sdpa_mask(m, pk, k, q, c)            # P visible columns first; c -> explicit
    y  = sdpa(q, k2, v2, attn_mask=m2, is_causal=False)

With ``gate="zero"`` the original call is left untouched and the prefix gets its own
softmax, scaled per head by a gate ``g`` that starts at zero (identity at init)::

    y  = sdpa(q, k, v, attn_mask=m, is_causal=c)     # unchanged
    y2 = prefix_gate(y, q, pk, pv)                   # y + g · sdpa(q, pk, pv)

Eager attention (``softmax(q @ k^T [· s] [+ m]) @ v``) gets the prefix in front of ``k^T``
(last dimension) and ``v``, and every mask applied to the scores gets ``P`` visible
columns. ``nn.MultiheadAttention`` gets learned ``(P, embed_dim)`` vectors in front of its
key and value *inputs* (its own projections apply), and its ``key_padding_mask`` /
``attn_mask`` gain ``P`` visible columns.

``mode="sequence"`` instead prepends ``P`` learned vectors to the first input of selected
modules: ``(B, L, d) → (B, P + L, d)``. The input must be recorded (example inputs) as
floating-point ``(batch, seq, d)`` features, and the longer sequence must reach the model's
output: the pass runs the adapted model once on the recorded example inputs and refuses a
site where it fails (a mask, residual or reshape of the original length in the way).

``reparameterize=True`` produces the prefix with Li & Liang's MLP while training;
:class:`EjectPrefixPass` (or ``module.eject()``) folds it into plain tensors, bitwise.

Without the gate the pass changes the model's outputs at init; it says so in the
``detail`` of its :class:`Change` records (``"changes outputs at init (no zero gate)"``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import fx, nn

from passes.prefix_masks import (
    concat_prefix,
    concat_sequence,
    extend_mask,
    extend_sdpa_mask,
    extend_sequence_mask,
)
from passes.prefix_modules import (
    AttentionPrefix,
    LearnedPrefix,
    MHAPrefix,
    PrefixGate,
    SequencePrefix,
)
from passes.prefix_probe import SequenceSite, check_sequence_sites
from passes.prefix_sites import (
    MHA_ARGS,
    SDPA_ARGS,
    AttentionSite,
    attention_owners,
    attention_sites,
    call_arg,
    dtype_device,
    eager_attention,
    first_outputs,
    heads_at,
    recorded_shape,
    sequence_layout,
    set_call_arg,
)
from surgery.errors import ConfigError, NoMatchError, UnsupportedSiteError
from surgery.map.graphs import CallSite, call_sites, node_value, qualified
from surgery.pass_base import Change, Pass, PassResult
from surgery.sites.rewrite import (
    call_input,
    editable_graph,
    freeze_site,
    mark,
    register_adapter,
    replace_uses_after,
    set_call_input,
)
from surgery.map.roles import normalize_roles
from surgery.select import Selector, as_patterns, select_names
from surgery.sites.resolve import inside_adapter

__all__ = ["PrefixPass", "EjectPrefixPass", "attention_owners", "CHANGES_OUTPUTS", "IDENTITY"]

CHANGES_OUTPUTS = "changes outputs at init (no zero gate)"
IDENTITY = "identity at init (zero gate)"


@dataclass
class _Edit:
    """Inserting marked nodes into one graph for one site."""

    graph: fx.Graph
    tag: dict[str, Any]
    added: list[fx.Node] = field(default_factory=list)

    def module(self, target: str, args: tuple, part: str, like: fx.Node | None = None) -> fx.Node:
        suffix = "" if part in ("gate", "prefix") else "_" + part.removeprefix("prefix_")
        name = target.replace(".", "_") + suffix  # layers_0_attn_prefix_default_key
        node = self.graph.create_node("call_module", target, args, {}, name=name)
        self.added.append(mark(node, part=part, like=like, **self.tag))
        return node

    def function(self, fn: Any, args: tuple, part: str) -> fx.Node:
        node = self.graph.create_node("call_function", fn, args, {}, name=part)
        self.added.append(mark(node, part=part, **self.tag))
        return node


@dataclass(frozen=True, kw_only=True)
class PrefixPass(Pass):
    """Prepend ``P`` learned keys and values to every selected attention op.

    Args:
        length: ``P``, the number of prefix positions (0 leaves outputs bitwise unchanged).
        pattern: glob(s) or ``re:`` regex over the names of the modules holding the
            attention ops (``"layers.*.attn"``, ``"self_attn"``, ``"attention.self"``), or of
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
        name: adapter name.

    Shapes: per attention op, ``key`` and ``value`` are ``(heads, P, head_dim)``, where
    ``heads`` is the number of heads at the op's key input (after any ``repeat_kv``
    expansion; the key/value heads when the op itself groups queries, ``enable_gqa``); for
    ``nn.MultiheadAttention`` they are ``(P, kdim)`` and ``(P, vdim)`` inputs; in sequence
    mode ``vectors`` is ``(P, d)``. Parameters live at ``<owner>.prefix.<name>.key``
    (``.value``, ``.vectors``, ``.encoder.*``) and ``<owner>.prefix_gate.<name>.weight``,
    in the dtype and on the device of the attention's key projection.

    Masks: boolean (``True`` = attend) and additive masks get ``P`` leading columns every
    query sees; ``is_causal=True`` becomes an explicit mask (prefix visible, causal part
    intact) with ``is_causal=False``; a missing mask stays missing.

    Raises:
        ConfigError: invalid length, gate, mode or role (at construction).
        NoMatchError: the selection matches nothing, or the model has no attention op.
        UnsupportedSiteError: an attention op whose layout the pass cannot extend; in
            sequence mode, a module whose input is not recorded as floating-point
            ``(batch, seq, d)`` (token ids, masks, no example inputs), or whose longer
            output cannot reach the model's output (the dry run on the recorded example
            inputs fails; the error is chained).
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
        as_patterns(self.pattern)
        as_patterns(self.exclude)
        if not isinstance(self.length, int) or isinstance(self.length, bool) or self.length < 0:
            raise ConfigError(f"PrefixPass: length must be an int >= 0, got {self.length!r}")
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
        if not isinstance(self.adapter_name, str) or not self.adapter_name.isidentifier():
            raise ConfigError(f"PrefixPass: name must be a Python identifier, got "
                              f"{self.adapter_name!r}")

    @property
    def identity_at_init(self) -> bool:
        """Whether the adapted model's outputs equal the base model's before training."""
        return self.gate == "zero" or self.length == 0

    @property
    def _detail(self) -> str:
        return IDENTITY if self.identity_at_init else CHANGES_OUTPUTS

    # -- selection ----------------------------------------------------------------------------

    def targets(self, model: nn.Module) -> dict[str, list[AttentionSite]]:
        """Selected owner name → its attention ops (attention mode), in graph order.

        Raises:
            NoMatchError: the model has no attention op, or a pattern matches none.
        """
        sites = attention_sites(model)
        if not sites:
            raise NoMatchError(
                "PrefixPass: no attention op found (no scaled_dot_product_attention call, "
                "eager softmax(q @ k^T) @ v, or nn.MultiheadAttention). Way out: "
                "mode='sequence' with pattern=... prepends vectors to a module's input.")
        cands: dict[str, list[AttentionSite]] = {}
        for site in sites:
            cands.setdefault(site.owner, []).append(site)
        all_names = [n for n, _ in model.named_modules() if n]
        names = select_names(list(cands), self.pattern, self.exclude, pass_name="PrefixPass",
                             all_names=all_names, kind="attention module")
        return {n: cands[n] for n in names}

    def run(self, model: nn.Module) -> PassResult:
        if self.mode == "sequence":
            return self._run_sequence(model)
        changes: list[Change] = []
        made: dict[tuple[int, str], nn.Module] = {}  # (id(owner module), slot) -> this run's
        for owner, sites in self.targets(model).items():
            for site in sites:
                adapt = {"mha": self._adapt_mha, "eager": self._adapt_eager}.get(
                    site.op.kind, self._adapt_sdpa)
                changes.extend(adapt(model, site, made))
            owner_mod = model.get_submodule(owner) if owner else model
            changes.extend(freeze_site(owner_mod, pass_name=self.name, site=owner,
                                       role="attention"))
        return PassResult(model, bool(changes), tuple(changes), self.name)

    # -- bookkeeping ----------------------------------------------------------------------------

    def _edit(self, site: AttentionSite) -> _Edit:
        graph = editable_graph(CallSite(site.owner, site.graph_prefix, site.graph_owner, site.node))
        return _Edit(graph, dict(pass_name=self.name, site=site.owner, role="attention",
                                 adapter=self.adapter_name))

    def _register(self, made: dict[tuple[int, str], nn.Module], owner_mod: nn.Module,
                  owner: str, slot: str, module: nn.Module, changes: list[Change]) -> None:
        """Register ``module`` as ``<owner>.<slot>.<name>``; a second op of the same owner in
        this run (a forward running several attention ops) shares the first one's."""
        key = (id(owner_mod), slot)
        if key in made:
            if _shapes(made[key]) != _shapes(module):
                raise UnsupportedSiteError(
                    f"PrefixPass: {owner} holds several attention ops of different shapes "
                    f"({_shapes(made[key])} vs {_shapes(module)}); one prefix cannot serve "
                    f"them all. Way out: exclude={owner!r}.")
            return
        register_adapter(owner_mod, slot, self.adapter_name, module, pass_name="PrefixPass",
                         site=owner)
        made[key] = module
        for pname, param in module.named_parameters():
            changes.append(Change("param_added", self.name, owner,
                                  f"{qualified(owner, slot)}.{self.adapter_name}.{pname}",
                                  adapter=self.adapter_name, role="attention",
                                  shape=tuple(param.shape), numel=param.numel(), trainable=True,
                                  detail=self._detail))

    def _node_changes(self, site: AttentionSite, edit: _Edit) -> list[Change]:
        return [Change("node_added", self.name, site.owner, f"{site.graph_prefix}/{n.name}",
                       adapter=self.adapter_name, role="attention",
                       detail=f"{n.meta['surgery']['part']}; {self._detail}") for n in edit.added]

    def _owner_prefix(self, model: nn.Module, site: AttentionSite,
                      made: dict[tuple[int, str], nn.Module], heads: int, head_dim: int,
                      value: Any,
                      changes: list[Change]) -> tuple[nn.Module, torch.dtype, torch.device]:
        """Register the key/value prefix of ``site``'s owner (see :meth:`_register`); return the
        owner module and the dtype and device of its new parameters (``value``'s as a last
        resort)."""
        owner_mod = model.get_submodule(site.owner) if site.owner else model
        dtype, device = dtype_device(model, site.op.key + site.op.value, owner_mod, value)
        self._register(made, owner_mod, site.owner, "prefix", self._prefix_module(
            AttentionPrefix, site.owner, heads=heads, head_dim=head_dim, dtype=dtype,
            device=device), changes)
        return owner_mod, dtype, device

    def _prefix_module(self, cls: type[LearnedPrefix], owner: str, **kw: Any) -> LearnedPrefix:
        return cls(length=self.length, reparameterize=self.reparameterize,
                   hidden=self.reparam_hidden, init_std=float(self.init_std), site=owner,
                   adapter_name=self.adapter_name, **kw)

    def _gate_after(self, edit: _Edit, site: AttentionSite, out: fx.Node,
                    args: tuple[Any, ...]) -> None:
        """``out + g · attn(prefix)`` right after ``out``, read by every user of ``out``."""
        with edit.graph.inserting_after(out):
            gated = edit.module(site.target("prefix_gate", self.adapter_name), (out, *args),
                                "gate", like=out)
        replace_uses_after(out, gated)

    # -- scaled_dot_product_attention ---------------------------------------------------------

    def _adapt_sdpa(self, model: nn.Module, site: AttentionSite,
                    made: dict[tuple[int, str], nn.Module]) -> list[Change]:
        node = site.node
        q, k, v = (call_arg(node, SDPA_ARGS, n) for n in ("query", "key", "value"))
        mask = call_arg(node, SDPA_ARGS, "attn_mask")
        is_causal = call_arg(node, SDPA_ARGS, "is_causal", False)
        heads, hd = heads_at(model, k, site, "key")
        changes: list[Change] = []
        owner_mod, dtype, device = self._owner_prefix(model, site, made, heads, hd, k, changes)
        edit = self._edit(site)
        target = site.target("prefix", self.adapter_name)
        with edit.graph.inserting_before(node):
            pk = edit.module(target, (k, "key"), "prefix_key")
            pv = edit.module(target, (v, "value"), "prefix_value")
            if self.gate is None:
                kc = edit.function(concat_prefix, (pk, k, -2), "cat_key")
                vc = edit.function(concat_prefix, (pv, v, -2), "cat_value")
                if mask is not None or is_causal is not False:
                    m2 = edit.function(extend_sdpa_mask, (mask, pk, k, q, is_causal), "mask")
                    set_call_arg(node, SDPA_ARGS, "attn_mask", m2)
                    set_call_arg(node, SDPA_ARGS, "is_causal", False)
                set_call_arg(node, SDPA_ARGS, "key", kc)
                set_call_arg(node, SDPA_ARGS, "value", vc)
        if self.gate is not None:
            scale = call_arg(node, SDPA_ARGS, "scale")
            gqa = call_arg(node, SDPA_ARGS, "enable_gqa", False)
            if isinstance(scale, fx.Node) or isinstance(gqa, fx.Node):
                raise UnsupportedSiteError(
                    f"PrefixPass: the attention op at {site.op.node} computes its scale or "
                    f"enable_gqa at run time; gate='zero' needs them fixed. Way out: gate=None.")
            self._register(made, owner_mod, site.owner, "prefix_gate", PrefixGate(
                heads=heads_at(model, q, site, "query")[0], kind="sdpa", scale=scale,
                enable_gqa=bool(gqa), site=site.owner, adapter_name=self.adapter_name,
                dtype=dtype, device=device), changes)
            self._gate_after(edit, site, node, (q, pk, pv))
        return changes + self._node_changes(site, edit)

    # -- eager attention ----------------------------------------------------------------------

    def _adapt_eager(self, model: nn.Module, site: AttentionSite,
                     made: dict[tuple[int, str], nn.Module]) -> list[Change]:
        eager = eager_attention(site)
        qk, pv_mm = eager.qk, eager.pv
        q, kt = qk.args
        v = pv_mm.args[1]
        heads, hd = heads_at(model, v, site, "value")
        # check everything before changing anything
        masks = eager.masks(site) if self.gate is None else []
        scales = eager.scales(site) if self.gate is not None else ()
        changes: list[Change] = []
        owner_mod, dtype, device = self._owner_prefix(model, site, made, heads, hd, v, changes)
        edit = self._edit(site)
        target = site.target("prefix", self.adapter_name)
        if self.gate is not None:
            with edit.graph.inserting_before(pv_mm):
                pk = edit.module(target, (kt, "key"), "prefix_key")
                pv = edit.module(target, (v, "value"), "prefix_value")
            self._register(made, owner_mod, site.owner, "prefix_gate", PrefixGate(
                heads=heads, kind="eager", site=site.owner, adapter_name=self.adapter_name,
                dtype=dtype, device=device), changes)
            self._gate_after(edit, site, pv_mm, (q, pk, pv, None, scales))
            return changes + self._node_changes(site, edit)
        with edit.graph.inserting_before(qk):
            pkt = edit.module(target, (kt, "key", True), "prefix_key")
            kc = edit.function(concat_prefix, (pkt, kt, -1), "cat_key")
        qk.args = (q, kc)
        for user, index, convention in masks:
            with edit.graph.inserting_before(user):
                m2 = edit.function(extend_mask, (user.args[index], pkt, -1, kt, -1, convention),
                                   "mask")
            user.args = tuple(m2 if i == index else a for i, a in enumerate(user.args))
        with edit.graph.inserting_before(pv_mm):
            pv = edit.module(target, (v, "value"), "prefix_value")
            vc = edit.function(concat_prefix, (pv, v, -2), "cat_value")
        pv_mm.args = (pv_mm.args[0], vc)
        return changes + self._node_changes(site, edit)

    # -- nn.MultiheadAttention ----------------------------------------------------------------

    def _adapt_mha(self, model: nn.Module, site: AttentionSite,
                   made: dict[tuple[int, str], nn.Module]) -> list[Change]:
        node = site.node
        mha: nn.MultiheadAttention = site.graph_owner.get_submodule(str(node.target))
        query, key, value = (call_arg(node, MHA_ARGS, n) for n in ("query", "key", "value"))
        weight = mha.in_proj_weight if mha.in_proj_weight is not None else mha.q_proj_weight
        firsts = first_outputs(node) if self.gate is not None else []
        if firsts is None:
            raise UnsupportedSiteError(
                f"PrefixPass: the output of {site.owner} (nn.MultiheadAttention) is used as a "
                f"whole; gate='zero' needs its first element read with [0]. Way out: gate=None.")
        changes: list[Change] = []
        self._register(made, mha, site.owner, "prefix", self._prefix_module(
            MHAPrefix, site.owner, kdim=mha.kdim, vdim=mha.vdim, batch_first=mha.batch_first,
            dtype=weight.dtype, device=weight.device), changes)
        edit = self._edit(site)
        target = site.target("prefix", self.adapter_name)
        bf = mha.batch_first
        with edit.graph.inserting_before(node):
            pk = edit.module(target, (key, "key"), "prefix_key")
            pv = edit.module(target, (value, "value"), "prefix_value")
            if self.gate is None:
                kc = edit.function(concat_sequence, (pk, key, bf), "cat_key")
                vc = edit.function(concat_sequence, (pv, value, bf), "cat_value")
                for mname in ("key_padding_mask", "attn_mask"):
                    m = call_arg(node, MHA_ARGS, mname)
                    if m is not None:
                        m2 = edit.function(extend_sequence_mask, (m, pk, key, bf, "drop"), "mask")
                        set_call_arg(node, MHA_ARGS, mname, m2)
                if call_arg(node, MHA_ARGS, "is_causal", False) is not False:
                    # is_causal only hints that attn_mask is causal; the extended mask rules
                    set_call_arg(node, MHA_ARGS, "is_causal", False)
                set_call_arg(node, MHA_ARGS, "key", kc)
                set_call_arg(node, MHA_ARGS, "value", vc)
        if self.gate is not None:
            self._register(made, mha, site.owner, "prefix_gate", PrefixGate(
                heads=mha.num_heads, kind="mha", batch_first=bf, site=site.owner,
                adapter_name=self.adapter_name, dtype=weight.dtype, device=weight.device),
                changes)
            rel = str(node.target)
            for first in firsts:
                with edit.graph.inserting_before(first):
                    params = tuple(
                        edit.graph.get_attr(f"{rel}.{attr}") if getattr(mha, attr) is not None
                        else None for attr in ("in_proj_weight", "in_proj_bias", "q_proj_weight",
                                               "k_proj_weight", "v_proj_weight"))
                    params += (edit.graph.get_attr(f"{rel}.out_proj.weight"),)
                for p in params:
                    if p is not None:
                        edit.added.append(mark(p, part="gate_param", **edit.tag))
                self._gate_after(edit, site, first, (query, pk, pv, params))
        return changes + self._node_changes(site, edit)

    # -- sequence mode ------------------------------------------------------------------------

    def _run_sequence(self, model: nn.Module) -> PassResult:
        graph_owners = {id(m) for _, m in model.named_modules()
                        if isinstance(getattr(m, "graph", None), fx.Graph)}
        cands = {q: calls for q, calls in call_sites(model).items()
                 if id(calls[0].owner.get_submodule(str(calls[0].node.target))) not in graph_owners
                 and not inside_adapter(model, q)}
        all_names = [n for n, _ in model.named_modules() if n]
        names = select_names(list(cands), self.pattern, self.exclude, pass_name="PrefixPass",
                             all_names=all_names)
        changes: list[Change] = []
        sites: list[SequenceSite] = []
        for qname in names:
            calls = cands[qname]
            module = calls[0].owner.get_submodule(str(calls[0].node.target))
            x = call_input(calls[0].node)
            width, seq_dim, dtype, device = sequence_layout(module, x, qname)
            val = node_value(x)
            sites.append(SequenceSite(qname, module, recorded_shape(val), val.dtype))
            seq = self._prefix_module(SequencePrefix, qname, width=width, seq_dim=seq_dim,
                                      role=None, dtype=dtype, device=device)
            register_adapter(module, "prefix", self.adapter_name, seq, pass_name="PrefixPass",
                             site=qname)
            for pname, param in seq.named_parameters():
                changes.append(Change("param_added", self.name, qname,
                                      f"{qname}.prefix.{self.adapter_name}.{pname}",
                                      adapter=self.adapter_name, shape=tuple(param.shape),
                                      numel=param.numel(), trainable=True,
                                      detail="sequence prefix (B, L, d) -> (B, P + L, d)"))
            for call in calls:
                edit = _Edit(editable_graph(call), dict(pass_name=self.name, site=qname,
                                                        role=None, adapter=self.adapter_name))
                with edit.graph.inserting_before(call.node):
                    new = edit.module(f"{call.node.target}.prefix.{self.adapter_name}",
                                      (call_input(call.node),), "prefix")
                set_call_input(call.node, new)
                changes.append(Change("node_added", self.name, qname, f"{call.prefix}/{new.name}",
                                      adapter=self.adapter_name,
                                      detail="sequence prefix; changes output shapes"))
            changes.extend(freeze_site(module, pass_name=self.name, site=qname, role=None))
        check_sequence_sites(model, sites, self.adapter_name)
        return PassResult(model, bool(changes), tuple(changes), self.name)


def _shapes(module: nn.Module) -> tuple:
    return tuple(sorted(getattr(module, "shapes", {}).items())) + (getattr(module, "heads", None),)



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
