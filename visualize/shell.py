"""Tracing the two ends of each run of identical layers instead of every layer.

Tracing a whole transformers model with torch.export costs time in proportion to its depth
(seconds at 24 layers), while a picture whose repeated layers are drawn once needs only
one of them. Here the items of every repeated ``nn.ModuleList`` / ``nn.Sequential`` are
compared as modules (:func:`module_runs`: classes, parameter shapes and ``requires_grad``,
rewritten weights, plain attributes other than the layer index, adapters and the nodes of
site graphs, all relative to the item's own name), and a weight-free copy keeping only the
first and last item of each run of identical consecutive items, under their own names
(``model.layers.0`` and ``model.layers.23``), is traced (:func:`shell_map`). The graphs
drawn from it are then checked node by node: :func:`visualize.repeats.collapse_repeats`
raises :class:`visualize.repeats.RepeatMismatch` when the two ends of a run are not drawn
alike (a forward that branches on the layer index), and the caller traces the whole model.

:func:`unroll` gives back, for the diff tables, one node per item of a run for every node
of its first item (``model.layers.5.self_attn.q_proj:lora_a_default`` for each layer).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import networkx as nx
from torch import fx, nn

from surgery.adapters.active import INACTIVE_KEY
from surgery.map.trace import trace
from surgery.sites.marker import AdapterModule
from surgery.sites.site_graph import base_module, is_site_graph, plain_weight_free
from visualize.facts import rewritten_params
from visualize.nodeinfo import target_name
from visualize.repeats import blocks_of, item_path, relative

__all__ = ["module_runs", "plain_structure", "shell_map", "unroll", "MIN_RUN"]

MIN_RUN = 3
"""Shortest run worth tracing by its ends: a run of two is traced whole anyway."""

_SCALARS = (bool, int, float, str, type(None))


def _containers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Outermost ``ModuleList`` / ``Sequential`` modules of two or more numbered items."""
    out: list[tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod._modules) < 2:
            continue
        if not all(k.isdigit() for k in mod._modules):
            continue
        if any(name == c or name.startswith(c + ".") or not c for c, _ in out):
            continue  # inside an item of a container already taken
        out.append((name, mod))
    return out


def _graph_rows(gm: fx.GraphModule, rel: Any) -> tuple:
    rows = []
    for node in gm.graph.nodes:
        meta = node.meta.get("surgery") or {}
        rows.append((node.op, rel(target_name(node)), tuple(a.name for a in node.all_input_nodes),
                     tuple(sorted((str(k), rel(v) if isinstance(v, str) else repr(v))
                                  for k, v in meta.items())),
                     bool(node.meta.get(INACTIVE_KEY))))
    return tuple(rows)


def _raw_rows(item: nn.Module, path: str, rewritten: Mapping[str, str]
              ) -> tuple[list[tuple], dict[tuple[str, str], Any]]:
    """``(structure rows, plain attributes)`` of one item, names relative to ``path``."""
    rel = relative(path)
    rows: list[tuple] = []
    attrs: dict[tuple[str, str], Any] = {}
    for name, mod in item.named_modules(remove_duplicate=False):
        full = f"{path}.{name}" if name else path
        params = tuple((k, tuple(p.shape), str(p.dtype), bool(p.requires_grad),
                        rewritten.get(f"{full}.{k}"))
                       for k, p in mod._parameters.items() if p is not None)
        buffers = tuple((k, tuple(b.shape), str(b.dtype)) for k, b in mod._buffers.items()
                        if b is not None)
        kind = type(base_module(mod)).__qualname__ if is_site_graph(mod) else type(mod).__qualname__
        extra: tuple = ()
        if isinstance(mod, fx.GraphModule):
            extra = _graph_rows(mod, rel)
        if isinstance(mod, AdapterModule):
            extra += (mod.pass_name,)
        rows.append((name, type(mod).__qualname__, kind, params, buffers, extra))
        for key, value in vars(mod).items():
            if not key.startswith("_") and isinstance(value, _SCALARS):
                attrs[name, key] = rel(value)
    return rows, attrs


def _signatures(container: nn.Module, path: str, rewritten: Mapping[str, str]) -> list[tuple]:
    """One signature per item; a plain int attribute equal to its item's index in every
    item (``layer_idx``) is left out."""
    raws = [_raw_rows(item, item_path(path, int(k)), rewritten)
            for k, item in container._modules.items()]
    indices = [int(k) for k in container._modules]
    index_keys = {key for key in raws[0][1]
                  if all(type(r[1].get(key)) is int and r[1].get(key) == i
                         for r, i in zip(raws, indices))}
    return [(tuple(rows),
             tuple(sorted((k, repr(v)) for k, v in attrs.items() if k not in index_keys)))
            for rows, attrs in raws]


def plain_structure(model: nn.Module) -> tuple:
    """What the map of ``model`` is traced from: the module names, classes and parameter
    shapes of the model as the user wrote it (site graphs read as the modules they replaced,
    adapters left out; :func:`surgery.sites.site_graph.plain_weight_free`)."""
    plain = plain_weight_free(model)
    return tuple((name, type(mod).__qualname__,
                  tuple((k, tuple(p.shape)) for k, p in mod._parameters.items() if p is not None))
                 for name, mod in plain.named_modules(remove_duplicate=False))


def module_runs(models: Sequence[nn.Module]) -> dict[str, list[range]]:
    """Runs of identical consecutive items in every repeated container, the same for all models.

    Args:
        models: models of one plain structure (:func:`plain_structure`), adapted or not.

    Returns:
        Container name → item ranges, covering every item in order; items are in one
        range when they are identical in every model. Containers whose runs are all
        shorter than :data:`MIN_RUN` are left out.
    """
    out: dict[str, list[range]] = {}
    first = models[0]
    for path, _ in _containers(first):
        sigs = []
        for model in models:
            container = model.get_submodule(path) if path else model
            sigs.append(_signatures(container, path, rewritten_params(model)))
        indices = [int(k) for k in (first.get_submodule(path) if path else first)._modules]
        joint = list(zip(*sigs))
        runs: list[range] = []
        start = 0
        for j in range(1, len(indices) + 1):
            if j == len(indices) or joint[j] != joint[start] or indices[j] != indices[j - 1] + 1:
                runs.append(range(indices[start], indices[j - 1] + 1))
                start = j
        if any(len(r) >= MIN_RUN for r in runs):
            out[path] = runs
    return out


def shell_map(model: nn.Module, runs: Mapping[str, Sequence[range]], example_inputs: tuple | None,
              example_kwargs: Mapping[str, Any] | None, *,
              leaf_modules: Collection[str | type] = ()) -> nn.Module:
    """The map of ``model`` with only the first and last item of each run in ``runs``.

    The items keep their names (``model.layers.0``, ``model.layers.23``), so the graph
    drawn from this map names modules, sites and parameters as the whole model does, and
    reads their tensors from ``model`` itself. ``model`` is not changed.

    Raises:
        surgery.errors.TraceError: the shortened model cannot be traced (a forward that
            indexes its layers by number, say).
    """
    shell = plain_weight_free(model)  # a private copy, module by module
    for path, spans in runs.items():
        container = shell.get_submodule(path) if path else shell
        keep = {str(i) for span in spans for i in (span[0], span[-1])}
        container._modules = {k: m for k, m in container._modules.items() if k in keep}
    return trace(shell, example_inputs, example_kwargs, leaf_modules=leaf_modules)


def _renamed(text: str, old: str, new: str) -> str | None:
    if text == old or (text.startswith(old) and text[len(old)] in "./:@"):
        return new + text[len(old):]
    return None


def unroll(graph: nx.DiGraph, runs: Mapping[str, Sequence[range]]) -> nx.DiGraph:
    """Nodes (no edges) of the whole model, from a graph of :func:`shell_map`.

    Every node of the first item of a run is repeated for each item the shell left out,
    its id, site and module path renamed (``model.layers.0/…`` → ``model.layers.5/…``);
    ``stands_in`` names the node it was made from. Nodes are numbered (``order``) item by
    item, as the whole model's graph orders them.
    """
    keyed: list[tuple[tuple, str, dict]] = []
    made: set[str] = set()
    for nid, attrs in graph.nodes(data=True):
        keyed.append(((int(attrs.get("order", 0)), 0, 0), nid, attrs))
    for parent, spans in runs.items():
        blocks = blocks_of(graph, parent)
        for span in spans:
            first = blocks.get(span[0])
            if first is None or len(span) < 3:
                continue
            end = max(int(graph.nodes[n].get("order", 0)) for n in first.nodes)
            old = item_path(parent, span[0])
            for k in span[1:-1]:
                new = item_path(parent, k)
                for nid in first.nodes:
                    attrs = graph.nodes[nid]
                    copy_id = _renamed(nid, old, new) or f"{nid}#{k}"
                    if copy_id in made:
                        continue
                    made.add(copy_id)
                    prov = attrs.get("provenance")
                    if prov and prov.get("site"):
                        site = str(prov["site"])
                        prov = {**prov, "site": _renamed(site, old, new) or site}
                    module = attrs.get("module")
                    copy = {**attrs, "provenance": prov, "stands_in": nid,
                            "module": _renamed(module, old, new) if module else None}
                    keyed.append(((end, k, int(attrs.get("order", 0))), copy_id, copy))
    out = nx.DiGraph()
    out.graph.update(graph.graph)
    for i, (_, nid, attrs) in enumerate(sorted(keyed, key=lambda item: (item[0], item[1]))):
        out.add_node(nid, **{**attrs, "order": i + 1})
    return out
