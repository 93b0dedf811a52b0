"""Small helpers shared by the ``teach_*.py`` examples (not an example itself).

- :func:`output_folder`: the ``--out`` folder, or a temporary one removed at exit;
- :func:`close_up`: the part of a whole-model graph around what a pass inserted, for a
  picture small enough to read (the inserted nodes, the nodes they read from and feed, and
  the base call of each site);
- :func:`max_abs_diff`: ``max|a - b|`` of two output tensors, as a Python float.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import networkx as nx
import torch

try:
    import surgery  # noqa: F401
except ImportError:  # run from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import surgery  # noqa: F401

__all__ = ["output_folder", "close_up", "inserted_nodes", "max_abs_diff"]


@contextlib.contextmanager
def output_folder(out: Path | None) -> Iterator[Path]:
    """Yield ``out`` (created if missing), or a temporary folder removed when the block ends."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        yield out
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


def inserted_nodes(graph: nx.DiGraph, pass_name: str | None = None) -> list[str]:
    """Ids of the nodes a pass inserted (any pass, or ``pass_name``), in graph order."""
    found = [n for n, a in graph.nodes(data=True)
             if a.get("pass_name") and (pass_name is None or a["pass_name"] == pass_name)]
    return sorted(found, key=lambda n: graph.nodes[n].get("order", 0))


def close_up(graph: nx.DiGraph, keep: Iterable[str], hops: int = 1) -> nx.DiGraph:
    """The subgraph of ``graph`` within ``hops`` edges of the nodes in ``keep``.

    Args:
        graph: a graph from :func:`visualize.to_networkx`.
        keep: node ids to centre on (usually :func:`inserted_nodes`).
        hops: how many edges out from ``keep``, both directions.

    Returns:
        A copy, with the graph attributes (model name, parameter totals) kept, so that
        :func:`visualize.render` draws it with the same colours, legend and shapes.
    """
    chosen = set(keep)
    frontier = set(chosen)
    for _ in range(hops):
        step = set()
        for n in frontier:
            step.update(graph.predecessors(n))
            step.update(graph.successors(n))
        frontier = step - chosen
        chosen |= step
    sub = graph.subgraph(chosen).copy()
    sub.graph.update(graph.graph)
    sub.graph.pop("repeats", None)
    return sub


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b|`` over all elements, as a float (0.0 means bitwise equal values)."""
    return float((a - b).abs().max())
