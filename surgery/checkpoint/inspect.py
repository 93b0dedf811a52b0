"""What a checkpoint directory holds, ours or PEFT's, read without loading its tensors.

::

    summary = inspect_checkpoint("ckpt/", model=base)   # model optional: does it fit?
    print(summary)

Behind ``surgery inspect DIRECTORY [--model SPEC]``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any

from torch import nn

from surgery.checkpoint.files import checkpoint_dir, read_json, tensor_headers
from surgery.checkpoint.peft_config import CONFIG_NAME as PEFT_CONFIG
from surgery.checkpoint.peft_config import parse_peft_config
from surgery.checkpoint.peft_keys import PREFIX as PEFT_PREFIX
from surgery.checkpoint.peft_keys import WEIGHTS_NAME as PEFT_TENSORS
from surgery.checkpoint.recipe import rebuild_step
from surgery.checkpoint.save import RECIPE_FILE, TENSORS_FILE
from surgery.checkpoint.validate import check_listing, read_recipe
from surgery.errors import CheckpointError, SurgeryError

__all__ = ["AdapterInfo", "CheckpointSummary", "inspect_checkpoint"]


@dataclass
class AdapterInfo:
    """One adapter of a checkpoint.

    Attributes:
        name: the adapter name.
        kinds: the passes (ours) or PEFT type (``"LORA"``, ``"IA3"``) that make it.
        sites: qualified names of the layers it adapts.
        parameters: number of scalars it stores.
        dtypes: the dtypes of its tensors.
        settings: the settings worth a glance (rank, alpha, merged sites, active, ...).
    """

    name: str
    kinds: list[str]
    sites: list[str]
    parameters: int
    dtypes: list[str]
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckpointSummary:
    """What :func:`inspect_checkpoint` found.

    Attributes:
        directory: the checkpoint directory.
        format: ``"fx-surgery"`` or ``"peft"``.
        base: the base model's class (and name, for PEFT, when recorded).
        adapters: one :class:`AdapterInfo` per adapter.
        steps: the passes of the recipe, in order (ours only).
        trained_modules: base modules trained fully (ours) / ``modules_to_save`` (PEFT).
        fits: whether the checkpoint loads onto the model given (``None``: no model given).
        fit_detail: why it does not fit (the loader's error), or ``""``.
        problems: what makes the checkpoint unloadable whatever the model (files that
            disagree, unknown passes, PEFT settings fx-surgery cannot reproduce).
    """

    directory: Path
    format: str
    base: str
    adapters: list[AdapterInfo]
    steps: list[str] = field(default_factory=list)
    trained_modules: list[str] = field(default_factory=list)
    fits: bool | None = None
    fit_detail: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No problems, and it fits the model given (if any)."""
        return not self.problems and self.fits is not False

    def to_dict(self) -> dict[str, Any]:
        """The summary as JSON-ready values."""
        return {"directory": str(self.directory), "format": self.format, "base": self.base,
                "adapters": [vars(a) for a in self.adapters], "steps": self.steps,
                "trained_modules": self.trained_modules, "fits": self.fits,
                "fit_detail": self.fit_detail, "problems": self.problems}

    def __str__(self) -> str:
        lines = [f"{self.directory}: {self.format} checkpoint of a {self.base}"]
        for a in self.adapters:
            extra = ", ".join(f"{k}={v}" for k, v in a.settings.items() if v not in (None, [], {}))
            lines.append(f"  adapter {a.name!r}: {'/'.join(a.kinds)} on {len(a.sites)} layer(s), "
                         f"{a.parameters:,} parameters ({', '.join(a.dtypes)})"
                         + (f"; {extra}" if extra else ""))
            for site in a.sites[:8]:
                lines.append(f"    {site}")
            if len(a.sites) > 8:
                lines.append(f"    ... ({len(a.sites) - 8} more)")
        if self.steps:
            lines.append("  recipe: " + " -> ".join(self.steps))
        if self.trained_modules:
            lines.append("  trained fully: " + ", ".join(self.trained_modules))
        for problem in self.problems:
            lines.append(f"  problem: {problem}")
        if self.fits is not None:
            lines.append("  fits the model given: " + ("yes" if self.fits else
                                                       f"no: {self.fit_detail}"))
        return "\n".join(lines)


def inspect_checkpoint(directory: str | os.PathLike[str],
                       model: nn.Module | None = None) -> CheckpointSummary:
    """Read what ``directory`` holds; with ``model``, also whether it loads onto it.

    The files are checked against each other as loading checks them (problems are listed,
    not raised). The fit is checked by loading (:func:`surgery.load_adapters` or
    :func:`surgery.import_peft`) onto a weight-sharing copy that is then dropped; ``model``
    is not changed.

    Raises:
        CheckpointError: the directory holds neither format, or its files are unreadable.
    """
    who = "inspect"
    path = checkpoint_dir(directory, who, must_exist=True)
    if (path / RECIPE_FILE).is_file():
        summary = _ours(path, who)
    elif (path / PEFT_CONFIG).is_file():
        summary = _peft(path, who)
    else:
        present = sorted(p.name for p in path.iterdir())
        raise CheckpointError(f"{who}: {str(path)!r} holds neither an fx-surgery checkpoint "
                              f"({RECIPE_FILE}) nor a PEFT adapter ({PEFT_CONFIG}); it holds: "
                              f"{', '.join(present) or 'nothing'}.")
    if model is not None:
        try:
            if summary.format == "peft":
                from surgery.checkpoint.peft_import import import_peft

                import_peft(model, path)
            else:
                from surgery.checkpoint.load import load_adapters

                load_adapters(model, path)
            summary.fits = True
        except SurgeryError as exc:
            summary.fits, summary.fit_detail = False, str(exc)
    return summary


def _ours(path: Path, who: str) -> CheckpointSummary:
    recipe = read_recipe(path, who)
    headers = tensor_headers(path / TENSORS_FILE, who)
    problems = []
    try:
        check_listing(recipe, headers, who)
    except CheckpointError as exc:
        problems.append(str(exc))
    for i, step in enumerate(recipe["steps"]):
        try:
            rebuild_step(step, who)
        except CheckpointError as exc:
            problems.append(f"step {i}: {exc}")
    listed = recipe["tensors"]
    adapters = []
    for name, info in recipe.get("adapters", {}).items():
        keys = [k for k, t in listed.items() if t.get("adapter") == name and k in headers]
        adapters.append(AdapterInfo(
            name=name, kinds=list(info.get("kinds", [])), sites=list(info.get("sites", [])),
            parameters=sum(prod(headers[k][0]) for k in keys),
            dtypes=sorted({headers[k][1] for k in keys}),
            settings={"active": info.get("active"), "trainable": info.get("trainable"),
                      "merged": info.get("merged")}))
    steps = []
    for step in recipe.get("steps", []):
        config = step.get("config", {})
        shown = {k: v for k, v in config.items() if v not in (None, False, [], {})}
        steps.append(f"{step.get('pass')}(" + ", ".join(f"{k}={v!r}" for k, v in shown.items())
                     + ")")
    return CheckpointSummary(path, "fx-surgery", recipe.get("model_class", "?"), adapters, steps,
                             list(recipe.get("trained_modules", [])), problems=problems)


def _peft(path: Path, who: str) -> CheckpointSummary:
    adapters = []
    base = "?"
    trained: list[str] = []
    problems: list[str] = []
    dirs = [("default", path)] + sorted((p.name, p) for p in path.iterdir()
                                        if p.is_dir() and (p / PEFT_CONFIG).is_file())
    for name, where in dirs:
        config = read_json(where / PEFT_CONFIG, who)
        mapping = config.get("auto_mapping") if isinstance(config.get("auto_mapping"), dict) else {}
        base = (config.get("base_model_name_or_path") or mapping.get("base_model_class")
                or base)
        try:
            parse_peft_config(config, who, source=str(where / PEFT_CONFIG))
        except CheckpointError as exc:
            problems.append(f"adapter {name!r}: {exc}")
        if not (where / PEFT_TENSORS).is_file():
            raise CheckpointError(f"{who}: {str(where)!r} has {PEFT_CONFIG} but no "
                                  f"{PEFT_TENSORS} (a pickled adapter_model.bin is not "
                                  f"read: it could run code).")
        headers = tensor_headers(where / PEFT_TENSORS, who)
        sites = sorted({_peft_site(k) for k in headers if _peft_site(k)})
        trained += [m for m in config.get("modules_to_save") or [] if m not in trained]
        settings = {k: config.get(k) for k in ("r", "lora_alpha", "use_rslora", "use_dora",
                                               "rank_pattern", "alpha_pattern",
                                               "feedforward_modules", "task_type")
                    if k in config}
        adapters.append(AdapterInfo(
            name=name, kinds=[str(config.get("peft_type", "?"))], sites=sites,
            parameters=sum(prod(s) for k, (s, _) in headers.items()
                           if _peft_part(k) != "modules_to_save"),
            dtypes=sorted({d for _, d in headers.values()}), settings=settings))
    return CheckpointSummary(path, "peft", base, adapters, [], trained, problems=problems)


_PEFT_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
               "ia3_l", "modules_to_save")


def _peft_split(key: str) -> tuple[str, str]:
    """``(layer, part)`` of a PEFT key ``base_model.model.<layer>.<part>...``, for display."""
    parts = key.removeprefix(PEFT_PREFIX).split(".")
    for i, part in enumerate(parts):
        if part in _PEFT_PARTS:
            return ".".join(parts[:i]), part
    return "", ""


def _peft_site(key: str) -> str:
    return _peft_split(key)[0]


def _peft_part(key: str) -> str:
    return _peft_split(key)[1]
