"""Write the transformers support table into README.md.

Runs every check of :mod:`checks` on every architecture of :mod:`surgery.zoo.hf_tiny` and
replaces the text between ``<!-- support-table:start -->`` and ``<!-- support-table:end -->``
in README.md with a Markdown table: one row per architecture, one column per method, each
cell ``yes`` or ``no`` with a numbered footnote giving the error. From the repository root::

    python -m tests.zoo.support_table            # all architectures, rewrites README.md
    python -m tests.zoo.support_table --print gpt2 t5   # only print the rows of these
    python -m tests.zoo.support_table --print --notes   # and every check's note
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from surgery.zoo.hf_tiny import TINY_ARCHITECTURES, tiny_architectures

from .checks import (
    CHECKS,
    DEFAULT_PASSES,
    GENERATING_TASKS,
    MOE_CHECKS,
    Outcome,
    make_case,
    run_check,
    without_inputs,
)
from .known_failures import KNOWN_FAILURES

START = "<!-- support-table:start -->"
END = "<!-- support-table:end -->"

# column -> the checks that must all pass for "yes"
COLUMNS: dict[str, tuple[str, ...]] = {
    "LoRA": ("lora", "lora_default"),
    "IA³": ("ia3",),
    "adapters": ("adapters",),
    "prefix": ("prefix",),
    "generate": ("peft_outputs",),
    "merge": ("merge",),
    "save/load": ("save_load",),
    "expert LoRA": ("lora_experts",),
}

_CHECK_TITLES = {
    "lora": "LoRA on PEFT's targets",
    "lora_default": "LoRAPass()",
    "ia3": "IA3Pass()",
    "adapters": "SerialAdapterPass()",
    "prefix": 'PrefixPass(length=4, gate="zero")',
    "peft_outputs": "PEFT parity",
    "merge": "merge / unmerge / unload",
    "save_load": "save_adapters / load_adapters",
    "lora_experts": "LoRAPass(target_parameters=<fused expert weights>)",
}

_NEEDS_INPUTS = ("applies only with example inputs; without them it raises a TraceError "
                 "naming example_inputs= as the way out")


@dataclass
class Footnotes:
    """Numbered footnotes, one per distinct text."""

    texts: list[str] = field(default_factory=list)

    def ref(self, text: str) -> int:
        """The number of ``text``, adding it if new."""
        if text not in self.texts:
            self.texts.append(text)
        return self.texts.index(text) + 1


def run_architecture(model_type: str) -> tuple[dict[str, Outcome], dict[str, bool | str]]:
    """Every check on ``model_type``, and for each default pass whether it applies without
    example inputs."""
    case = make_case(model_type)
    outcomes = {name: run_check(name, case)
                for checks in COLUMNS.values() for name in checks if name in CHECKS}
    if TINY_ARCHITECTURES[model_type].moe:
        outcomes.update((name, run_check(name, case)) for name in MOE_CHECKS)
    no_inputs: dict[str, bool | str] = {}
    for column in DEFAULT_PASSES:
        try:
            no_inputs[column] = without_inputs(case, column)
        except Exception as e:  # noqa: BLE001 - recorded in the table
            no_inputs[column] = f"{type(e).__name__}"
    return outcomes, no_inputs


def _clean(text: str, limit: int = 220) -> str:
    text = " ".join(text.replace("|", "\\|").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _note(model_type: str, check: str, outcome: Outcome) -> str:
    """The footnote of a failed check: the reason :data:`KNOWN_FAILURES` gives (with the
    error's type) when the case is listed and failed that way, else the error itself."""
    known = KNOWN_FAILURES.get((model_type, check))
    if known is not None and outcome.error_type is not None and issubclass(
            outcome.error_type, known.error):
        return f"{_CHECK_TITLES[check]}: {known.reason} ({known.error.__name__})."
    return _clean(f"{_CHECK_TITLES[check]}: {outcome.note}")


def row(model_type: str, outcomes: dict[str, Outcome], no_inputs: dict[str, bool | str],
        notes: Footnotes) -> str:
    """One Markdown table row; ``no_inputs``: whether each default pass applies without
    example inputs."""
    arch = TINY_ARCHITECTURES[model_type]
    cells = [f"`{model_type}`" + (" (MoE)" if arch.moe else ""), arch.task]
    for column, checks in COLUMNS.items():
        if column == "expert LoRA" and not arch.moe:
            cells.append("n/a")
            continue
        if column == "generate" and arch.task not in GENERATING_TASKS:
            checks = ("peft_outputs",)
            bad = [c for c in checks if not outcomes[c].ok]
            cells.append("n/a" if not bad else
                         f"no [{notes.ref(_note(model_type, bad[0], outcomes[bad[0]]))}]")
            continue
        bad = [c for c in checks if not outcomes[c].ok]
        needs = [c for c in checks if no_inputs.get(c, True) is not True]
        if not bad and needs:
            refs = ", ".join(str(notes.ref(f"{_CHECK_TITLES[c]} {_NEEDS_INPUTS}"
                                           + ("" if no_inputs[c] is False else
                                              f" (without them: {no_inputs[c]})")))
                             for c in needs)
            cells.append(f"yes [{refs}]")
        elif not bad:
            cells.append("yes")
        else:
            refs = ", ".join(str(notes.ref(_note(model_type, c, outcomes[c]))) for c in bad)
            cells.append(f"no [{refs}]")
    return "| " + " | ".join(cells) + " |"


def table(results: dict[str, tuple[dict[str, Outcome], dict[str, bool | str]]]) -> str:
    """The Markdown block written between the markers."""
    notes = Footnotes()
    header = ["architecture", "head", *COLUMNS]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += [row(model_type, outcomes, no_inputs, notes)
              for model_type, (outcomes, no_inputs) in results.items()]
    lines.append("")
    for i, text in enumerate(notes.texts, 1):
        lines.append(f"{i}. {text}")
    import peft
    import transformers

    lines += [
        "",
        f"Generated by `python -m tests.zoo.support_table` (transformers "
        f"{transformers.__version__}, peft {peft.__version__}, torch "
        f"{torch.__version__.split('+')[0]}; {len(results)} architectures).",
    ]
    return "\n".join(lines)


def write_readme(block: str, readme: Path) -> None:
    """Replace the text between the markers of ``readme`` with ``block``.

    Raises:
        ValueError: the markers are missing or out of order.
    """
    text = readme.read_text()
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{readme} needs the markers {START} and {END}, in that order")
    readme.write_text(text[: start + len(START)] + "\n" + block + "\n" + text[end:])


def main(argv: list[str] | None = None) -> int:
    """Run the checks and write (or print) the table; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_types", nargs="*", help="architectures (default: all)")
    parser.add_argument("--print", action="store_true", help="print instead of writing")
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    parser.add_argument("--notes", action="store_true",
                        help="print every check's note (counts, differences, errors)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    started = time.perf_counter()
    results = {}
    for model_type in args.model_types or tiny_architectures():
        t0 = time.perf_counter()
        results[model_type] = run_architecture(model_type)
        print(f"{model_type}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        if args.notes:
            for name, outcome in results[model_type][0].items():
                print(f"  {name}: {'ok' if outcome.ok else 'FAILED'}: {outcome.note}",
                      file=sys.stderr, flush=True)
    block = table(results)
    print(f"{len(results)} architectures in {time.perf_counter() - started:.0f} s",
          file=sys.stderr)
    if args.print:
        print(block)
    else:
        write_readme(block, args.readme)
        print(f"wrote {len(results)} rows into {args.readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
