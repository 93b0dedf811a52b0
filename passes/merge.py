"""Merging adapters into base weights and taking them out again, as graph rewrites.

LoRA merge (Hu et al. 2021), at every call of an adapted layer, before and after::

    y0 = q_proj(x)                                 y = q_proj(x)    # W' = W + (alpha/r)·B A
    d  = q_proj.lora_dropout.default(x)
    a  = q_proj.lora_A.default(d)          →
    b  = q_proj.lora_B.default(a)
    y  = y0 + b * scaling

IA³ fold (Liu et al. 2022): ``k_proj.ia3_l.default(k_proj(x))`` becomes ``k_proj(x)`` with
``W' = diag(l) W`` and ``b' = l ⊙ b`` (output scaling); ``down_proj(down_proj.ia3_l(h))``
becomes ``down_proj(h)`` with ``W' = W diag(l)`` (input scaling). Weights stored ``(in, out)``
(transformers' ``Conv1D``) are handled transposed. The arithmetic is in
:mod:`surgery.merge_math`: at least float32, cast once to the weight's dtype.

**Exact round trips.** Subtracting ``ΔW`` again cannot give the original weight back bit
for bit in bfloat16 (or even float32), so a merge keeps what it replaced:

* ``inplace=False`` (default): the merged weight is a new tensor in a new ``Parameter``; the
  merge keeps a reference to the original tensor, which still is the caller's storage, so it
  costs no memory beyond the new weight. Unmerge puts the original tensor back.
* ``inplace=True``: the merged values are written into the existing storage (shared with the
  caller's model and every copy made by :func:`surgery.apply_passes`, whose outputs change
  accordingly); the merge keeps an exact copy of the overwritten values (one copy of the
  weight per adapter merged, plus the bias for IA³ output scaling). Unmerge writes that copy
  back into the same storage, which restores every model sharing it.

Either way unmerge restores the base weight bit for bit, in every dtype, however many
merge/unmerge cycles and however much training of the adapters happen in between.

**Order.** A branch folds only when the layer's weight sees it alone: a LoRA branch whose
add reads the layer's call (possibly through other LoRA adds) and whose input is the
layer's input; an IA³ vector right at the call. IA³ scales a layer as LoRA adapted it, so
on a layer carrying both, LoRA merges first and unmerges last::

    merged = apply_passes(adapted, [MergeLoRAPass(), MergeIA3Pass()])
    back = apply_passes(merged, [UnmergeIA3Pass(), UnmergeLoRAPass()])

**Merge state** lives in the graph: every call node of a merged layer carries
``node.meta["surgery_merged"]``, a tuple of :class:`MergeRecord` (oldest first), the same
tuple on every call of a shared layer. Only these passes change it; ``train()`` / ``eval()``
never merge or unmerge. Merges at one layer are undone last-in, first-out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, fx, nn

from surgery.adapter_base import AdapterModule
from surgery.errors import AdapterNotFoundError, ConfigError, MergeError
from surgery.graphs import CallSite, call_sites
from surgery.merge_math import compute_dtype, ia3_fold, is_finite, lora_delta, merge_delta
from surgery.pass_base import Change, Pass, PassResult
from surgery.rewrite import call_input, editable_graph, insert_chain, set_call_input
from surgery.trace import is_hf_conv1d

__all__ = [
    "MERGED_KEY",
    "MergeRecord",
    "MergeLoRAPass",
    "UnmergeLoRAPass",
    "MergeIA3Pass",
    "UnmergeIA3Pass",
    "merged_adapters",
]

MERGED_KEY = "surgery_merged"
"""``node.meta`` key, on a merged layer's call nodes, holding its :class:`MergeRecord` tuple."""

_LORA_PARTS = ("lora_dropout", "lora_A", "lora_B", "scale", "add")
_SIDE_PARTS = frozenset(_LORA_PARTS[:-1])  # nodes beside the path, feeding an add
_KIND_LABEL = {"lora": "LoRA", "ia3": "IA³"}
_MERGE_PASS = {"lora": "MergeLoRAPass", "ia3": "MergeIA3Pass"}
_UNMERGE_PASS = {"lora": "UnmergeLoRAPass", "ia3": "UnmergeIA3Pass"}
_WHY_NOT_LINEAR = (
    "it is not linear in the base weights, so no merged weight W' computes what it does (a "
    "bottleneck adapter applies a non-linearity between its projections; a prefix changes the "
    "keys and values an attention op sees); only LoRA and IA³ fold into a weight")


# --------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class NodeSpec:
    """One graph node a merge removed, kept so that unmerge can put it back as it was.

    Attributes:
        name: the node's name.
        target: module target (relative to the graph owner) or function.
        op: ``"call_module"`` or ``"call_function"``.
        part: ``lora_dropout`` / ``lora_A`` / ``lora_B`` / ``scale`` / ``add`` / ``ia3_l``.
        meta: a copy of ``node.meta``.
        const: the constant operand of the ``scale`` node (LoRA's ``scaling``).
    """

    name: str
    target: Any
    op: str
    part: str
    meta: dict
    const: Any = None


@dataclass(frozen=True, eq=False)
class CallSpec:
    """The nodes a merge removed at one call of the layer.

    Attributes:
        prefix: qualified name of the module owning the graph ("" for the root).
        base: name of the layer's ``call_module`` node.
        anchor: name of the node the LoRA ``add`` read (the base call or another LoRA add).
        nodes: removed nodes, in graph order.
    """

    prefix: str
    base: str
    anchor: str
    nodes: tuple[NodeSpec, ...]


@dataclass(frozen=True, eq=False)
class MergeRecord:
    """What one merge of one adapter into one layer replaced.

    Attributes:
        kind: ``"lora"`` or ``"ia3"``.
        adapter: adapter name.
        site: qualified name of the layer.
        mode: ``"lora"``, or ``"output"`` / ``"input"`` for IA³.
        inplace: whether the merge wrote into the existing storage.
        weight: the replaced weight: the original ``Parameter`` itself (``inplace=False``)
            or an exact copy of the overwritten values (``inplace=True``).
        bias: the same for the bias, when the merge rewrote it (IA³ output scaling).
        weight_grad / bias_grad: ``requires_grad`` of the replaced parameters.
        calls: the removed nodes, one :class:`CallSpec` per call of the layer.

    Records are immutable and shared, never copied, when a model is copied: the tensors
    they hold are never written.
    """

    kind: str
    adapter: str
    site: str
    mode: str
    inplace: bool
    weight: Tensor
    bias: Tensor | None
    weight_grad: bool
    bias_grad: bool
    calls: tuple[CallSpec, ...] = field(default=())

    @property
    def label(self) -> str:
        """``"lora:default"``."""
        return f"{self.kind}:{self.adapter}"

    def __deepcopy__(self, memo: dict) -> MergeRecord:
        return self


def merged_adapters(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Layers with merged adapters: qualified name → ``("lora:default", ...)``, oldest first."""
    out: dict[str, tuple[str, ...]] = {}
    for qname, calls in call_sites(model).items():
        records = calls[0].node.meta.get(MERGED_KEY, ())
        if records:
            out[qname] = tuple(r.label for r in records)
    return out


# --------------------------------------------------------------------------------------
# Inventory: which adapters the model carries, and where
# --------------------------------------------------------------------------------------


def adapter_inventory(model: nn.Module) -> dict[str, dict[str, list[str]]]:
    """Adapter name → pass name → qualified names of the layers carrying it (model order)."""
    out: dict[str, dict[str, list[str]]] = {}
    for _, mod in model.named_modules():
        if isinstance(mod, AdapterModule):
            sites = out.setdefault(mod.adapter_name, {}).setdefault(mod.pass_name, [])
            if mod.site not in sites:
                sites.append(mod.site)
    return out


def _describe_present(inv: dict[str, dict[str, list[str]]]) -> str:
    if not inv:
        return "the model carries no adapter"
    return "adapters present: " + ", ".join(
        f"{name!r} ({'/'.join(_KIND_LABEL.get(k, k) for k in kinds)})"
        for name, kinds in sorted(inv.items()))


def not_mergeable_error(who: str, name: str, kinds: Sequence[str]) -> MergeError:
    """The error for an adapter that no merge can fold into the weights."""
    return MergeError(
        f"{who}: adapter {name!r} ({', '.join(kinds)}) cannot be merged: {_WHY_NOT_LINEAR}. "
        f"Way out: keep it as a module, or merge only the LoRA / IA³ adapters by name.")


def _resolve_names(who: str, kind: str, names: tuple[str, ...] | None,
                   inv: dict[str, dict[str, list[str]]]) -> list[str]:
    """The adapter names a pass of ``kind`` acts on; errors for unknown or foreign ones."""
    if names is None:
        return sorted(n for n, kinds in inv.items() if kind in kinds)
    for name in names:
        if name not in inv:
            raise AdapterNotFoundError(f"{who}: the model has no adapter named {name!r}; "
                                       f"{_describe_present(inv)}.")
        kinds = list(inv[name])
        if kind not in kinds:
            other = [k for k in kinds if k in _KIND_LABEL]
            if other:
                raise MergeError(
                    f"{who}: adapter {name!r} is an {_KIND_LABEL[other[0]]} adapter, not "
                    f"{_KIND_LABEL[kind]}. Way out: use {_MERGE_PASS[other[0]]} / "
                    f"{_UNMERGE_PASS[other[0]]} for it.")
            raise not_mergeable_error(who, name, kinds)
    return list(dict.fromkeys(names))


# --------------------------------------------------------------------------------------
# Layout: the adapter nodes around one call of a layer
# --------------------------------------------------------------------------------------


def _tag(node: Any) -> dict | None:
    return node.meta.get("surgery") if isinstance(node, fx.Node) else None


def _is(node: Any, pass_name: str, part: str, site: str) -> bool:
    tag = _tag(node)
    return bool(tag) and tag.get("pass") == pass_name and tag.get("part") == part \
        and tag.get("site") == site


@dataclass
class Layout:
    """The LoRA and IA³ nodes around one call of a layer.

    Attributes:
        call: the call site.
        inputs: IA³ input-scaling nodes of this layer, the one feeding the call first.
        outputs: nodes passes put on the path of the call's value (LoRA ``add``, IA³
            output scaling, other passes' nodes), the one reading the call first (a chain:
            each reads the previous one and is its only user).
    """

    call: CallSite
    inputs: list[fx.Node]
    outputs: list[fx.Node]

    def key(self, node: fx.Node) -> tuple[str, str]:
        tag = _tag(node)
        return tag["pass"], tag["adapter"]

    def keys(self) -> set[tuple[str, str]]:
        return {self.key(n) for n in self.inputs + self.outputs}


def layout(call: CallSite, site: str) -> Layout:
    """Find the adapter nodes of ``site`` around one call of it."""
    base = call.node
    inputs = []
    cur = call_input(base)
    while _is(cur, "ia3", "ia3_l", site) and cur.op == "call_module":
        inputs.append(cur)
        cur = call_input(cur)
    outputs = []
    cur = base
    while len(cur.users) == 1:
        (user,) = cur.users
        tag = _tag(user)
        if not (tag and tag.get("site") == site and user.args and user.args[0] is cur
                and tag.get("part") not in _SIDE_PARTS):
            break
        outputs.append(user)  # LoRA adds, IA³ scalings, and other passes' nodes on the path
        cur = user
    return Layout(call, inputs, outputs)


def lora_nodes(add: fx.Node, site: str) -> dict[str, fx.Node]:
    """The five nodes of the LoRA branch ending in ``add``, by part.

    Raises:
        MergeError: the branch was edited into a shape the merge does not recognise.
    """
    try:
        scale = add.args[1]
        lora_b = scale.args[0]
        lora_a = lora_b.args[0]
        drop = lora_a.args[0]
        nodes = {"lora_dropout": drop, "lora_A": lora_a, "lora_B": lora_b, "scale": scale,
                 "add": add}
    except (AttributeError, IndexError) as e:
        raise MergeError(f"the LoRA branch ending in node {add.name!r} at {site} is not "
                         f"dropout → lora_A → lora_B → scale → add; it cannot be merged") from e
    adapter = _tag(add)["adapter"]
    for part, node in nodes.items():
        tag = _tag(node)
        if not (tag and tag.get("pass") == "lora" and tag.get("part") == part
                and tag.get("site") == site and tag.get("adapter") == adapter):
            raise MergeError(f"the LoRA branch ending in node {add.name!r} at {site} is not "
                             f"dropout → lora_A → lora_B → scale → add; it cannot be merged")
    for part in ("lora_dropout", "lora_A", "lora_B", "scale"):
        if len(nodes[part].users) != 1:
            raise MergeError(f"node {nodes[part].name!r} of the LoRA branch {adapter!r} at {site} "
                             f"has other users; the branch cannot be removed")
    return nodes


def plan_call(lay: Layout, site: str, wanted: set[tuple[str, str]]) -> list[tuple[str, str]]:
    """The order in which the ``wanted`` adapters of one call can be folded, innermost first.

    A LoRA branch folds when only other LoRA adds lie between it and the call and it reads
    the call's own input; an IA³ output vector when it reads the call directly; an IA³ input
    vector when it feeds the call and nothing else reads it.

    Raises:
        MergeError: an adapter is missing from this call, or another adapter, not being
            merged, lies in the way (the message says which to merge first).
    """
    missing = wanted - lay.keys()
    if missing:
        kind, name = sorted(missing)[0]
        raise MergeError(f"{_KIND_LABEL.get(kind, kind)} adapter {name!r} of {site} has no "
                         f"branch at the call {lay.call.node.name!r}: the graph around it was "
                         f"edited by hand or by a pass that does not keep the branch in place")
    outputs = list(lay.outputs)
    inputs = list(lay.inputs)
    base_in = call_input(lay.call.node)
    readers = {n: set(n.users) for n in inputs}
    drop_of = {n: lora_nodes(n, site)["lora_dropout"] for n in outputs if _is(n, "lora", "add", site)}
    pending = set(wanted)
    order: list[tuple[str, str]] = []

    def take(key: tuple[str, str]) -> None:
        pending.discard(key)
        order.append(key)

    while pending:
        progressed = False
        for p, node in enumerate(outputs):
            key = lay.key(node)
            if key not in pending:
                continue
            if key[0] == "lora":
                x = drop_of[node].args[0]
                if all(q in drop_of for q in outputs[:p]) and x is base_in:
                    outputs.pop(p)
                    if x in readers:
                        readers[x].discard(drop_of[node])
                    take(key)
                    progressed = True
                    break
            elif key[0] == "ia3" and p == 0:
                outputs.pop(0)
                take(key)
                progressed = True
                break
        if progressed:
            continue
        if inputs and lay.key(inputs[0]) in pending and len(readers[inputs[0]]) == 1:
            node = inputs.pop(0)
            base_in = call_input(node)
            take(lay.key(node))
            continue
        raise MergeError(_blocked(lay, site, pending, outputs, inputs, base_in, drop_of))
    return order


def _blocked(lay: Layout, site: str, pending: set[tuple[str, str]], outputs: list[fx.Node],
             inputs: list[fx.Node], base_in: Any, drop_of: dict[fx.Node, fx.Node]) -> str:
    """Explain why none of the ``pending`` adapters can fold, naming what to merge first."""
    def label(node: fx.Node) -> str:
        kind, name = lay.key(node)
        return f"{_KIND_LABEL.get(kind, kind)} {name!r}"

    for p, node in enumerate(outputs):
        if lay.key(node) not in pending:
            continue
        kind, name = lay.key(node)
        blockers = [q for q in outputs[:p] if not (kind == "lora" and q in drop_of)]
        if blockers:
            b = blockers[0]
            return (f"cannot merge {_KIND_LABEL[kind]} {name!r} into {site}: {label(b)} sits "
                    f"between the layer and it, so the layer's weight does not see it alone. "
                    f"Way out: {_merge_first(lay.key(b), label(b))}.")
        if kind == "lora" and drop_of[node].args[0] is not base_in:
            ins = [n for n in inputs]
            what = label(ins[0]) if ins else "another node"
            return (f"cannot merge LoRA {name!r} into {site}: the layer reads its input through "
                    f"{what} (IA³ input scaling) but the LoRA branch does not, so no single "
                    f"weight computes both. Way out: merge {what} first "
                    f"({_MERGE_PASS['ia3']}).")
    node = inputs[0] if inputs else None
    for q, cand in enumerate(inputs):
        if lay.key(cand) in pending:
            kind, name = lay.key(cand)
            if q > 0:
                return (f"cannot merge IA³ {name!r} into {site}: {label(inputs[0])} lies between "
                        f"it and the layer. Way out: merge {label(inputs[0])} first.")
            node = cand
            break
    if node is not None:
        others = [u for u in node.users if u is not lay.call.node]
        readers = [f"LoRA {_tag(u)['adapter']!r}" for u in others if _tag(u)] or \
            [repr(u.name) for u in others]
        return (f"cannot merge IA³ {lay.key(node)[1]!r} into {site}: its scaled input also feeds "
                f"{', '.join(readers)}, which would lose the scaling. Way out: merge "
                f"{readers[0]} first ({_MERGE_PASS['lora']}).")
    kind, name = sorted(pending)[0]
    return f"cannot merge {_KIND_LABEL.get(kind, kind)} {name!r} into {site}"


def _merge_first(key: tuple[str, str], label: str) -> str:
    if key[0] in _MERGE_PASS:
        return f"merge {label} first ({_MERGE_PASS[key[0]]}), in the same apply_passes call if you like"
    return f"{label} cannot be merged ({_WHY_NOT_LINEAR}); leave this adapter unmerged"


def plan_site(calls: Sequence[CallSite], site: str,
              wanted: set[tuple[str, str]]) -> list[tuple[str, str]]:
    """:func:`plan_call` for every call of a layer; all calls must agree.

    Raises:
        MergeError: as :func:`plan_call`, or two calls of a shared layer carry different
            adapters.
    """
    order = None
    for call in calls:
        this = plan_call(layout(call, site), site, wanted)
        if order is not None and this != order:
            raise MergeError(f"the calls of {site} carry different adapters ({order} vs "
                             f"{this}); a shared layer merges only when every call has them")
        order = this
    return order or []


# --------------------------------------------------------------------------------------
# Arithmetic over a sequence of merges
# --------------------------------------------------------------------------------------


def fold_steps(site_module: nn.Module, steps: Sequence[tuple[str, str]], weight: Tensor,
               bias: Tensor | None) -> list[tuple[Tensor, Tensor | None]]:
    """Weight and bias after each merge step, computed from ``weight`` and ``bias``.

    Args:
        site_module: the adapted layer (holding ``lora_A``/``lora_B``/``ia3_l``).
        steps: ``[(kind, adapter name)]`` in merge order.
        weight / bias: the starting values (not changed).

    Returns:
        ``[(weight, bias)]`` after each step: new tensors, or the input ones where a step
        does not change them.
    """
    transposed = is_hf_conv1d(site_module)
    out = []
    with torch.no_grad():
        for kind, name in steps:
            if kind == "lora":
                lora_a = site_module._modules["lora_A"][name]
                lora_b = site_module._modules["lora_B"][name]
                delta = lora_delta(lora_a.weight, lora_b.weight, lora_b.scaling,
                                   transposed=transposed, dtype=compute_dtype(weight.dtype))
                weight = merge_delta(weight, delta)
            else:
                vec = site_module._modules["ia3_l"][name]
                weight, bias = ia3_fold(weight, bias, vec.vector().detach(), mode=vec.mode,
                                        transposed=transposed)
            out.append((weight, bias))
    return out


def _detail(site_module: nn.Module, kind: str, name: str, inplace: bool) -> str:
    where = " (in place)" if inplace else ""
    if kind == "lora":
        scaling = site_module._modules["lora_B"][name].scaling
        t = "ᵀ" if is_hf_conv1d(site_module) else ""
        return f"W + {scaling:g}·(B A){t} of LoRA {name!r}{where}"
    mode = site_module._modules["ia3_l"][name].mode
    return f"IA³ {name!r} folded ({mode} scaling){where}"


# --------------------------------------------------------------------------------------
# Graph edits
# --------------------------------------------------------------------------------------


def _owner(model: nn.Module, prefix: str) -> nn.Module:
    return model.get_submodule(prefix) if prefix else model


def _spec(node: fx.Node) -> NodeSpec:
    const = node.args[1] if _tag(node)["part"] == "scale" else None
    return NodeSpec(node.name, node.target, node.op, _tag(node)["part"], dict(node.meta), const)


def _remove(call: CallSite, site: str, kind: str, name: str) -> CallSpec:
    """Take one adapter's nodes out of one call; return what is needed to put them back."""
    lay = layout(call, site)
    graph = call.owner.graph
    base = call.node
    if kind == "lora":
        add = next(n for n in lay.outputs if lay.key(n) == (kind, name))
        nodes = lora_nodes(add, site)
        anchor = add.args[0]
        specs = tuple(_spec(nodes[p]) for p in _LORA_PARTS)
        add.replace_all_uses_with(anchor)
        for part in reversed(_LORA_PARTS):
            graph.erase_node(nodes[part])
        return CallSpec(call.prefix, base.name, anchor.name, specs)
    node = next(n for n in lay.inputs + lay.outputs if lay.key(n) == (kind, name))
    spec = (_spec(node),)
    if node in lay.outputs:
        node.replace_all_uses_with(base)
    else:
        set_call_input(base, call_input(node))
    graph.erase_node(node)
    return CallSpec(call.prefix, base.name, base.name, spec)


def _create(graph: fx.Graph, spec: NodeSpec, args: tuple, live: set[str]) -> fx.Node:
    """Recreate a removed node under its old name (when free) and with its old meta."""
    namespace = getattr(graph, "_graph_namespace", None)
    used = getattr(namespace, "_used_names", None)
    if spec.name not in live and isinstance(used, set):
        used.discard(spec.name)  # names of erased nodes stay reserved; free the old one
    node = graph.create_node(spec.op, spec.target, args, {}, name=spec.name)
    node.meta = dict(spec.meta)
    live.add(node.name)
    return node


def _restore(model: nn.Module, record: MergeRecord, spec: CallSpec) -> None:
    """Put one adapter's nodes back at one call, where the merge found them."""
    owner = _owner(model, spec.prefix)
    by_name = {n.name: n for n in owner.graph.nodes}
    live = set(by_name)
    base = by_name[spec.base]
    graph = editable_graph(CallSite(record.site, spec.prefix, owner, base))
    if record.kind == "lora":
        anchor = base
        cur = base
        while cur.name != spec.anchor and len(cur.users) == 1:  # the old anchor, if still there
            (user,) = cur.users
            if not (_is(user, "lora", "add", record.site) and user.args[0] is cur):
                break
            cur = user
        if cur.name == spec.anchor:
            anchor = cur
        x = call_input(base)
        parts = {s.part: s for s in spec.nodes}

        def build() -> fx.Node:
            d = _create(graph, parts["lora_dropout"], (x,), live)
            a = _create(graph, parts["lora_A"], (d,), live)
            b = _create(graph, parts["lora_B"], (a,), live)
            s = _create(graph, parts["scale"], (b, parts["scale"].const), live)
            return _create(graph, parts["add"], (anchor, s), live)

        add = insert_chain(graph, anchor, build)
        anchor.replace_all_uses_with(add, delete_user_cb=lambda user: user is not add)
        return
    (node_spec,) = spec.nodes
    if record.mode == "input":
        with graph.inserting_before(base):
            node = _create(graph, node_spec, (call_input(base),), live)
        set_call_input(base, node)
    else:
        node = insert_chain(graph, base, lambda: _create(graph, node_spec, (base,), live))
        base.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)


def _set_records(calls: Sequence[CallSite], records: tuple[MergeRecord, ...]) -> None:
    for call in calls:
        if records:
            call.node.meta[MERGED_KEY] = records
        else:
            call.node.meta.pop(MERGED_KEY, None)


def _records(calls: Sequence[CallSite], site: str) -> tuple[MergeRecord, ...]:
    records = calls[0].node.meta.get(MERGED_KEY, ())
    for call in calls[1:]:
        if call.node.meta.get(MERGED_KEY, ()) != records:
            raise MergeError(f"the calls of {site} disagree on what is merged into it; the "
                             f"graph was edited outside the merge passes")
    return records


def _node_name(prefix: str, name: str) -> str:
    return f"{prefix}/{name}"


# --------------------------------------------------------------------------------------
# The engines behind the four passes
# --------------------------------------------------------------------------------------


def _tied(model: nn.Module, param: Tensor) -> list[str]:
    ptr = param.untyped_storage().data_ptr()
    return [n for n, p in model.named_parameters(remove_duplicate=False)
            if p.untyped_storage().data_ptr() == ptr]


def _merge(model: nn.Module, *, kind: str, names: tuple[str, ...] | None, safe: bool,
           inplace: bool, who: str, pass_name: str) -> PassResult:
    inv = adapter_inventory(model)
    chosen = _resolve_names(who, kind, names, inv)
    if not chosen:
        raise MergeError(f"{who}: nothing to merge: the model has no {_KIND_LABEL[kind]} adapter "
                         f"({_describe_present(inv)}).")
    calls_of = call_sites(model)
    work: dict[str, set[tuple[str, str]]] = {}
    merged_already: dict[str, list[str]] = {}
    for name in chosen:
        for site in inv[name][kind]:
            if site not in calls_of:
                raise MergeError(f"{who}: {site}, which carries {_KIND_LABEL[kind]} {name!r}, "
                                 f"is not called from the graph")
            if any(r.kind == kind and r.adapter == name for r in _records(calls_of[site], site)):
                merged_already.setdefault(name, []).append(site)
            else:
                work.setdefault(site, set()).add((kind, name))
    pending_names = {n for keys in work.values() for _, n in keys}
    done = [n for n in chosen if n not in pending_names]
    if names is not None and done:
        raise MergeError(f"{who}: {_KIND_LABEL[kind]} adapter {done[0]!r} is already merged (into "
                         f"{', '.join(merged_already[done[0]][:5])}); merging twice would add "
                         f"its update twice. Way out: {_UNMERGE_PASS[kind]}(names="
                         f"[{done[0]!r}]) first.")
    if not work:
        raise MergeError(f"{who}: every {_KIND_LABEL[kind]} adapter is already merged "
                         f"({', '.join(map(repr, chosen))}); nothing to merge.")

    # Plan and compute everything first: nothing changes unless all of it can be done.
    plans: dict[str, tuple[nn.Module, list[tuple[str, str]], list]] = {}
    for site, wanted in work.items():
        calls = calls_of[site]
        module = calls[0].owner.get_submodule(str(calls[0].node.target))
        steps = plan_site(calls, site, wanted)
        if inplace:
            others = [n for n in _tied(model, module.weight) if n != f"{site}.weight"]
            if others:
                raise MergeError(f"{who}: {site}.weight shares its storage with "
                                 f"{', '.join(others[:5])}; an in-place merge would change them "
                                 f"too. Way out: inplace=False.")
        results = fold_steps(module, steps, module.weight, module._parameters.get("bias"))
        if safe:
            for (k, n), (w, b) in zip(steps, results):
                if not is_finite(w) or (b is not None and not is_finite(b)):
                    raise MergeError(
                        f"{who}: merging {_KIND_LABEL[k]} {n!r} into {site} gives non-finite "
                        f"values (inf or nan) in its {'weight' if not is_finite(w) else 'bias'}; "
                        f"nothing was changed. Way out: check the adapter's parameters, or pass "
                        f"safe=False to merge anyway.")
        plans[site] = (module, steps, [] if inplace else results)
        del results  # an in-place merge recomputes them one at a time below

    changes: list[Change] = []
    for site, (module, steps, results) in plans.items():
        calls = calls_of[site]
        records = _records(calls, site)
        for i, (k, n) in enumerate(steps):
            weight = module.weight
            bias = module._parameters.get("bias")
            if inplace:
                ((new_w, new_b),) = fold_steps(module, [(k, n)], weight, bias)
            else:
                new_w, new_b = results[i]
            rewrites_bias = new_b is not bias
            specs = tuple(_remove(call, site, k, n) for call in calls)
            if inplace:
                record = MergeRecord(k, n, site, _mode(module, k, n), True,
                                     weight.detach().clone(),
                                     bias.detach().clone() if rewrites_bias else None,
                                     weight.requires_grad,
                                     bool(bias is not None and bias.requires_grad), specs)
                with torch.no_grad():
                    weight.copy_(new_w)
                    if rewrites_bias:
                        bias.copy_(new_b)
            else:
                record = MergeRecord(k, n, site, _mode(module, k, n), False, weight,
                                     bias if rewrites_bias else None, weight.requires_grad,
                                     bool(bias is not None and bias.requires_grad), specs)
                module._parameters["weight"] = nn.Parameter(new_w, requires_grad=weight.requires_grad)
                if rewrites_bias:
                    module._parameters["bias"] = nn.Parameter(new_b, requires_grad=bias.requires_grad)
            records = records + (record,)
            _set_records(calls, records)
            role = specs[0].nodes[0].meta["surgery"].get("role") if specs else None
            for spec in specs:
                for node in spec.nodes:
                    changes.append(Change("node_removed", pass_name, site,
                                          _node_name(spec.prefix, node.name), adapter=n, role=role))
            detail = _detail(module, k, n, inplace)
            for pname in ("weight", "bias") if rewrites_bias else ("weight",):
                param = module._parameters[pname]
                changes.append(Change("param_rewritten", pass_name, site, f"{site}.{pname}",
                                      adapter=n, role=role, shape=tuple(param.shape),
                                      numel=param.numel(), trainable=param.requires_grad,
                                      detail=detail))
    return PassResult(model, True, tuple(changes), pass_name)


def _mode(module: nn.Module, kind: str, name: str) -> str:
    return "lora" if kind == "lora" else module._modules["ia3_l"][name].mode


def _unmerge(model: nn.Module, *, kind: str, names: tuple[str, ...] | None, who: str,
             pass_name: str) -> PassResult:
    inv = adapter_inventory(model)
    chosen = set(_resolve_names(who, kind, names, inv))
    calls_of = call_sites(model)
    todo: dict[str, int] = {}
    seen: set[str] = set()
    for site, calls in calls_of.items():
        records = _records(calls, site)
        hits = [i for i, r in enumerate(records) if r.kind == kind and r.adapter in chosen]
        if not hits:
            continue
        k = hits[0]
        later = [r for r in records[k:] if not (r.kind == kind and r.adapter in chosen)]
        if later:
            first = records[k]
            raise MergeError(
                f"{who}: cannot unmerge {_KIND_LABEL[kind]} {first.adapter!r} from {site} while "
                f"{_KIND_LABEL[later[0].kind]} {later[0].adapter!r}, merged after it, stays merged: "
                f"merges come out last-in, first-out so that the weight comes back bit for bit. "
                f"Way out: unmerge {later[0].adapter!r} first ({_UNMERGE_PASS[later[0].kind]}), "
                f"then merge it again if you want it merged.")
        for spec in records[k].calls:
            owner = _owner(model, spec.prefix) if _has(model, spec.prefix) else None
            if owner is None or not any(n.name == spec.base for n in owner.graph.nodes):
                raise MergeError(f"{who}: the call {spec.base!r} of {site} that "
                                 f"{records[k].label} was merged at is no longer in the graph")
        todo[site] = k
        seen.update(records[i].adapter for i in hits)
    if not todo:
        what = f"{_KIND_LABEL[kind]} adapter {sorted(chosen)[0]!r} is" if names is not None and chosen \
            else f"no {_KIND_LABEL[kind]} adapter is"
        raise MergeError(f"{who}: nothing to unmerge: {what} merged. Way out: "
                         f"{_MERGE_PASS[kind]}() merges it.")
    if names is not None:
        unmerged = [n for n in names if n not in seen]
        if unmerged:
            raise MergeError(f"{who}: {_KIND_LABEL[kind]} adapter {unmerged[0]!r} is not merged; "
                             f"nothing was changed.")

    changes: list[Change] = []
    for site, k in todo.items():
        calls = calls_of[site]
        records = _records(calls, site)
        module = calls[0].owner.get_submodule(str(calls[0].node.target))
        for record in reversed(records[k:]):
            for spec in record.calls:
                _restore(model, record, spec)
            _put_back(model, module, record)
            records = records[:-1]
            _set_records(calls, records)
            role = record.calls[0].nodes[0].meta.get("surgery", {}).get("role") if record.calls else None
            for spec in record.calls:
                for node in spec.nodes:
                    changes.append(Change("node_added", pass_name, site,
                                          _node_name(spec.prefix, node.name),
                                          adapter=record.adapter, role=role))
            for pname in ("weight", "bias") if record.bias is not None else ("weight",):
                param = module._parameters[pname]
                changes.append(Change("param_rewritten", pass_name, site, f"{site}.{pname}",
                                      adapter=record.adapter, role=role, shape=tuple(param.shape),
                                      numel=param.numel(), trainable=param.requires_grad,
                                      detail=f"restored from before {record.label} was merged"))
    return PassResult(model, True, tuple(changes), pass_name)


def _has(model: nn.Module, prefix: str) -> bool:
    try:
        _owner(model, prefix)
    except AttributeError:
        return False
    return True


def _put_back(model: nn.Module, module: nn.Module, record: MergeRecord) -> None:
    """Restore the weight (and bias) a merge replaced, bit for bit."""
    pairs = [("weight", record.weight, record.weight_grad)]
    if record.bias is not None:
        pairs.append(("bias", record.bias, record.bias_grad))
    present = {id(p) for p in model.parameters()}
    for pname, saved, grad in pairs:
        if record.inplace:
            with torch.no_grad():
                module._parameters[pname].copy_(saved)
            module._parameters[pname].requires_grad_(grad)
        elif isinstance(saved, nn.Parameter) and id(saved) in present:
            module._parameters[pname] = saved  # still held by a tied module: keep them tied
        else:
            module._parameters[pname] = nn.Parameter(saved.detach(), requires_grad=grad)


# --------------------------------------------------------------------------------------
# The passes
# --------------------------------------------------------------------------------------


def _names(who: str, names: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if names is None:
        return None
    if isinstance(names, str):
        names = (names,)
    out = tuple(names)
    if not out or not all(isinstance(n, str) for n in out):
        raise ConfigError(f"{who}: names must be None (all adapters) or adapter names, got "
                          f"{names!r}")
    return out


@dataclass(frozen=True, kw_only=True)
class MergeLoRAPass(Pass):
    """Fold LoRA branches into their base weights and remove the branch nodes.

    ``W' = W + (alpha / r) · B A`` (``(B A)ᵀ`` for weights stored ``(in, out)``, such as
    transformers' ``Conv1D``), computed in float32 (float64 for float64 weights) and cast
    once to the weight's dtype. Where several branches sit on one layer they fold innermost
    first. Dropout on the branch input is dropped (the merged model computes the branch as
    in evaluation mode). The ``lora_A`` / ``lora_B`` modules stay, unused, so that
    :class:`UnmergeLoRAPass` can put the branch back.

    Memory: with ``inplace=False`` (default) each merged layer gets a new weight tensor and
    the original (the caller's storage) is kept for unmerge, at no extra cost. With
    ``inplace=True`` the merged values are written into the existing storage, which the
    caller's model and every copy sharing it see too, and an exact copy of the overwritten
    values is kept for unmerge: one extra copy of each merged weight per adapter. The
    write cannot be rolled back by :func:`surgery.apply_passes` if a later pass of the same
    call fails, so put an in-place merge last.

    Args:
        names: adapter names to merge; ``None`` = every LoRA adapter not merged yet.
        safe: check that every merged weight is finite before changing anything.
        inplace: write into the existing weight storage instead of a new tensor.

    Raises:
        AdapterNotFoundError: a name the model does not carry (the message lists those it does).
        MergeError: nothing to merge (no LoRA adapter, or all merged already); a named adapter
            is already merged; a named adapter is not LoRA (IA³: use :class:`MergeIA3Pass`;
            bottleneck adapters and prefixes cannot be merged, they are not linear in the
            weights); an adapter not being merged lies between the layer and the branch; a
            merged weight is not finite (``safe=True``); ``inplace=True`` on a tied weight.
            Nothing is changed when it raises.
    """

    name: ClassVar[str] = "merge_lora"

    names: tuple[str, ...] | None = None
    safe: bool = True
    inplace: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", _names("MergeLoRAPass", self.names))

    def run(self, model: nn.Module) -> PassResult:
        return _merge(model, kind="lora", names=self.names, safe=self.safe, inplace=self.inplace,
                      who="MergeLoRAPass", pass_name=self.name)


@dataclass(frozen=True, kw_only=True)
class UnmergeLoRAPass(Pass):
    """Take merged LoRA branches out of their base weights and put the branch nodes back.

    The base weight comes back bit for bit (the tensor the merge replaced, or its exact
    copy written back into the same storage after ``inplace=True``), and the branch nodes
    come back with their names and meta, reading the layer's current input.

    Args:
        names: adapter names to unmerge; ``None`` = every merged LoRA adapter.

    Raises:
        AdapterNotFoundError: a name the model does not carry.
        MergeError: nothing is merged; a named adapter is not merged or not LoRA; another
            adapter merged into the same layer later stays merged (unmerge last-in,
            first-out). Nothing is changed when it raises.
    """

    name: ClassVar[str] = "unmerge_lora"

    names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", _names("UnmergeLoRAPass", self.names))

    def run(self, model: nn.Module) -> PassResult:
        return _unmerge(model, kind="lora", names=self.names, who="UnmergeLoRAPass",
                        pass_name=self.name)


@dataclass(frozen=True, kw_only=True)
class MergeIA3Pass(Pass):
    """Fold IA³ vectors into their layers' weights and remove the scaling nodes.

    Output scaling: ``W' = diag(l) W``, ``b' = l ⊙ b`` (rows of an ``(out, in)`` weight,
    columns of a ``Conv1D`` ``(in, out)`` one). Input scaling (feed-forward output layers):
    ``W' = W diag(l)``. A vector on a fused projection (GPT-2's ``c_attn``) folds as its full
    width, ones outside the learned key and value slices. Computed in float32 and cast once;
    memory as :class:`MergeLoRAPass` (plus the bias for output scaling).

    IA³ scales a layer as LoRA adapted it (``(W x + s·B A x) · l``), so on a layer carrying
    both, the LoRA branch folds first: ``apply_passes(model, [MergeLoRAPass(),
    MergeIA3Pass()])``; the other order raises and says so.

    Args:
        names: adapter names to fold; ``None`` = every IA³ adapter not merged yet.
        safe: check that every folded weight and bias is finite before changing anything.
        inplace: write into the existing storage instead of new tensors.

    Raises:
        AdapterNotFoundError, MergeError: as :class:`MergeLoRAPass`.
    """

    name: ClassVar[str] = "merge_ia3"

    names: tuple[str, ...] | None = None
    safe: bool = True
    inplace: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", _names("MergeIA3Pass", self.names))

    def run(self, model: nn.Module) -> PassResult:
        return _merge(model, kind="ia3", names=self.names, safe=self.safe, inplace=self.inplace,
                      who="MergeIA3Pass", pass_name=self.name)


@dataclass(frozen=True, kw_only=True)
class UnmergeIA3Pass(Pass):
    """Take folded IA³ vectors out of their layers and put the scaling nodes back.

    Weight and bias come back bit for bit, as with :class:`UnmergeLoRAPass`.

    Args:
        names: adapter names; ``None`` = every merged IA³ adapter.

    Raises:
        AdapterNotFoundError, MergeError: as :class:`UnmergeLoRAPass`.
    """

    name: ClassVar[str] = "unmerge_ia3"

    names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", _names("UnmergeIA3Pass", self.names))

    def run(self, model: nn.Module) -> PassResult:
        return _unmerge(model, kind="ia3", names=self.names, who="UnmergeIA3Pass",
                        pass_name=self.name)
