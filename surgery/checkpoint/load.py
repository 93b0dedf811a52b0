"""``load_adapters``: a checkpoint of :func:`surgery.save_adapters` onto a base model.

The recipe's passes are replayed, one by one, on a weight-sharing copy of the base (so the
result is the base's own class, and the base is never changed); after each step the
checkpoint's tensors that now have a home go into it, so that a later merge folds the
loaded values, as it did when the model was saved. Every check that can fail does so
before the copy is returned: the caller gets the loaded model or an error, never a model
half-loaded.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Collection
from typing import Any

import torch
from torch import Tensor, nn

from surgery.adapters.active import active_adapters, set_active
from surgery.adapters.merge_state import merged_adapters
from surgery.adapters.names import check_adapter_name
from surgery.apply import apply_passes, unwrap
from surgery.checkpoint.files import checkpoint_dir, read_tensors
from surgery.checkpoint.fingerprint import fingerprint, fingerprint_differences
from surgery.checkpoint.recipe import rebuild_step, step_adapter
from surgery.checkpoint.save import INPUTS_FILE, TENSORS_FILE, decode_inputs
from surgery.checkpoint.state import adapter_state, assign
from surgery.checkpoint.validate import (
    check_listing,
    dtype_name,
    key_listing,
    read_recipe,
)
from surgery.errors import CheckpointError, ConfigError, SurgeryError, few, near_matches

__all__ = ["load_adapters", "read_checkpoint"]


def read_checkpoint(directory: str | os.PathLike[str], who: str
                    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The recipe and the tensors of a checkpoint directory, checked against each other.

    Raises:
        CheckpointError: a file is missing, truncated or corrupt, not of this format or of
            a newer version, or the tensors do not match the recipe's listing.
    """
    path = checkpoint_dir(directory, who, must_exist=True)
    recipe = read_recipe(path, who)
    tensors = read_tensors(path / TENSORS_FILE, who)
    check_listing(recipe, {k: (list(t.shape), dtype_name(t.dtype)) for k, t in tensors.items()},
                  who)
    return recipe, tensors


def _kept(recipe: dict[str, Any], names: str | Collection[str] | None, who: str) -> set[str]:
    present = list(recipe["adapters"])
    if names is None:
        return set(present)
    wanted = [names] if isinstance(names, str) else names
    if not isinstance(wanted, Collection) or not all(isinstance(n, str) for n in wanted):
        raise ConfigError(f"{who}: names must be an adapter name, a list of them or None (all), "
                          f"got {names!r}. Way out: names='default' or names=['a', 'b'].")
    wanted = list(wanted)
    if not wanted:
        raise ConfigError(f"{who}: names is an empty list; give adapter names, or None to load "
                          f"all of them ({', '.join(map(repr, present))}).")
    for name in wanted:
        check_adapter_name(who, name, field="names")
    missing = [n for n in wanted if n not in present]
    if missing or not wanted:
        near = ", ".join(map(repr, near_matches(missing[0] if missing else "", present)))
        raise CheckpointError(f"{who}: the checkpoint holds no adapter named "
                              f"{missing[0] if missing else names!r}; it holds (nearest "
                              f"first): {near or 'none'}.")
    return set(wanted)


def _steps(recipe: dict[str, Any], keep: set[str], who: str) -> list[tuple[int, dict[str, Any]]]:
    """The recipe's steps that build adapters ``keep`` (with their index in the recipe),
    steps acting on named adapters narrowed to those kept.

    Raises:
        CheckpointError: a kept adapter was combined from adapters not kept.
    """
    out = []
    for i, step in enumerate(recipe["steps"]):
        config = dict(step.get("config", {}))
        created = step_adapter(config)
        if created is not None and created not in keep:
            continue
        sources = [pair[0] for pair in config.get("weights") or ()]
        if [s for s in sources if s not in keep]:
            raise CheckpointError(f"{who}: adapter {created!r} was combined from {sources}; "
                                  f"load those as well (names=[...]).")
        if created is None and isinstance(config.get("names"), list):
            config["names"] = [n for n in config["names"] if n in keep]
            if not config["names"]:
                continue
        out.append((i, {**step, "config": config}))
    return out


def load_adapters(base_model: nn.Module, directory: str | os.PathLike[str],
                  names: str | Collection[str] | None = None, *,
                  dtype: torch.dtype | None = None, example_inputs: tuple | None = None,
                  example_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The adapters saved in ``directory``, on a weight-sharing copy of ``base_model``.

    The outputs equal, bit for bit, those of the model that was saved (same base weights,
    same adapters, same merge state, same active adapters); the parameters that trained
    then train now. The result is of ``base_model``'s class (a ``torch.compile`` or DDP
    wrapper is taken off, as by :func:`surgery.apply_passes`); ``base_model`` itself is
    never changed.

    Args:
        base_model: the base the adapters were trained on (same architecture: module
            names, types and parameter shapes), plain or already carrying other adapters.
        directory: a directory written by :func:`surgery.save_adapters`.
        names: the adapters to load (a name or a list); ``None`` loads all of them.
        dtype: cast the loaded floating-point tensors to this dtype; ``None`` keeps the
            dtypes they were saved in.
        example_inputs / example_kwargs: inputs for tracing the map where the recipe
            selects by role and the checkpoint holds no example inputs of its own.

    Returns:
        The adapted model.

    Raises:
        CheckpointError: a file missing, truncated, corrupt or of another format; a base
            whose architecture differs from the checkpoint's (the differences are listed);
            missing keys, unexpected keys or shape mismatches (listed, with the nearest
            names present); a name the checkpoint does not hold, or an adapter asked for
            without the adapters it was combined from; tensors tied in the saved model
            that are not tied in this base; a recipe step that fails on this base (a recipe
            selecting layers by role needs example inputs: stored in the checkpoint when
            the model was adapted with them, else ``example_inputs=``). Nothing is loaded
            then.
        ConfigError: ``names`` is not a name, a list of names or ``None``.
    """
    who = "load_adapters"
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ConfigError(f"{who}: dtype must be a floating-point torch.dtype (torch.float32, "
                          f"torch.bfloat16, ...) or None, got {dtype!r}. Way out: dtype=None "
                          f"keeps the saved dtype.")
    recipe, tensors = read_checkpoint(directory, who)
    keep = _kept(recipe, names, who)
    base = unwrap(base_model)[0]
    on_meta = [n for n, t in base.state_dict(keep_vars=True).items() if t.is_meta]
    if on_meta:
        raise CheckpointError(f"{who}: the base has {len(on_meta)} tensor(s) on the meta device "
                              f"({few(on_meta, 3)}): they hold no values, so adapters loaded "
                              f"onto it could not run. Way out: materialise the base first "
                              f"(model.to_empty(device=...) and load its weights), then load "
                              f"the adapters.")
    diffs = fingerprint_differences(recipe["base"], fingerprint(base))
    if diffs:
        raise CheckpointError(f"{who}: the checkpoint was saved from another architecture "
                              f"than this {type(base).__name__}: " + "; ".join(diffs)
                              + ". Way out: load it onto the base model it was trained on.")
    wanted = {k: info for k, info in recipe["tensors"].items()
              if info.get("adapter") is None or info["adapter"] in keep}
    spec = recipe.get("example_inputs")
    if example_inputs is None and example_kwargs is None and spec is not None:
        path = checkpoint_dir(directory, who, must_exist=True)
        refers = any("tensor" in item for item in [*spec.get("args", ()),
                                                    *spec.get("kwargs", {}).values()])
        stored = read_tensors(path / INPUTS_FILE, who) if refers else {}
        try:
            example_inputs, example_kwargs = decode_inputs(spec, stored)
        except KeyError as exc:
            raise CheckpointError(f"{who}: the recipe's example input {exc} is not in "
                                  f"{INPUTS_FILE}; one of the files was replaced or edited. "
                                  f"Way out: example_inputs=... to load_adapters.") from None
    leaves = _leaf_modules(recipe.get("leaf_modules") or (), base)
    before = set(adapter_state(base))
    work = base
    loaded: set[str] = set()
    # Fresh adapters draw random numbers: the caller's RNG state stays. The passes warned
    # when they first ran; replayed one by one, they would warn again, or wrongly (a task
    # head not yet trained by a later step of the recipe).
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, step in _steps(recipe, keep, who):
            p = rebuild_step(step, who)
            try:
                work = apply_passes(work, [p], example_inputs, example_kwargs,
                                    leaf_modules=leaves)
            except SurgeryError as exc:
                raise CheckpointError(f"{who}: step {i} of the recipe, {p.describe()}, fails on "
                                      f"this {type(base).__name__}: {exc}") from exc
            _fill(work, tensors, wanted, loaded, before, dtype, who)
    _check_complete(work, wanted, loaded, before, who)
    _check_ties(work, wanted, who)
    _restore_flags(work, recipe, wanted, keep, who)
    return work


def _leaf_modules(entries: Collection[Any], base: nn.Module) -> list[str | type]:
    """The recipe's leaf modules: qualified names as they are, ``{"type": "module.Class"}``
    as the class of a module of ``base`` with that name (nothing is imported; a class no
    module of ``base`` has cannot matter to its map and is dropped)."""
    classes = {f"{type(m).__module__}.{type(m).__qualname__}": type(m) for m in base.modules()}
    out: list[str | type] = []
    for entry in entries:
        if isinstance(entry, str):
            out.append(entry)
        elif isinstance(entry, dict) and entry.get("type") in classes:
            out.append(classes[entry["type"]])
    return out


def _fill(model: nn.Module, tensors: dict[str, Tensor], wanted: dict[str, Any], loaded: set[str],
          before: set[str], dtype: torch.dtype | None, who: str) -> None:
    """Put the checkpoint's tensors into the homes the last step made."""
    now = adapter_state(model)
    mismatched: list[str] = []
    wrong_dtype: list[str] = []
    for key, entry in now.items():
        if key in before or key in loaded or key not in wanted:
            continue
        value = tensors[key]
        if value.shape != entry.tensor.shape:
            mismatched.append(f"{key} ({tuple(value.shape)} in the checkpoint, "
                              f"{tuple(entry.tensor.shape)} here)")
            continue
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        if value.is_floating_point() and value.dtype != entry.tensor.dtype:
            wrong_dtype.append(f"{key} ({dtype_name(value.dtype)}, the layer here is "
                               f"{dtype_name(entry.tensor.dtype)})")
            continue
        value = value.to(entry.tensor.device)
        assign(model, key, value)
        if not isinstance(entry.tensor, nn.Parameter):  # a tied buffer is replaced under each key
            for tie in entry.ties:
                assign(model, tie, value)
        loaded.add(key)
    if mismatched:
        raise CheckpointError(f"{who}: {len(mismatched)} tensor(s) do not fit their place: "
                              f"{few(mismatched)}. Nothing was loaded.")
    if wrong_dtype:
        wanted_dtype = dtype_name(next(iter(now.values())).tensor.dtype)
        raise CheckpointError(
            f"{who}: {len(wrong_dtype)} tensor(s) are in another dtype than the layers they "
            f"adapt, and would fail at the first forward: {few(wrong_dtype)}. Nothing was "
            f"loaded. Way out: load_adapters(..., dtype=torch.{wanted_dtype}) to cast them, "
            f"or cast the base to the checkpoint's dtype first.")


def _check_complete(model: nn.Module, wanted: dict[str, Any], loaded: set[str],
                    before: set[str], who: str) -> None:
    made = [k for k in adapter_state(model) if k not in before]
    missing = [k for k in made if k not in loaded]
    unexpected = [k for k in wanted if k not in loaded]
    if missing or unexpected:
        raise CheckpointError(
            f"{who}: the checkpoint does not fit the adapters its recipe builds on this model: "
            + "; ".join(filter(None, [
                key_listing("missing keys", missing, wanted),
                key_listing("unexpected keys", unexpected, made)]))
            + ". Nothing was loaded.")


def _check_ties(model: nn.Module, wanted: dict[str, Any], who: str) -> None:
    """Every tie of the checkpoint holds in the loaded model: the tied keys reach one tensor
    (a tied weight that trained must train as one)."""
    now = model.state_dict(keep_vars=True)
    broken = [f"{key} / {tie}" for key, info in wanted.items() for tie in info.get("ties") or ()
              if tie in now and now[tie] is not now[key]]
    if broken:
        raise CheckpointError(
            f"{who}: {len(broken)} tensor(s) were tied in the saved model and are not in this "
            f"base: {few(broken)}; loading would leave the second key at the base's values. "
            f"Way out: tie them in the base first (transformers: tie_word_embeddings=True, "
            f"model.tie_weights()).")


def _restore_flags(model: nn.Module, recipe: dict[str, Any], wanted: dict[str, Any],
                   keep: set[str], who: str) -> None:
    """Trainable flags per tensor, active adapters and merge state as saved."""
    now = adapter_state(model)
    for key, info in wanted.items():
        tensor = now[key].tensor
        if isinstance(tensor, nn.Parameter):
            tensor.requires_grad_(bool(info.get("trainable", True)))
    off = {n for n in keep if not recipe["adapters"][n].get("active", True)}
    if off:
        set_active(model, [n for n in active_adapters(model) if n not in off])
    merged = merged_adapters(model)
    for name in keep:
        here = sorted(q for q, labels in merged.items()
                      if any(lbl.partition(":")[2] == name for lbl in labels))
        if here != recipe["adapters"][name].get("merged", []):
            raise CheckpointError(f"{who}: adapter {name!r} is merged at {here} after loading, "
                                  f"at {recipe['adapters'][name].get('merged')} when saved.")
