"""Rendering options and the colour palette, in frozen dataclasses validated once."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from surgery.errors import ConfigError

__all__ = ["Palette", "RenderOptions", "DEFAULT_MAX_LAYOUT_NODES"]

DEFAULT_MAX_LAYOUT_NODES = 500
"""Nodes Graphviz lays out by default: a few seconds of ``dot`` (see benchmarks/bench_render.py)."""

_COLOUR = re.compile(r"^#[0-9a-fA-F]{6}$")
_RANKDIRS = ("TB", "LR", "BT", "RL")

# (pass name, fill, border): one hue per pass, light fill and a darker border of it.
_PASS_COLOURS: tuple[tuple[str, str, str], ...] = (
    ("lora", "#f9c6df", "#c2185b"),
    ("ia3", "#d9c8f0", "#6a3d9a"),
    ("adapter", "#b9e6ec", "#0e7c86"),
    ("prefix", "#f6eaa0", "#9a8500"),
    ("stack", "#e6d2bd", "#8c564b"),
    ("merge", "#fdc086", "#d95f02"),
)
# Passes drawn in the hue of their family: both bottleneck placements in the adapter hue,
# merge and unmerge in the merge hue (the colour of rewritten weights), prefix removal in
# the prefix hue.
_PASS_FAMILIES: dict[str, str] = {
    "serial_adapter": "adapter",
    "parallel_adapter": "adapter",
    "merge_lora": "merge",
    "unmerge_lora": "merge",
    "merge_ia3": "merge",
    "unmerge_ia3": "merge",
    "eject_prefix": "prefix",
}
# Hues for passes not listed above, picked by a stable hash of the pass name.
_SPARE_COLOURS: tuple[tuple[str, str], ...] = (
    ("#fbb4ae", "#b2182b"),
    ("#ccebc5", "#1b7837"),
    ("#decbe4", "#762a83"),
    ("#fed9a6", "#b35806"),
    ("#e5d8bd", "#7f6000"),
    ("#b3cde3", "#2166ac"),
)


@dataclass(frozen=True, kw_only=True)
class Palette:
    """Colours of a diagram, as ``#rrggbb`` strings.

    Attributes:
        frozen: fill of modules whose parameters are all frozen (grey-blue).
        trainable: fill of modules whose parameters all train (green).
        mixed: fill of modules with frozen and trainable parameters.
        rewritten: fill of modules whose weights a pass rewrote (merge; orange).
        op: fill of parameter-free operations.
        io: fill of the model's inputs and outputs, and of inlined submodule inputs.
        constant: fill of tensor constants and buffers read directly.
        border: default node border.
        edge: edge and edge-label colour.
        cluster: border of module clusters.
        added: border of highlighted nodes that no pass claims (a diff by node id).
        passes: ``(pass name, fill, border)`` for nodes inserted by each pass.
    """

    frozen: str = "#c6d4e6"
    trainable: str = "#b5e3a5"
    mixed: str = "#e0efc4"
    rewritten: str = "#fdc086"
    op: str = "#ffffff"
    io: str = "#fff3c4"
    constant: str = "#eeeeee"
    border: str = "#555555"
    edge: str = "#777777"
    cluster: str = "#b0b0b0"
    added: str = "#d62728"
    passes: tuple[tuple[str, str, str], ...] = _PASS_COLOURS

    def __post_init__(self) -> None:
        for name in ("frozen", "trainable", "mixed", "rewritten", "op", "io", "constant",
                     "border", "edge", "cluster", "added"):
            _check_colour(f"Palette.{name}", getattr(self, name))
        for entry in self.passes:
            if len(entry) != 3:
                raise ConfigError(f"Palette.passes entries are (pass name, fill, border), got {entry!r}")
            _check_colour(f"Palette.passes[{entry[0]!r}] fill", entry[1])
            _check_colour(f"Palette.passes[{entry[0]!r}] border", entry[2])

    def for_pass(self, pass_name: str) -> tuple[str, str]:
        """``(fill, border)`` of nodes inserted by ``pass_name``; stable for unknown names.

        A pass not listed in ``passes`` takes the hue of its family when it has one
        (``serial_adapter`` and ``parallel_adapter``: ``adapter``; ``merge_lora``: ``merge``),
        else one picked by a stable hash of its name.
        """
        for wanted in (pass_name, _PASS_FAMILIES.get(pass_name)):
            for name, fill, border in self.passes:
                if name == wanted:
                    return fill, border
        digest = hashlib.sha256(pass_name.encode("utf-8")).digest()
        return _SPARE_COLOURS[digest[0] % len(_SPARE_COLOURS)]


def _check_colour(what: str, value: str) -> None:
    if not isinstance(value, str) or not _COLOUR.match(value):
        raise ConfigError(f"{what} must be a colour like '#1f77b4', got {value!r}")


@dataclass(frozen=True, kw_only=True)
class RenderOptions:
    """How a graph is drawn.

    Attributes:
        rankdir: graphviz layout direction: ``"TB"`` (top to bottom), ``"LR"``, ``"BT"``, ``"RL"``.
        show_shapes: label edges with tensor shapes (``2×16×64``) when known.
        show_params: print parameter counts in module nodes.
        clusters: draw a box around the nodes of each module (transformer blocks, ...).
        legend: add a legend of the colours used.
        depth: collapse modules nested deeper than this into one node each (see
            :func:`visualize.to_networkx`); ``None`` draws everything. Used by
            :func:`visualize.render` and :func:`visualize.render_diff`, which build the graph.
        expand_changed: with ``depth``, keep open every module that holds something a pass
            changed (inserted nodes, rewritten weights, nodes a diff found removed), down to
            the change, so the change is drawn in place; ``False`` collapses them too (the
            inserted nodes are then drawn beside the collapsed module).
        repeats: draw each run of identical consecutive blocks (the items of an
            ``nn.ModuleList`` or ``nn.Sequential``: decoder layers) once, marked with its
            range and count (``model.layers 0–23 ×24``); the nodes inside stand for every
            copy. Blocks that differ (a pass applied to some layers only) are drawn apart.
            See :mod:`visualize.repeats`.
        max_layout_nodes: the most nodes handed to the Graphviz layout; a larger diagram is
            written as DOT only and a :class:`visualize.LayoutSkippedWarning` says why.
            ``None`` lays out any size (Graphviz's ``dot`` takes minutes beyond a few
            thousand nodes). The default keeps a diagram to a few seconds of layout.
        title: the diagram's title; ``None`` = model class, front end and parameter counts.
        highlight: node ids drawn with a thick border in their pass colour (the nodes a
            diff found added).
        fontname: font of every label.
        fontsize: base font size in points; details use a smaller one.
        max_label: longest label kept before it is shortened with ``…``.
        palette: the colours.

    Raises:
        ConfigError: an invalid value (at construction).
    """

    rankdir: str = "TB"
    show_shapes: bool = True
    show_params: bool = True
    clusters: bool = True
    legend: bool = True
    depth: int | None = None
    title: str | None = None
    highlight: frozenset[str] = frozenset()
    fontname: str = "Helvetica"
    fontsize: int = 10
    max_label: int = 48
    palette: Palette = field(default_factory=Palette)
    expand_changed: bool = True
    repeats: bool = True
    max_layout_nodes: int | None = DEFAULT_MAX_LAYOUT_NODES

    def __post_init__(self) -> None:
        if self.rankdir not in _RANKDIRS:
            raise ConfigError(f"RenderOptions.rankdir must be one of {_RANKDIRS}, got {self.rankdir!r}")
        if self.depth is not None and (not isinstance(self.depth, int) or isinstance(self.depth, bool)
                                       or self.depth < 1):
            raise ConfigError(f"RenderOptions.depth must be a positive int or None, got {self.depth!r}")
        if not isinstance(self.fontsize, int) or not 4 <= self.fontsize <= 72:
            raise ConfigError(f"RenderOptions.fontsize must be an int in [4, 72], got {self.fontsize!r}")
        if not isinstance(self.max_label, int) or self.max_label < 8:
            raise ConfigError(f"RenderOptions.max_label must be an int >= 8, got {self.max_label!r}")
        if not isinstance(self.palette, Palette):
            raise ConfigError(f"RenderOptions.palette must be a Palette, got {type(self.palette).__name__}")
        if not isinstance(self.highlight, frozenset):
            object.__setattr__(self, "highlight", frozenset(self.highlight))
        if self.max_layout_nodes is not None and (
                not isinstance(self.max_layout_nodes, int) or isinstance(self.max_layout_nodes, bool)
                or self.max_layout_nodes < 1):
            raise ConfigError(f"RenderOptions.max_layout_nodes must be a positive int or None, "
                              f"got {self.max_layout_nodes!r}")
        for name in ("expand_changed", "repeats"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"RenderOptions.{name} must be True or False, "
                                  f"got {getattr(self, name)!r}")
        if any(c in self.fontname for c in '"\\\n'):
            raise ConfigError(f"RenderOptions.fontname must be a plain font name, got {self.fontname!r}")
