"""A model as one ``networkx.DiGraph``: its map, calls inlined, site graphs expanded.

The whole-model picture is the map (:func:`surgery.trace`, the graph tree traced from a
weight-free copy of the model as the user wrote it) with every adapted call expanded into
its site graph: the nodes passes inserted appear in place, coloured by pass, and every
parameter is described from the model's own tensors. :mod:`visualize.walk` does the walk;
this module picks the map and collapses deep modules.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import networkx as nx
from torch import nn

from surgery.map.trace import is_map, trace
from surgery.sites.site_graph import plain_weight_free, site_graphs
from surgery.targets import model_map
from visualize.collapse import collapse
from visualize.facts import param_totals, rewritten_params
from visualize.walk import GraphBuilder

__all__ = ["to_networkx", "build_graph", "map_of", "param_totals", "rewritten_params"]


def _check_depth(depth: object) -> None:
    if depth is not None and (not isinstance(depth, int) or isinstance(depth, bool) or depth < 1):
        raise ValueError(f"depth must be a positive int or None, got {depth!r}")


def map_of(model: nn.Module, example_inputs: tuple | None = None,
           example_kwargs: Mapping[str, Any] | None = None, *, frontend: str = "auto",
           leaf_modules: Collection[str | type] = ()) -> nn.Module:
    """The map to draw for ``model``.

    Args:
        model: a map (returned as it is), an adapted model (its map, cached on
            ``model._surgery`` and built with the recorded example inputs when first
            needed), or a plain model (traced from a weight-free copy; not changed).
        example_inputs: positional inputs, for torch.export and for shapes. For an adapted
            model whose cached map was traced without inputs, a map traced with these.
        example_kwargs: keyword inputs, likewise.
        frontend: ``"auto"``, ``"fx"`` or ``"export"``; an adapted model's cached map is
            used when it was traced by this front end.
        leaf_modules: extra modules kept opaque when tracing a plain model (an adapted
            model uses those it recorded).

    Raises:
        surgery.errors.TraceError: the model cannot be traced.
    """
    if is_map(model):
        return model
    state = getattr(model, "_surgery", None)
    if state is not None:
        cached = model_map(model, example_inputs, example_kwargs)
        info = cached._surgery_map
        if ((example_inputs is None or info.example_inputs is not None)
                and frontend in ("auto", info.frontend)):
            return cached
        leaf_modules = state.leaf_modules or leaf_modules
    source = plain_weight_free(model) if next(site_graphs(model), None) is not None else model
    return trace(source, example_inputs, example_kwargs, leaf_modules=leaf_modules,
                 frontend=frontend)


def build_graph(graph_map: nn.Module, model: nn.Module, *, depth: int | None = None) -> nx.DiGraph:
    """:func:`to_networkx` for a map already at hand.

    Args:
        graph_map: the map of ``model`` (see :func:`map_of`); only read.
        model: the model it stands for (plain or adapted), or the map itself; only read.
        depth: as in :func:`to_networkx`.

    Raises:
        ValueError: ``depth`` is not a positive int.
        TypeError: ``graph_map`` owns no fx graph at its root.
    """
    _check_depth(depth)
    graph = GraphBuilder(graph_map, model).build()
    if depth is not None:
        graph = collapse(graph, depth)
    return graph


def to_networkx(
    model: nn.Module,
    example_inputs: tuple | None = None,
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    depth: int | None = None,
) -> nx.DiGraph:
    """Build the whole-model dataflow graph of ``model`` for drawing and diffing.

    Args:
        model: a plain ``nn.Module`` (its map is traced from a weight-free copy; the model
            is not changed), an adapted model from :func:`surgery.apply_passes` (its cached
            map, every site graph expanded in place), or a map from :func:`surgery.trace`
            (drawn as it is).
        example_inputs: positional inputs, for tracing with torch.export and for shapes
            (``(batch, seq)`` token ids, ...). An adapted model defaults to those it recorded;
            a map ignores them.
        example_kwargs: keyword inputs for tracing, likewise.
        depth: when given (``>= 1``), every module nested deeper than ``depth`` levels is
            drawn as one node in its ancestor at that depth (``depth=2`` shows
            ``layers.0``, ``layers.1``, ... as single nodes). Nodes inserted by passes stay
            visible, and a collapsed node holding adapted layers is marked ``adapted``.

    Returns:
        A ``networkx.DiGraph``. Node ids: ``"<graph prefix>/<fx node name>"`` for the map's
        nodes (``"/input_ids"``; ``"layers.0.attn/q_proj"`` on the export front end),
        ``"<site>:<fx node name>"`` for the nodes a pass inserted into the site graph of
        ``<site>`` (``"layers.0.attn.q_proj:lora_a_default"``; ``"<site>@1:..."`` for its
        second call), ``"<module path>/*"`` for collapsed modules. Node attributes: ``op``
        (fx op, or ``"module"`` for a collapsed module), ``name``, ``graph``, ``target``
        (str), ``label``, ``module`` and ``module_type`` (called modules; a site reads as
        the class it replaced), ``shape`` (tuple of ints, or of strings for symbolic
        dimensions) and ``dtype`` (str) when known, ``params`` (tuple of ``{"name",
        "shape", "numel", "trainable", "rewritten"}``, read from ``model``'s own tensors),
        ``numel``, ``trainable_numel``, ``param_state`` (``"none"``/``"trainable"``/
        ``"frozen"``/``"mixed"``), ``rewritten`` (passes that rewrote a weight),
        ``constant``, ``provenance`` (the ``meta["surgery"]`` dict: ``pass``, ``site``,
        ``role``, ``adapter``, ``part``; ``active=False`` for a switched-off adapter) and
        ``pass_name``, ``adapter`` (inserted by a pass), ``scaling`` (``"output"`` or
        ``"input"`` for an inserted module multiplying a layer's output or input by a
        learned vector, as IA³ does; else ``None``), ``adapted`` (passes that adapted
        something inside a collapsed module), ``collapsed`` (how many nodes a collapsed
        module stands for), ``cluster`` (the qualified module path the node is drawn in;
        inserted nodes sit beside their site) and ``order`` (graph order);
        :func:`visualize.render_diff` adds ``diff="removed"`` to the nodes of its
        ``before`` graph that are gone from ``after``. Edge attributes: ``shape`` and
        ``dtype`` of the value. Graph attributes: ``name``, ``frontend``, ``module_types``
        (path → class name), ``rewritten``, ``depth``, ``param_total`` and
        ``param_trainable`` (every parameter of the model, drawn or not, each once, as
        :func:`param_totals` and :func:`surgery.audit` count).

    Raises:
        ValueError: ``depth`` is not a positive int.
        TypeError: ``model`` is not an ``nn.Module``.
        surgery.errors.TraceError: the model could not be traced.
    """
    _check_depth(depth)
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_networkx() takes an nn.Module, got {type(model).__name__}")
    return build_graph(map_of(model, example_inputs, example_kwargs), model, depth=depth)
