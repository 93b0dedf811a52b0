"""Prefix rewrites inside a site graph: the attention op of a hand-written module.

:class:`passes.prefix.PrefixPass` replaces the module whose ``forward`` holds an attention
op by its site graph and rewrites the op there. At a ``scaled_dot_product_attention``
call, before and after (``prefix`` is ``<owner>.prefix.default``, an
:class:`~passes.prefix_modules.AttentionPrefix`)::

    y = sdpa(q, k, v, attn_mask=m, is_causal=c)

    pk = prefix(k, "key")                            # (B, H, P, hd), learned, over the batch
    pv = prefix(v, "value")
    k2 = concat_prefix(pk, k, -2)                    # (B, H, P + S, hd)
    v2 = concat_prefix(pv, v, -2)
    m2 = extend_sdpa_mask(m, pk, k, q, c)            # P visible columns first; c -> explicit
    y  = sdpa(q, k2, v2, attn_mask=m2, is_causal=False)

With ``gate="zero"`` the original call is left untouched and the prefix gets its own
softmax, scaled per head by a gate ``g`` that starts at zero (identity at init)::

    y2 = prefix_gate(y, q, pk, pv)                   # y + g · sdpa(q, pk, pv)

Eager attention (``softmax(q @ k^T [· s] [+ m]) @ v``) gets the prefix in front of ``k^T``
(last dimension) and ``v``, and every mask applied to the scores gets ``P`` visible
columns. ``nn.MultiheadAttention`` gets learned ``(P, embed_dim)`` vectors in front of its
key and value *inputs* (its own projections apply), in the graph of the module calling it,
and its ``key_padding_mask`` / ``attn_mask`` gain ``P`` visible columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from passes.prefix_eager import eager_attention
from passes.prefix_masks import (
    concat_prefix,
    concat_sequence,
    extend_mask,
    extend_sdpa_mask,
    extend_sequence_mask,
)
from passes.prefix_modules import AttentionPrefix, LearnedPrefix, MHAPrefix, PrefixGate
from passes.prefix_sites import (
    MHA_ARGS,
    SDPA_ARGS,
    SiteOp,
    call_arg,
    first_outputs,
    set_call_arg,
)
from surgery.adapters.names import identifier_part
from surgery.errors import UnsupportedSiteError
from surgery.pass_base import Change
from surgery.sites.rewrite import mark, register_adapter, replace_uses_after
from surgery.sites.woven import record_restore, stands_for

__all__ = ["GraphPrefix", "Layout"]


@dataclass(frozen=True)
class Layout:
    """What the map says about one op: heads and head size at its key (or value) input,
    query heads, and the dtype and device of new parameters."""

    heads: int
    head_dim: int
    query_heads: int
    dtype: torch.dtype
    device: torch.device


@dataclass
class _Edit:
    """Inserting marked nodes into one site graph for one op."""

    graph: fx.Graph
    tag: dict[str, Any]
    added: list[fx.Node] = field(default_factory=list)

    def module(self, target: str, args: tuple, part: str, like: fx.Node | None = None) -> fx.Node:
        suffix = "" if part in ("gate", "prefix") else "_" + part.removeprefix("prefix_")
        name = identifier_part(target) + suffix  # prefix_default_key, prefix_test_adapter_key
        node = self.graph.create_node("call_module", target, args, {}, name=name)
        self.added.append(mark(node, part=part, like=like, **self.tag))
        return node

    def function(self, fn: Any, args: tuple, part: str) -> fx.Node:
        node = self.graph.create_node("call_function", fn, args, {}, name=part)
        self.added.append(mark(node, part=part, **self.tag))
        return node


@dataclass
class GraphPrefix:
    """Rewrites the attention ops of site graphs for one :class:`PrefixPass` run.

    Attributes:
        make: builds an :class:`AttentionPrefix` / :class:`MHAPrefix` with the pass's
            settings (``make(cls, owner, **shape)``).
        gate: the pass's ``gate`` (``None`` or ``"zero"``).
        adapter: the adapter name.
        detail: the note every change carries (identity at init or not).
        changes: what was done so far, in order.
    """

    make: Any
    gate: str | None
    adapter: str
    detail: str
    changes: list[Change] = field(default_factory=list)
    _made: dict[tuple[int, str], nn.Module] = field(default_factory=dict)

    def adapt(self, site: SiteOp, layout: Layout | None) -> None:
        """Rewrite one op (``layout`` is ``None`` for ``nn.MultiheadAttention``)."""
        if site.kind == "mha":
            self._mha(site)
        elif site.kind == "eager":
            self._eager(site, layout)
        else:
            self._sdpa(site, layout)

    # -- bookkeeping ----------------------------------------------------------------------

    def _edit(self, site: SiteOp) -> _Edit:
        return _Edit(site.sg.graph, dict(pass_name="prefix", site=site.owner, role="attention",
                                         adapter=self.adapter))

    def _register(self, site: SiteOp, slot: str, module: nn.Module) -> None:
        """Register ``module`` as ``<owner>.<slot>.<adapter>``; a second op of the same owner
        in this run (a forward running several attention ops) shares the first one's."""
        owner_mod = site.owner_module
        key = (id(owner_mod), slot)
        if key in self._made:
            if _shapes(self._made[key]) != _shapes(module):
                raise UnsupportedSiteError(
                    f"PrefixPass: {site.owner} holds several attention ops of different shapes "
                    f"({_shapes(self._made[key])} vs {_shapes(module)}); one prefix cannot serve "
                    f"them all. Way out: exclude={site.owner!r}.")
            return
        register_adapter(owner_mod, slot, self.adapter, module, pass_name="PrefixPass",
                         site=site.owner)
        self._made[key] = module
        for pname, param in module.named_parameters():
            self.changes.append(Change(
                "param_added", "prefix", site.owner,
                ".".join(p for p in (site.owner, slot, self.adapter, pname) if p),
                adapter=self.adapter, role="attention", shape=tuple(param.shape),
                numel=param.numel(), trainable=True, detail=self.detail))

    def _done(self, site: SiteOp, edit: _Edit) -> None:
        holder = site.site.holder
        for n in edit.added:
            self.changes.append(Change(
                "node_added", "prefix", site.owner, f"{holder}/{n.name}", adapter=self.adapter,
                role="attention", detail=f"{n.meta['surgery']['part']}; {self.detail}"))

    def _prefix(self, site: SiteOp, layout: Layout) -> None:
        self._register(site, "prefix", self.make(
            AttentionPrefix, site.owner, heads=layout.heads, head_dim=layout.head_dim,
            dtype=layout.dtype, device=layout.device, gated=self.gate is not None))

    def _gate_after(self, edit: _Edit, site: SiteOp, out: fx.Node, args: tuple[Any, ...]) -> None:
        """``out + g · attn(prefix)`` right after ``out``, read by every user of ``out``."""
        with edit.graph.inserting_after(out):
            gated = stands_for(edit.module(site.target("prefix_gate", self.adapter),
                                           (out, *args), "gate", like=out), 0)
        replace_uses_after(out, gated)

    # -- scaled_dot_product_attention -------------------------------------------------------

    def _sdpa(self, site: SiteOp, layout: Layout) -> None:
        node = site.node
        q, k, v = (call_arg(node, SDPA_ARGS, n) for n in ("query", "key", "value"))
        mask = call_arg(node, SDPA_ARGS, "attn_mask")
        is_causal = call_arg(node, SDPA_ARGS, "is_causal", False)
        scale = call_arg(node, SDPA_ARGS, "scale")
        gqa = call_arg(node, SDPA_ARGS, "enable_gqa", False)
        if self.gate is not None and (isinstance(scale, fx.Node) or isinstance(gqa, fx.Node)):
            raise UnsupportedSiteError(
                f"PrefixPass: the attention op at {site.where} in {site.owner} computes its "
                f"scale or enable_gqa at run time; gate='zero' needs them fixed. Way out: "
                f"gate=None.")
        self._prefix(site, layout)
        edit = self._edit(site)
        target = site.target("prefix", self.adapter)
        with edit.graph.inserting_before(node):
            pk = edit.module(target, (k, "key"), "prefix_key")
            pv = edit.module(target, (v, "value"), "prefix_value")
            if self.gate is None:
                kc = stands_for(edit.function(concat_prefix, (pk, k, -2), "cat_key"), 1)
                vc = stands_for(edit.function(concat_prefix, (pv, v, -2), "cat_value"), 1)
                if mask is not None or is_causal is not False:
                    m2 = stands_for(edit.function(extend_sdpa_mask, (mask, pk, k, q, is_causal),
                                                  "mask"), 0)
                    set_call_arg(node, SDPA_ARGS, "attn_mask", m2)
                    if is_causal is not False:
                        _record_causal(kc, node, SDPA_ARGS, is_causal)
                        set_call_arg(node, SDPA_ARGS, "is_causal", False)
                set_call_arg(node, SDPA_ARGS, "key", kc)
                set_call_arg(node, SDPA_ARGS, "value", vc)
        if self.gate is not None:
            self._register(site, "prefix_gate", PrefixGate(
                heads=layout.query_heads, kind="sdpa", scale=scale, enable_gqa=bool(gqa),
                site=site.owner, adapter_name=self.adapter, dtype=layout.dtype,
                device=layout.device))
            self._gate_after(edit, site, node, (q, pk, pv))
        self._done(site, edit)

    # -- eager attention ----------------------------------------------------------------------

    def _eager(self, site: SiteOp, layout: Layout) -> None:
        eager = eager_attention(site)
        qk, pv_mm = eager.qk, eager.pv
        q, kt = qk.args
        v = pv_mm.args[1]
        # check everything before changing anything
        masks = eager.masks(site) if self.gate is None else []
        scales = eager.scales(site) if self.gate is not None else ()
        self._prefix(site, layout)
        edit = self._edit(site)
        target = site.target("prefix", self.adapter)
        if self.gate is not None:
            with edit.graph.inserting_before(pv_mm):
                pk = edit.module(target, (kt, "key"), "prefix_key")
                pv = edit.module(target, (v, "value"), "prefix_value")
            self._register(site, "prefix_gate", PrefixGate(
                heads=layout.heads, kind="eager", site=site.owner, adapter_name=self.adapter,
                dtype=layout.dtype, device=layout.device))
            self._gate_after(edit, site, pv_mm, (q, pk, pv, None, scales))
            self._done(site, edit)
            return
        with edit.graph.inserting_before(qk):
            pkt = edit.module(target, (kt, "key", True), "prefix_key")
            kc = stands_for(edit.function(concat_prefix, (pkt, kt, -1), "cat_key"), 1)
        qk.args = (q, kc)
        for user, index, convention in masks:
            with edit.graph.inserting_before(user):
                m2 = stands_for(edit.function(
                    extend_mask, (user.args[index], pkt, -1, kt, -1, convention), "mask"), 0)
            user.args = tuple(m2 if i == index else a for i, a in enumerate(user.args))
        with edit.graph.inserting_before(pv_mm):
            pv = edit.module(target, (v, "value"), "prefix_value")
            vc = stands_for(edit.function(concat_prefix, (pv, v, -2), "cat_value"), 1)
        pv_mm.args = (pv_mm.args[0], vc)
        self._done(site, edit)

    # -- nn.MultiheadAttention ----------------------------------------------------------------

    def _mha(self, site: SiteOp) -> None:
        node = site.node
        mha: nn.MultiheadAttention = site.owner_module
        query, key, value = (call_arg(node, MHA_ARGS, n) for n in ("query", "key", "value"))
        weight = mha.in_proj_weight if mha.in_proj_weight is not None else mha.q_proj_weight
        firsts = first_outputs(node) if self.gate is not None else []
        if firsts is None:
            raise UnsupportedSiteError(
                f"PrefixPass: the output of {site.owner} (nn.MultiheadAttention) is used as a "
                f"whole; gate='zero' needs its first element read with [0]. Way out: gate=None.")
        self._register(site, "prefix", self.make(
            MHAPrefix, site.owner, kdim=mha.kdim, vdim=mha.vdim, batch_first=mha.batch_first,
            dtype=weight.dtype, device=weight.device, gated=self.gate is not None))
        edit = self._edit(site)
        target = site.target("prefix", self.adapter)
        bf = mha.batch_first
        with edit.graph.inserting_before(node):
            pk = edit.module(target, (key, "key"), "prefix_key")
            pv = edit.module(target, (value, "value"), "prefix_value")
            if self.gate is None:
                kc = stands_for(edit.function(concat_sequence, (pk, key, bf), "cat_key"), 1)
                vc = stands_for(edit.function(concat_sequence, (pv, value, bf), "cat_value"), 1)
                for mname in ("key_padding_mask", "attn_mask"):
                    m = call_arg(node, MHA_ARGS, mname)
                    if m is not None:
                        m2 = stands_for(edit.function(extend_sequence_mask,
                                                      (m, pk, key, bf, "drop"), "mask"), 0)
                        set_call_arg(node, MHA_ARGS, mname, m2)
                causal = call_arg(node, MHA_ARGS, "is_causal", False)
                if causal is not False:
                    # is_causal only hints that attn_mask is causal; the extended mask rules
                    _record_causal(kc, node, MHA_ARGS, causal)
                    set_call_arg(node, MHA_ARGS, "is_causal", False)
                set_call_arg(node, MHA_ARGS, "key", kc)
                set_call_arg(node, MHA_ARGS, "value", vc)
        if self.gate is not None:
            self._register(site, "prefix_gate", PrefixGate(
                heads=mha.num_heads, kind="mha", batch_first=bf, site=site.owner,
                adapter_name=self.adapter, dtype=weight.dtype, device=weight.device))
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
        self._done(site, edit)


def _record_causal(node: fx.Node, op: fx.Node, names: tuple[str, ...], old: Any) -> None:
    """Record on ``node`` the ``is_causal`` that the prefix switches off on ``op``."""
    passed = names.index("is_causal") < len(op.args) or "is_causal" in op.kwargs
    record_restore(node, op, names, "is_causal", old, passed)


def _shapes(module: nn.Module) -> tuple:
    if isinstance(module, LearnedPrefix):
        return tuple(sorted(module.shapes.items())) + (getattr(module, "heads", None),)
    return (getattr(module, "heads", None),)
