"""LoRA as a graph rewrite (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
Models"; rsLoRA: Kalajdzievski 2023).

Each selected layer becomes a site graph (:mod:`surgery.sites.site_graph`) at its own
qualified name. Before, the site graph of ``q_proj`` (an ``nn.Linear``)::

    def forward(self, input):
        linear = torch._C._nn.linear(input, self.weight, self.bias)
        return linear

After::

    def forward(self, input):
        linear = torch._C._nn.linear(input, self.weight, self.bias)   # frozen base layer
        d = self.lora_dropout.default(input)
        a = self.lora_A.default(d)              # (..., in) -> (..., rank)
        b = self.lora_B.default(a)              # (..., rank) -> (..., out), zero at init
        s = b * scaling                         # scaling = alpha / rank (or alpha / sqrt(rank))
        return linear + s

Parameters read ``q_proj.weight`` (unchanged) and ``q_proj.lora_A.default.weight``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from torch import fx, nn

from passes.modules import LoRADropout, LoRAProjection
from surgery.errors import ConfigError
from surgery.map.leaves import is_hf_conv1d
from surgery.pass_base import Change, Pass, PassResult
from surgery.select import Selector, as_patterns
from surgery.sites.features import require_plain_weight, warn_rank_exceeds
from surgery.sites.rewrite import (
    freeze_site,
    insert_after,
    mark,
    register_adapter,
    replace_uses_after,
    site_input,
)
from surgery.sites.site_graph import base_module, site_graph_at
from surgery.targets import Site, resolve_sites

__all__ = ["LoRAPass", "lora_features"]


def lora_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a layer LoRA can adapt.

    ``nn.Linear`` stores its weight ``(out, in)``; transformers' ``Conv1D`` stores it
    transposed, ``(in, out)``.
    """
    module = base_module(module)
    weight = module.weight
    if is_hf_conv1d(module):
        return int(weight.shape[0]), int(weight.shape[1])
    return int(weight.shape[1]), int(weight.shape[0])


def _accept(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


@dataclass(frozen=True, kw_only=True)
class LoRAPass(Pass):
    """Add a low-rank update ``(alpha / rank) · B A x`` beside every selected linear layer.

    Args:
        pattern: qualified-name glob(s) or ``re:`` regex (see :mod:`surgery.select`).
        role: structural role(s) (``"query"``, ``"value"``, ``"ffn_up"``, ...).
            With neither, the query and value projections are selected (the LoRA paper's
            choice); a fused qkv projection counts as both.
        exclude: patterns removed from the selection.
        rank: ``r``, the inner dimension of ``B A``; ``A`` is ``(r, in)``, ``B`` is ``(out, r)``.
        alpha: the scale numerator; ``scaling = alpha / r``.
        dropout: dropout probability on the branch input (0 = none).
        use_rslora: ``scaling = alpha / sqrt(r)`` (rank-stabilised LoRA).
        init: ``"kaiming"`` (A Kaiming-uniform) or ``"gaussian"`` (A normal, std ``1/r``);
            ``B`` always starts at zero, so outputs are bitwise unchanged at init.
        name: adapter name; several named adapters can sit on one layer.

    Sites: ``nn.Linear`` and transformers' ``Conv1D`` (weight stored ``(in, out)``).
    Parameters are created in the dtype and on the device of the adapted weight.

    Raises:
        ConfigError: invalid rank, alpha, dropout or init (at construction).
        NoMatchError: the selection matches nothing (when run).
        AlreadyAdaptedError: a selected layer already has a LoRA adapter of this name.
    """

    name: ClassVar[str] = "lora"
    default_roles: ClassVar[tuple[str, ...]] = ("query", "value")

    pattern: Selector = None
    role: str | Sequence[str] | None = None
    exclude: Selector = None
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "kaiming"
    adapter_name: str = "default"

    def __init__(self, *, pattern: Selector = None, role: str | Sequence[str] | None = None,
                 exclude: Selector = None, rank: int = 8, alpha: float = 8.0,
                 dropout: float = 0.0, use_rslora: bool = False, init: str = "kaiming",
                 name: str = "default") -> None:
        for key, val in (("pattern", pattern), ("role", role), ("exclude", exclude),
                         ("rank", rank), ("alpha", alpha), ("dropout", dropout),
                         ("use_rslora", use_rslora), ("init", init), ("adapter_name", name)):
            object.__setattr__(self, key, tuple(val) if isinstance(val, list) else val)
        self.__post_init__()

    def __post_init__(self) -> None:
        try:
            as_patterns(self.pattern)
            as_patterns(self.exclude)
        except ConfigError as exc:
            raise ConfigError(f"LoRAPass: {exc}") from exc
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ConfigError(f"LoRAPass: rank must be a positive int, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"LoRAPass: alpha must be a positive number, got {self.alpha!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"LoRAPass: dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in ("kaiming", "gaussian"):
            raise ConfigError(f"LoRAPass: init must be 'kaiming' or 'gaussian', got {self.init!r}")
        if not isinstance(self.adapter_name, str) or not self.adapter_name.isidentifier():
            raise ConfigError(f"LoRAPass: name must be a Python identifier (it becomes part of "
                              f"parameter names), got {self.adapter_name!r}")

    @property
    def scaling(self) -> float:
        """``alpha / rank``, or ``alpha / sqrt(rank)`` with ``use_rslora``."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def sites(self, model: nn.Module) -> list[Site]:
        """The sites this pass would adapt in ``model``."""
        return resolve_sites(model, pass_name="LoRAPass", pattern=self.pattern, role=self.role,
                             exclude=self.exclude, default_roles=self.default_roles,
                             accept=_accept, accepted_types="nn.Linear / Conv1D")

    def run(self, model: nn.Module) -> PassResult:
        changes: list[Change] = []
        sites = self.sites(model)
        warn_rank_exceeds(sites, self.rank, pass_name="LoRAPass")
        root = model
        for site in sites:
            root, more = self._adapt(root, site)
            changes.extend(more)
        return PassResult(root, bool(changes), tuple(changes), self.name)

    def _adapt(self, model: nn.Module, site: Site) -> tuple[nn.Module, list[Change]]:
        qname, role = site.qname, site.label
        require_plain_weight(qname, site.base, who="LoRAPass")
        in_f, out_f = lora_features(site.base)
        root, sg = site_graph_at(model, qname, who="LoRAPass", aliases=site.aliases)
        weight = sg.weight
        common = dict(rank=self.rank, alpha=float(self.alpha), scaling=self.scaling, site=qname,
                      adapter_name=self.adapter_name, role=role, dtype=weight.dtype,
                      device=weight.device)
        lora_a = LoRAProjection(in_f, self.rank, factor="A", init=self.init, **common)
        lora_b = LoRAProjection(self.rank, out_f, factor="B", init=self.init, **common)
        drop = LoRADropout(float(self.dropout), site=qname, adapter_name=self.adapter_name, role=role)
        for slot, mod in (("lora_A", lora_a), ("lora_B", lora_b), ("lora_dropout", drop)):
            register_adapter(sg, slot, self.adapter_name, mod, pass_name="LoRAPass", site=qname)
        graph = sg.graph
        base = sg.base_node
        x = site_input(sg)
        tag = dict(pass_name=self.name, site=qname, role=role, adapter=self.adapter_name)
        name = self.adapter_name

        def build() -> fx.Node:
            d = mark(graph.call_module(f"lora_dropout.{name}", (x,)), part="lora_dropout", **tag)
            a = mark(graph.call_module(f"lora_A.{name}", (d,)), part="lora_A", **tag)
            b = mark(graph.call_module(f"lora_B.{name}", (a,)), part="lora_B", **tag)
            s = mark(graph.call_function(operator.mul, (b, self.scaling)), part="scale", **tag)
            return mark(graph.call_function(operator.add, (base, s)), part="add", **tag)

        out = insert_after(graph, base, build)
        replace_uses_after(base, out)
        changes = [Change("node_added", self.name, qname, f"{qname}/{part}",
                          adapter=self.adapter_name, role=role)
                   for part in ("lora_dropout", "lora_A", "lora_B", "scale", "add")]
        for slot, mod in (("lora_A", lora_a), ("lora_B", lora_b)):
            changes.append(Change("param_added", self.name, qname,
                                  f"{qname}.{slot}.{self.adapter_name}.weight" if qname
                                  else f"{slot}.{self.adapter_name}.weight",
                                  adapter=self.adapter_name, role=role,
                                  shape=tuple(mod.weight.shape), numel=mod.weight.numel(),
                                  trainable=True))
        changes.extend(freeze_site(sg, pass_name=self.name, site=qname, role=role))
        return root, changes
