"""``save_adapters``: an adapted model's adapters as safetensors plus a JSON recipe.

A checkpoint directory holds:

* ``adapters.safetensors``: the adapter tensors only (and those of base modules trained
  fully), under the adapted model's own ``state_dict`` keys, in their dtypes; a tensor
  tied under several keys is stored once;
* ``surgery_config.json``: the recipe (:mod:`surgery.checkpoint.recipe`), the adapters
  with their kinds, sites, merge state, and whether each is active and trains, every
  tensor's key, adapter, shape, dtype and ties, the base architecture's fingerprint
  (:mod:`surgery.checkpoint.fingerprint`), and the example inputs the map was traced
  with where the recipe needs them (tensors in ``example_inputs.safetensors``).

Nothing in it is pickled: loading it runs no code from the directory.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Collection
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from surgery.adapters.active import active_adapters
from surgery.adapters.merge_state import adapter_inventory, merged_adapters
from surgery.adapters.names import check_adapter_name
from surgery.apply import unwrap
from surgery.checkpoint.files import (
    checkpoint_dir,
    json_writer,
    tensors_writer,
    write_together,
)
from surgery.checkpoint.fingerprint import fingerprint
from surgery.checkpoint.recipe import recipe_steps
from surgery.checkpoint.state import adapter_state, trained_modules
from surgery.errors import (
    AdapterNotFoundError,
    CheckpointError,
    ConfigError,
    few,
    near_matches,
)

__all__ = ["save_adapters", "FORMAT", "VERSION", "RECIPE_FILE", "TENSORS_FILE", "INPUTS_FILE"]

FORMAT = "fx-surgery-adapters"
VERSION = 1
RECIPE_FILE = "surgery_config.json"
TENSORS_FILE = "adapters.safetensors"
INPUTS_FILE = "example_inputs.safetensors"


def save_adapters(model: nn.Module, directory: str | os.PathLike[str],
                  names: str | Collection[str] | None = None) -> Path:
    """Write the adapters of ``model`` to ``directory`` (created if needed).

    Args:
        model: an adapted model (from :func:`surgery.apply_passes`), possibly wrapped by
            ``torch.compile`` or DDP (the keys are the bare model's either way). A module
            that carries no surgery state of its own but holds an adapted model as its
            ``model`` submodule (:class:`passes.stack.AdapterStack`) is saved as that
            model: the checkpoint holds the adapters, not the wrapper, and the keys are
            the adapted model's (``layers.0...``, not ``model.layers.0...``).
        directory: where ``adapters.safetensors`` and ``surgery_config.json`` go; files of
            an earlier checkpoint there are replaced, other files are left alone.
        names: the adapters to save (a name or a list); ``None`` saves every adapter.
            Base modules trained fully are saved with any selection.

    Returns:
        The directory, as a :class:`pathlib.Path`.

    Raises:
        ConfigError: ``model`` carries no adapters.
        AdapterNotFoundError: a name the model does not carry.
        CheckpointError: ``directory`` is a file, or a kept adapter was combined from
            adapters not kept, or the history cannot be written as a recipe, or a pass
            setting cannot be written as JSON. Nothing is written then: a checkpoint
            already in ``directory`` stays whole.

    A base parameter that trains without being part of a module trained fully
    (``freeze=False``) is not saved; a warning names it.
    """
    who = "save_adapters"
    model = _adapted_model(model)
    path = checkpoint_dir(directory, who, must_exist=False)
    inventory = adapter_inventory(model)
    if getattr(model, "_surgery", None) is None or (not inventory and not trained_modules(model)):
        raise ConfigError(f"{who}: the {type(model).__name__} given carries no adapters. Way "
                          f"out: save the model returned by surgery.apply_passes.")
    keep = _names(who, names, inventory)
    tensors = {k: t for k, t in adapter_state(model).items()
               if t.adapter is None or keep is None or t.adapter in keep}
    on_meta = [k for k, t in tensors.items() if t.tensor.is_meta]
    if on_meta:
        raise CheckpointError(f"{who}: {len(on_meta)} adapter tensor(s) are on the meta device "
                              f"({few(on_meta, 3)}) and hold no values to save. Way out: "
                              f"materialise the model (to_empty(device=...)) and set or train "
                              f"the adapters first.")
    steps = recipe_steps(model, keep, who)
    _warn_unsaved(model, tensors)
    state = model._surgery
    active = set(active_adapters(model))
    merged = merged_adapters(model)
    adapters = {}
    for name, kinds in inventory.items():
        if keep is not None and name not in keep:
            continue
        owned = [t for t in tensors.values() if t.adapter == name]
        adapters[name] = {
            "kinds": sorted(kinds),
            "sites": sorted({s for sites in kinds.values() for s in sites}),
            "parameters": sum(t.tensor.numel() for t in owned
                              if isinstance(t.tensor, nn.Parameter)),
            "active": name in active,
            "trainable": any(t.trainable for t in owned),
            "merged": sorted(q for q, labels in merged.items()
                             if any(lbl.partition(":")[2] == name for lbl in labels)),
        }
    inputs, input_tensors = _example_inputs(state)
    recipe: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "model_class": type(model).__name__,
        "steps": steps,
        "adapters": adapters,
        "trained_modules": trained_modules(model),
        "tensors": {k: {"adapter": t.adapter, "shape": list(t.tensor.shape),
                        "dtype": str(t.tensor.dtype).removeprefix("torch."),
                        "trainable": t.trainable, "ties": t.ties}
                    for k, t in tensors.items()},
        "leaf_modules": [_leaf(m) for m in state.leaf_modules],
        "example_inputs": inputs,
        "base": fingerprint(model),
    }
    try:
        recipe_file = json_writer(recipe)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{who}: the recipe cannot be written as JSON ({exc}): a pass "
                              f"setting holds a value JSON cannot store. Nothing was "
                              f"written.") from None
    files = {path / TENSORS_FILE: tensors_writer({k: t.tensor for k, t in tensors.items()},
                                                 metadata={"format": FORMAT})}
    if input_tensors:
        files[path / INPUTS_FILE] = tensors_writer(input_tensors)
    files[path / RECIPE_FILE] = recipe_file
    write_together(files, remove=() if input_tensors else (path / INPUTS_FILE,))
    return path


def _adapted_model(model: nn.Module) -> nn.Module:
    """The adapted model to save: ``model`` without a ``torch.compile`` / DDP wrapper, or
    the adapted model a wrapper without surgery state holds as its ``model`` submodule
    (:class:`passes.stack.AdapterStack`)."""
    model = unwrap(model)[0]
    if getattr(model, "_surgery", None) is None:
        inner = model._modules.get("model")
        if inner is not None and getattr(unwrap(inner)[0], "_surgery", None) is not None:
            return unwrap(inner)[0]
    return model


def _leaf(entry: str | type) -> str | dict[str, str]:
    """A leaf module of the map as JSON: a qualified name, or ``{"type": "module.Class"}``
    (matched on loading against the classes of the base's modules; nothing is imported)."""
    if isinstance(entry, str):
        return entry
    return {"type": f"{entry.__module__}.{entry.__qualname__}"}


def _names(who: str, names: str | Collection[str] | None,
           inventory: dict[str, dict[str, list[str]]]) -> set[str] | None:
    if names is None:
        return None
    wanted = [names] if isinstance(names, str) else list(names)
    if not wanted or not all(isinstance(n, str) for n in wanted):
        raise ConfigError(f"{who}: names must be an adapter name or a non-empty list of "
                          f"names, got {names!r}")
    for name in wanted:
        check_adapter_name(who, name, field="names")
        if name not in inventory:
            near = ", ".join(map(repr, near_matches(name, inventory))) or "none"
            raise AdapterNotFoundError(f"{who}: the model has no adapter named {name!r}; "
                                       f"adapters present (nearest first): {near}.")
    return set(wanted)


def _warn_unsaved(model: nn.Module, tensors: dict) -> None:
    saved = {id(t.tensor) for t in tensors.values()}
    loose = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in saved]
    if loose:
        warnings.warn(
            f"save_adapters: {len(loose)} trainable base parameter(s) are not saved "
            f"({', '.join(loose[:5])}{', ...' if len(loose) > 5 else ''}): only adapters and "
            f"modules trained fully go into an adapter checkpoint. Way out: "
            f"TrainModulePass(pattern=...) for modules you train, or save them yourself.",
            UserWarning, stacklevel=3)


def _example_inputs(state: Any) -> tuple[dict[str, Any] | None, dict[str, Tensor]]:
    """The example inputs the model's map was traced with, as JSON (tensors by reference
    into ``example_inputs.safetensors``); ``None`` when there were none or one of them is
    neither a tensor nor a plain value."""
    if state.example_inputs is None and not state.example_kwargs:
        return None, {}
    tensors: dict[str, Tensor] = {}

    def encode(key: str, value: Any) -> Any:
        if isinstance(value, Tensor):
            tensors[key] = value
            return {"tensor": key}
        if value is None or isinstance(value, (bool, int, float, str)):
            return {"value": value}
        raise TypeError(type(value).__name__)

    try:
        args = [encode(f"args.{i}", v) for i, v in enumerate(state.example_inputs or ())]
        kwargs = {k: encode(f"kwargs.{k}", v) for k, v in (state.example_kwargs or {}).items()}
    except TypeError as exc:
        warnings.warn(f"save_adapters: the example inputs hold a {exc}, which a checkpoint "
                      f"cannot store; where the recipe selects by role, give example_inputs= "
                      f"to load_adapters.", UserWarning, stacklevel=3)
        return None, {}
    return {"args": args, "kwargs": kwargs}, tensors


def decode_inputs(spec: dict[str, Any] | None, tensors: dict[str, Tensor]
                  ) -> tuple[tuple | None, dict | None]:
    """The example inputs :func:`_example_inputs` encoded."""
    if spec is None:
        return None, None

    def decode(item: dict[str, Any]) -> Any:
        if "tensor" in item:
            return tensors[item["tensor"]]
        return item.get("value")

    args = tuple(decode(a) for a in spec.get("args", ()))
    kwargs = {k: decode(v) for k, v in spec.get("kwargs", {}).items()}
    return args, kwargs or None

