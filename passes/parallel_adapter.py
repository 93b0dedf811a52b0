"""Parallel bottleneck adapters as a site-graph rewrite (He et al. 2022, "Towards a Unified
View of Parameter-Efficient Transfer Learning").

``sub(x) + scaling · up(act(down(x)))``: the adapter reads a sub-layer's input ``x`` and adds
to its output. The sub-layer becomes a site graph at its own name; before, for
``layers.0.mlp``::

    def forward(self, x):
        up_proj = self.up_proj(x)
        act = self.act(up_proj)
        down_proj = self.down_proj(act)
        return down_proj

After::

    def forward(self, x):
        up_proj = self.up_proj(x)
        act = self.act(up_proj)
        down_proj = self.down_proj(act)
        parallel_adapter_default_down = self.parallel_adapter.default.down(x)
        parallel_adapter_default_act = self.parallel_adapter.default.act(parallel_adapter_default_down)
        parallel_adapter_default_up = self.parallel_adapter.default.up(parallel_adapter_default_act)
        mul = parallel_adapter_default_up * 4.0                # scaling
        add = down_proj + mul
        return add

``up`` starts with zero weight and bias, so outputs are bitwise unchanged at init. Which
sub-layers, and where the adapter reads and joins in them: :mod:`passes.sublayers`,
:mod:`passes.branch_points`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from passes.bottleneck_rewrite import attach_bottleneck, select_sites, store_settings
from passes.branch_points import branch_points
from passes.sublayers import SubLayer, find_sublayers, is_linear_layer, map_roles
from surgery.errors import ConfigError, NoMatchError, UnsupportedSiteError, near_matches
from surgery.pass_base import Change, Pass, PassResult
from surgery.select import Selector, as_patterns, matches
from surgery.sites.rewrite import freeze_site
from surgery.sites.site_graph import site_graph_at
from surgery.targets import model_map

__all__ = ["ParallelAdapterPass"]

_SUBLAYER_ROLES = {"ffn": "ffn", "feedforward": "ffn", "attention": "attention",
                   "attn": "attention"}
_WHAT = {"ffn": "feed-forward block", "attention": "attention sub-layer"}


@dataclass(frozen=True, kw_only=True)
class ParallelAdapterPass(Pass):
    """Add ``scaling · up(act(down(x)))`` of a sub-layer's input ``x`` to its output.

    ``sub(x) + scaling · up(act(down(x)))`` (He et al. 2022). Which sub-layer:

    - default, or ``role="ffn"``: every feed-forward block (He et al.'s best placement). The
      site is the smallest module holding the block's projections (``layers.0.mlp``); the
      adapter reads the input of the up (and gate) projection and joins the output of the
      down projection, before anything after it (GPT-2's dropout; BERT's dropout, residual
      and LayerNorm). Where up and down sit in sibling modules (BERT), the site is the
      module holding the down projection, and the adapter reads the argument that carries
      the up projection's input (``encoder.layer.0.output``, ``input_tensor``).
    - ``role="attention"`` (or ``"attn"``): every attention sub-layer, from the input of
      the query projection (a fused qkv projection counts) to the output of the output
      projection, in the smallest module holding both (``layers.0.attn``). Transformers'
      attention modules cannot be traced (their code reads ``self.training``); this raises.
    - ``pattern=...`` without ``role``: each selected linear layer on its own, from its
      input to its output; a pattern that matches no linear layer selects the modules it
      names (``pattern="mlp"``): ``sub(x) + scaling · up(act(down(x)))`` on the module's
      first argument and output, which must have the same width.
    - ``pattern=...`` with ``role``: the sub-layers of that role with a layer (or module)
      matching the pattern (``pattern="layers.0.**"`` takes block 0 only); ``exclude``
      removes sub-layers the same way.

    Roles need the map (``example_inputs=`` for transformers models); patterns need none.

    Args:
        pattern: qualified-name glob(s) or ``re:`` regex (see above).
        role: ``"ffn"`` / ``"feedforward"`` or ``"attention"`` / ``"attn"``.
        exclude: patterns removing sites or sub-layers.
        bottleneck: the bottleneck width ``m``.
        reduction_factor: ``m = d_in // reduction_factor``; give this or ``bottleneck``, not
            both. With neither, ``reduction_factor=16``.
        scaling: the factor ``s`` on the branch (He et al.: 4).
        activation: ``"relu"`` (default, as He et al.), ``"gelu"``, ``"silu"`` or ``"tanh"``.
        name: adapter name; modules live at ``<site>.parallel_adapter.<name>``
            (``layers.0.mlp.parallel_adapter.default.down.weight``).

    ``down`` maps the input width to ``m``, ``up`` maps ``m`` to the output width; ``up``
    starts at zero (weight and bias); parameters take the dtype and device of the output
    layer's weight.

    Raises:
        ConfigError: invalid settings (at construction); a reduction factor larger than a
            width (when run).
        NoMatchError: the selection matches nothing, or the model has no sub-layer of the
            role asked for.
        UnsupportedSiteError: the attention is ``nn.MultiheadAttention`` (no projection
            calls); the module holding a sub-layer cannot be traced or does not return one
            tensor; a module named by pattern returns a width other than its input's.
        AlreadyAdaptedError: a site already has a parallel adapter of this name.
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
        store_settings(self, dict(pattern=pattern, role=role, exclude=exclude,
                                  bottleneck=bottleneck, reduction_factor=reduction_factor,
                                  scaling=scaling, activation=activation, adapter_name=name))

    def __post_init__(self) -> None:
        if (not isinstance(self.scaling, (int, float)) or isinstance(self.scaling, bool)
                or self.scaling != self.scaling or abs(self.scaling) == float("inf")):
            raise ConfigError(f"ParallelAdapterPass: scaling must be a finite number, got "
                              f"{self.scaling!r}. Way out: a number such as 1.0 (the default) "
                              f"or 4.0 (He et al.'s choice for the feed-forward adapter).")
        self._kinds()

    def _kinds(self) -> tuple[str, ...]:
        """The sub-layer kinds asked for (``("ffn",)`` by default; ``()`` for a selection by
        pattern alone).

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
        """The spans this pass would adapt in ``model``, in module order.

        Raises:
            NoMatchError: the selection matches nothing, or no sub-layer of the role exists.
            UnsupportedSiteError: attention sub-layers asked of ``nn.MultiheadAttention``.
            TraceError: a role is asked for and the map cannot be traced.
        """
        if not self._kinds():
            sites = select_sites(model, pass_name="ParallelAdapterPass", pattern=self.pattern,
                                 role=None, exclude=self.exclude, default_roles=())
            return [SubLayer("layer", s.qname, role=s.label) if is_linear_layer(s.base)
                    else SubLayer("module", s.qname) for s in sites]
        found: list[SubLayer] = []
        for kind in self._kinds():
            subs = find_sublayers(model, kind)
            if not subs:
                roles = map_roles(model_map(model))
                found_roles = sorted({r for i in roles.modules.values() for r in i.roles})
                if kind == "attention" and "attention" in found_roles:
                    raise UnsupportedSiteError(
                        f"ParallelAdapterPass: the attention of this model is "
                        f"nn.MultiheadAttention ({', '.join(roles.with_role(['attention'])[:5])}), "
                        f"which computes its projections inside one call: there is no query "
                        f"projection input or output projection call to bridge. Way out: "
                        f"role='ffn', or select single layers with pattern=....")
                raise NoMatchError(
                    f"ParallelAdapterPass: no {_WHAT[kind]} was found (roles found: "
                    f"{', '.join(found_roles) or 'none'}). Way out: select single layers or "
                    f"modules with pattern=..., see surgery.list_targets(model).")
            found.extend(subs)
        return self._filter(found)

    def _filter(self, subs: list[SubLayer]) -> list[SubLayer]:
        members = [m for s in subs for m in s.members]
        for what, pats in (("pattern", as_patterns(self.pattern)),
                           ("exclude pattern", as_patterns(self.exclude))):
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
        root = model
        for sub in self.sublayers(model):
            root, more = self._adapt(root, sub)
            changes.extend(more)
        return PassResult(root, bool(changes), tuple(changes), self.name)

    def _adapt(self, root: nn.Module, sub: SubLayer) -> tuple[nn.Module, list[Change]]:
        who, qname = "ParallelAdapterPass", sub.module
        try:
            root, sg = site_graph_at(root, qname, who=who)
        except UnsupportedSiteError as exc:
            if sub.kind not in _WHAT:
                raise
            way = ("role='ffn' (the feed-forward blocks), or an adapter beside single layers "
                   f"with pattern='{sub.output}'" if sub.kind == "attention" else
                   f"an adapter beside single layers with pattern='{sub.output}'")
            reason = str(exc).split(" Way out:")[0].removeprefix(f"{who}: ")
            raise UnsupportedSiteError(
                f"{who}: the {_WHAT[sub.kind]} from {sub.inputs[0]} to {sub.output} needs a "
                f"site graph of the smallest module holding both, and {reason} Way out: "
                f"{way}.") from exc
        branch = branch_points(root, sg, sub, who=who)
        if sub.kind == "module" and branch.in_features != branch.out_features:
            raise UnsupportedSiteError(
                f"{who}: {qname or 'the model'} ({type(sg.template).__name__}) reads width "
                f"{branch.in_features} and returns width {branch.out_features}; a parallel "
                f"adapter on a module adds to its output a function of its input, of the same "
                f"width. Way out: select the layers inside it (pattern='{qname}.*'), or a "
                f"module whose output has its input's width.")
        changes = attach_bottleneck(self, sg, qname, sub.role, branch.reads, branch.joins,
                                    branch.in_features, branch.out_features, branch.weight,
                                    float(self.scaling))
        changes.extend(freeze_site(sg, pass_name=self.name, site=qname, role=sub.role))
        return root, changes
