"""The anatomy of one adapted layer: its site graph drawn alone, large.

Each adapted layer of a model is replaced by a :class:`surgery.SiteGraph`, a small
``torch.fx.GraphModule`` holding the layer's own computation and the nodes passes inserted
(LoRA's ``lora_A → lora_B → × scaling → +``, an IA³ multiply, a bottleneck branch). The HTML
report shows one of them at a time, chosen from a list: the layers picked here, one per
distinct pattern (``blocks.*.attn.q_proj`` adapted by LoRA) so a 24-layer model lists a few
entries rather than a hundred identical ones.
"""

from __future__ import annotations

import re
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import networkx as nx
from torch import nn

from surgery.errors import ConfigError, few, near_matches
from surgery.sites.site_graph import SiteGraph, base_module, site_graphs
from visualize.dot import to_dot
from visualize.graph import build_graph
from visualize.options import RenderOptions
from visualize.render import MissingRendererWarning, render_source

__all__ = ["SitePicture", "SiteChoice", "pick_sites", "site_graph_picture", "draw_sites",
           "svg_of", "DEFAULT_MAX_SITES"]

DEFAULT_MAX_SITES = 8
"""Site graphs drawn in a report by default: one per pattern, up to this many."""

_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)")


@dataclass(frozen=True)
class SiteChoice:
    """Which adapted sites a report draws.

    Attributes:
        sites: qualified names of the sites drawn, the one shown first at the front.
        total: how many adapted sites the model has.
        patterns: how many distinct patterns (name with layer indices as ``*``, and the
            passes inserted) they fall into.
    """

    sites: tuple[str, ...]
    total: int
    patterns: int

    @property
    def left_out(self) -> int:
        """Adapted sites not drawn."""
        return self.total - len(self.sites)

    def note(self) -> str:
        """One sentence on what was left out, or ``""`` when every site is drawn."""
        if not self.left_out:
            return ""
        return (f"Showing {len(self.sites)} of {self.total} adapted sites: one per layer "
                f"pattern ({self.patterns} patterns); the other {self.left_out} repeat a "
                f"pattern shown{' or exceed the limit' if self.patterns > len(self.sites) else ''}.")


@dataclass(frozen=True)
class SitePicture:
    """One site graph drawn for the report.

    Attributes:
        site: qualified name of the adapted module.
        type: class of the module the site graph replaced (``"Linear"``).
        passes: the passes that inserted nodes there, in graph order.
        svg: the SVG document, or ``None`` when no renderer exists.
        dot: the DOT source (always).
        nodes: nodes in the drawing (without the legend).
    """

    site: str
    type: str
    passes: tuple[str, ...]
    svg: str | None
    dot: str
    nodes: int


def _inserted_passes(sg: SiteGraph) -> tuple[str, ...]:
    found = (str((n.meta.get("surgery") or {}).get("pass") or "") for n in sg.graph.nodes)
    return tuple(dict.fromkeys(p for p in found if p))


def _pattern(name: str, sg: SiteGraph) -> tuple[str, tuple[str, ...]]:
    return _INDEX.sub("*", name), _inserted_passes(sg)


def pick_sites(model: nn.Module, site: str | None = None,
               max_sites: int = DEFAULT_MAX_SITES) -> SiteChoice:
    """The adapted sites of ``model`` a report draws.

    One site per pattern (the qualified name with layer indices replaced by ``*``, together
    with the passes that inserted nodes there), first in model order, at most ``max_sites``;
    ``site`` is always drawn and put first, replacing its pattern's first site.

    Args:
        model: an adapted model (a plain one has no sites: the choice is empty).
        site: the site to show first, by qualified name; ``None`` = the first picked.
        max_sites: the most sites drawn (``>= 1``).

    Raises:
        ConfigError: ``site`` is not an adapted site of ``model`` (the nearest names and the
            way to list them are given), or ``max_sites < 1``.
    """
    if isinstance(max_sites, bool) or not isinstance(max_sites, int) or max_sites < 1:
        raise ConfigError(f"max_sites must be a positive int, got {max_sites!r}. Way out: "
                          f"leave it out (the default draws up to {DEFAULT_MAX_SITES} site "
                          f"graphs).")
    graphs = dict(site_graphs(model))
    if site is not None and site not in graphs:
        if not graphs:
            raise ConfigError(f"site {site!r}: the model has no adapted sites; apply a pass "
                              f"first, or leave the site out")
        near = near_matches(site, graphs, n=5)
        raise ConfigError(f"site {site!r} is not an adapted site of the model; nearest: "
                          f"{', '.join(near)}. Adapted sites: {few(list(graphs), 8)}")
    firsts: dict[tuple[str, tuple[str, ...]], str] = {}
    for name, sg in graphs.items():
        firsts.setdefault(_pattern(name, sg), name)
    chosen = list(firsts.values())
    if site is not None:
        own = firsts[_pattern(site, graphs[site])]
        chosen = [site] + [s for s in chosen if s != own]
    return SiteChoice(tuple(chosen[:max_sites]), len(graphs), len(firsts))


def site_graph_picture(sg: SiteGraph, site: str) -> nx.DiGraph:
    """The graph of one site graph alone, in the form :func:`visualize.to_dot` draws.

    Nodes carry the attributes :func:`visualize.to_networkx` gives (``op``, ``label``,
    ``pass_name``, ``provenance``, ``params``, ...), so inserted nodes take their pass's
    colour as in the whole-model diagrams. Node ids are ``"/<fx node name>"``.

    Args:
        sg: the site graph (only read).
        site: its qualified name in the model (for the title).
    """
    graph = build_graph(sg, sg)
    graph.graph["name"] = f"{site or '(root)'} ({type(base_module(sg)).__name__})"
    return graph


def draw_sites(model: nn.Module, choice: SiteChoice,
               options: RenderOptions | None = None) -> list[SitePicture]:
    """Draw each site of ``choice`` alone.

    Args:
        model: the adapted model ``choice`` was picked from (only read).
        choice: from :func:`pick_sites`.
        options: drawing options (colours, fonts); depth, repeats and highlight do not
            apply to a site graph.

    Returns:
        One picture per site, in ``choice.sites`` order; ``svg`` is ``None`` for all of
        them when no Graphviz renderer exists (no warning: the report says so).

    Raises:
        RenderError: Graphviz is installed but failed on a site graph.
    """
    options = options or RenderOptions()
    graphs = dict(site_graphs(model))
    out: list[SitePicture] = []
    for site in choice.sites:
        sg = graphs[site]
        graph = site_graph_picture(sg, site)
        kind = type(base_module(sg)).__name__
        passes = _inserted_passes(sg)
        title = f"{site or '(root)'} · {kind}" + (f" + {', '.join(passes)}" if passes else "")
        source = to_dot(graph, replace(options, title=title, highlight=frozenset()))
        out.append(SitePicture(site, kind, passes, svg_of(source), source,
                               graph.number_of_nodes()))
    return out


def svg_of(source: str) -> str | None:
    """DOT ``source`` drawn as an SVG document in memory, or ``None`` without a renderer.

    Raises:
        RenderError: Graphviz is installed but failed.
    """
    with tempfile.TemporaryDirectory() as tmp:
        dot_path, image = Path(tmp) / "graph.dot", Path(tmp) / "graph.svg"
        dot_path.write_text(source, encoding="utf-8")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MissingRendererWarning)
            drawn = render_source(source, dot_path, image, "svg")
        return image.read_text(encoding="utf-8") if drawn else None
