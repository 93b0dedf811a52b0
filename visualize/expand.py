"""Site graphs drawn into the map: what a pass inserted, in place, at each call of its site.

The map of an adapted model (:func:`surgery.targets.model_map`) is traced from the model as
the user wrote it, so it shows each adapted site as it was: one ``call_module`` node for a
linear layer, or the nodes of a sub-layer (an ``mlp``) inlined by torch.fx or held in its own
graph by torch.export. The site graph installed there (:mod:`surgery.sites.site_graph`) holds
the same base computation plus the nodes passes inserted, tagged ``node.meta["surgery"]``.

The picture keeps the map's nodes for the base computation (so a before/after diff finds
exactly the inserted nodes) and adds the inserted nodes of the site graph, wired to the map
through anchors: the site's inputs (the values the map passes to the call), the base result
(the map's value for the call), and the calls of the site's own children (the map's value
for ``<site>.<child>``). Where torch.fx inlined a sub-layer into the map, its nodes pair one
to one with the site graph's base nodes (:func:`align`), so every base node is an anchor: a
prefix's ``cat`` reads the map's keys and the map's attention op reads the ``cat``. Users
of the call in the map read the site graph's adapted output instead of the base result;
when a pass inserted nodes on the input side (IA³ scaling the input of a feed-forward output
layer), the base computation reads their output.

Before a LoRA pass, ``q_proj`` is one node; after it, the same node plus the branch::

    ln ──► q_proj ───────────────────────────────► add ──► softmax
     └───► lora_dropout ► lora_A ► lora_B ► mul ──┘
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from surgery.map.graphs import qualified
from surgery.sites.rewrite import site_input
from surgery.sites.site_graph import SiteGraph, is_site_graph
from visualize.flow import Src, Value, flatten, same_structure
from visualize.nodeinfo import clean_path

__all__ = ["Region", "SiteCall", "align", "find_regions", "site_index", "site_shapes"]

# Symbolic dimensions (torch.export's batch and sequence, "s27") are stood in for by sizes no
# real dimension has while shapes are propagated, and read back as their symbols.
_SYMBOL_BASE = 1_000_003
_SYMBOL_STEP = 2


def site_index(model: nn.Module) -> dict[str, SiteGraph]:
    """Every site graph of ``model`` under every qualified name it sits at.

    Nested site graphs (a LoRA site graph inside the site graph of an ``mlp``) are listed
    too; the root is ``""`` when the model is itself one site graph.
    """
    return {qname: mod for qname, mod in model.named_modules(remove_duplicate=False)
            if is_site_graph(mod)}


def _stack_paths(node: fx.Node) -> set[str]:
    """Qualified paths of the modules torch.fx was inside when it recorded ``node``."""
    return {clean_path(str(v[0])) for v in (node.meta.get("nn_module_stack") or {}).values()}


@dataclass(frozen=True, eq=False)
class Region:
    """The nodes of one module call that torch.fx inlined into the map's root graph.

    Attributes:
        site: the qualified name of the site (``""`` for the whole model).
        sg: its site graph.
        nodes: the map nodes computing the call, in graph order (a contiguous run).
        inputs: nodes outside the region that it reads, in order of first use.
        exit: the node whose value leaves the region (the module's result).
    """

    site: str
    sg: SiteGraph
    nodes: tuple[fx.Node, ...]
    inputs: tuple[fx.Node, ...]
    exit: fx.Node

    @property
    def entry(self) -> fx.Node:
        """The first node of the call."""
        return self.nodes[0]


def find_regions(graph: fx.Graph, sites: Mapping[str, SiteGraph], *, flat: bool) -> list[Region]:
    """The site calls of the map's root ``graph`` that are not one ``call_module`` node.

    Args:
        graph: the map's root graph.
        sites: site graphs by qualified name (:func:`site_index`).
        flat: ``graph`` is a whole-model torch.fx graph, whose nodes record the module stack
            they were traced in (``meta["nn_module_stack"]``). Only then are sub-layer sites
            found; the whole-model site ``""`` is found in any root graph.

    Returns:
        One region per site whose call torch.fx inlined, largest first.
    """
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    called = {clean_path(str(n.target)) for n in nodes if n.op == "call_module"}
    stacks = {n: _stack_paths(n) for n in nodes} if flat else {}
    out = []
    for site, sg in sites.items():
        if site in called:
            continue  # drawn at its call_module node
        if site == "":
            members = nodes
        elif flat:
            members = [n for n in nodes if site in stacks[n]]
        else:
            continue
        if not members:
            continue
        mset = frozenset(members)
        inputs: dict[fx.Node, None] = {}
        for n in members:
            for arg in n.all_input_nodes:
                if arg not in mset:
                    inputs.setdefault(arg, None)
        exits = [n for n in members if any(u not in mset for u in n.users)]
        if not exits:
            continue
        out.append(Region(site, sg, tuple(members), tuple(inputs), exits[-1]))
    return sorted(out, key=lambda r: -len(r.nodes))


def _is_inserted(node: fx.Node) -> bool:
    return "surgery" in node.meta


def align(region: Region) -> dict[fx.Node, fx.Node] | None:
    """Pair each map node of ``region`` with the base node of the site graph it stands for.

    The map and the site graph trace the same ``forward`` with the same leaves, so their
    base nodes match one to one, in order, by op and target (module and attribute targets
    compared as qualified names).

    Returns:
        Map node → site-graph node, or ``None`` when the two do not match (a front end or
        leaf choice that traced the module differently).
    """
    base = [n for n in region.sg.graph.nodes
            if n.op not in ("placeholder", "output") and not _is_inserted(n)]
    if len(base) != len(region.nodes):
        return None
    for m, b in zip(region.nodes, base):
        if m.op != b.op:
            return None
        if m.op in ("call_module", "get_attr"):
            if clean_path(str(m.target)) != qualified(region.site, str(b.target)):
                return None
        elif m.target != b.target:
            return None
    return dict(zip(region.nodes, base))


def _pairs(b_arg: Any, m_arg: Any) -> list[tuple[fx.Node, Any]]:
    """``(site-graph node, map argument)`` at the same place of two argument trees."""
    if isinstance(b_arg, fx.Node):
        return [(b_arg, m_arg)]
    if isinstance(b_arg, (tuple, list)) and isinstance(m_arg, (tuple, list)):
        return [p for b, m in zip(b_arg, m_arg) for p in _pairs(b, m)]
    if isinstance(b_arg, dict) and isinstance(m_arg, dict):
        return [p for k in b_arg if k in m_arg for p in _pairs(b_arg[k], m_arg[k])]
    return []


def _early_nodes(sg: SiteGraph) -> set[fx.Node]:
    """Nodes computable from the site's inputs alone: placeholders, attributes, and inserted
    nodes reading only those (a LoRA branch, an input-side IA³ scaling)."""
    early: set[fx.Node] = set()
    for node in sg.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            early.add(node)
        elif _is_inserted(node) and all(a in early for a in node.all_input_nodes):
            early.add(node)
    return early


RecordFn = Callable[[fx.Node, "SiteCall", tuple[Src, ...]], tuple[Src, ...]]


class SiteCall:
    """One call of a site graph, drawn around the map's base computation.

    :meth:`enter`, when the call's inputs are known, draws the inserted nodes that need only
    the inputs and returns what the base computation reads; :meth:`leave`, given the map's
    value for the base result, draws the rest and returns the site's adapted output. When
    the map's nodes of the call are paired with the site graph's base nodes (:func:`align`),
    :meth:`bind` gives each base node the map's value as the walk reaches it, inserted nodes
    are drawn as soon as what they read is known, and :meth:`rewired` says which inputs of a
    map node the site graph replaced (a prefix ``cat`` before the attention op).

    Args:
        site: the site's qualified name.
        sg: its site graph (only read).
        id_prefix: prefix of the drawn nodes' ids (the site, with ``@n`` from the second
            call of the same site on).
        record: draws one inserted node given the sources of its inputs; returns its value.
        module_values: the map's value for each module path called so far.
        aligned: map node → site-graph base node (:func:`align`), if known.
    """

    def __init__(self, site: str, sg: SiteGraph, id_prefix: str, record: RecordFn,
                 module_values: Mapping[str, Value],
                 aligned: Mapping[fx.Node, fx.Node] | None = None) -> None:
        self.site = site
        self.sg = sg
        self.id_prefix = id_prefix
        self.aligned = aligned
        self.shapes: dict[str, tuple[tuple | None, str | None]] = {}
        self._record = record
        self._module_values = module_values
        self._env: dict[fx.Node, Value] = {}
        self._early = _early_nodes(sg)
        self._input = site_input(sg)
        self._pending = [n for n in sg.graph.nodes if _is_inserted(n) and n not in self._early]

    @property
    def rewires_input(self) -> bool:
        """True when inserted nodes stand between the site's input and its base computation."""
        return self._input is not self.sg.input_node

    def placeholder_sources(self) -> dict[fx.Node, fx.Node]:
        """Placeholder → the map node outside the call that an aligned base node reads there."""
        out: dict[fx.Node, fx.Node] = {}
        for m, b in (self.aligned or {}).items():
            for b_arg, m_arg in _pairs((b.args, b.kwargs), (m.args, m.kwargs)):
                if b_arg.op == "placeholder" and isinstance(m_arg, fx.Node):
                    out.setdefault(b_arg, m_arg)
        return out

    def enter(self, args: Sequence[Value], kwargs: Mapping[str, Value],
              bound: Mapping[fx.Node, Value] | None = None) -> Value:
        """Bind the site's placeholders to the call's inputs and draw the early nodes.

        Args:
            args: the values passed positionally, in order.
            kwargs: the values passed by keyword.
            bound: placeholder → value, taking precedence over ``args`` and ``kwargs``.

        Returns:
            The value the base computation reads in place of the first input.
        """
        placeholders = [n for n in self.sg.graph.nodes if n.op == "placeholder"]
        specs = []
        for i, ph in enumerate(placeholders):
            if bound is not None and ph in bound:
                value = bound[ph]
            else:
                value = args[i] if i < len(args) else kwargs.get(str(ph.target).lstrip("*"))
            self._env[ph] = value
            srcs = flatten(value)
            specs.append((srcs[0].shape, srcs[0].dtype) if srcs else None)
        self.shapes = site_shapes(self.sg, specs)
        for node in self.sg.graph.nodes:
            if node in self._early and node.op != "placeholder":
                self._env[node] = self._visit(node)
        return self._env.get(self._input)

    def rewired(self, map_node: fx.Node) -> dict[fx.Node, Value]:
        """The inputs of an aligned map node that the site graph replaced by inserted nodes.

        Returns:
            Map input node → the value the site graph reads there instead (empty when
            nothing was replaced or the node is not aligned).
        """
        base = (self.aligned or {}).get(map_node)
        if base is None:
            return {}
        out = {}
        for b_arg, m_arg in _pairs((base.args, base.kwargs), (map_node.args, map_node.kwargs)):
            if isinstance(m_arg, fx.Node) and _is_inserted(b_arg) and b_arg in self._env:
                out[m_arg] = self._env[b_arg]
        return out

    def bind(self, map_node: fx.Node, value: Value) -> None:
        """Give the base node paired with ``map_node`` the map's value, then draw every
        inserted node whose inputs are now known."""
        base = (self.aligned or {}).get(map_node)
        if base is None:
            return
        self._env[base] = value
        for node in list(self._pending):
            if all(a in self._env for a in node.all_input_nodes):
                self._pending.remove(node)
                self._env[node] = self._visit(node)

    def leave(self, base: Value) -> Value:
        """Draw the nodes not drawn yet and return the site's adapted output.

        Args:
            base: the map's value for the call (the base result).

        Returns:
            The value users of the call read: the site graph's output, in the container
            ``base`` came in.
        """
        self._env.setdefault(self.sg.base_node, base)
        for node in self.sg.graph.nodes:
            if node in self._env:
                continue
            if node.op == "output":
                out = node.args[0] if node.args else None
                if out is self.sg.base_node or not isinstance(out, fx.Node):
                    return base
                return same_structure(base, self._env.get(out))
            if _is_inserted(node):
                self._env[node] = self._visit(node)
            elif node.op == "call_module":
                value = self._module_values.get(qualified(self.site, str(node.target)))
                self._env[node] = value if value is not None else self._through(node)
            else:
                self._env[node] = self._through(node)
        return base

    def _through(self, node: fx.Node) -> tuple[Src, ...]:
        """A base node the map does not show as such: its value comes from its inputs."""
        return tuple(src for arg in node.all_input_nodes for src in flatten(self._env.get(arg)))

    def _visit(self, node: fx.Node) -> Value:
        if not _is_inserted(node):
            return None  # the base layer's own weights: drawn with the base call
        return self._record(node, self, self._through(node))


class _Probe(nn.Module):
    """Holds a site graph so that :func:`torch.func.functional_call` can swap its tensors."""

    def __init__(self, sg: SiteGraph) -> None:
        super().__init__()
        self.sg = sg
        self.seen: dict[str, torch.Tensor] = {}

    def forward(self, *args: torch.Tensor) -> Any:
        seen = self.seen

        class _Recorder(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                result = super().run_node(n)
                if isinstance(result, torch.Tensor):
                    seen[n.name] = result
                return result

            def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
                # ``forward`` itself: the model's own forward hooks must not see meta tensors
                return self.fetch_attr(str(target)).forward(*args, **kwargs)

        return _Recorder(self.sg).run(*args)


def site_shapes(sg: SiteGraph, inputs: Sequence[tuple[tuple | None, str | None] | None]
                ) -> dict[str, tuple[tuple, str]]:
    """Shapes and dtypes of every node of a site graph, for inputs of the given shapes.

    The site graph runs once on meta tensors (its parameters swapped for meta copies by
    :func:`torch.func.functional_call`, nothing computed, nothing changed).

    Args:
        sg: the site graph.
        inputs: ``(shape, dtype)`` of each placeholder, as the map recorded them (dimensions
            are ints, or strings for symbolic ones); ``None`` where unknown.

    Returns:
        Node name → ``(shape, dtype)``; empty when an input used is of unknown shape or the
        graph cannot run on meta tensors (shapes are an annotation, not a requirement).
    """
    placeholders = [n for n in sg.graph.nodes if n.op == "placeholder"]
    symbols: dict[str, int] = {}
    args = []
    for ph, spec in zip(placeholders, list(inputs) + [None] * len(placeholders)):
        if spec is None or spec[0] is None:
            if ph.users:
                return {}
            break
        shape, dtype = spec
        dims = []
        for d in shape:
            if isinstance(d, str):
                d = symbols.setdefault(d, _SYMBOL_BASE + _SYMBOL_STEP * len(symbols))
            dims.append(int(d))
        torch_dtype = getattr(torch, dtype or "float32", None)
        if not isinstance(torch_dtype, torch.dtype):
            return {}
        args.append(torch.empty(dims, dtype=torch_dtype, device="meta"))
    names = {v: k for k, v in symbols.items()}
    unknown = _SYMBOL_BASE if symbols else None  # sizes made of symbols (a flattened batch)
    probe = _Probe(sg)
    metas: dict[int, torch.Tensor] = {}
    swapped = {}
    for name, t in list(sg.named_parameters(remove_duplicate=False)) + list(
            sg.named_buffers(remove_duplicate=False)):
        swapped[f"sg.{name}"] = metas.setdefault(id(t), torch.empty_like(t, device="meta"))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.func.functional_call(probe, swapped, tuple(args))
    except Exception:  # a site graph that cannot run on meta tensors: no shapes
        return {}
    out = {}
    for name, t in probe.seen.items():
        dims = tuple(names.get(int(d), "?" if unknown and int(d) >= unknown else int(d))
                     for d in t.shape)
        out[name] = (dims, str(t.dtype).replace("torch.", ""))
    return out
