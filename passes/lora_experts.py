"""LoRA on the fused expert weights of mixture-of-experts blocks, routed token by token
(PEFT's ``LoraConfig(target_parameters=[...])``).

``LoRAPass(target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])`` selects
parameters by qualified name, in the selection language (a glob matched at any ``.``
boundary, or ``re:``), among the 3-D expert weights of transformers' fused experts modules
(:func:`passes.moe_trace.is_fused_experts`; dimension 0 counts the experts). The site is the
experts module: its site graph is transformers' grouped experts forward
(:mod:`passes.moe_trace`), and next to the grouped linear of each targeted weight the pass
adds the low-rank update of the expert each routed token went to. Before::

    _grouped_linear = _grouped_linear(getitem_2, self.gate_up_proj, cumsum, bias=None, ...)

After (``x`` the routed tokens sorted by expert, ``cumsum`` the offsets per expert)::

    _grouped_linear = _grouped_linear(getitem_2, self.gate_up_proj, cumsum, bias=None, ...)
    a = self.base_layer.lora_A.default(getitem_2, cumsum)    # (S, hidden) -> (S, r), A_e
    b = self.base_layer.lora_B.default(a, cumsum)            # (S, r) -> (S, 2I), B_e
    add = _grouped_linear + b * scaling

never forming a dense per-expert delta (PEFT adds ``ΔW`` to the whole weight at every
forward). Parameters carry PEFT's names without ``base_model.model.``: with one targeted
weight on a module, ``experts.lora_A.<a>.weight`` ``(r·E, in)`` and
``experts.lora_B.<a>.weight`` ``(out, r·E)`` (:mod:`passes.lora_experts_factor`); with
several, PEFT nests one wrapper per weight, the first weight (in the module's parameter
order) innermost, so its factors read ``experts.base_layer.lora_A.<a>.weight`` (one
``base_layer.`` per wrapper around it). Here ``base_layer`` is a plain holder module of the
site graph: the base weights keep their own keys (``experts.gate_up_proj``). As in PEFT,
every adapter on one experts module targets the same weights, and no dropout, DoRA or
bias training is offered.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

from torch import fx, nn

from passes.lora_experts_factor import ExpertLoRAFactor
from passes.lora_settings import scaling_for
from passes.moe_trace import grouped_linear, implementation_note, is_fused_experts, trace_experts
from surgery.errors import ConfigError, NoMatchError, few, near_matches
from surgery.map.leaves import is_linear_like
from surgery.pass_base import Change
from surgery.select import matches, regex_hint, select_names
from surgery.sites.rewrite import (
    chain_end,
    freeze_site,
    insert_after,
    mark,
    register_adapter,
    replace_uses_after,
)
from surgery.sites.site_graph import SiteGraph, base_module, module_aliases, site_graph_at

__all__ = ["HOLDER", "PARAMS_KEY", "expert_parameters", "adapt_experts", "refuse_settings",
           "holder_path"]

HOLDER = "base_layer"
"""The holder module of the factors of all but the last targeted weight (PEFT's nesting)."""

PARAMS_KEY = "lora_expert_params"
"""Site-graph attribute: the weights LoRA adapters target on this experts module, in order."""

_INITS = ("kaiming", "gaussian", "random")


def refuse_settings(*, dropout: float, use_dora: bool, bias: str, init: str) -> str:
    """Why these LoRA settings cannot go with ``target_parameters`` (``""`` when they can):
    PEFT's ``ParamWrapper`` refuses dropout, DoRA and bias training, and the inits that
    read a 2-D weight."""
    if dropout:
        return (f"dropout={dropout!r}: the update is applied to the routed tokens through "
                f"the experts' grouped matmul, where dropout on its input cannot be told from "
                f"dropout on the base's (PEFT refuses it too). Way out: dropout=0.0")
    if use_dora:
        return "use_dora=True is not offered on expert weights (nor by PEFT). Way out: leave it off"
    if bias != "none":
        return f"bias={bias!r} is not offered on expert weights (nor by PEFT). Way out: bias='none'"
    if init not in _INITS:
        return (f"init={init!r} is not offered on expert weights. Way out: one of "
                f"{', '.join(map(repr, _INITS))}")
    return ""


def expert_parameters(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Every parameter LoRA can adapt through ``target_parameters``: qualified name →
    ``(module qualified name, parameter name)``, in model order: the 3-D weights of fused
    experts modules (plain, or already site graphs)."""
    out: dict[str, tuple[str, str]] = {}
    for qname, mod in model.named_modules():
        base = base_module(mod)
        if not is_fused_experts(base):
            continue
        for pname, param in base._parameters.items():
            if param is not None and param.dim() == 3:
                out[f"{qname}.{pname}" if qname else pname] = (qname, pname)
    return out


def holder_path(index: int, count: int) -> str:
    """The holder prefix of the ``index``-th of ``count`` weights targeted on one module
    (``"base_layer."`` for the first of two, ``""`` for the last)."""
    return f"{HOLDER}." * (count - 1 - index)


def _grouped_call(sg: SiteGraph, pname: str, site: str) -> fx.Node:
    """The ``_grouped_linear`` node reading the weight ``pname``."""
    fn = grouped_linear()
    for node in sg.graph.nodes:
        if node.op == "call_function" and node.target is fn and len(node.args) >= 3:
            w = node.args[1]
            if isinstance(w, fx.Node) and w.op == "get_attr" and w.target == pname:
                return node
    raise ConfigError(f"LoRAPass: no grouped linear reads {site}.{pname} in the experts forward "
                      f"of {site}; it cannot be adapted there. Way out: leave it out of "
                      f"target_parameters.")


def _holder(sg: SiteGraph, path: str) -> nn.Module:
    """The module at ``path`` (``"base_layer."``; ``""``: the site graph), made if missing."""
    cur: nn.Module = sg
    for part in (p for p in path.split(".") if p):
        nxt = cur._modules.get(part)
        if nxt is None:
            nxt = nn.Module()
            cur.add_module(part, nxt)
        cur = nxt
    return cur


def _no_expert_match(model: nn.Module, pat: str, cands: list[str]) -> NoMatchError:
    """The error for a ``target_parameters`` pattern that selects no expert weight: why,
    the module pattern for a Linear's own weight, and the expert weights, nearest first."""
    lines = [f"LoRAPass: target_parameters pattern {pat!r} matches no expert weight; "
             f"target_parameters reaches only the 3-D fused expert weights of transformers' "
             f"experts modules (dimension 0 = experts)."]
    others = [n for n, _ in model.named_parameters() if n not in set(cands) and matches(pat, n)]
    if others:
        lines.append(f"It matches {len(others)} other parameter(s): {few(others)}.")
        owners = [n.rpartition(".")[0] for n in others]
        layers = [o for o in dict.fromkeys(owners)
                  if is_linear_like(base_module(model.get_submodule(o)))]
        if layers:
            head, _, last = pat.rpartition(".")
            module_pat = head if head and not pat.startswith("re:") and any(
                last == n.rpartition(".")[2] for n in others) else layers[0].rpartition(".")[2]
            lines.append(f"The weight of a layer such as {layers[0]} is adapted through its "
                         f"module: LoRAPass(pattern={module_pat!r}).")
    hint = regex_hint(pat, cands, "parameter")
    if hint:
        lines.append(hint)
    if cands:
        lines.append(f"The expert weights, nearest first: "
                     f"{few(near_matches(pat, cands, n=len(cands)), 8)}.")
        lines.append("Way out: fix the pattern (a glob matched at any '.' boundary, or 're:').")
    else:
        lines.append(f"{type(model).__name__} has no fused experts module, so there are none. "
                     f"Way out: select layers by module with pattern=... or role=....")
    return NoMatchError(" ".join(lines))


def adapt_experts(model: nn.Module, lora: Any, selection: Sequence[str]) -> tuple[nn.Module, list[Change]]:
    """Add ``lora``'s update to every expert weight ``selection`` selects.

    Args:
        model: the model being adapted (the pass's working copy).
        lora: the :class:`passes.lora.LoRAPass` (rank, alpha, scaling, init, name).
        selection: the ``target_parameters`` patterns.

    Returns:
        ``(root, changes)``.

    Raises:
        NoMatchError: a pattern selects no expert weight (with the nearest ones).
        ConfigError: an experts module already carries LoRA on another set of weights.
        AlreadyAdaptedError: a weight already has an adapter of this name.
        UnsupportedSiteError: the experts forward cannot be traced.
    """
    cands = expert_parameters(model)
    for pat in selection:
        if not any(matches(pat, n) for n in cands):
            raise _no_expert_match(model, pat, list(cands))
    chosen = select_names(list(cands), tuple(selection), None, pass_name="LoRAPass",
                          all_names=[n for n, _ in model.named_parameters()], kind="parameter")
    by_site: dict[str, list[str]] = {}
    for qualified in chosen:
        qname, pname = cands[qualified]
        by_site.setdefault(qname, []).append(pname)
    changes: list[Change] = []
    root = model
    state = getattr(model, "_surgery", None)
    for qname, pnames in by_site.items():
        module = root.get_submodule(qname) if qname else root
        template = base_module(module)
        order = [p for p in template._parameters if p in pnames]
        note = implementation_note(template, qname)
        if note and state is not None and note not in state.notes:
            state.notes.append(note)
        root, sg = site_graph_at(root, qname, who="LoRAPass",
                                 aliases=module_aliases(root, module) or [qname],
                                 tracer=lambda m, s: trace_experts(m, s, who="LoRAPass"))
        before = sg.__dict__.get(PARAMS_KEY)
        if before is not None and tuple(before) != tuple(order):
            raise ConfigError(
                f"LoRAPass: {qname} ({type(template).__name__}) already carries LoRA on "
                f"{list(before)}; every adapter on one experts module targets the same weights "
                f"(PEFT's rule too), not {order}. Way out: target_parameters selecting "
                f"{list(before)} there.")
        sg.__dict__[PARAMS_KEY] = tuple(order)
        for index, pname in enumerate(order):
            changes += _adapt_one(sg, qname, pname, holder_path(index, len(order)), lora,
                                  note)
        changes += freeze_site(sg, pass_name=lora.name, site=qname, role=None)
    return root, changes


def _adapt_one(sg: SiteGraph, qname: str, pname: str, holder: str, lora: Any,
               note: str | None) -> list[Change]:
    weight = sg._parameters[pname]
    template = sg.template
    transposed = bool(getattr(template, "is_transposed", False))
    num_experts, d1, d2 = (int(s) for s in weight.shape)
    in_f, out_f = (d1, d2) if transposed else (d2, d1)
    qualified = f"{qname}.{pname}" if qname else pname
    rank, alpha = lora.rank_at(qualified), lora.alpha_at(qualified)
    scaling = scaling_for(alpha, rank, lora.use_rslora)
    name = lora.adapter_name
    common = dict(num_experts=num_experts, in_features=in_f, out_features=out_f, param=pname,
                  rank=rank, alpha=float(alpha), scaling=scaling, transposed=transposed,
                  init=lora.init, site=qname, adapter_name=name, role=None,
                  dtype=weight.dtype, device=weight.device)
    factors = [("lora_A", ExpertLoRAFactor(factor="A", **common)),
               ("lora_B", ExpertLoRAFactor(factor="B", **common))]
    host = _holder(sg, holder)
    for slot, mod in factors:
        register_adapter(host, slot, name, mod, pass_name="LoRAPass", site=qname)
    call = _grouped_call(sg, pname, qname)
    x, offs = call.args[0], call.args[2]
    tag = dict(pass_name=lora.name, site=qname, role=None, adapter=name)
    graph = sg.graph

    made: list[fx.Node] = []

    def build() -> fx.Node:
        a = mark(graph.call_module(f"{holder}lora_A.{name}", (x, offs)), part="lora_A", **tag)
        b = mark(graph.call_module(f"{holder}lora_B.{name}", (a, offs)), part="lora_B", **tag)
        s = mark(graph.call_function(operator.mul, (b, scaling)), part="scale", **tag)
        add = mark(graph.call_function(operator.add, (last, s)), part="add", **tag)
        made.extend((a, b, s, add))
        return add

    last = chain_end(call, lora.name)
    out = insert_after(graph, last, build)
    replace_uses_after(last, out)
    for node in made:  # which weight the branch adapts (merge folds it there)
        node.meta["surgery"]["param"] = pname
    detail = (f"rank {rank}, alpha {alpha:g}, scaling {scaling:g}, {num_experts} experts, "
              f"routed tokens only" + (f"; {note}" if note else ""))
    changes = [Change("node_added", lora.name, qname, f"{qname}/{pname}/{part}", adapter=name,
                      detail=detail) for part in ("lora_A", "lora_B", "scale", "add")]
    for slot, mod in factors:
        full = f"{qname}.{holder}{slot}.{name}.weight"
        changes.append(Change("param_added", lora.name, qname, full, adapter=name,
                              shape=tuple(mod.weight.shape), numel=mod.weight.numel(),
                              trainable=True, detail=detail))
    return changes
