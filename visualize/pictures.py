"""From models to the graphs drawn: trace as little as the picture needs, diff every node,
then collapse to the depth asked and draw repeated blocks once.

Steps, for one model (:func:`visualize.render`) or a before/after pair
(:func:`visualize.render_diff`):

1. **Maps.** A pair of one plain structure (the caller's model and its adapted copy) shares
   one map. When repeated blocks are drawn once and the map is not cached yet, only the two
   ends of each run of identical layers are traced (:mod:`visualize.shell`); the whole
   model is traced when that cannot be done (fx front end, a forward that indexes its
   layers, ends that are not drawn alike).
2. **Diff.** Nodes added and removed are found on every node of both models (a run's
   left-out layers are unrolled for it), so the tables do not depend on what is drawn.
3. **Depth.** With ``options.depth``, deeper modules collapse, except those holding a change
   (in either model of a pair) when ``options.expand_changed``.
4. **Repeats.** With ``options.repeats``, runs of identical blocks are drawn once, the same
   runs in both pictures of a pair (:mod:`visualize.repeats`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import networkx as nx
from torch import nn

from surgery.map.trace import is_map
from surgery.sites.site_graph import is_site_graph
from visualize.collapse import changed_paths, collapse
from visualize.diff_nodes import node_diff
from visualize.diff_report import NodeChange
from visualize.facts import rewritten_params
from visualize.graph import build_graph, map_of
from visualize.options import RenderOptions
from visualize.repeats import RepeatMismatch, collapse_repeats
from visualize.shell import module_runs, plain_structure, shell_map, unroll

__all__ = ["pictures", "finish_graphs"]


def _has_cached_map(model: nn.Module) -> bool:
    state = getattr(model, "_surgery", None)
    return state is not None and state.cached_map is not None


def _leaf_modules(models: Sequence[nn.Module]) -> tuple:
    """The extra leaves the last model recorded when adapted, else an earlier one's."""
    for model in reversed(models):
        leaves = getattr(getattr(model, "_surgery", None), "leaf_modules", None)
        if leaves:
            return tuple(leaves)
    return ()


def _changed_modules(models: Sequence[nn.Module]) -> frozenset[str]:
    """Sites and modules with rewritten weights in ``models``, with all their ancestors."""
    out: set[str] = set()
    for model in models:
        names = [n for n, m in model.named_modules(remove_duplicate=False) if is_site_graph(m)]
        names += [name.rpartition(".")[0] for name in rewritten_params(model)]
        for name in names:
            parts = name.split(".") if name else []
            out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return frozenset(out)


def _visible(runs: Mapping[str, list[range]], depth: int | None,
             opened: frozenset[str]) -> dict[str, list[range]]:
    """The containers whose items stay apart at ``depth``: deeper than it, or kept open
    by a change inside (a collapsed container would sum the parameters of the items
    traced only)."""
    return {path: spans for path, spans in runs.items()
            if depth is None or depth >= (path.count(".") + 2 if path else 1) or path in opened}


def _merged_items(graphs: Sequence[nx.DiGraph], given: Mapping[str, Sequence[range]]) -> bool:
    """True when a depth-collapsed node holds a whole container of ``given`` (or more)."""
    for graph in graphs:
        for _, attrs in graph.nodes(data=True):
            if attrs.get("op") != "module":
                continue
            group = str(attrs.get("module") or "")
            if any(not group or path == group or path.startswith(group + ".") for path in given):
                return True
    return False


def _shell_graphs(models: Sequence[nn.Module], example_inputs: tuple | None,
                  example_kwargs: Mapping[str, Any] | None,
                  options: RenderOptions) -> tuple[list[nx.DiGraph], dict[str, list[range]]] | None:
    """Graphs drawn from a map of the runs' ends, or ``None`` when that cannot be done."""
    if not options.repeats or any(is_map(m) or _has_cached_map(m) for m in models):
        return None
    if len({plain_structure(m) for m in models}) != 1:
        return None
    opened = _changed_modules(models) if options.expand_changed else frozenset()
    runs = _visible(module_runs(models), options.depth, opened)
    if not runs:
        return None
    try:
        small = shell_map(models[-1], runs, example_inputs, example_kwargs,
                          leaf_modules=_leaf_modules(models))
    except Exception:  # a forward that needs every layer: trace the whole model
        return None
    if small._surgery_map.frontend != "export":  # torch.fx traces deep models fast: all of it
        return None
    return [build_graph(small, m) for m in models], runs


def _full_graphs(models: Sequence[nn.Module], example_inputs: tuple | None,
                 example_kwargs: Mapping[str, Any] | None) -> list[nx.DiGraph]:
    """Graphs of the whole models; a pair of one plain structure shares the map."""
    last = map_of(models[-1], example_inputs, example_kwargs)
    frontend = getattr(getattr(last, "_surgery_map", None), "frontend", None) or "auto"
    maps = []
    for model in models[:-1]:
        if not is_map(model) and not is_map(models[-1]) \
                and plain_structure(model) == plain_structure(models[-1]):
            maps.append(last)
        else:
            maps.append(map_of(model, example_inputs, example_kwargs, frontend=frontend,
                               leaf_modules=_leaf_modules(models)))
    maps.append(last)
    return [build_graph(gm, m) for gm, m in zip(maps, models)]


def finish_graphs(graphs: list[nx.DiGraph], options: RenderOptions, *, diff: bool,
                  given: Mapping[str, Sequence[range]] | None = None
                  ) -> tuple[list[nx.DiGraph], tuple[NodeChange, ...]]:
    """Diff (for a pair), collapse to ``options.depth``, draw repeats once.

    Args:
        graphs: uncollapsed graphs of :func:`visualize.graph.build_graph` (changed here:
            removed nodes get ``diff="removed"``).
        options: ``depth``, ``expand_changed`` and ``repeats`` are used.
        diff: ``graphs`` is a before/after pair: find the nodes added and removed.
        given: runs found from the modules, when the graphs come from :mod:`visualize.shell`.

    Returns:
        ``(graphs to draw, node changes)``; no changes unless ``diff``.

    Raises:
        RepeatMismatch: a ``given`` run's items are not drawn alike, or a module collapsed
            to ``options.depth`` holds them all (its sums would miss the items not traced).
    """
    nodes: tuple[NodeChange, ...] = ()
    if diff:
        full = [unroll(g, given) for g in graphs] if given else graphs
        nodes = node_diff(full[0], full[1])
        for change in nodes:
            if change.kind == "removed":
                nid = full[0].nodes[change.id].get("stands_in", change.id)
                graphs[0].nodes[nid]["diff"] = "removed"  # drawn dashed, see visualize.dot
    if options.depth is not None:
        opened: frozenset[str] = frozenset()
        if options.expand_changed:
            opened = frozenset().union(*(changed_paths(g) for g in graphs))
        graphs = [g if g.graph.get("depth") is not None
                  else collapse(g, options.depth, open_paths=opened) for g in graphs]
        if given and _merged_items(graphs, given):
            raise RepeatMismatch("a collapsed module holds the items of a run traced by its ends")
    if options.repeats:
        collapsed, runs = collapse_repeats(graphs, given)
        if not runs and len(graphs) > 1 and not given:
            # no run is alike in both (a pass on every other layer): each picture draws
            # its own repeats, so that at least the unchanged model stays small
            collapsed = [collapse_repeats([g])[0][0] for g in graphs]
        graphs = collapsed
    return graphs, nodes


def pictures(models: Sequence[nn.Module], example_inputs: tuple | None,
             example_kwargs: Mapping[str, Any] | None, options: RenderOptions
             ) -> tuple[list[nx.DiGraph], tuple[NodeChange, ...]]:
    """The graphs to draw for one model or a before/after pair, and the pair's node diff.

    Raises:
        surgery.errors.TraceError: a model cannot be traced.
    """
    diff = len(models) == 2
    shell = _shell_graphs(models, example_inputs, example_kwargs, options)
    if shell is not None:
        try:
            return finish_graphs(shell[0], options, diff=diff, given=shell[1])
        except RepeatMismatch:  # the ends of a run differ: draw from the whole model
            pass
    return finish_graphs(_full_graphs(models, example_inputs, example_kwargs), options, diff=diff)
