"""Before/after: the parameter and graph diff of two models, drawn side by side, and the
HTML report of it."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery.errors import InputTypeError, RenderError
from surgery.map.wrappers import unwrap
from surgery.sites.marker import AdapterModule, slot_parameters
from visualize.anatomy import (
    DEFAULT_MAX_SITES,
    SiteChoice,
    draw_sites,
    pick_sites,
    svg_of,
)
from visualize.diff_nodes import node_diff
from visualize.diff_report import PARAM_KINDS, DiffReport, ParamChange
from visualize.diff_view import diff_graph
from visualize.dot import default_title, to_dot
from visualize.graph import param_totals
from visualize.html import report_html
from visualize.options import RenderOptions
from visualize.pictures import pictures
from visualize.render import LayoutSkippedWarning, MissingRendererWarning, write_diagram

__all__ = ["render_diff", "report", "param_diff", "node_diff"]


def _history(model: nn.Module) -> dict[tuple[str, str], str]:
    """``(change kind, parameter name) → pass name`` from ``model._surgery.history``."""
    state = getattr(model, "_surgery", None)
    out: dict[tuple[str, str], str] = {}
    for result in getattr(state, "history", None) or []:
        for change in result.changes:
            out.setdefault((change.kind, change.name), change.pass_name)
    return out


def _adapter_owners(model: nn.Module) -> dict[str, str]:
    """Parameter name → ``pass_name`` of the adapter module (or adapters' parameter slot,
    IA³'s ``ia3_l``) holding it."""
    out: dict[str, str] = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, AdapterModule):
            for pname, _ in mod.named_parameters(prefix=mod_name):
                out.setdefault(pname, mod.pass_name)
    for pname, _, pass_name, _ in slot_parameters(model):
        out.setdefault(pname, pass_name)
    return out


def _is_rewritten(old: torch.Tensor, new: torch.Tensor, recorded: bool) -> bool:
    if old.shape != new.shape or old.dtype != new.dtype:
        return True
    if old.device.type == "meta" or new.device.type == "meta":
        return recorded
    if old.device == new.device and old.data_ptr() == new.data_ptr() and old.stride() == new.stride():
        return False
    return recorded or not torch.equal(old.detach(), new.detach())


def _row(kind: str, name: str, param: torch.Tensor, pass_name: str | None) -> ParamChange:
    return ParamChange(kind, name, tuple(int(d) for d in param.shape), int(param.numel()),
                       bool(param.requires_grad), pass_name)


def param_diff(before: nn.Module, after: nn.Module) -> tuple[ParamChange, ...]:
    """Compare the parameters of two models by qualified name.

    A parameter is *rewritten* when its shape or dtype changed, or when its storage differs
    and either its values differ or a pass recorded a ``param_rewritten`` change for it.
    Two models that merely hold copies of the same values show no rewrite.

    Args:
        before: the model before surgery (plain or adapted).
        after: the model after surgery.

    Returns:
        Rows grouped by kind (added, removed, frozen, unfrozen, rewritten), in model order
        within a kind. The pass of each row comes from the adapter module holding the
        parameter, else from ``after._surgery.history``, else is ``None``.
    """
    old = dict(before.named_parameters())
    new = dict(after.named_parameters())
    owners = _adapter_owners(after)
    hist = _history(after)
    rows: dict[str, list[ParamChange]] = {k: [] for k in PARAM_KINDS}
    for name, param in new.items():
        if name not in old:
            rows["added"].append(_row("added", name, param, owners.get(name) or hist.get(("param_added", name))))
            continue
        prev = old[name]
        if prev.requires_grad and not param.requires_grad:
            rows["frozen"].append(_row("frozen", name, param, hist.get(("param_frozen", name))))
        elif param.requires_grad and not prev.requires_grad:
            rows["unfrozen"].append(_row("unfrozen", name, param, owners.get(name)))
        recorded = ("param_rewritten", name) in hist
        if _is_rewritten(prev, param, recorded):
            rows["rewritten"].append(_row("rewritten", name, param, hist.get(("param_rewritten", name))))
    for name, param in old.items():
        if name not in new:
            rows["removed"].append(_row("removed", name, param, hist.get(("param_removed", name))))
    return tuple(r for k in PARAM_KINDS for r in rows[k])


def check_models(who: str, before: object, after: object) -> None:
    """Refuse a ``before`` or ``after`` that is not an ``nn.Module``, before anything is
    traced or written.

    Raises:
        surgery.errors.InputTypeError: naming ``who``, the argument and its type.
    """
    for arg, value in (("before", before), ("after", after)):
        if not isinstance(value, nn.Module):
            raise InputTypeError(
                f"{who}: {arg} must be an nn.Module (the plain model, or the model "
                f"apply_passes returned), got {type(value).__name__}. Way out: "
                f"{who}(model, adapted, ...).")


def _source_name(model: nn.Module) -> str:
    """The class the model had before surgery (an adapted model's, a map's source class)."""
    for info in (getattr(model, "_surgery", None), getattr(model, "_surgery_map", None)):
        cls = getattr(info, "source_class", None)
        if cls is not None:
            return cls.__name__
    return type(model).__name__


def _draw(before: nn.Module, after: nn.Module, out: Path, stems: tuple[str, str],
          example_inputs: tuple | None, example_kwargs: Mapping[str, Any] | None,
          options: RenderOptions) -> tuple[DiffReport, list[str | None], str | None]:
    """Trace, diff and draw the pair into ``out``: the report (its files: the ``.dot``
    files and images), the two SVG texts, and the SVG of the changed part (in memory).
    ``out`` is created only once both models are traced, so a model that cannot be traced
    leaves no folder behind."""
    state = getattr(after, "_surgery", None)
    if example_inputs is None and state is not None:
        example_inputs = state.example_inputs
    if example_kwargs is None and state is not None:
        example_kwargs = state.example_kwargs
    (g_before, g_after), nodes = pictures([before, after], example_inputs, example_kwargs, options)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RenderError(f"could not create the output folder {out}: {e}") from e
    added = frozenset(n.id for n in nodes if n.kind == "added")
    highlight = frozenset(nid for nid, attrs in g_after.nodes(data=True)
                          if nid in added or any(c in added for c in attrs.get("copies", ())))
    before_opts = replace(options, highlight=frozenset(),
                          title=options.title or f"before: {default_title(g_before)}")
    after_opts = replace(options, highlight=highlight,
                         title=options.title or f"after: {default_title(g_after)}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before_img = write_diagram(g_before, out / f"{stems[0]}.svg", options=before_opts)
        after_img = write_diagram(g_after, out / f"{stems[1]}.svg", options=after_opts)
    notes = tuple(str(w.message) for w in caught if issubclass(w.category, LayoutSkippedWarning))
    missing_told = False
    for w in caught:  # one missing-renderer warning for the pair is enough
        if issubclass(w.category, MissingRendererWarning):
            if missing_told:
                continue
            missing_told = True
        warnings.warn(w.message, w.category, stacklevel=3)
    files = [out / f"{stems[0]}.dot", out / f"{stems[1]}.dot"]
    svgs: list[str | None] = []
    for img in (before_img, after_img):
        if img.suffix == ".svg":
            files.append(img)
            svgs.append(img.read_text(encoding="utf-8"))
        else:
            svgs.append(None)
    removed = frozenset(n.id for n in nodes if n.kind == "removed")
    changed = diff_graph(g_before, g_after, highlight, removed)
    diff_svg = None
    budget = options.max_layout_nodes
    if changed.number_of_nodes() and (budget is None or changed.number_of_nodes() <= budget):
        diff_svg = svg_of(to_dot(changed, replace(  # the after diagram's legend serves
            after_opts, legend=False,
            title=f"changed: {len(added)} nodes added, {len(removed)} removed")))
    before_total, before_trainable = param_totals(before)
    after_total, after_trainable = param_totals(after)
    report = DiffReport(
        out_dir=out,
        files=tuple(files),
        params=param_diff(before, after),
        nodes=nodes,
        before_name=_source_name(before),
        after_name=_source_name(after) + (" (adapted)" if state is not None and state.history else ""),
        before_total=before_total,
        before_trainable=before_trainable,
        after_total=after_total,
        after_trainable=after_trainable,
        notes=notes,
    )
    return report, svgs, diff_svg


def _page(report: DiffReport, svgs: list[str | None], diff_svg: str | None, after: nn.Module,
          choice: SiteChoice, options: RenderOptions, stems: tuple[str, str]) -> str:
    from surgery.audit.count import audit

    return report_html(report, svgs[0], svgs[1], diff_svg=diff_svg, audit=audit(after),
                       sites=draw_sites(after, choice, options), sites_note=choice.note(),
                       dot_names=(f"{stems[0]}.dot", f"{stems[1]}.dot"))


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise RenderError(f"could not write the report {path}: {e}") from e


def render_diff(
    before: nn.Module,
    after: nn.Module,
    out_dir: str | os.PathLike[str],
    example_inputs: tuple | None = None,
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    options: RenderOptions | None = None,
) -> DiffReport:
    """Draw a model before and after surgery, and report what changed.

    Writes into ``out_dir`` (created if missing; other files there are left alone):
    ``before.dot``, ``after.dot``, ``before.svg`` and ``after.svg`` (when a Graphviz
    renderer exists, see :func:`visualize.render`), ``diff.md`` and ``diff.html`` (the
    self-contained report page of :func:`report`: the diagrams with pan and zoom, the
    anatomy of the adapted sites, the audit and the diff tables). In the after diagram the
    added nodes are drawn with a thick border in their pass's colour; in the before diagram
    the removed ones (a merged branch, say) with a thick dashed border, and both legends
    say so. Each title counts the parameters of its whole model as :func:`surgery.audit`
    does (each tensor once; trainable by ``requires_grad``).

    Both pictures are maps (:func:`visualize.to_networkx`): ``after``'s with each adapted
    call expanded into its site graph, ``before``'s traced by the same front end (the same
    map, when ``before`` has the plain structure ``after`` was made from), so the nodes
    both share keep their ids and the diff finds exactly what the passes inserted (and,
    for a merge, what they took out). The node and parameter tables count every node and
    parameter of both models whatever is drawn: by default each run of identical layers
    is drawn once (``model.layers 0–23 ×24``, the same runs in both pictures, see
    :mod:`visualize.repeats`), and with ``options.depth`` deep modules collapse except
    where either model was changed (``options.expand_changed``).

    Args:
        before: usually the caller's plain model (its map is traced from a weight-free
            copy; it is not changed), or an adapted model, or a map.
        after: the adapted model from :func:`surgery.apply_passes` (or a plain model or a
            map).
        out_dir: output folder.
        example_inputs: inputs for tracing; by default those ``after`` was adapted with
            (``after._surgery.example_inputs``).
        example_kwargs: keyword inputs, likewise.
        options: drawing options (``depth``, colours, ...); ``RenderOptions()`` by default.

    Returns:
        A :class:`DiffReport`: parameter rows (added, removed, frozen, unfrozen, rewritten,
        each with shape, numel, trainable and the pass responsible), node rows (added by id
        or pass provenance, removed by id), totals and the files written.

    Warns:
        MissingRendererWarning: once, when no renderer exists; the ``.dot`` files, the
            Markdown and the HTML (pointing at the ``.dot`` files) are still written.
        LayoutSkippedWarning: for each diagram of more nodes than
            ``options.max_layout_nodes``: it is written as DOT only, and the report's
            ``notes`` (and the HTML page) say why and how to get the image.

    Raises:
        RenderError: a renderer failed, or a file could not be written (named).
        surgery.errors.TraceError: a plain model could not be traced (``out_dir`` is then
            not created).
        surgery.errors.InputTypeError: ``before`` or ``after`` is not an ``nn.Module``.
    """
    check_models("render_diff", before, after)
    before, after = unwrap(before)[0], unwrap(after)[0]  # torch.compile / DDP wrappers
    options = options or RenderOptions()
    out = Path(out_dir)
    stems = ("before", "after")
    report, svgs, diff_svg = _draw(before, after, out, stems, example_inputs, example_kwargs,
                                   options)
    report = replace(report, files=report.files + (out / "diff.md", out / "diff.html"))
    _write(out / "diff.md", report.to_markdown())
    _write(out / "diff.html", _page(report, svgs, diff_svg, after, pick_sites(after), options,
                                    stems))
    return report


def report(
    before: nn.Module,
    after: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: tuple | None = None,
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    site: str | None = None,
    max_sites: int = DEFAULT_MAX_SITES,
    options: RenderOptions | None = None,
) -> DiffReport:
    """Write the HTML report of a surgery: one self-contained page that works offline.

    The page holds, inline: the totals; the before, after and diff diagrams side by side
    (the diff diagram is the changed nodes with their direct neighbours), each with mouse
    wheel zoom, drag to pan and a reset button; the anatomy of an adapted site (its site
    graph drawn alone, inserted nodes coloured by pass as in the diagrams), with a picker
    over one site per layer pattern; the audit of ``after`` (:func:`surgery.audit`: per
    pass and per layer); the parameter diff and the node diff. Tables sort by a click on a
    column header (numbers numerically). Diagrams are drawn as by :func:`render_diff`.

    Besides ``path``, the diagram sources are written beside it, named after it:
    ``report.html`` gets ``report.before.dot`` and ``report.after.dot`` (and their SVGs);
    when no Graphviz renderer exists, the page says so and names them.

    Args:
        before: the model before surgery (plain, adapted, or a map; not changed).
        after: the adapted model (not changed).
        path: the HTML file to write; missing folders are created.
        example_inputs: inputs for tracing; by default those ``after`` was adapted with.
        example_kwargs: keyword inputs, likewise.
        site: the adapted site shown first in the anatomy section (qualified name, as
            ``"layers.0.attn.q_proj"``); ``None`` = the first adapted site.
        max_sites: the most site graphs drawn (one per layer pattern, ``site`` first); the
            page says how many were left out.
        options: drawing options; ``RenderOptions()`` by default.

    Returns:
        The :class:`DiffReport`; its ``files`` are the ``.dot`` files, the SVGs and the page.

    Warns:
        MissingRendererWarning, LayoutSkippedWarning: as :func:`render_diff`.

    Raises:
        ConfigError: ``site`` is not an adapted site of ``after`` (raised before anything is
            drawn; the message gives the nearest names), or ``max_sites < 1``.
        RenderError: a renderer failed, or a file could not be written (named).
        surgery.errors.TraceError: a model could not be traced (no folder is created).
        surgery.errors.InputTypeError: ``before`` or ``after`` is not an ``nn.Module``.
    """
    check_models("report", before, after)
    before, after = unwrap(before)[0], unwrap(after)[0]  # torch.compile / DDP wrappers
    options = options or RenderOptions()
    page = Path(path)
    choice = pick_sites(after, site, max_sites)
    stems = (f"{page.stem}.before", f"{page.stem}.after")
    result, svgs, diff_svg = _draw(before, after, page.parent, stems, example_inputs,
                                   example_kwargs, options)
    result = replace(result, files=result.files + (page,))
    _write(page, _page(result, svgs, diff_svg, after, choice, options, stems))
    return result
