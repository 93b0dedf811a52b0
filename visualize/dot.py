"""networkx graph → graphviz DOT text, deterministic to the byte.

Everything is emitted in a fixed order (nodes by graph order then id, clusters by their first
node, edges by their endpoints' order), every string is escaped, and no memory address,
``id()`` or hash seed reaches the output, so the same graph always gives the same text.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import networkx as nx

from visualize.options import RenderOptions
from visualize.repeats import display_path
from visualize.style import LEGEND_BASE, node_category, node_style

__all__ = ["to_dot", "default_title", "quote", "format_count", "format_shape", "REMOVED_BORDER"]

REMOVED_BORDER = "#333333"
"""Border of nodes a diff found removed (``diff="removed"``), drawn thick and dashed, unless
the palette has a ``removed`` colour."""


def quote(text: str) -> str:
    """A DOT double-quoted string: backslashes and quotes escaped, newlines as ``\\n``."""
    text = str(text).replace("\\", "\\\\").replace('"', '\\"')
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\\n")
    return f'"{text}"'


def format_count(n: int) -> str:
    """``950``, ``12.3K``, ``7.0M``, ``1.24B``."""
    if n < 1000:
        return str(n)
    if n < 1_000_000:
        return f"{n / 1e3:.1f}K"
    if n < 1_000_000_000:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e9:.2f}B"


def format_shape(shape: Iterable[Any] | None, dtype: str | None = None) -> str:
    """``2×16×64``, ``scalar``; a dtype other than float32 is appended (``2×16 int64``)."""
    if shape is None:
        return ""
    dims = tuple(shape)
    text = "×".join(str(d) for d in dims) if dims else "scalar"
    if dtype and dtype != "float32":
        text = f"{text} {dtype}"
    return text


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _detail_lines(attrs: dict[str, Any], options: RenderOptions,
                  repeats: dict[str, Any] | None = None) -> list[str]:
    lines: list[str] = []
    op = attrs["op"]
    times = int(attrs.get("repeat", 1))
    if op == "module":
        lines.append(f"{attrs.get('module_type') or 'module'} · {attrs['collapsed']} nodes")
        if times > 1 and attrs.get("module") in (repeats or {}):
            lines.append(f"×{times}")
    elif op == "call_module" and attrs.get("module_type"):
        lines.append(attrs["module_type"])
    if options.show_params and attrs.get("numel"):
        text = f"{format_count(attrs['numel'])} params"
        if attrs.get("param_state") == "mixed":
            text += f", {format_count(attrs['trainable_numel'])} trainable"
        lines.append(text)
    prov = attrs.get("provenance") or {}
    if attrs.get("pass_name"):
        part = prov.get("part") or prov.get("role")
        adapter = prov.get("adapter")
        text = f"+ {attrs['pass_name']}"
        if part:
            text += f" · {part}"
        if adapter and adapter != "default":
            text += f" [{adapter}]"
        if times > 1:  # one inserted node drawn for every copy of its block
            text += f" ×{times}"
        lines.append(text)
    if attrs.get("scaling"):  # a learned vector multiplying the layer's output or input
        lines.append(f"× l ({attrs['scaling']} scaling)")
    if attrs.get("adapted"):
        lines.append("adapted: " + ", ".join(attrs["adapted"]))
    if attrs.get("rewritten"):
        lines.append("rewritten by " + ", ".join(attrs["rewritten"]))
    if _is_removed(attrs):
        lines.append("− removed")
    if op == "output" and options.show_shapes and attrs.get("shape") is not None:
        lines.append(format_shape(attrs["shape"], attrs.get("dtype")))
    return lines


def _label(attrs: dict[str, Any], options: RenderOptions,
           repeats: dict[str, Any] | None = None) -> str:
    # Plain escString labels: HTML-like labels need Graphviz built with expat, which the
    # WebAssembly build lacks (it silently prints the node id instead).
    first = str(attrs["label"])
    if repeats and attrs["op"] == "module" and first == attrs.get("module"):
        first = display_path(first, repeats)
    lines = [first] + _detail_lines(attrs, options, repeats)
    return quote("\n".join(_shorten(line, options.max_label) for line in lines))


def _tooltip(nid: str, attrs: dict[str, Any]) -> str:
    lines = [nid, f"{attrs['op']}: {attrs['target']}"]
    if int(attrs.get("repeat", 1)) > 1:
        lines.append(f"drawn once for {attrs['repeat']} identical copies")
    if attrs.get("module"):
        what = "collapsed module" if attrs["op"] == "module" else "module"
        lines.append(f"{what}: {attrs['module']} ({attrs.get('module_type') or '?'})")
    if attrs.get("shape") is not None:
        lines.append(f"shape: {format_shape(attrs['shape'], attrs.get('dtype'))}")
    for p in attrs.get("params", ())[:16]:
        state = "trainable" if p["trainable"] else "frozen"
        extra = f", rewritten by {p['rewritten']}" if p.get("rewritten") else ""
        lines.append(f"{p['name']}: {format_shape(p['shape'])} ({p['numel']}, {state}{extra})")
    if len(attrs.get("params", ())) > 16:
        lines.append(f"... {len(attrs['params']) - 16} more parameters")
    prov = attrs.get("provenance")
    if prov:
        lines.append("inserted: " + ", ".join(f"{k}={prov[k]}" for k in sorted(prov)
                                              if prov[k] is not None))  # no role: by name
    return "\n".join(lines)


def _removed_border(palette: Any) -> str:
    return getattr(palette, "removed", REMOVED_BORDER)


def _is_removed(attrs: dict[str, Any]) -> bool:
    return attrs.get("diff") == "removed"


def _node_line(nid: str, attrs: dict[str, Any], options: RenderOptions, indent: str,
               repeats: dict[str, Any] | None = None) -> str:
    style = node_style(attrs, options.palette, highlighted=nid in options.highlight)
    if _is_removed(attrs):  # gone from the other model of a diff: thick dashed border
        dashed = style.style if "dashed" in style.style.split(",") else f"{style.style},dashed"
        style = replace(style, border=_removed_border(options.palette), penwidth=3.0,
                        style=dashed if "bold" in dashed.split(",") else f"{dashed},bold")
    parts = [
        f"label={_label(attrs, options, repeats)}",
        f"shape={style.shape}",
        f"style={quote(style.style)}",
        f"fillcolor={quote(style.fill)}",
        f"color={quote(style.border)}",
    ]
    if style.penwidth != 1.0:
        parts.append(f"penwidth={style.penwidth:g}")
    parts.append(f"tooltip={quote(_tooltip(nid, attrs))}")
    return f"{indent}{quote(nid)} [{', '.join(parts)}];"


def _sort_key(graph: nx.DiGraph, nid: str) -> tuple[int, str]:
    return (int(graph.nodes[nid].get("order", 0)), str(nid))


def _cluster_tree(graph: nx.DiGraph) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """``(nodes of each cluster path, child clusters of each path)``, both in drawing order."""
    members: dict[str, list[str]] = {}
    for nid, attrs in graph.nodes(data=True):
        members.setdefault(str(attrs.get("cluster") or ""), []).append(nid)
    paths = set(members)
    for path in list(paths):
        parts = path.split(".") if path else []
        for i in range(1, len(parts)):
            paths.add(".".join(parts[:i]))
    paths.add("")
    first: dict[str, tuple] = {}
    for path in paths:
        keys = [_sort_key(graph, n) for n in members.get(path, [])]
        first[path] = min(keys) if keys else (1 << 62, path)
    # a cluster sorts by its earliest node anywhere below it
    for path in sorted(paths, key=lambda p: -p.count(".") if p else 1):
        parent = path.rpartition(".")[0] if path else None
        if parent is not None and first[path] < first[parent]:
            first[parent] = first[path]
    children: dict[str, list[str]] = {p: [] for p in paths}
    for path in paths:
        if path:
            children[path.rpartition(".")[0]].append(path)
    for path in children:
        children[path].sort(key=lambda p: (first[p], p))
        members.setdefault(path, []).sort(key=lambda n: _sort_key(graph, n))
    return members, children


def _cluster_lines(graph: nx.DiGraph, options: RenderOptions, path: str,
                   members: dict[str, list[str]], children: dict[str, list[str]],
                   indent: str) -> list[str]:
    types = graph.graph.get("module_types", {})
    repeats = graph.graph.get("repeats") or {}
    if path in repeats:  # one block drawn for a run of identical ones
        label = display_path(path, repeats) + f" ×{repeats[path]['count']}"
    else:
        label = display_path(path, repeats) if repeats else path
    label += f" · {types[path]}" if types.get(path) else ""
    small = max(options.fontsize - 1, 4)
    lines = [
        f"{indent}subgraph {quote('cluster_' + path)} {{",
        f"{indent}  graph [label={quote(label)}, style={quote('rounded,dashed')}, "
        f"color={quote(options.palette.cluster)}, fontcolor={quote('#555555')}, "
        f"fontsize={small}, labeljust=l];",
    ]
    for nid in members.get(path, []):
        lines.append(_node_line(nid, graph.nodes[nid], options, indent + "  ", repeats))
    for child in children.get(path, []):
        lines.extend(_cluster_lines(graph, options, child, members, children, indent + "  "))
    lines.append(f"{indent}}}")
    return lines


def _flat_lines(graph: nx.DiGraph, options: RenderOptions, path: str,
                members: dict[str, list[str]], children: dict[str, list[str]]) -> list[str]:
    repeats = graph.graph.get("repeats") or {}
    lines = [_node_line(nid, graph.nodes[nid], options, "  ", repeats)
             for nid in members.get(path, [])]
    for child in children.get(path, []):
        lines.extend(_flat_lines(graph, options, child, members, children))
    return lines


def _edge_lines(graph: nx.DiGraph, options: RenderOptions) -> list[str]:
    lines = []
    edges = sorted(graph.edges(data=True),
                   key=lambda e: (_sort_key(graph, e[0]), _sort_key(graph, e[1])))
    for u, v, data in edges:
        parts = []
        if options.show_shapes and data.get("shape") is not None:
            parts.append(f"label={quote(format_shape(data['shape'], data.get('dtype')))}")
        passes = [graph.nodes[n].get("pass_name") for n in (v, u)]
        owner = next((p for p in passes if p), None)
        if data.get("repeat"):  # from one copy of a block to the next, drawn once
            parts = [f"label={quote('repeated ×' + str(data['repeat']))}", "style=dashed",
                     "constraint=false"]
        elif owner:
            parts.append(f"color={quote(options.palette.for_pass(owner)[1])}")
        suffix = f" [{', '.join(parts)}]" if parts else ""
        lines.append(f"  {quote(u)} -> {quote(v)}{suffix};")
    return lines


def _legend_lines(graph: nx.DiGraph, options: RenderOptions) -> list[str]:
    palette = options.palette
    entries: list[tuple[str, str, str, str]] = []  # (id, text, fill, border)
    fills = {"frozen": palette.frozen, "trainable": palette.trainable, "mixed": palette.mixed,
             "rewritten": palette.rewritten, "op": palette.op, "io": palette.io}
    for category, text in LEGEND_BASE:
        entries.append((f"legend:{category}", text, fills[category], palette.border))
    passes = sorted({c[5:] for c in (node_category(a) for _, a in graph.nodes(data=True))
                     if c.startswith("pass:")})
    for name in passes:
        fill, border = palette.for_pass(name)
        entries.append((f"legend:pass:{name}", f"added by {name}", fill, border))
    if options.highlight:
        entries.append(("legend:highlight", "added (diff)", palette.op, palette.added))
    if any(_is_removed(a) for _, a in graph.nodes(data=True)):
        entries.append(("legend:removed", "removed (diff)", palette.op, _removed_border(palette)))
    lines = [
        "  subgraph \"cluster_legend\" {",
        f"    graph [label=\"legend\", style={quote('rounded')}, color={quote(palette.cluster)}, "
        f"fontcolor={quote('#555555')}, fontsize={max(options.fontsize - 1, 4)}];",
        f"    node [shape=box, style={quote('rounded,filled')}, fontsize={max(options.fontsize - 1, 4)}];",
    ]
    for nid, text, fill, border in entries:
        width = {"legend:highlight": ", penwidth=3",
                 "legend:removed": f", penwidth=3, style={quote('rounded,filled,dashed,bold')}"
                 }.get(nid, "")
        lines.append(f"    {quote(nid)} [label={quote(text)}, fillcolor={quote(fill)}, "
                     f"color={quote(border)}{width}];")
    ids = [quote(e[0]) for e in entries]
    lines.append(f"    {{ rank=same; {'; '.join(ids)}; }}")
    lines.append("    " + " -> ".join(ids) + " [style=invis];")
    lines.append("  }")
    return lines


def default_title(graph: nx.DiGraph) -> str:
    """``"TinyTransformer · traced by fx · 150.3K params, 9.0K trainable"``.

    The counts are the graph's ``param_total`` / ``param_trainable`` (every parameter of
    the model, each once, trainable by ``requires_grad``: the totals of
    :func:`surgery.audit`); a graph without them counts the parameters of its nodes.
    """
    if "param_total" in graph.graph:
        total = int(graph.graph["param_total"])
        trainable = int(graph.graph.get("param_trainable", 0))
    else:
        params: dict[str, dict] = {}
        for _, attrs in graph.nodes(data=True):
            for p in attrs.get("params", ()):
                params.setdefault(p["name"], p)
        total = sum(p["numel"] for p in params.values())
        trainable = sum(p["numel"] for p in params.values() if p["trainable"])
    parts = [str(graph.graph.get("name") or "model")]
    if graph.graph.get("frontend"):
        parts.append(f"traced by {graph.graph['frontend']}")
    parts.append(f"{format_count(total)} params, {format_count(trainable)} trainable")
    if graph.graph.get("depth"):
        parts.append(f"depth {graph.graph['depth']}")
    return " · ".join(parts)


def to_dot(graph: nx.DiGraph, options: RenderOptions | None = None) -> str:
    """Write a graph from :func:`visualize.to_networkx` as graphviz DOT source.

    Nodes are coloured by one rule (see :mod:`visualize.style`): nodes a pass inserted take
    that pass's hue (LoRA pink, IA³ purple, adapters cyan, prefix yellow, ...); modules with
    frozen parameters are grey-blue, trainable ones green, both light green; weights a pass
    rewrote (merge) orange. Nodes a diff marked ``diff="removed"`` get a thick dashed dark
    border and a "− removed" line. Edges carry tensor shapes (``2×16×64``) when known,
    modules are grouped into nested clusters by qualified path, and a legend lists the
    colours used (with "added (diff)" / "removed (diff)" entries when those are drawn).
    A block drawn once for a run of identical ones (:func:`visualize.collapse_repeats`) is
    titled with its range and count (``model.layers.0–23 ×24 · LlamaDecoderLayer``), the
    modules inside it with the range (``model.layers.0–23.self_attn``), the nodes passes
    inserted in it say ``×24``, and one dashed "repeated ×24" edge goes from the block's
    output back to where the next copy reads it.

    Args:
        graph: the graph; node attributes as documented in :func:`visualize.to_networkx`
            (``op``, ``label`` and ``target`` are required, the rest optional).
        options: drawing options; ``RenderOptions()`` when omitted. ``options.depth``,
            ``repeats`` and ``max_layout_nodes`` are not applied here (see
            :func:`visualize.render`).

    Returns:
        DOT source text ending in a newline. The same graph and options always give
        byte-identical text.

    Raises:
        KeyError: a node lacks ``op``, ``label`` or ``target``.
    """
    options = options or RenderOptions()
    members, children = _cluster_tree(graph)
    name = str(graph.graph.get("name") or "model")
    small = max(options.fontsize - 2, 4)
    lines = [
        f"digraph {quote(name)} {{",
        f"  graph [rankdir={options.rankdir}, newrank=true, compound=true, "
        f"fontname={quote(options.fontname)}, fontsize={options.fontsize + 2}, "
        f"label={quote(options.title if options.title is not None else default_title(graph))}, labelloc=t, nodesep=0.25, ranksep=0.35];",
        f"  node [fontname={quote(options.fontname)}, fontsize={options.fontsize}, "
        f"margin=\"0.08,0.04\", height=0.3];",
        f"  edge [fontname={quote(options.fontname)}, fontsize={small}, "
        f"color={quote(options.palette.edge)}, fontcolor={quote(options.palette.edge)}, arrowsize=0.6];",
    ]
    if options.clusters:
        repeats = graph.graph.get("repeats") or {}
        lines.extend(_node_line(nid, graph.nodes[nid], options, "  ", repeats)
                     for nid in members.get("", []))
        for child in children.get("", []):
            lines.extend(_cluster_lines(graph, options, child, members, children, "  "))
    else:
        lines.extend(_flat_lines(graph, options, "", members, children))
    lines.extend(_edge_lines(graph, options))
    if options.legend:
        lines.extend(_legend_lines(graph, options))
    lines.append("}")
    return "\n".join(lines) + "\n"
