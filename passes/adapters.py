"""Bottleneck adapters as graph rewrites: serial (Houlsby et al. 2019, "Parameter-Efficient
Transfer Learning for NLP"; Pfeiffer et al. 2021, "AdapterFusion") and parallel (He et al.
2022, "Towards a Unified View of Parameter-Efficient Transfer Learning").

Serial, on the output ``h`` of an anchor layer (an attention output projection, a
feed-forward down projection), before anything the model does with it. Before::

    h = o_proj(y)
    ...                                    # the model's code reads h

After::

    h  = o_proj(y)
    z  = o_proj.adapter.default.down(h)    # (..., d) -> (..., m)
    a  = o_proj.adapter.default.act(z)
    u  = o_proj.adapter.default.up(a)      # (..., m) -> (..., d), zero at init
    h2 = h + u                             # the adapter's own residual
    ...                                    # the model's code reads h2

Parallel, reading the input ``x`` of a sub-layer and adding to its output. Before::

    g = act(up_proj(x))
    y = down_proj(g)

After::

    g  = act(up_proj(x))
    y  = down_proj(g)
    z  = down_proj.parallel_adapter.default.down(x)
    a  = down_proj.parallel_adapter.default.act(z)
    u  = down_proj.parallel_adapter.default.up(a)     # zero at init
    s  = u * scaling
    y2 = y + s

``up`` starts with zero weight and bias, so both are bitwise identities at init. The spans a
parallel adapter bridges are found by :func:`passes.sublayers.find_sublayers`; on the export
front end the input reaches the output's graph through :func:`surgery.sites.rewrite.carry_value`.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import fx, nn

from passes.bottleneck import BottleneckAdapter, bottleneck_width, check_adapter_settings
from passes.lora import lora_features
from passes.sublayers import SubLayer, find_sublayers, is_linear_layer
from surgery.map.dataflow import build_dataflow
from surgery.errors import ConfigError, NoMatchError, UnsupportedSiteError, near_matches
from surgery.map.graphs import CallSite
from surgery.pass_base import Change, Pass, PassResult
from surgery.sites.rewrite import (
    call_input,
    carry_value,
    editable_graph,
    freeze_site,
    insert_chain,
    mark,
    register_adapter,
    relative_target,
    replace_uses_after,
    site_output,
)
from surgery.map.roles import find_roles
from surgery.select import Selector, as_patterns, matches
from surgery.sites.resolve import Site, resolve_sites

__all__ = ["SerialAdapterPass", "ParallelAdapterPass"]

_PLACEMENTS: dict[str, tuple[str, ...]] = {"houlsby": ("attn_out", "ffn_down"),
                                           "pfeiffer": ("ffn_down",)}
_SUBLAYER_ROLES = {"ffn": "ffn", "feedforward": "ffn", "attention": "attention",
                   "attn": "attention"}
_BRANCH = ("down", "act", "up")


def _param_changes(pass_name: str, site: str, slot: str, adapter: BottleneckAdapter,
                   role: str | None) -> list[Change]:
    changes = []
    for pname, param in adapter.named_parameters():
        changes.append(Change("param_added", pass_name, site,
                              f"{site}.{slot}.{adapter.adapter_name}.{pname}",
                              adapter=adapter.adapter_name, role=role, shape=tuple(param.shape),
                              numel=param.numel(), trainable=True))
    return changes


def _insert_branch(graph: fx.Graph, call: CallSite, slot: str, adapter_name: str, source: fx.Node,
                   last: fx.Node, scaling: float | None, tag: dict[str, Any]) -> fx.Node:
    """Insert ``last + [scaling ·] up(act(down(source)))`` right after ``last``; return the sum."""

    def target(part: str) -> str:
        return relative_target(call, slot, adapter_name, part)

    def build() -> fx.Node:
        z = mark(graph.call_module(target("down"), (source,)), part="down", **tag)
        a = mark(graph.call_module(target("act"), (z,)), part="act", **tag)
        u = mark(graph.call_module(target("up"), (a,)), part="up", like=last, **tag)
        if scaling is not None:
            u = mark(graph.call_function(operator.mul, (u, scaling)), part="scale", like=last,
                     **tag)
        return mark(graph.call_function(operator.add, (last, u)), part="add", like=last, **tag)

    out = insert_chain(graph, last, build)
    replace_uses_after(last, out)
    return out


def _store_settings(adapter_pass: SerialAdapterPass | ParallelAdapterPass,
                    settings: dict[str, Any]) -> None:
    """Set the frozen fields of ``adapter_pass`` (lists kept as tuples), then validate them."""
    for key, val in settings.items():
        object.__setattr__(adapter_pass, key, tuple(val) if isinstance(val, list) else val)
    adapter_pass.__post_init__()


def _check_common_settings(who: str,
                           adapter_pass: SerialAdapterPass | ParallelAdapterPass) -> None:
    """Validate the selection and bottleneck settings both adapter passes share.

    Raises:
        ConfigError: an invalid pattern, width, reduction factor, activation or name.
    """
    as_patterns(adapter_pass.pattern)
    as_patterns(adapter_pass.exclude)
    check_adapter_settings(who, adapter_pass.bottleneck, adapter_pass.reduction_factor,
                           adapter_pass.activation, adapter_pass.adapter_name)


def _attach_adapter(who: str, adapter_pass: SerialAdapterPass | ParallelAdapterPass,
                    module: nn.Module, qname: str, role: str | None, d_in: int, width: int,
                    d_out: int, scaling: float) -> tuple[BottleneckAdapter, dict[str, Any]]:
    """Build a ``d_in → width → d_out`` bottleneck in ``module``'s weight dtype and device and
    register it as ``<qname>.<slot>.<name>``; return it and the tag for its graph nodes.

    Raises:
        AlreadyAdaptedError: ``module`` already has an adapter of this name in this slot.
    """
    adapter = BottleneckAdapter(d_in, width, d_out, activation=adapter_pass.activation,
                                scaling=scaling, pass_name=adapter_pass.name, site=qname,
                                adapter_name=adapter_pass.adapter_name, role=role,
                                dtype=module.weight.dtype, device=module.weight.device)
    register_adapter(module, adapter_pass.slot, adapter_pass.adapter_name, adapter,
                     pass_name=who, site=qname)
    tag = dict(pass_name=adapter_pass.name, site=qname, role=role,
               adapter=adapter_pass.adapter_name)
    return adapter, tag


# --------------------------------------------------------------------------------------
# Serial
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SerialAdapterPass(Pass):
    """Insert a bottleneck ``h + up(act(down(h)))`` on the output ``h`` of anchor layers.

    Where the adapter sits:

    - **Pre-LayerNorm blocks** (LLaMA, GPT-2, the built-in TinyTransformer:
      ``x + proj(f(norm(x)))``): on the projection's output, before the model's residual add
      (and before GPT-2's residual dropout): ``x + adapter(proj(...))``.
    - **Post-LayerNorm blocks** (BERT: ``LayerNorm(x + dropout(proj(f(x))))``): on the
      projection's output, before dropout, the residual add and the LayerNorm:
      ``LayerNorm(x + dropout(adapter(proj(...))))``.

    Either way the model's own residual and norm are left as they are and the adapter adds
    exactly one residual of its own, ``h + up(act(down(h)))``; nothing is added on top of the
    model's residual. If the anchor already carries LoRA or an IA³ output scaling, the adapter
    reads the layer's output as adapted (``W x + s · B A x``, then scaled).

    Args:
        pattern: qualified-name glob(s) or ``re:`` regex of the anchor layers.
        role: structural role(s) of the anchor layers (``"attn_out"``, ``"ffn_down"``, ...).
            ``pattern`` and ``role`` replace the placement's selection.
        exclude: patterns removed from the selection.
        bottleneck: the bottleneck width ``m`` (``down`` is ``d → m``, ``up`` is ``m → d``).
        reduction_factor: ``m = d // reduction_factor`` per anchor; give this or
            ``bottleneck``, not both. With neither, ``reduction_factor=16``.
        activation: ``"gelu"`` (default), ``"relu"``, ``"silu"`` or ``"tanh"``.
        placement: ``"houlsby"``: after every attention output projection (role
            ``attn_out``) and every feed-forward down projection (``ffn_down``);
            ``"pfeiffer"``: after every feed-forward down projection only.
        name: adapter name; modules live at ``<anchor>.adapter.<name>`` (state-dict keys
            ``layers.0.attn.o_proj.adapter.default.down.weight``).

    Anchors are ``nn.Linear`` and transformers' ``Conv1D`` layers; ``d`` is their
    ``out_features``. ``down`` starts as ``nn.Linear`` does, ``up`` at zero (weight and
    bias), so outputs are bitwise unchanged at init; parameters take the anchor weight's
    dtype and device.

    Raises:
        ConfigError: both ``bottleneck`` and ``reduction_factor``, an invalid width, an
            unknown activation or placement, an invalid name (at construction); a reduction
            factor larger than an anchor's width (when run).
        NoMatchError: the selection matches nothing (when run).
        UnsupportedSiteError: ``placement="houlsby"`` (without ``pattern`` / ``role``) on a
            model whose attention is ``nn.MultiheadAttention``, which never calls its output
            projection.
        AlreadyAdaptedError: an anchor already has a serial adapter of this name.
    """

    name: ClassVar[str] = "serial_adapter"
    slot: ClassVar[str] = "adapter"

    pattern: Selector = None
    role: str | Sequence[str] | None = None
    exclude: Selector = None
    bottleneck: int | None = None
    reduction_factor: int | None = None
    activation: str = "gelu"
    placement: str = "houlsby"
    adapter_name: str = "default"

    def __init__(self, *, pattern: Selector = None, role: str | Sequence[str] | None = None,
                 exclude: Selector = None, bottleneck: int | None = None,
                 reduction_factor: int | None = None, activation: str = "gelu",
                 placement: str = "houlsby", name: str = "default") -> None:
        _store_settings(self, dict(pattern=pattern, role=role, exclude=exclude,
                                   bottleneck=bottleneck, reduction_factor=reduction_factor,
                                   activation=activation, placement=placement,
                                   adapter_name=name))

    def __post_init__(self) -> None:
        _check_common_settings("SerialAdapterPass", self)
        if self.placement not in _PLACEMENTS:
            near = near_matches(str(self.placement), _PLACEMENTS)
            raise ConfigError(f"SerialAdapterPass: unknown placement {self.placement!r}; "
                              f"nearest: {', '.join(near)}. Valid placements: "
                              f"{', '.join(_PLACEMENTS)}.")

    def sites(self, model: nn.Module) -> list[Site]:
        """The anchor layers this pass would adapt in the traced ``model``, in graph order.

        Raises:
            NoMatchError: the selection matches nothing.
            UnsupportedSiteError: ``placement="houlsby"`` on a model whose attention is
                ``nn.MultiheadAttention`` (it has no output projection call to follow).
        """
        roles = find_roles(model)
        if self.pattern is None and self.role is None and "attn_out" in _PLACEMENTS[self.placement]:
            mha = roles.with_role(["attention"])
            if mha:
                raise UnsupportedSiteError(
                    f"SerialAdapterPass: placement={self.placement!r} puts an adapter after every "
                    f"attention output projection, but the attention of this model is "
                    f"nn.MultiheadAttention ({', '.join(mha[:5])}), which reads out_proj.weight "
                    f"directly instead of calling out_proj, so there is no output to adapt. Way "
                    f"out: placement='pfeiffer' (feed-forward only), or choose anchors with "
                    f"pattern=... / role=....")
        return resolve_sites(model, pass_name="SerialAdapterPass", pattern=self.pattern,
                             role=self.role, exclude=self.exclude,
                             default_roles=_PLACEMENTS[self.placement], accept=is_linear_layer,
                             accepted_types="nn.Linear / Conv1D", roles=roles)

    def run(self, model: nn.Module) -> PassResult:
        changes: list[Change] = []
        for site in self.sites(model):
            changes.extend(self._adapt(site))
        return PassResult(model, bool(changes), tuple(changes), self.name)

    def _adapt(self, site: Site) -> list[Change]:
        module, qname = site.module, site.qname
        role = site.role.label if site.role else None
        _, d = lora_features(module)
        width = bottleneck_width("SerialAdapterPass", self.bottleneck, self.reduction_factor, d,
                                 qname)
        adapter, tag = _attach_adapter("SerialAdapterPass", self, module, qname, role, d, width,
                                       d, 1.0)
        changes = []
        for call in site.calls:
            graph = editable_graph(call)
            last = site_output(call.node, qname)  # after LoRA's add / IA³'s scaling, if any
            _insert_branch(graph, call, self.slot, self.adapter_name, last, last, None, tag)
            for part in _BRANCH + ("add",):
                changes.append(Change("node_added", self.name, qname, f"{call.prefix}/{part}",
                                      adapter=self.adapter_name, role=role,
                                      detail=f"bottleneck {d} -> {width} -> {d}"))
        changes.extend(_param_changes(self.name, qname, self.slot, adapter, role))
        changes.extend(freeze_site(module, pass_name=self.name, site=qname, role=role))
        return changes


# --------------------------------------------------------------------------------------
# Parallel
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ParallelAdapterPass(Pass):
    """Add ``scaling · up(act(down(x)))`` of a sub-layer's input ``x`` to its output.

    ``sublayer(x) + scaling · up(act(down(x)))`` (He et al. 2022). Which sub-layer:

    - default, or ``role="ffn"``: every feed-forward block (He et al.'s best placement). The
      adapter reads the input of the block's up (and gate) projection and joins the output
      of its down projection, before the model's residual add (and, post-LN, before the
      dropout, residual and LayerNorm).
    - ``role="attention"`` (or ``"attn"``): every attention sub-layer: the input of the query
      projection (a fused qkv projection counts) to the output of the output projection.
    - ``pattern=...`` without ``role``: each selected linear layer on its own, from its input
      to its output.
    - ``pattern=...`` with ``role``: the sub-layers of that role that have a layer matching
      the pattern (``pattern="layers.0.**"`` takes block 0 only); ``exclude`` removes
      sub-layers the same way.

    On the export front end the input and the output may live in different graphs (BERT's
    ``intermediate.dense`` and ``output.dense``); the input is passed across the module
    boundary through the call arguments (an existing argument that carries it is reused).

    Args:
        pattern: qualified-name glob(s) or ``re:`` regex (see above).
        role: ``"ffn"`` / ``"feedforward"`` or ``"attention"`` / ``"attn"``.
        exclude: patterns removing sites or sub-layers.
        bottleneck: the bottleneck width ``m``.
        reduction_factor: ``m = d_in // reduction_factor``; give this or ``bottleneck``, not
            both. With neither, ``reduction_factor=16``.
        scaling: the factor ``s`` on the branch (He et al.: 4).
        activation: ``"relu"`` (default, as He et al.), ``"gelu"``, ``"silu"`` or ``"tanh"``.
        name: adapter name; modules live at ``<output layer>.parallel_adapter.<name>``.

    ``down`` maps the input width to ``m``, ``up`` maps ``m`` to the output layer's
    ``out_features``; ``up`` starts at zero (weight and bias), so outputs are bitwise
    unchanged at init.

    Raises:
        ConfigError: invalid settings (at construction); a reduction factor larger than a
            width (when run).
        NoMatchError: the selection matches nothing, or the model has no sub-layer of the
            role asked for.
        UnsupportedSiteError: the attention is ``nn.MultiheadAttention`` (no projection
            calls), or the input cannot be passed to the output's graph.
        AlreadyAdaptedError: an output layer already has a parallel adapter of this name.
    """

    name: ClassVar[str] = "parallel_adapter"
    slot: ClassVar[str] = "parallel_adapter"

    pattern: Selector = None
    role: str | Sequence[str] | None = None
    exclude: Selector = None
    bottleneck: int | None = None
    reduction_factor: int | None = None
    scaling: float = 4.0
    activation: str = "relu"
    adapter_name: str = "default"

    def __init__(self, *, pattern: Selector = None, role: str | Sequence[str] | None = None,
                 exclude: Selector = None, bottleneck: int | None = None,
                 reduction_factor: int | None = None, scaling: float = 4.0,
                 activation: str = "relu", name: str = "default") -> None:
        _store_settings(self, dict(pattern=pattern, role=role, exclude=exclude,
                                   bottleneck=bottleneck, reduction_factor=reduction_factor,
                                   scaling=scaling, activation=activation, adapter_name=name))

    def __post_init__(self) -> None:
        _check_common_settings("ParallelAdapterPass", self)
        if (not isinstance(self.scaling, (int, float)) or isinstance(self.scaling, bool)
                or self.scaling != self.scaling or abs(self.scaling) == float("inf")):
            raise ConfigError(f"ParallelAdapterPass: scaling must be a finite number, got "
                              f"{self.scaling!r}")
        self._kinds()

    def _kinds(self) -> tuple[str, ...]:
        """The sub-layer kinds asked for (``("ffn",)`` by default; ``()`` for single layers).

        Raises:
            ConfigError: an unknown role.
        """
        if self.role is None:
            return () if self.pattern is not None else ("ffn",)
        items = (self.role,) if isinstance(self.role, str) else tuple(self.role)
        out = []
        for item in items:
            if item not in _SUBLAYER_ROLES:
                near = near_matches(str(item), _SUBLAYER_ROLES)
                raise ConfigError(
                    f"ParallelAdapterPass: role must name a sub-layer, 'ffn' or 'attention', "
                    f"got {item!r} (nearest: {', '.join(near)}). To span a single layer, select "
                    f"it with pattern=... and no role.")
            out.append(_SUBLAYER_ROLES[item])
        return tuple(dict.fromkeys(out))

    def sublayers(self, model: nn.Module) -> list[SubLayer]:
        """The sub-layers this pass would adapt in the traced ``model``, in graph order.

        Raises:
            NoMatchError: the selection matches nothing, or no sub-layer of the role exists.
            UnsupportedSiteError: attention sub-layers asked of ``nn.MultiheadAttention``.
        """
        g = build_dataflow(model)
        roles = find_roles(model, g)
        if not self._kinds():
            sites = resolve_sites(model, pass_name="ParallelAdapterPass", pattern=self.pattern,
                                  role=None, exclude=self.exclude, default_roles=(),
                                  accept=is_linear_layer, accepted_types="nn.Linear / Conv1D",
                                  roles=roles)
            return [SubLayer("layer", s, (s.qname,), tuple((c, c) for c in s.calls)) for s in sites]
        found: list[SubLayer] = []
        for kind in self._kinds():
            subs = find_sublayers(model, kind, dataflow=g, roles=roles)
            if not subs:
                found_roles = sorted({r for i in roles.modules.values() for r in i.roles})
                if kind == "attention" and "attention" in found_roles:
                    raise UnsupportedSiteError(
                        f"ParallelAdapterPass: the attention of this model is "
                        f"nn.MultiheadAttention ({', '.join(roles.with_role(['attention'])[:5])}), "
                        f"which computes its projections inside one call: there is no query "
                        f"projection input or output projection call to bridge. Way out: "
                        f"role='ffn', or select single layers with pattern=....")
                what = "feed-forward block" if kind == "ffn" else "attention sub-layer"
                raise NoMatchError(
                    f"ParallelAdapterPass: no {what} was found (roles found: "
                    f"{', '.join(found_roles) or 'none'}). Way out: select single layers with "
                    f"pattern=..., see surgery.list_targets(model).")
            found.extend(subs)
        return self._filter(found)

    def _filter(self, subs: list[SubLayer]) -> list[SubLayer]:
        members = [m for s in subs for m in s.members]
        for what, pats in (("pattern", as_patterns(self.pattern)), ("exclude pattern",
                                                                  as_patterns(self.exclude))):
            for pat in pats:
                if not any(matches(pat, m) for m in members):
                    raise NoMatchError(
                        f"ParallelAdapterPass: {what} {pat!r} matches no layer of the "
                        f"{'/'.join(self._kinds())} sub-layers; nearest: "
                        f"{', '.join(near_matches(pat, members))}.")
        keep = subs
        if self.pattern is not None:
            keep = [s for s in keep if any(matches(p, m) for p in as_patterns(self.pattern)
                                           for m in s.members)]
        if self.exclude is not None:
            keep = [s for s in keep if not any(matches(p, m) for p in as_patterns(self.exclude)
                                               for m in s.members)]
        if not keep:
            raise NoMatchError("ParallelAdapterPass: exclude= removes every selected sub-layer.")
        return keep

    def run(self, model: nn.Module) -> PassResult:
        changes: list[Change] = []
        for sub in self.sublayers(model):
            changes.extend(self._adapt(model, sub))
        return PassResult(model, bool(changes), tuple(changes), self.name)

    def _adapt(self, model: nn.Module, sub: SubLayer) -> list[Change]:
        site = sub.output
        module, qname = site.module, site.qname
        role = sub.kind if sub.kind != "layer" else (site.role.label if site.role else None)
        widths = {lora_features(model.get_submodule(q))[0] for q in sub.inputs}
        if len(widths) != 1:
            raise UnsupportedSiteError(
                f"ParallelAdapterPass: the input layers of {qname} ({', '.join(sub.inputs)}) "
                f"read different widths {sorted(widths)}.")
        d_in = widths.pop()
        d_out = lora_features(module)[1]
        width = bottleneck_width("ParallelAdapterPass", self.bottleneck, self.reduction_factor,
                                 d_in, qname)
        adapter, tag = _attach_adapter("ParallelAdapterPass", self, module, qname, role, d_in,
                                       width, d_out, float(self.scaling))
        changes = []
        detail = f"reads the input of {sub.inputs[0]}; bottleneck {d_in} -> {width} -> {d_out}"
        for in_call, out_call in sub.calls:
            x = call_input(in_call.node)
            if not isinstance(x, fx.Node):
                raise UnsupportedSiteError(f"ParallelAdapterPass: the input of {in_call.qname} is "
                                           f"a constant, not a graph value.")
            x, carried = carry_value(model, x, in_call.prefix, out_call.prefix,
                                     who="ParallelAdapterPass",
                                     what=f"the input of {in_call.qname}", **tag)
            for prefix in carried:
                changes.append(Change("node_added", self.name, qname, f"{prefix}/carry",
                                      adapter=self.adapter_name, role=role,
                                      detail=f"passes the input of {in_call.qname} into {prefix}"))
            graph = editable_graph(out_call)
            last = site_output(out_call.node, qname)
            _insert_branch(graph, out_call, self.slot, self.adapter_name, x, last,
                           float(self.scaling), tag)
            for part in _BRANCH + ("scale", "add"):
                changes.append(Change("node_added", self.name, qname, f"{out_call.prefix}/{part}",
                                      adapter=self.adapter_name, role=role, detail=detail))
        changes.extend(_param_changes(self.name, qname, self.slot, adapter, role))
        changes.extend(freeze_site(module, pass_name=self.name, site=qname, role=role))
        return changes
