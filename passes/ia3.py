"""IA³ as a graph rewrite (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is
Better and Cheaper than In-Context Learning").

Output scaling (keys, values), before and after::

    k = k_proj(x)            l = k_proj.ia3_l.default                   # a parameter
                             k = k_proj.ia3.default(k_proj(x), l)       # k_proj(x) * l

Input scaling (feed-forward output layers)::

    y = down_proj(h)         y = down_proj(down_proj.ia3.default(h, l))  # down_proj(h * l)

``l`` starts at ones, so outputs are bitwise unchanged at init. It is the parameter
``<layer>.ia3_l.<adapter>`` with PEFT's name and shape: ``(out, 1)`` for output scaling,
``(1, in)`` for input scaling, ``(1, channels, 1, 1)`` / ``(1, channels, 1, 1, 1)`` on
``nn.Conv2d`` / ``nn.Conv3d``; so a PEFT IA³ model's state dict, stripped of
``base_model.model.``, loads into the adapted model and back. The module
``<layer>.ia3.<adapter>`` (an :class:`~passes.modules.IA3Vector`, no parameters of its
own) applies it. On a fused qkv projection (GPT-2's ``c_attn``) with ``fused="key_value"``
only the key and value slices of ``l`` are learned, so the parameter is ``(2/3 · out,
1)`` where PEFT's whole-layer vector is ``(out, 1)`` (``fused="all"`` gives PEFT's); the
query slice is fixed at one. On convolutions (selected by pattern, as PEFT's IA³ allows
them) ``l`` scales the channel dimension: output channels, or input channels for a
feed-forward layer.

On a layer that already carries a LoRA branch, IA³ scales the layer as adapted, whatever
the order the passes ran in: ``(W x + s · B A x) * l`` for output scaling and
``W (x * l) + s · B A (x * l)`` for input scaling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from torch import fx, nn

from passes.lora import lora_features
from passes.lora_layers import is_plain_conv
from passes.modules import IA3_MODULES, IA3_SLOT, IA3Vector
from surgery.adapters.names import check_adapter_name
from surgery.errors import ConfigError, NoMatchError, near_matches
from surgery.map.leaves import is_dense_linear
from surgery.pass_base import Change, Pass, PassResult
from surgery.select import Selector, as_patterns, matches
from surgery.sites.marker import AdapterParameters
from surgery.sites.features import require_plain_weight
from surgery.sites.rewrite import (
    freeze_site,
    insert_after,
    mark,
    register_adapter,
    replace_uses_after,
    site_input,
    site_output,
)
from surgery.sites.site_graph import site_graph_at
from surgery.targets import Site, resolve_sites, with_roles

__all__ = ["IA3Pass"]


def _accept(module: nn.Module) -> bool:
    return is_dense_linear(module) or (is_plain_conv(module)
                                      and isinstance(module, (nn.Conv2d, nn.Conv3d)))


@dataclass(frozen=True, kw_only=True)
class IA3Pass(Pass):
    """Scale activations by learned vectors initialised to ones.

    Args:
        pattern: qualified-name glob(s) or ``re:`` regex of layers to scale.
        role: structural role(s). With neither, keys, values and feed-forward down
            projections are selected (the paper's choice).
        exclude: patterns removed from the selection.
        feedforward: pattern(s) naming which selected layers are feed-forward output layers,
            whose *input* is scaled; ``None`` = the layers with role ``ffn_down``; ``[]`` =
            none of them (every selected layer scales its output).
        fused: on a fused qkv projection whose role is known, ``"key_value"`` (default)
            learns only the key and value slices of the output, as the paper scales keys
            and values; ``"all"`` learns the whole output, as PEFT does on GPT-2's
            ``c_attn`` (the only choice where roles are unknown: selection by pattern).
        name: adapter name, any string without ``"."`` as in PEFT (``"test-adapter"``).

    A vector is the parameter ``<layer>.ia3_l.<name>``, shaped as PEFT's: ``(out_features,
    1)`` for output scaling and ``(1, in_features)`` for input scaling (``(2/3 ·
    out_features, 1)`` on a fused qkv layer with ``fused="key_value"``: key and value only),
    in the dtype and on the device of the layer's weight.

    Sites: ``nn.Linear`` and transformers' ``Conv1D``; by pattern also ``nn.Conv2d`` and
    ``nn.Conv3d`` running torch's own forward (as PEFT's IA³), whose vector is
    ``(1, channels, 1, 1)`` / ``(1, channels, 1, 1, 1)`` (output channels, or input channels
    for a feed-forward layer) and scales the channel dimension (groups included in the
    merge). Selection by role alone picks linear layers only.

    Raises:
        NoMatchError: the selection, or a ``feedforward`` pattern, matches nothing.
        AlreadyAdaptedError: a selected layer already has an IA³ vector of this name.
        ConfigError: the adapter's name is an attribute of the slot holding the vectors
            (``"training"``, ``"forward"``, ...), which a parameter cannot take.
    """

    name: ClassVar[str] = "ia3"
    default_roles: ClassVar[tuple[str, ...]] = ("key", "value", "ffn_down")
    peft_spellings: ClassVar[dict[str, str]] = {
        "target_modules": "pattern", "feedforward_modules": "feedforward",
        "exclude_modules": "exclude"}
    """PEFT's ``IA3Config`` names answered with ours (see :class:`surgery.pass_base.Pass`)."""

    pattern: Selector = None
    role: str | Sequence[str] | None = None
    exclude: Selector = None
    feedforward: Selector = None
    fused: str = "key_value"
    adapter_name: str = "default"

    def __init__(self, *, pattern: Selector = None, role: str | Sequence[str] | None = None,
                 exclude: Selector = None, feedforward: Selector = None,
                 fused: str = "key_value", name: str = "default") -> None:
        for key, val in (("pattern", pattern), ("role", role), ("exclude", exclude),
                         ("feedforward", feedforward), ("fused", fused), ("adapter_name", name)):
            object.__setattr__(self, key, tuple(val) if isinstance(val, list) else val)
        try:
            as_patterns(self.pattern)
            as_patterns(self.exclude)
            if self.feedforward != ():  # an empty list: no selected layer is feed-forward
                as_patterns(self.feedforward)
        except ConfigError as exc:
            raise ConfigError(f"IA3Pass: {exc}") from exc
        if fused not in ("key_value", "all"):
            raise ConfigError(f"IA3Pass: fused must be 'key_value' or 'all', got {fused!r}")
        check_adapter_name("IA3Pass", name)

    def sites(self, model: nn.Module) -> list[Site]:
        """The sites this pass would adapt in ``model`` (convolutions only when a pattern
        is given)."""
        by_pattern = self.pattern is not None
        return resolve_sites(model, pass_name="IA3Pass", pattern=self.pattern, role=self.role,
                             exclude=self.exclude, default_roles=self.default_roles,
                             accept=_accept if by_pattern else is_dense_linear,
                             accepted_types=("nn.Linear / Conv1D / nn.Conv2d / nn.Conv3d"
                                             if by_pattern else "nn.Linear / Conv1D"))

    def _is_feedforward(self, site: Site) -> bool:
        if self.feedforward is None:
            return bool(site.role and "ffn_down" in site.role.roles)
        if self.feedforward == ():
            return False
        return any(matches(p, site.qname) for p in as_patterns(self.feedforward))

    def run(self, model: nn.Module) -> PassResult:
        sites = with_roles(
            model, self.sites(model), pass_name="IA3Pass", required=self.feedforward is None,
            why="telling feed-forward output layers (scaled at their input) from the others "
                "goes by structural role when feedforward= is not given. Way out: "
                "feedforward=[...] naming them (feedforward=[] for none), or example_inputs=")
        if self.feedforward:  # None: by role; (): none of them
            for pat in as_patterns(self.feedforward):
                if not any(matches(pat, s.qname) for s in sites):
                    raise NoMatchError(
                        f"IA3Pass: feedforward pattern {pat!r} matches none of the selected "
                        f"layers; nearest: {', '.join(near_matches(pat, [s.qname for s in sites]))}. "
                        f"Way out: feedforward names a subset of the selection.")
        changes: list[Change] = []
        root = model
        for site in sites:
            root, more = self._adapt(root, site, self._is_feedforward(site))
            changes.extend(more)
        return PassResult(root, bool(changes), tuple(changes), self.name)

    def _adapt(self, model: nn.Module, site: Site, feedforward: bool
               ) -> tuple[nn.Module, list[Change]]:
        qname, role = site.qname, site.label
        require_plain_weight(qname, site.base, who="IA3Pass")
        in_f, out_f = lora_features(site.base)
        parts = None
        if (not feedforward and self.fused == "key_value" and site.role is not None
                and site.role.is_fused):
            parts = [site.role.fused[r] for r in ("key", "value") if r in site.role.fused]
        root, sg = site_graph_at(model, qname, who="IA3Pass", aliases=site.aliases)
        vec = IA3Vector(in_f if feedforward else out_f, parts=parts,
                        mode="input" if feedforward else "output", site=qname,
                        adapter_name=self.adapter_name, role=role,
                        spatial=sg.weight.dim() - 2 if is_plain_conv(site.base) else 0)
        param = vec.new_parameter(dtype=sg.weight.dtype, device=sg.weight.device)
        if IA3_SLOT not in sg._modules:
            sg.add_module(IA3_SLOT, AdapterParameters(pass_name=self.name))
        # refuses a second vector of this name (a pass that raises leaves no trace: atomic)
        sg._modules[IA3_SLOT].add(self.adapter_name, param, who="IA3Pass", site=qname,
                                  slot=IA3_SLOT)
        register_adapter(sg, IA3_MODULES, self.adapter_name, vec, pass_name="IA3Pass",
                         site=qname)
        tag = dict(pass_name=self.name, site=qname, role=role, adapter=self.adapter_name)
        graph = sg.graph
        target = f"{IA3_MODULES}.{self.adapter_name}"

        def scale(node: fx.Node) -> fx.Node:
            scales = mark(graph.get_attr(f"{IA3_SLOT}.{self.adapter_name}"), **tag, part=IA3_SLOT)
            return mark(graph.call_module(target, (node, scales)), **tag, part=IA3_MODULES)

        if feedforward:  # the layer as adapted so far reads x * l: base and branches
            x = site_input(sg)
            scaled = insert_after(graph, x, lambda: scale(x))
            replace_uses_after(x, scaled)
        else:  # scale the layer's output as adapted so far (after LoRA's add, if any)
            last = site_output(sg)
            out = insert_after(graph, last, lambda: scale(last))
            replace_uses_after(last, out)
        changes = [Change("node_added", self.name, qname, f"{qname}/{IA3_MODULES}",
                          adapter=self.adapter_name, role=role,
                          detail="input scaling" if feedforward else "output scaling"),
                   Change("param_added", self.name, qname,
                          f"{qname}.{IA3_SLOT}.{self.adapter_name}" if qname
                          else f"{IA3_SLOT}.{self.adapter_name}",
                          adapter=self.adapter_name, role=role,
                          shape=tuple(param.shape), numel=param.numel(),
                          trainable=True)]
        changes.extend(freeze_site(sg, pass_name=self.name, site=qname, role=role))
        return root, changes
