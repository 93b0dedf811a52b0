"""The ``surgery`` command: try passes on a model of the zoo from a shell.

::

    surgery demo --out out/                          # built-in transformer, LoRA + IA³
    surgery targets hf:llama                         # every candidate site: name, type, role, shape
    surgery apply hf:gpt2 --lora 'attn.*' --ia3 --out out/
    surgery apply builtin --lora-role query --lora-role value --rank 4 --dry-run
    surgery apply hf:llama --adapter houlsby --bottleneck 16 --name sst2 --out out/
    surgery apply builtin --parallel --prefix 4 --prefix-gate zero --dry-run
    surgery report builtin --lora 'attn.*' --ia3 --site layers.0.attn.q_proj --out report.html
    surgery inspect ckpt/ --model hf:gpt2             # what a checkpoint (ours or PEFT's) holds

Errors on purpose (a pattern matching nothing, an unknown model name, ...) print one clean
paragraph on stderr and exit with status 2; usage errors exit 2 as well.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from surgery.cli_passes import add_pass_arguments, passes_from_args
from surgery.errors import ConfigError, NoMatchError, RenderError, SurgeryError

if TYPE_CHECKING:
    from torch import nn

    from surgery.audit.count import Audit
    from surgery.pass_base import Pass
    from surgery.zoo import ModelSpec
    from visualize.diff_report import DiffReport

__all__ = ["main", "build_parser"]

EXIT_OK = 0
EXIT_ERROR = 2

_DEMO_MODEL = "builtin"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``surgery`` command, with its subcommands."""
    from surgery import __version__

    parser = argparse.ArgumentParser(
        prog="surgery",
        description="Parameter-efficient model surgery (LoRA, IA3, bottleneck adapters, "
                    "prefixes) as torch.fx graph rewrites.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser(
        "demo", help="adapt the built-in transformer with LoRA and IA3, audit it, draw the diff",
        description="Build the built-in transformer, apply LoRAPass(pattern='attn.*', rank=8, "
                    "alpha=16) and IA3Pass(), print the audit and write before/after diagrams "
                    "and the audit into --out.")
    demo.add_argument("--out", default="out", metavar="DIR", help="output folder (default: out)")

    targets = sub.add_parser(
        "targets", help="list every candidate site of a model: name, type, role, shape",
        description="List the layers a pass could adapt, with their structural roles.")
    targets.add_argument("spec", metavar="SPEC", help=_spec_help())
    targets.add_argument("--json", action="store_true", help="print JSON instead of a table")

    apply = sub.add_parser(
        "apply", help="apply LoRA, IA3, adapters and/or a prefix to a model, print the audit, "
                      "draw the diff",
        description="Apply the passes to a model of the zoo, print the audit, and write "
                    "before/after diagrams and the audit into --out.")
    apply.add_argument("spec", metavar="SPEC", help=_spec_help())
    add_pass_arguments(apply)
    apply.add_argument("--out", default="out", metavar="DIR", help="output folder (default: out)")
    apply.add_argument("--dry-run", action="store_true",
                       help="print what the passes would change; adapt and write nothing")
    report = sub.add_parser(
        "report", help="apply passes to a model and write the HTML report: diagrams with pan "
                       "and zoom, the anatomy of an adapted site, audit and diff tables",
        description="Apply the passes to a model of the zoo, print the audit, and write one "
                    "self-contained HTML page (works offline) with the before, after and diff "
                    "diagrams, the site graph of an adapted layer, and sortable audit and "
                    "parameter diff tables; the diagram sources are written beside it.")
    report.add_argument("spec", nargs="?", default=None, metavar="SPEC", help=_spec_help())
    report.add_argument("--model", default=None, metavar="SPEC", help="the model (as SPEC)")
    add_pass_arguments(report)
    report.add_argument("--site", default=None, metavar="NAME",
                        help="the adapted site shown first in the anatomy section "
                             "(layers.0.attn.q_proj); default: the first adapted site")
    report.add_argument("--max-sites", type=int, default=8, metavar="N",
                        help="the most site graphs drawn, one per layer pattern (default 8)")
    report.add_argument("--out", default="report.html", metavar="FILE",
                        help="the HTML file to write (default: report.html)")
    inspect = sub.add_parser(
        "inspect", help="print what an adapter checkpoint holds (fx-surgery's or PEFT's)",
        description="Print the adapters of a checkpoint directory (save_adapters or PEFT's "
                    "save_pretrained): passes, sites, parameter counts, dtypes; with --model, "
                    "whether it loads onto that model.")
    inspect.add_argument("directory", metavar="DIRECTORY", help="the checkpoint directory")
    fit = inspect.add_mutually_exclusive_group()
    fit.add_argument("--model", default=None, metavar="SPEC",
                     help="check that the checkpoint fits this model of the zoo")
    fit.add_argument("--factory", default=None, metavar="MODULE:FUNCTION",
                     help="check that the checkpoint fits the model FUNCTION() returns "
                          "(your own model: e.g. mypackage.models:build_base; the module is "
                          "imported from the current directory or the installed packages)")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def _spec_help() -> str:
    from surgery.zoo import available_models

    return "model name: builtin, " + ", ".join(available_models())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``surgery`` command.

    Args:
        argv: the arguments after the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The exit status: 0 on success, 2 on a usage error or a :class:`SurgeryError`
        (printed as one paragraph on stderr, without a traceback).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    commands = {"demo": _demo, "targets": _targets, "apply": _apply, "report": _report,
                "inspect": _inspect}
    try:
        return commands[args.command](args, sys.stdout)
    except SurgeryError as exc:
        _error(f"{type(exc).__name__}: {exc}")
        return EXIT_ERROR


def _error(message: str) -> None:
    print(f"surgery: error: {' '.join(message.split())}", file=sys.stderr)


def _load(spec: str) -> ModelSpec:
    """The zoo's ModelSpec for ``spec``; a missing optional dependency is a clean error."""
    from surgery.zoo import load_model

    try:
        return load_model(spec)
    except ImportError as exc:
        raise ConfigError(str(exc)) from exc


def _targets(args: argparse.Namespace, out: TextIO) -> int:
    from surgery.listing import list_targets

    spec = _load(args.spec)
    found = list_targets(spec.model, spec.example_inputs, spec.example_kwargs)
    if args.json:
        rows = [{"name": t.qname, "type": t.type, "role": t.role, "shape": list(t.shape),
                 "calls": t.calls, "adapters": list(t.adapters)} for t in found]
        print(json.dumps(rows, indent=2), file=out)
        if found.note:  # names need no tracing; roles do
            print(f"surgery: note: {found.note}", file=sys.stderr)
    else:
        print(f"{spec.name}: {spec.description}", file=out)
        print(found, file=out)
    return EXIT_OK


def _inspect(args: argparse.Namespace, out: TextIO) -> int:
    from surgery.checkpoint.inspect import inspect_checkpoint

    model = None
    if args.model:
        model = _load(args.model).model
    elif args.factory:
        model = _factory(args.factory)
    summary = inspect_checkpoint(args.directory, model)
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary, file=out)
    return EXIT_OK if summary.ok else EXIT_ERROR


def _factory(spec: str) -> nn.Module:
    """The model ``FUNCTION()`` of ``MODULE:FUNCTION`` returns."""
    import importlib

    from torch import nn

    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        raise ConfigError(f"--factory takes MODULE:FUNCTION (mypackage.models:build_base), got "
                          f"{spec!r}")
    if "" not in sys.path:
        sys.path.insert(0, "")  # the current directory, as `python -m` does
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--factory {spec}: cannot find {func_name} in {module_name} ({exc})") \
            from None
    model = func()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--factory {spec}: {func_name}() returned a {type(model).__name__}, "
                          f"not an nn.Module")
    return model


def _apply(args: argparse.Namespace, out: TextIO) -> int:
    passes = passes_from_args(args, "apply")
    spec = _load(args.spec)
    for p in passes:
        if getattr(p, "identity_at_init", True) is False:
            print(f"note: {p.describe()} changes the model's outputs before any training "
                  f"(the prefix joins the attention softmax); --prefix-gate zero keeps them "
                  f"unchanged at init", file=out)
    try:
        if args.dry_run:
            return _dry_run(spec, passes, out)
        return _adapt_and_report(spec, passes, Path(args.out), out)
    except NoMatchError as exc:
        raise NoMatchError(f"{exc} On the command line, 'surgery targets {args.spec}' lists "
                           f"every candidate site with its role.") from exc


def _demo(args: argparse.Namespace, out: TextIO) -> int:
    from passes.ia3 import IA3Pass
    from passes.lora import LoRAPass

    spec = _load(_DEMO_MODEL)
    print(f"{spec.name}: {spec.description}", file=out)
    passes = [LoRAPass(pattern="attn.*", rank=8, alpha=16), IA3Pass()]
    return _adapt_and_report(spec, passes, Path(args.out), out)


def _dry_run(spec: ModelSpec, passes: list[Pass], out: TextIO) -> int:
    from surgery.apply import plan

    results = plan(spec.model, passes, spec.example_inputs, spec.example_kwargs)
    print(f"dry run on {spec.name}: nothing is changed or written", file=out)
    for p, result in zip(passes, results):
        added = [c for c in result.changes if c.kind == "param_added"]
        print(f"{p.describe()}: {len(result.sites)} site(s), "
              f"{sum(c.numel for c in added):,d} new params", file=out)
        for site in result.sites:
            shapes = ", ".join(f"{c.name.removeprefix(site + '.')} {tuple(c.shape)}"
                               for c in added if c.site == site)
            role = next((c.role for c in result.changes if c.site == site and c.role), "")
            line = f"  {site}" + (f"  [{role}]" if role else "")
            print(line + (f"  + {shapes}" if shapes else ""), file=out)
    return EXIT_OK


def _adapt(spec: ModelSpec, passes: list[Pass], out: TextIO) -> tuple[nn.Module, Audit]:
    """Apply ``passes`` to the spec's model and print its audit."""
    from surgery.apply import apply_passes
    from surgery.audit.count import audit

    adapted = apply_passes(spec.model, passes, spec.example_inputs, spec.example_kwargs)
    _build_map(adapted)
    report = audit(adapted)
    _print_audit(report, out)
    return adapted, report


def _adapt_and_report(spec: ModelSpec, passes: list[Pass], out_dir: Path, out: TextIO) -> int:
    adapted, report = _adapt(spec, passes, out)
    files, hints = _render(spec, adapted, out_dir)
    for name, text in (("audit.md", report.to_markdown()), ("audit.json", report.to_json() + "\n")):
        path = out_dir / name
        try:
            path.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise RenderError(f"could not write {path}: {exc}") from exc
        files.append(path)
    _wrote(files, hints, out_dir / "diff.html", out)
    return EXIT_OK


def _report(args: argparse.Namespace, out: TextIO) -> int:
    from visualize import report as write_report

    if args.spec and args.model and args.spec != args.model:
        raise ConfigError(f"report: two models given ({args.spec} and --model {args.model}); "
                          f"give one")
    name = args.model or args.spec
    if not name:
        raise ConfigError(f"report: which model? give SPEC or --model SPEC ({_spec_help()})")
    passes = passes_from_args(args, "report")
    spec = _load(name)
    try:
        adapted, _ = _adapt(spec, passes, out)
    except NoMatchError as exc:
        raise NoMatchError(f"{exc} On the command line, 'surgery targets {name}' lists "
                           f"every candidate site with its role.") from exc
    page = Path(args.out)
    files, hints = _drawn(lambda: write_report(
        spec.model, adapted, page, spec.example_inputs, spec.example_kwargs or None,
        site=args.site, max_sites=args.max_sites))
    _wrote(files, hints, page, out)
    return EXIT_OK


def _wrote(files: list[Path], hints: list[str], page: Path, out: TextIO) -> None:
    print(f"\nwrote {len(files)} file(s):", file=out)
    for path in files:
        print(f"  {path}", file=out)
    for hint in hints:
        print(f"hint: {hint}", file=out)
    print(f"report: open {page} in a browser (diagrams, anatomy of a site, audit, diff)",
          file=out)


def _build_map(adapted: nn.Module) -> None:
    """Trace and cache the adapted model's map and roles, so the audit shows roles (the
    audit itself never traces) and the diagrams reuse the map; a model that cannot be
    traced is audited without roles."""
    from surgery.errors import TraceError
    from surgery.targets import model_map, model_roles

    try:
        model_map(adapted)
        model_roles(adapted)
    except TraceError:
        pass


def _render(spec: ModelSpec, adapted: nn.Module, out_dir: Path) -> tuple[list[Path], list[str]]:
    """Draw the before/after diagrams and write the report page (``diff.html``) into
    ``out_dir``; returns what :func:`_drawn` does."""
    from visualize import render_diff

    return _drawn(lambda: render_diff(spec.model, adapted, out_dir,
                                      example_inputs=spec.example_inputs,
                                      example_kwargs=spec.example_kwargs or None))


def _drawn(draw: Callable[[], DiffReport]) -> tuple[list[Path], list[str]]:
    """Run ``draw`` (which writes diagrams and reports).

    Returns:
        The files written, and what the renderer said about a missing Graphviz (only the
        ``.dot`` files are written then), as hints. Other warnings pass through unchanged.
    """
    from visualize import MissingRendererWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = draw()
    hints: list[str] = []
    for w in caught:
        if issubclass(w.category, MissingRendererWarning):
            text = " ".join(str(w.message).split())
            if text not in hints:
                hints.append(text)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return list(report.files), hints


def _print_audit(report: Audit, out: TextIO) -> None:
    if out is sys.stdout and out.isatty():
        try:
            from rich.console import Console
        except ImportError:
            pass
        else:
            Console().print(report)
            return
    print(report, file=out)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
