"""Small graph-editing helpers shared by the passes.

Passes edit the graph that holds a site's ``call_module`` node and register their modules
under the site, so parameters read ``layers.0.attn.q_proj.lora_A.default.weight``.

Every node a pass inserts carries ``node.meta["surgery"] = {"pass", "site", "role",
"adapter", "part"}`` (see :func:`mark`). The part says where the node sits:

- side-branch parts (:data:`BRANCH_PARTS`: ``lora_dropout``, ``lora_A``, ``lora_B``,
  ``scale``, ``down``, ``act``, ``up``) read the site's input or output but are not on the
  path the site's value takes to the rest of the graph; walks never enter them.
- every other part is on the main path and is see-through: a walk from a layer's output
  (role discovery, :func:`site_output`) passes it as if the layer were unadapted. Among them:
  ``add`` (the sum of the layer's output and a branch), ``ia3_l`` (IA³ scaling), and
  ``carry``, a placeholder :func:`carry_value` adds to pass a value into a submodule's
  graph on the export front end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import fx, nn

from surgery.errors import AlreadyAdaptedError, UnsupportedSiteError
from surgery.map.graphs import CallSite, call_sites, graph_modules, qualified
from surgery.pass_base import Change

__all__ = [
    "freeze_site",
    "register_adapter",
    "call_input",
    "set_call_input",
    "replace_uses_after",
    "mark",
    "relative_target",
    "editable_graph",
    "insert_chain",
    "site_output",
    "site_input_users",
    "carry_value",
]

# Parts of an inserted side branch: they read the site's input or output but are not on
# the path the site's value takes to the rest of the graph.
BRANCH_PARTS = frozenset({"lora_dropout", "lora_A", "lora_B", "scale", "down", "act", "up"})


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
    if adapter_name in holder:
        raise AlreadyAdaptedError(
            f"{pass_name}: {site} ({type(site_module).__name__}) already has an adapter named "
            f"{adapter_name!r} in slot {slot!r}. Way out: give the pass another name=..., or "
            f"exclude this site with exclude=[{site!r}].")
    holder[adapter_name] = module


def editable_graph(call: CallSite) -> fx.Graph:
    """The graph holding ``call``, made ready for inserting ``call_module`` nodes.

    On the export front end a graph's ``owning_module`` is the compiled copy made when the
    graph was last finalised, which does not know modules registered since; inserting a
    ``call_module`` node checks the target against it. This points it back at the owner.
    """
    graph = call.owner.graph
    if graph.owning_module is not call.owner and not isinstance(call.owner, fx.GraphModule):
        graph.owning_module = call.owner
    return graph


def relative_target(call: CallSite, *parts: str) -> str:
    """Target string, relative to the graph owner, of a module registered under the site."""
    return ".".join((str(call.node.target),) + parts)


def call_input(node: fx.Node) -> Any:
    """The first input of a ``call_module`` node (positional or ``input=``)."""
    if node.args:
        return node.args[0]
    if "input" in node.kwargs:
        return node.kwargs["input"]
    return next(iter(node.kwargs.values()))


def set_call_input(node: fx.Node, value: fx.Node) -> None:
    """Replace the first input of a ``call_module`` node."""
    if node.args:
        node.args = (value,) + tuple(node.args[1:])
    elif "input" in node.kwargs:
        node.kwargs = {**node.kwargs, "input": value}
    else:
        key = next(iter(node.kwargs))
        node.kwargs = {**node.kwargs, key: value}


def replace_uses_after(node: fx.Node, new: fx.Node) -> None:
    """Make every user of ``node`` except ``new`` (and its own inputs) use ``new`` instead.

    Only the inserted nodes feeding ``new`` (those carrying ``meta["surgery"]``) are walked,
    so the cost is the size of the inserted chain, not of the graph.
    """
    keep = {new}
    stack = list(new.all_input_nodes)
    while stack:  # inserted nodes feeding ``new`` that themselves use ``node`` keep using it
        cur = stack.pop()
        if cur in keep or cur is node or "surgery" not in cur.meta:
            continue
        keep.add(cur)
        stack.extend(cur.all_input_nodes)
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user not in keep)


def mark(node: fx.Node, *, pass_name: str, site: str, role: str | None, adapter: str,
         part: str, like: fx.Node | None = None) -> fx.Node:
    """Attach provenance (``node.meta["surgery"]``) and, from ``like``, the example value."""
    node.meta["surgery"] = {"pass": pass_name, "site": site, "role": role, "adapter": adapter,
                            "part": part}
    if like is not None and "val" in like.meta:
        node.meta["val"] = like.meta["val"]
    return node


def insert_chain(graph: fx.Graph, after: fx.Node, build: Callable[[], fx.Node]) -> fx.Node:
    """Run ``build`` with new nodes inserted right after ``after``, in creation order."""
    anchor = after.next
    with graph.inserting_before(anchor):
        return build()


def freeze_site(module: nn.Module, *, pass_name: str, site: str, role: str | None) -> list[Change]:
    """Freeze the base parameters of an adapted layer (its own, not its adapters')."""
    changes = []
    for pname, param in module.named_parameters(recurse=False):
        if param.requires_grad:
            param.requires_grad_(False)
            changes.append(Change("param_frozen", pass_name, site, f"{site}.{pname}", role=role,
                                  shape=tuple(param.shape), numel=param.numel()))
    return changes


def _site_meta(node: fx.Node, site: str) -> dict | None:
    meta = node.meta.get("surgery")
    return meta if meta is not None and meta.get("site") == site else None


def site_output(base: fx.Node, site: str) -> fx.Node:
    """The node carrying the adapted value of one call of ``site``.

    Starting from the base ``call_module`` node, follows the nodes earlier passes inserted
    on the main path of the same site (LoRA's ``add``, an IA³ output scaling), so a later
    pass wraps the layer as already adapted: IA³ after LoRA scales ``W x + s · B A x``,
    as it does when applied before LoRA.
    """
    node = base
    while True:
        nxt = [u for u in node.users
               if (meta := _site_meta(u, site)) is not None and meta.get("part") not in BRANCH_PARTS]
        if len(nxt) != 1:
            return node
        node = nxt[0]


def site_input_users(base: fx.Node, site: str, value: Any) -> list[fx.Node]:
    """The nodes that read ``value`` as the input of one call of ``site``, in graph order:
    the base call and the side branches earlier passes attached to it (LoRA's dropout)."""
    if not isinstance(value, fx.Node):
        return [base]
    users = [u for u in value.users if u is base or _site_meta(u, site) is not None]
    order = {n: i for i, n in enumerate(base.graph.nodes)}
    return sorted(set(users) | {base}, key=order.__getitem__)


def _within(inner: str, outer: str) -> bool:
    return outer == "" or inner == outer or inner.startswith(outer + ".")


def _argument(call: fx.Node, index: int, placeholder: fx.Node) -> Any:
    """What a ``call_module`` node passes to the callee's ``index``-th placeholder."""
    if index < len(call.args):
        return call.args[index]
    return call.kwargs.get(str(placeholder.target))


def carry_value(model: nn.Module, value: fx.Node, src: str, dst: str, *, who: str, what: str,
                pass_name: str, site: str, role: str | None, adapter: str
                ) -> tuple[fx.Node, list[str]]:
    """Make ``value`` (a node of the graph owned by ``src``) available in ``dst``'s graph.

    On the export front end each submodule owns a graph, and a value produced in one is
    read in another only through call arguments. This goes up from ``src`` through
    placeholders to a graph that (transitively) calls ``dst``, then down to ``dst``,
    reusing a placeholder already fed with the value or adding one (``carry_<value>``,
    marked with part ``"carry"``) and the matching argument to the call. Before, with the
    value ``x`` read in the root graph and wanted inside ``down``::

        root:  y = down(h)                 down:  def forward(self, h): ...

    After::

        root:  y = down(h, x)              down:  def forward(self, h, carry_x): ...

    On the fx front end (one graph, ``src == dst == ""``) this returns ``value`` unchanged.

    Args:
        model: the traced model owning both graphs.
        value: the node to carry; a node of ``src``'s graph.
        src / dst: qualified names of the graph owners (``""`` for the root).
        who / what: the pass and the value, as named in error messages
            (``"ParallelAdapterPass"``, ``"the input of up.lin"``).
        pass_name, site, role, adapter: provenance for new placeholders (see :func:`mark`).

    Returns:
        The node carrying the value in ``dst``'s graph, and the qualified names of the
        graphs that got a new placeholder, outermost first.

    Raises:
        UnsupportedSiteError: the value is computed inside a module that does not return it,
            or a module on the way is called more than once.
    """
    if src == dst:
        return value, []
    owners = dict(graph_modules(model))
    callers = call_sites(model)
    where = lambda p: f"'{p}'" if p else "the root graph"  # noqa: E731
    while not _within(dst, src):
        if value.op != "placeholder":
            raise UnsupportedSiteError(
                f"{who}: {what} is computed inside {where(src)} ({value.name!r}), but the layer "
                f"whose output the adapter joins is called in {where(dst)}, and {src} does not "
                f"return that value, so the adapter cannot read it there. Way out: select "
                f"single layers with pattern=... (a layer's input and output are in one graph).")
        calls = callers.get(src, [])
        if len(calls) != 1:
            raise UnsupportedSiteError(
                f"{who}: {src} is called {len(calls)} times, so {what} has no "
                f"single source to pass on to {dst}. Way out: select a single layer with "
                f"pattern=....")
        index = [n for n in owners[src].graph.nodes if n.op == "placeholder"].index(value)
        arg = _argument(calls[0].node, index, value)
        if not isinstance(arg, fx.Node):
            raise UnsupportedSiteError(f"{who}: {what} is a constant argument of {src}, not a "
                                       f"graph value.")
        value, src = arg, calls[0].prefix
    added = []
    while src != dst:
        steps = [(n, qualified(src, str(n.target))) for n in owners[src].graph.nodes
                 if n.op == "call_module" and qualified(src, str(n.target)) in owners
                 and _within(dst, qualified(src, str(n.target)))]
        if len(steps) != 1:
            raise UnsupportedSiteError(
                f"{who}: {where(src)} calls the module holding {dst} {len(steps)} times, so the "
                f"input cannot be passed to it unambiguously. Way out: select a single layer "
                f"with pattern=....")
        call, child_name = steps[0]
        child = owners[child_name].graph
        placeholders = [n for n in child.nodes if n.op == "placeholder"]
        fed = [ph for i, ph in enumerate(placeholders) if _argument(call, i, ph) is value]
        if fed:
            value, src = fed[0], child_name
            continue
        taken = {str(ph.target) for ph in placeholders}
        target = f"carry_{value.name}"
        while target in taken:
            target += "_"
        if placeholders:
            ctx = child.inserting_after(placeholders[-1])
        else:
            ctx = child.inserting_before(next(iter(child.nodes), None))
        with ctx:
            ph = child.placeholder(target)
        mark(ph, pass_name=pass_name, site=site, role=role, adapter=adapter,
             part="carry", like=value)
        if call.kwargs:
            call.kwargs = {**call.kwargs, target: value}
        else:
            call.args = tuple(call.args) + (value,)
        added.append(child_name)
        value, src = ph, child_name
    return value, added
