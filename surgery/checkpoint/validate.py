"""Checks of a checkpoint's recipe, and of its tensors against the recipe's listing.

Shared by :func:`surgery.load_adapters` (before anything is built) and by
:func:`surgery.checkpoint.inspect.inspect_checkpoint` (which reads tensor headers only).
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from surgery.checkpoint.files import read_json
from surgery.checkpoint.peft_config import CONFIG_NAME as PEFT_CONFIG
from surgery.checkpoint.save import FORMAT, RECIPE_FILE, TENSORS_FILE, VERSION
from surgery.errors import CheckpointError, few, near_matches

__all__ = ["read_recipe", "check_listing", "key_listing", "dtype_name"]


def dtype_name(dtype: torch.dtype) -> str:
    """``"float32"`` for ``torch.float32``: how a recipe writes dtypes."""
    return str(dtype).removeprefix("torch.")


def read_recipe(path: Path, who: str) -> dict[str, Any]:
    """The recipe of the checkpoint in ``path``, with its format, version and layout checked.

    Raises:
        CheckpointError: the file is missing (with a hint when the directory is a PEFT
            adapter), not JSON, of another format or a newer version, or malformed.
    """
    if not (path / RECIPE_FILE).is_file() and (path / PEFT_CONFIG).is_file():
        raise CheckpointError(f"{who}: {str(path)!r} holds a PEFT adapter ({PEFT_CONFIG}), not an "
                              f"fx-surgery checkpoint ({RECIPE_FILE}). Way out: "
                              f"surgery.import_peft(base_model, {str(path)!r}).")
    recipe = read_json(path / RECIPE_FILE, who)
    if recipe.get("format") != FORMAT:
        raise CheckpointError(f"{who}: {str(path / RECIPE_FILE)!r} is not an fx-surgery adapter "
                              f"recipe (format {recipe.get('format')!r}).")
    if not isinstance(recipe.get("version"), int) or recipe["version"] > VERSION:
        raise CheckpointError(f"{who}: the checkpoint has format version "
                              f"{recipe.get('version')!r}; this version of fx-surgery reads "
                              f"up to {VERSION}. Way out: upgrade fx-surgery.")
    _check_layout(recipe, who)
    return recipe


def check_listing(recipe: dict[str, Any], headers: dict[str, tuple[list[int], str]],
                  who: str) -> None:
    """The tensors of the file (``key -> (shape, dtype name)``) are those the recipe lists,
    with the listed shapes and dtypes.

    Raises:
        CheckpointError: keys, shapes or dtypes that disagree (listed).
    """
    listed = recipe["tensors"]
    if set(headers) != set(listed):
        parts = [key_listing("tensors missing from the file", sorted(set(listed) - set(headers)),
                             headers),
                 key_listing("tensors not in the recipe", sorted(set(headers) - set(listed)),
                             listed)]
        raise CheckpointError(f"{who}: {TENSORS_FILE} and {RECIPE_FILE} disagree: "
                              + "; ".join(p for p in parts if p)
                              + ". One of the files was replaced or edited; save the checkpoint "
                                "again.")
    bad = [f"{k} ({shape} {dtype} in the file, {listed[k].get('shape')} "
           f"{listed[k].get('dtype')} listed)"
           for k, (shape, dtype) in headers.items()
           if shape != listed[k].get("shape") or dtype != listed[k].get("dtype")]
    if bad:
        raise CheckpointError(f"{who}: {len(bad)} tensor(s) have another shape or dtype in "
                              f"{TENSORS_FILE} than in {RECIPE_FILE}: {few(bad)}. One of the "
                              f"files was replaced or edited; save the checkpoint again.")


def _check_layout(recipe: dict[str, Any], who: str) -> None:
    """The recipe's entries have the types :func:`surgery.save_adapters` writes.

    Raises:
        CheckpointError: naming the first entry that does not.
    """
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{who}: the recipe's {what} is malformed; the file is corrupt "
                               f"or was edited. Way out: save the checkpoint again.")

    for key, kind in (("steps", list), ("adapters", dict), ("tensors", dict), ("base", dict)):
        if not isinstance(recipe.get(key), kind):
            raise bad(f"{key!r} entry")
    for i, step in enumerate(recipe["steps"]):
        if not (isinstance(step, dict) and isinstance(step.get("pass"), str)
                and isinstance(step.get("config"), dict)):
            raise bad(f"step {i}")
    for name, info in recipe["adapters"].items():
        if not isinstance(info, dict):
            raise bad(f"entry of adapter {name!r}")
    for key, info in recipe["tensors"].items():
        if not (isinstance(info, dict) and isinstance(info.get("shape"), list)
                and isinstance(info.get("ties", []), list)):
            raise bad(f"entry of tensor {key!r}")
    spec = recipe.get("example_inputs")
    if spec is None:
        return
    args, kwargs = (spec.get("args", []), spec.get("kwargs", {})) if isinstance(spec, dict) else (
        None, None)
    if not (isinstance(args, list) and isinstance(kwargs, dict)
            and all(isinstance(item, dict) for item in [*args, *kwargs.values()])):
        raise bad("'example_inputs' entry")


def key_listing(what: str, keys: list[str], present: Collection[str]) -> str:
    """``"<what> (N): k1, k2, ... (nearest present: ...)"`` or ``""`` when ``keys`` is empty."""
    if not keys:
        return ""
    near = near_matches(keys[0], present, n=3)
    return (f"{what} ({len(keys)}): {few(keys)}"
            + (f" (nearest present to {keys[0]!r}: {', '.join(near)})" if near else ""))



