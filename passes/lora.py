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

Parameters read ``q_proj.weight`` (unchanged) and ``q_proj.lora_A.default.weight``. Rank
and alpha may differ from site to site (``rank_for`` / ``alpha_for``, as PEFT's
``rank_pattern`` / ``alpha_pattern``): each site graph then holds its own rank in the
factors' shapes and its own scaling in the ``scale`` node.

With ``use_dora=True`` (DoRA, :mod:`passes.dora`) the branch ends in the magnitude vector
instead of ``scale``; it reads the weights it needs through ``get_attr`` nodes::

        d = self.lora_dropout.default(input)
        b = self.lora_B.default(self.lora_A.default(d))
        w = self.weight;  wa = self.lora_A.default.weight;  wb = self.lora_B.default.weight
        # n = ‖W + s·B A‖ per output row, held constant (detached) as in the paper and PEFT;
        # W d read off the layer's result (linear - bias) unless dropout is drawing
        u = self.lora_magnitude_vector.default(b, d, w, wa, wb, linear)  # (m/n - 1)·W d + m/n·s·b
        return linear + u

Convolutions (``nn.Conv1d/2d/3d``) and embeddings (``nn.Embedding``) take the same branch
with factors of their own kind (:mod:`passes.lora_layers`: ``lora_A`` a convolution with the
layer's geometry; ``lora_embedding_A.<adapter>`` / ``lora_embedding_B.<adapter>`` on an
embedding), selected by pattern.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from torch import fx, nn

from passes.dora import DoRAMagnitude, refuse_dora_sites
from passes.lora_bias import check_bias, train_biases
from passes.lora_conv import LoRAConvFactor
from passes.lora_experts import adapt_experts, refuse_settings
from passes.lora_init import check_init, rewrite_base, rewrites_base
from passes.lora_layers import (
    is_plain_conv,
    is_plain_embedding,
    lora_branch,
    register_branch,
)
from passes.lora_settings import PerSite, check_alpha, check_rank, per_site, scaling_for
from passes.modules import LoRAProjection
from surgery.adapters.names import check_adapter_name
from surgery.errors import ConfigError, NoMatchError, near_matches
from surgery.map.leaves import is_dense_linear, is_hf_conv1d
from surgery.pass_base import Change, Pass, PassResult
from surgery.select import Selector, as_patterns, first_match, matches
from surgery.sites.features import require_plain_weight, warn_rank_exceeds
from surgery.sites.rewrite import (
    chain_end,
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
    transposed, ``(in, out)``; a convolution has ``(in_channels, out_channels)``; an
    embedding maps its ``num_embeddings`` ids to ``embedding_dim`` (PEFT's ``in_features``
    and ``out_features`` of these layers).
    """
    module = base_module(module)
    if isinstance(module, nn.modules.conv._ConvNd):
        return int(module.in_channels), int(module.out_channels)
    if isinstance(module, nn.Embedding):
        return int(module.num_embeddings), int(module.embedding_dim)
    weight = module.weight
    if is_hf_conv1d(module):
        return int(weight.shape[0]), int(weight.shape[1])
    return int(weight.shape[1]), int(weight.shape[0])


def _accept(module: nn.Module) -> bool:
    return is_dense_linear(module) or is_plain_conv(module) or is_plain_embedding(module)


_TYPES = "nn.Linear / Conv1D / nn.Conv1d/2d/3d / nn.Embedding"


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
            The rank of every site that no ``rank_for`` key selects.
        alpha: the scale numerator; ``scaling = alpha / r``. The alpha of every site that no
            ``alpha_for`` key selects.
        rank_for: per-site ranks: a mapping, or a sequence of ``(pattern, rank)`` pairs, from
            a pattern in the selection language (a glob over qualified names matching the whole
            name or a dot-boundary suffix, or ``"re:<regex>"``) to a positive int. A site takes
            the rank of the first key, in the order given, that selects its qualified name
            (PEFT's ``rank_pattern``), else ``rank``. Stored as a tuple of pairs.
        alpha_for: per-site alphas, the same way (positive finite numbers; PEFT's
            ``alpha_pattern``), else ``alpha``.
        dropout: dropout probability on the branch input (0 = none).
        use_rslora: ``scaling = alpha / sqrt(r)`` (rank-stabilised LoRA), per site with that
            site's alpha and rank.
        use_dora: weight-decomposed LoRA (DoRA, Liu et al. 2024; :mod:`passes.dora`): each
            branch also learns a magnitude ``lora_magnitude_vector.<name>.weight`` ``(out,)``,
            starting at ``‖W‖`` per output feature, and the layer computes
            ``m / ‖W + s·B A‖ · (W + s·B A) x + b`` (the norm held constant in the backward
            pass), as PEFT's ``use_dora=True``; on a convolution the magnitude is
            ``(1, out, 1, ...)`` (PEFT's shape); not on embeddings. At init
            the output equals the layer's up to rounding (``m / ‖W‖`` is one within an
            ulp), not bit for bit.
        init: ``"kaiming"`` (A Kaiming-uniform) or ``"gaussian"`` (A normal, std ``1/r``):
            ``B`` starts at zero, so outputs are bitwise unchanged at init. On ``nn.Linear``
            and ``Conv1D`` only, also ``"orthogonal"`` (PEFT's: A and B non-zero, ``B A = 0``
            up to rounding, so outputs are unchanged to rounding; even ranks only) and
            ``"random"`` (A and B both Kaiming-uniform, PEFT's ``init_lora_weights=False``:
            outputs CHANGE at init; for tests; on convolutions and embeddings too),
            ``"pissa"`` / ``"pissa_niter_<K>"`` (PiSSA)
            and ``"olora"`` (OLoRA): A and B from the SVD / QR of the weight, whose site
            graph then holds a NEW residual weight ``W - scaling·B A`` (outputs unchanged to
            rounding; the caller's weight untouched; a ``param_rewritten`` change; not with
            ``use_dora``). See :mod:`passes.lora_init`.
        name: adapter name, any string without ``"."`` as in PEFT (``"test-adapter"``,
            kept verbatim in keys: ``q_proj.lora_A.test-adapter.weight``); several named
            adapters can sit on one layer.
        target_parameters: expert weights to adapt, as PEFT's ``target_parameters``: patterns
            in the selection language over qualified *parameter* names
            (``"mlp.experts.gate_up_proj"``, ``"experts.*"``, ``"re:..."``) among the 3-D
            weights of transformers' fused experts modules; each gets a per-expert update
            applied to the tokens routed to that expert (:mod:`passes.lora_experts`), with
            PEFT's parameter names. Alone (no ``pattern`` / ``role``) it selects no module
            layer; with them, both. Not with dropout, DoRA, ``bias`` or the inits that read
            a 2-D weight (PEFT refuses them too).
        bias: which base biases train too, as PEFT's ``LoraConfig(bias=...)``
            (:mod:`passes.lora_bias`): ``"none"`` (default), ``"lora_only"`` (the biases of
            the adapted layers) or ``"all"`` (every parameter of the model named ``bias``).
            They keep their names (``q_proj.bias``) and are recorded in
            ``model._surgery.trained_parameters``; a merge does not fold them.

    Sites: ``nn.Linear`` and transformers' ``Conv1D`` (weight stored ``(in, out)``); by
    pattern also ``nn.Conv1d/2d/3d`` and ``nn.Embedding`` running torch's own forward
    (:mod:`passes.lora_layers`: on a convolution ``A`` is ``(rank, in, *kernel)`` and ``B``
    ``(out, rank / groups, 1, ...)``, the rank a multiple of ``groups``; on an embedding the
    parameters are ``lora_embedding_A.<name>`` ``(rank, num_embeddings)``, zero at init,
    and ``lora_embedding_B.<name>`` ``(embedding_dim, rank)``, normal, with no dropout, and
    one LoRA adapter per embedding). Selection by role alone picks linear layers only.
    Parameters are created in the dtype and on the device of the adapted weight. Each
    site's ``lora_A`` / ``lora_B`` carry that site's ``rank``, ``alpha`` and ``scaling``
    (what merge, combine and the audit read); :meth:`rank_at`, :meth:`alpha_at` and
    :meth:`scaling_at` give them for a qualified name.

    Example::

        LoRAPass(pattern=["q_proj", "v_proj"], rank=8, rank_for={"layers.0.**": 16},
                 alpha_for=[("v_proj", 32.0)])

    Raises:
        ConfigError: invalid rank, alpha, dropout, init or bias, or a ``rank_for`` / ``alpha_for``
            entry with a bad pattern, a repeated pattern, a rank that is not a positive int
            or an alpha that is not a positive finite number (at construction); a
            convolution whose ``groups`` does not divide its rank (when run).
        UnsupportedSiteError: ``use_dora`` with an embedding selected
            (when run).
        NoMatchError: the selection matches nothing, or a ``rank_for`` / ``alpha_for`` key
            selects none of the selected sites (when run).
        AlreadyAdaptedError: a selected layer already has a LoRA adapter of this name (an
            embedding: a LoRA adapter of any name).
    """

    name: ClassVar[str] = "lora"
    default_roles: ClassVar[tuple[str, ...]] = ("query", "value")
    peft_spellings: ClassVar[dict[str, str]] = {
        "r": "rank", "lora_alpha": "alpha", "target_modules": "pattern",
        "exclude_modules": "exclude", "lora_dropout": "dropout",
        "rank_pattern": "rank_for", "alpha_pattern": "alpha_for"}
    """PEFT's ``LoraConfig`` names answered with ours (see :class:`surgery.pass_base.Pass`)."""

    pattern: Selector = None
    role: str | Sequence[str] | None = None
    exclude: Selector = None
    rank: int = 8
    alpha: float = 8.0
    rank_for: tuple[tuple[str, int], ...] = ()
    alpha_for: tuple[tuple[str, float], ...] = ()
    dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "kaiming"
    adapter_name: str = "default"
    bias: str = "none"
    target_parameters: Selector = None

    def __init__(self, *, pattern: Selector = None, role: str | Sequence[str] | None = None,
                 exclude: Selector = None, rank: int = 8, alpha: float = 8.0,
                 rank_for: PerSite[int] = None, alpha_for: PerSite[float] = None,
                 dropout: float = 0.0, use_rslora: bool = False, use_dora: bool = False,
                 init: str = "kaiming", name: str = "default",
                 bias: str = "none", target_parameters: Selector = None) -> None:
        for key, val in (("pattern", pattern), ("role", role), ("exclude", exclude),
                         ("rank", rank), ("alpha", alpha), ("dropout", dropout),
                         ("use_rslora", use_rslora), ("use_dora", use_dora), ("init", init),
                         ("adapter_name", name), ("bias", bias),
                         ("target_parameters", target_parameters)):
            object.__setattr__(self, key, tuple(val) if isinstance(val, list) else val)
        object.__setattr__(self, "rank_for",
                           per_site(rank_for, "rank_for", check_rank, int))
        object.__setattr__(self, "alpha_for",
                           per_site(alpha_for, "alpha_for", check_alpha, float))
        self.__post_init__()

    def __post_init__(self) -> None:
        try:
            as_patterns(self.pattern)
            as_patterns(self.exclude)
            as_patterns(self.target_parameters)
        except ConfigError as exc:
            raise ConfigError(f"LoRAPass: {exc}") from exc
        if check_rank(self.rank):
            raise ConfigError(f"LoRAPass: rank must be a positive int, got {self.rank!r}. "
                              f"Way out: rank=8 (or 4, 16, ...: an int >= 1).")
        if check_alpha(self.alpha):
            raise ConfigError(f"LoRAPass: alpha must be a positive number (finite), got "
                              f"{self.alpha!r}. Way out: alpha=rank (scaling 1) or 2 * rank.")
        if (not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool)
                or not 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"LoRAPass: dropout must be in [0, 1) (a number), got "
                              f"{self.dropout!r}. Way out: dropout=0.0 (none) to 0.1 (usual).")
        for flag in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"LoRAPass: {flag} must be True or False, got "
                                  f"{getattr(self, flag)!r}")
        why = check_init(self.init)
        if why:
            raise ConfigError(f"LoRAPass: {why}")
        if self.use_dora and rewrites_base(self.init):
            raise ConfigError(f"LoRAPass: init={self.init!r} with use_dora=True is not "
                              f"supported. Way out: one of them.")
        odd = [r for r in (self.rank, *(v for _, v in self.rank_for)) if r % 2]
        if self.init == "orthogonal" and odd:
            raise ConfigError(f"LoRAPass(init='orthogonal'): every rank must be even (A and B "
                              f"take half the rows of an orthogonal matrix each), got {odd[0]}. "
                              f"Way out: even ranks, or another init.")
        check_adapter_name("LoRAPass", self.adapter_name)
        why = check_bias(self.bias)
        if why:
            raise ConfigError(f"LoRAPass: {why}")
        if self.target_parameters is not None:
            why = refuse_settings(dropout=self.dropout, use_dora=self.use_dora, bias=self.bias,
                                  init=self.init)
            if why:
                raise ConfigError(f"LoRAPass(target_parameters=...): {why}.")

    @property
    def scaling(self) -> float:
        """The default scaling: ``alpha / rank``, or ``alpha / sqrt(rank)`` with
        ``use_rslora``; a site that a ``rank_for`` / ``alpha_for`` key selects has its own
        (:meth:`scaling_at`)."""
        return scaling_for(self.alpha, self.rank, self.use_rslora)

    def rank_at(self, qname: str | Sequence[str]) -> int:
        """The rank of the site at ``qname`` (or under any of several names, for a shared
        module): the value of the first ``rank_for`` key selecting it, else ``rank``."""
        key = first_match((k for k, _ in self.rank_for), qname)
        return self.rank if key is None else dict(self.rank_for)[key]

    def alpha_at(self, qname: str | Sequence[str]) -> float:
        """The alpha of the site at ``qname``: the first ``alpha_for`` key selecting it, else
        ``alpha``."""
        key = first_match((k for k, _ in self.alpha_for), qname)
        return self.alpha if key is None else dict(self.alpha_for)[key]

    def scaling_at(self, qname: str | Sequence[str]) -> float:
        """The scaling of the site at ``qname``: ``alpha_at / rank_at``, or
        ``alpha_at / sqrt(rank_at)`` with ``use_rslora``."""
        return scaling_for(self.alpha_at(qname), self.rank_at(qname), self.use_rslora)

    def sites(self, model: nn.Module) -> list[Site]:
        """The sites this pass would adapt in ``model`` (convolutions and embeddings only
        when a pattern is given)."""
        by_pattern = self.pattern is not None
        return resolve_sites(model, pass_name="LoRAPass", pattern=self.pattern, role=self.role,
                             exclude=self.exclude, default_roles=self.default_roles,
                             accept=_accept if by_pattern else is_dense_linear,
                             accepted_types=_TYPES if by_pattern else "nn.Linear / Conv1D")

    @property
    def params_only(self) -> bool:
        """``target_parameters`` given without ``pattern`` or ``role``: no module layer is
        selected."""
        return self.target_parameters is not None and self.pattern is None and self.role is None

    def run(self, model: nn.Module) -> PassResult:
        changes: list[Change] = []
        sites = [] if self.params_only else self.sites(model)
        if not self.params_only:  # keys then select expert weights by name
            self._check_keys(model, sites)
        if self.use_dora:
            refuse_dora_sites(sites)
        by_rank: dict[int, list[Site]] = {}
        for site in sites:
            by_rank.setdefault(self.rank_at(site.aliases), []).append(site)
        for rank, group in by_rank.items():
            warn_rank_exceeds(group, rank, pass_name="LoRAPass")
        root = model
        for site in sites:
            root, more = self._adapt(root, site)
            changes.extend(more)
        if self.target_parameters is not None:
            root, more = adapt_experts(root, self, as_patterns(self.target_parameters))
            changes.extend(more)
        changes.extend(train_biases(root, self.bias, [s.qname for s in sites], self.name))
        return PassResult(root, bool(changes), tuple(changes), self.name)

    def _check_keys(self, model: nn.Module, sites: list[Site]) -> None:
        """Every ``rank_for`` / ``alpha_for`` key must select one of the selected sites: a
        key that selects nothing is a typo, or a site the selection left out."""
        names = [n for site in sites for n in site.aliases]
        for what, table in (("rank_for", self.rank_for), ("alpha_for", self.alpha_for)):
            for key, _ in table:
                if first_match((key,), names) is not None:
                    continue
                elsewhere = [n for n, _ in model.named_modules() if n and matches(key, n)]
                seen = (f" It selects {', '.join(elsewhere[:5])}, which this pass does not "
                        f"adapt." if elsewhere else "")
                near = near_matches(key, [s.qname for s in sites])
                raise NoMatchError(
                    f"LoRAPass: {what} key {key!r} selects none of the {len(sites)} site(s) "
                    f"the pass adapts.{seen} Nearest sites: {', '.join(near) or 'none'}. Way "
                    f"out: fix the key (keys are patterns as in pattern=: a glob matching the "
                    f"whole name or a dot-boundary suffix, or 're:<regex>'), or widen the "
                    f"selection; surgery.list_targets(model) lists the names.")

    def _adapt(self, model: nn.Module, site: Site) -> tuple[nn.Module, list[Change]]:
        qname, role = site.qname, site.label
        require_plain_weight(qname, site.base, who="LoRAPass")
        rank, alpha = self.rank_at(site.aliases), self.alpha_at(site.aliases)
        scaling = scaling_for(alpha, rank, self.use_rslora)
        name = self.adapter_name
        weight = site.module.weight  # the template of a site graph is on the meta device
        slots = lora_branch(site.base, rank=rank, alpha=alpha, scaling=scaling, init=self.init,
                            dropout=float(self.dropout), site=qname, adapter_name=name,
                            role=role, dtype=weight.dtype, device=weight.device)
        root, sg = site_graph_at(model, qname, who="LoRAPass", aliases=site.aliases)
        targets = register_branch(sg, slots, name, site=qname)
        rewritten = rewrite_base(
            root, sg, sg.lora_A[name], sg.lora_B[name], init=self.init, rank=rank,
            scaling=scaling, transposed=is_hf_conv1d(site.base), site=qname,
            aliases=tuple(site.aliases), adapter_name=name, role=role,
            pass_name=self.name) if rewrites_base(self.init) else []
        graph = sg.graph
        base = sg.base_node
        x = site_input(sg)
        tag = dict(pass_name=self.name, site=qname, role=role, adapter=name)

        branch = list(targets)

        def build() -> fx.Node:
            cur = x
            for part, target, _ in branch:
                cur = mark(graph.call_module(target, (cur,)), part=part, **tag)
            s = mark(graph.call_function(operator.mul, (cur, scaling)), part="scale", **tag)
            return mark(graph.call_function(operator.add, (last, s)), part="add", **tag)

        def build_dora() -> fx.Node:
            called = []
            cur = x
            for part, target, _ in branch:
                cur = mark(graph.call_module(target, (cur,)), part=part, **tag)
                called.append(cur)
            own = ("weight", f"lora_A.{name}.weight", f"lora_B.{name}.weight",
                   *(("bias",) if sg._parameters.get("bias") is not None else ()))
            reads = [mark(graph.get_attr(t), part="dora_weight", **tag) for t in own]
            update = mark(graph.call_module(f"lora_magnitude_vector.{name}",
                                            (cur, called[0], *reads[:3], base, *reads[3:])),
                          part="dora_scale", **tag)
            return mark(graph.call_function(operator.add, (last, update)), part="add", **tag)

        if self.use_dora:
            magnitude = DoRAMagnitude(sg._parameters["weight"], transposed=is_hf_conv1d(site.base),
                                      scaling=scaling, site=qname, adapter_name=name, role=role,
                                      conv=site.base if is_plain_conv(site.base) else None,
                                      dropout=float(self.dropout))
            register_adapter(sg, "lora_magnitude_vector", name, magnitude, pass_name="LoRAPass",
                             site=qname)
            for _, _, mod in branch:
                if isinstance(mod, (LoRAProjection, LoRAConvFactor)):
                    mod.dora = True
            targets = branch + [("dora_scale", f"lora_magnitude_vector.{name}", magnitude)]
        # after the LoRA updates already there, so that they add up in the order added (PEFT's)
        last = chain_end(base, self.name)
        out = insert_after(graph, last, build_dora if self.use_dora else build)
        replace_uses_after(last, out)
        detail = f"rank {rank}, alpha {alpha:g}, scaling {scaling:g}"
        if self.use_dora:
            detail += ", DoRA"
            parts = [part for part, _, _ in targets[:-1]] + ["dora_weight", "dora_scale", "add"]
        else:
            parts = [part for part, _, _ in targets] + ["scale", "add"]
        changes = [Change("node_added", self.name, qname, f"{qname}/{part}", adapter=name,
                          role=role, detail=detail) for part in parts]
        for _, target, mod in targets:
            for pname, param in mod.named_parameters():
                full = f"{target}.{pname}"
                changes.append(Change("param_added", self.name, qname,
                                      f"{qname}.{full}" if qname else full, adapter=name,
                                      role=role, shape=tuple(param.shape), numel=param.numel(),
                                      trainable=True, detail=detail))
        changes.extend(rewritten)
        changes.extend(freeze_site(sg, pass_name=self.name, site=qname, role=role))
        return root, changes

