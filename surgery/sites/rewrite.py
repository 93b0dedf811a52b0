"""Rewrite primitives on site graphs, shared by the passes.

Passes insert nodes into a site's :class:`~surgery.sites.site_graph.SiteGraph` and register
their modules on it, so parameters read ``layers.0.attn.q_proj.lora_A.default.weight``.

Every node a pass inserts carries ``node.meta["surgery"] = {"pass", "site", "role",
"adapter", "part"}`` (see :func:`mark`). The part says where the node sits:

- side-branch parts (:data:`BRANCH_PARTS`: ``lora_dropout``, ``lora_A``, ``lora_B``,
  ``scale``, ``down``, ``act``, ``up``; a DoRA branch's ``dora_weight``, the reads of the
  weights it needs, and ``dora_scale``, its magnitude's update; IA³'s ``ia3_l``, the read of
  its vector) read the site's input or output, or a parameter, but are not on the
  path the site's value takes to the output;
- every other part is on the main path and is see-through: :func:`site_output` passes it
  as if the layer were unadapted. Among them: ``add`` (the sum of the layer's output and a
  branch) and ``ia3`` (IA³ scaling).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import fx, nn

from surgery.errors import AlreadyAdaptedError
from surgery.sites.changes import Change
from surgery.sites.marker import AdapterModule, AdapterParameters
from surgery.sites.site_graph import SiteGraph

__all__ = [
    "BRANCH_PARTS",
    "chain_end",
    "follow_main_path",
    "freeze_site",
    "insert_after",
    "mark",
    "register_adapter",
    "replace_uses_after",
    "site_input",
    "site_output",
]

# Parts of an inserted side branch: they read the site's input or output but are not on
# the path the site's value takes to the output.
BRANCH_PARTS = frozenset({"lora_dropout", "lora_A", "lora_B", "scale", "down", "act", "up",
                          "dora_weight", "dora_scale", "ia3_l"})


def register_adapter(site_module: nn.Module, slot: str, adapter_name: str, module: nn.Module,
                     *, pass_name: str, site: str) -> None:
    """Register ``module`` as ``site_module.<slot>.<adapter_name>`` (a ``ModuleDict`` entry).

    Raises:
        AlreadyAdaptedError: the slot already holds an adapter of that name.
    """
    holder = site_module._modules.get(slot)
    if holder is None:
        holder = nn.ModuleDict()
        site_module.add_module(slot, holder)
    module.train(site_module.training)  # an eval-mode model gets eval-mode adapters (dropout off)
    holder.train(site_module.training)
    if adapter_name in holder:
        kind = type(site_module.template if isinstance(site_module, SiteGraph) else site_module)
        raise AlreadyAdaptedError(
            f"{pass_name}: {site or 'the model'} ({kind.__name__}) already has an adapter named "
            f"{adapter_name!r} in slot {slot!r}. Way out: give the pass another name=..., or "
            f"exclude this site with exclude=[{site!r}].")
    holder[adapter_name] = module


def replace_uses_after(node: fx.Node, new: fx.Node) -> None:
    """Make every user of ``node`` except ``new`` (and its own inputs) use ``new`` instead.

    Only the inserted nodes feeding ``new`` (those carrying ``meta["surgery"]``) are walked,
    so the cost is the size of the inserted chain, not of the graph.
    """
    keep = {new}
    # a DoRA magnitude reads the layer's own result ``W x + b`` (to take ``W x`` off it),
    # whatever is put on the layer's path after it
    keep.update(u for u in node.users
                if (u.meta.get("surgery") or {}).get("part") == "dora_scale")
    stack = list(new.all_input_nodes)
    while stack:  # inserted nodes feeding ``new`` that themselves use ``node`` keep using it
        cur = stack.pop()
        if cur in keep or cur is node or "surgery" not in cur.meta:
            continue
        keep.add(cur)
        stack.extend(cur.all_input_nodes)
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user not in keep)


def chain_end(node: fx.Node, pass_name: str) -> fx.Node:
    """The last of the ``add`` nodes of pass ``pass_name`` that follow ``node`` one after the
    other (each reading the previous one as its first argument), or ``node`` itself."""
    cur = node
    while True:
        nxt = [u for u in cur.users if (u.meta.get("surgery") or {}).get("pass") == pass_name
               and u.meta["surgery"].get("part") == "add" and u.args and u.args[0] is cur]
        if len(nxt) != 1:
            return cur
        cur = nxt[0]


def mark(node: fx.Node, *, pass_name: str, site: str, role: str | None, adapter: str,
         part: str, like: fx.Node | None = None) -> fx.Node:
    """Attach provenance (``node.meta["surgery"]``) and, from ``like``, the example value."""
    node.meta["surgery"] = {"pass": pass_name, "site": site, "role": role, "adapter": adapter,
                            "part": part}
    if like is not None and "val" in like.meta:
        node.meta["val"] = like.meta["val"]
    return node


def insert_after(graph: fx.Graph, after: fx.Node, build: Callable[[], fx.Node]) -> fx.Node:
    """Run ``build`` with new nodes inserted right after ``after``, in creation order."""
    with graph.inserting_before(after.next):
        return build()


def freeze_site(module: nn.Module, *, pass_name: str, site: str, role: str | None) -> list[Change]:
    """Freeze the base parameters of an adapted site: its own and its children's, not its
    adapters' (nor those of its adapters' parameter slots)."""
    changes = []
    adapters = {id(p) for m in module.modules() if isinstance(m, (AdapterModule, AdapterParameters))
                for p in m.parameters()}
    for pname, param in module.named_parameters():
        if param.requires_grad and id(param) not in adapters:
            param.requires_grad_(False)
            full = f"{site}.{pname}" if site else pname
            changes.append(Change("param_frozen", pass_name, site, full, role=role,
                                  shape=tuple(param.shape), numel=param.numel()))
    return changes


def _inserted_on_main_path(node: fx.Node) -> bool:
    meta = node.meta.get("surgery")
    return meta is not None and meta.get("part") not in BRANCH_PARTS


def follow_main_path(node: fx.Node) -> fx.Node:
    """From ``node``, the last of the nodes earlier passes inserted on its main path (LoRA's
    or an adapter's ``add``, an IA³ scaling); ``node`` itself when there are none."""
    while True:
        nxt = [u for u in node.users if _inserted_on_main_path(u)]
        if len(nxt) != 1:
            return node
        node = nxt[0]


def site_output(sg: SiteGraph) -> fx.Node:
    """The node carrying the site's adapted value.

    Starting from the base module's result, follows the nodes earlier passes inserted on the
    main path (LoRA's ``add``, an IA³ output scaling), so a later pass wraps the layer as
    already adapted: IA³ after LoRA scales ``W x + s · B A x``, as it does when applied
    before LoRA.
    """
    return follow_main_path(sg.base_node)


def site_input(sg: SiteGraph) -> fx.Node:
    """The node carrying the site's input as the base computation reads it.

    Starting from the first placeholder, follows the nodes earlier passes inserted on the
    main path (an IA³ input scaling), so a LoRA branch added later reads what the base
    layer reads: ``W (x * l) + s · B A (x * l)``.
    """
    return follow_main_path(sg.input_node)
