"""Serial bottleneck adapters as a site-graph rewrite (Houlsby et al. 2019,
"Parameter-Efficient Transfer Learning for NLP"; Pfeiffer et al. 2021, "AdapterFusion").

A serial adapter wraps a module ``sub`` (an attention output projection, a feed-forward down
projection, or a named sub-layer such as ``mlp``) as ``h = sub(x); h + up(act(down(h)))``.
The module becomes a site graph at its own name; before, for ``layers.0.mlp``::

    def forward(self, x):
        up_proj = self.up_proj(x)
        act = self.act(up_proj)
        down_proj = self.down_proj(act)
        return down_proj

After::

    def forward(self, x):
        ...
        down_proj = self.down_proj(act)                      # h
        adapter_default_down = self.adapter.default.down(down_proj)   # (..., d) -> (..., m)
        adapter_default_act = self.adapter.default.act(adapter_default_down)
        adapter_default_up = self.adapter.default.up(adapter_default_act)  # zero at init
        add = down_proj + adapter_default_up                 # the adapter's own residual
        return add

``up`` starts with zero weight and bias, so outputs are bitwise unchanged at init. Parameters
read ``layers.0.mlp.adapter.default.down.weight`` (``<site>.adapter.<name>.<part>``); the
parallel adapter is :class:`passes.parallel_adapter.ParallelAdapterPass`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from passes.bottleneck_rewrite import attach_bottleneck, select_sites, store_settings
from passes.branch_points import output_layer
from passes.parallel_adapter import ParallelAdapterPass
from passes.sublayers import is_linear_layer
from surgery.errors import ConfigError, UnsupportedSiteError, near_matches
from surgery.pass_base import Change, Pass, PassResult
from surgery.select import Selector
from surgery.sites.features import layer_features
from surgery.sites.rewrite import freeze_site, site_output
from surgery.sites.site_graph import site_graph_at
from surgery.targets import Site, model_roles

__all__ = ["SerialAdapterPass", "ParallelAdapterPass"]

_PLACEMENTS: dict[str, tuple[str, ...]] = {"houlsby": ("attn_out", "ffn_down"),
                                           "pfeiffer": ("ffn_down",)}


@dataclass(frozen=True, kw_only=True)
class SerialAdapterPass(Pass):
    """Insert a bottleneck ``h + up(act(down(h)))`` on the output ``h`` of selected modules.

    Where the adapter sits:

    - **Anchor layers** (``nn.Linear`` / transformers' ``Conv1D``, chosen by placement, role
      or pattern): on the layer's output, before anything the model does with it. In
      pre-LayerNorm blocks (LLaMA, GPT-2: ``x + proj(f(norm(x)))``) that is before the
      model's residual add (and GPT-2's residual dropout); in post-LayerNorm blocks (BERT:
      ``LayerNorm(x + dropout(proj(f(x))))``) before the dropout, residual and LayerNorm.
    - **Sub-layers** named by pattern (``pattern="mlp"``, ``"attn"``: any module holding
      linear layers whose ``forward`` returns one tensor): ``h = sub(x); h + up(act(down(h)))``.

    Either way the model's own residual and norm are left as they are and the adapter adds
    exactly one residual of its own. If the layer already carries LoRA or an IA³ output
    scaling, the adapter reads its output as adapted (``W x + s · B A x``, then scaled).

    Args:
        pattern: qualified-name glob(s) or ``re:`` regex; a pattern that matches linear
            layers selects them, one that matches none selects the sub-layers it names
            (:func:`passes.bottleneck_rewrite.select_sites`).
        role: structural role(s) of the anchor layers (``"attn_out"``, ``"ffn_down"``, ...).
            ``pattern`` and ``role`` replace the placement's selection.
        exclude: patterns removed from the selection.
        bottleneck: the bottleneck width ``m`` (``down`` is ``d → m``, ``up`` is ``m → d``).
        reduction_factor: ``m = d // reduction_factor`` per site; give this or
            ``bottleneck``, not both. With neither, ``reduction_factor=16``.
        activation: ``"gelu"`` (default), ``"relu"``, ``"silu"`` or ``"tanh"``.
        placement: ``"houlsby"``: after every attention output projection (role
            ``attn_out``) and every feed-forward down projection (``ffn_down``);
            ``"pfeiffer"``: after every feed-forward down projection only. Roles need the
            map (``example_inputs=`` for transformers models); patterns need none.
        name: adapter name; modules live at ``<site>.adapter.<name>`` (state-dict keys
            ``layers.0.attn.o_proj.adapter.default.down.weight``).

    ``d`` is the site's output width (a layer's ``out_features``; for a sub-layer, that of
    the linear layer making its output). ``down`` starts as ``nn.Linear`` does, ``up`` at
    zero (weight and bias); parameters take the dtype and device of that layer's weight.

    Raises:
        ConfigError: both ``bottleneck`` and ``reduction_factor``, an invalid width, an
            unknown activation or placement, an invalid name (at construction); a reduction
            factor larger than a site's width (when run).
        NoMatchError: the selection matches nothing (when run).
        UnsupportedSiteError: ``placement="houlsby"`` (without ``pattern`` / ``role``) on a
            model whose attention is ``nn.MultiheadAttention``, which never calls its output
            projection; a named sub-layer that torch.fx cannot trace, that does not return
            one tensor, or whose output width cannot be told.
        AlreadyAdaptedError: a site already has a serial adapter of this name.
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
        store_settings(self, dict(pattern=pattern, role=role, exclude=exclude,
                                  bottleneck=bottleneck, reduction_factor=reduction_factor,
                                  activation=activation, placement=placement, adapter_name=name))

    def __post_init__(self) -> None:
        if self.placement not in _PLACEMENTS:
            near = near_matches(str(self.placement), _PLACEMENTS)
            raise ConfigError(f"SerialAdapterPass: unknown placement {self.placement!r}; "
                              f"nearest: {', '.join(near)}. Valid placements: "
                              f"{', '.join(_PLACEMENTS)}.")

    def sites(self, model: nn.Module) -> list[Site]:
        """The layers and sub-layers this pass would adapt in ``model``, in module order.

        Raises:
            NoMatchError: the selection matches nothing.
            UnsupportedSiteError: ``placement="houlsby"`` on a model whose attention is
                ``nn.MultiheadAttention`` (it has no output projection call to follow).
        """
        if self.pattern is None and self.role is None and "attn_out" in _PLACEMENTS[self.placement]:
            mha = model_roles(model).with_role(["attention"])
            if mha:
                raise UnsupportedSiteError(
                    f"SerialAdapterPass: placement={self.placement!r} puts an adapter after every "
                    f"attention output projection, but the attention of this model is "
                    f"nn.MultiheadAttention ({', '.join(mha[:5])}), which reads out_proj.weight "
                    f"directly instead of calling out_proj, so there is no output to adapt. Way "
                    f"out: placement='pfeiffer' (feed-forward only), or choose sites with "
                    f"pattern=... / role=....")
        return select_sites(model, pass_name="SerialAdapterPass", pattern=self.pattern,
                            role=self.role, exclude=self.exclude,
                            default_roles=_PLACEMENTS[self.placement])

    def run(self, model: nn.Module) -> PassResult:
        changes: list[Change] = []
        root = model
        for site in self.sites(model):
            root, sg = site_graph_at(root, site.qname, who="SerialAdapterPass",
                                     aliases=site.aliases)
            if is_linear_layer(site.base):
                d, weight = layer_features(sg)[1], sg.weight
            else:
                layer = output_layer(sg, who="SerialAdapterPass")
                d, weight = layer_features(layer)[1], layer.weight
            last = site_output(sg)  # after LoRA's add / IA³'s scaling, if any
            changes.extend(attach_bottleneck(self, sg, site.qname, site.label, last, last, d, d,
                                             weight, None))
            changes.extend(freeze_site(sg, pass_name=self.name, site=site.qname, role=site.label))
        return PassResult(root, bool(changes), tuple(changes), self.name)
