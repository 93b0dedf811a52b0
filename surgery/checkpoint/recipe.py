"""The recipe of an adapted model: the passes that made it, in order, with their settings.

Each step of a model's history (:attr:`surgery.pass_base.SurgeryState.history`) records
the pass object that ran. A recipe step is ``{"pass": name, "config": {...}, "adapters":
[...], "sites": [...]}``: the pass's stable name (the registry rebuilds the class,
:func:`surgery.checkpoint.registry.known_pass`), the keyword arguments that rebuild it
(:meth:`~surgery.pass_base.Pass.config`), and, for reading, which adapters and sites it
touched. Replaying the steps on the same base architecture rebuilds the same modules at
the same keys; the checkpoint's tensors then go into them.

A recipe for some of the model's adapters (``names=``) keeps the steps that create those
adapters, and the merges and unmerges narrowed to them.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from torch import nn

from surgery.checkpoint.registry import known_pass
from surgery.errors import CheckpointError
from surgery.pass_base import Pass

__all__ = ["recipe_steps", "step_adapter", "rebuild_step"]

_CREATES = ("name", "adapter_name")  # the config key naming the adapter a step creates
_NARROWS = "names"  # the config key of steps acting on existing adapters (merge, eject)
_DELETE = "delete_adapter"  # the step that removes adapters (surgery.adapters.delete)


def step_adapter(config: dict[str, Any]) -> str | None:
    """The adapter a step creates (its ``name`` / ``adapter_name`` setting), or ``None``."""
    for key in _CREATES:
        if isinstance(config.get(key), str):
            return config[key]
    return None


def recipe_steps(model: nn.Module, names: Collection[str] | None, who: str) -> list[dict]:
    """The recipe of ``model`` (its pass history), kept to adapters ``names`` (``None``: all).

    Raises:
        CheckpointError: a step of the history has no recorded pass (a model adapted by an
            older version, or edited by hand), or a kept adapter was combined from adapters
            that are not kept.
    """
    state = getattr(model, "_surgery", None)
    steps: list[dict] = []
    for result in state.history if state is not None else ():
        if result.step is None:
            if result.pass_name == "freeze":  # apply_passes' own step: replayed by it
                continue
            raise CheckpointError(
                f"{who}: step {result.pass_name!r} of the model's history has no recorded "
                f"pass settings, so it cannot be written as a recipe. Way out: apply the "
                f"passes again with this version, then save.")
        config = result.step.config()
        touched = sorted({c.adapter for c in result.changes if c.adapter})
        created = step_adapter(config)
        if names is not None:
            if created is not None and created not in names:
                continue
            if _NARROWS in config and created is None:
                kept = [n for n in touched if n in names]
                if not kept:
                    continue
                config[_NARROWS] = kept
            _check_sources(result.step, config, names, who)
        elif _NARROWS in config and config[_NARROWS] is None and created is None:
            config[_NARROWS] = touched  # exactly what it acted on
        steps.append({"pass": result.step.name, "config": config, "adapters": touched,
                      "sites": result.sites})
    return _drop_deleted(steps)


def _drop_deleted(steps: list[dict]) -> list[dict]:
    """The steps without the adapters a later ``"delete_adapter"`` step removed.

    An adapter deleted and then added again under the same name has, in the checkpoint,
    only the tensors of its last incarnation; the steps of the earlier one (and the
    deletion) are left out, so that loading fills the adapter that survives. The steps of
    a deleted adapter another one was combined from are kept (the combination replays
    from them).
    """
    out = [dict(s, config=dict(s["config"])) for s in steps]
    dropped: set[int] = set()
    for j, step in enumerate(out):
        if step["pass"] != _DELETE:
            continue
        gone = []
        for name in _listed(step["config"]):
            if any(name in [pair[0] for pair in out[i]["config"].get("weights") or ()]
                   for i in range(j) if i not in dropped):
                continue  # a source of a combination: its steps replay
            for i in range(j):
                config = out[i]["config"]
                if i in dropped:
                    continue
                if step_adapter(config) == name:
                    dropped.add(i)
                elif name in _listed(config):
                    config[_NARROWS] = [n for n in _listed(config) if n != name]
                    out[i]["adapters"] = [n for n in out[i]["adapters"] if n != name]
                    if not config[_NARROWS]:
                        dropped.add(i)
            gone.append(name)
        step["config"][_NARROWS] = [n for n in _listed(step["config"]) if n not in gone]
        step["adapters"] = [n for n in step["adapters"] if n not in gone]
        if not step["config"][_NARROWS]:
            dropped.add(j)
    return [s for i, s in enumerate(out) if i not in dropped]


def _listed(config: dict[str, Any]) -> list[str]:
    """The adapter names a step acting on existing adapters names (``[]`` for others)."""
    names = config.get(_NARROWS)
    if isinstance(names, str):
        return [names]
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def _check_sources(step: Pass, config: dict[str, Any], names: Collection[str], who: str) -> None:
    weights = config.get("weights")
    if not weights:
        return
    sources = [pair[0] for pair in weights]
    missing = [s for s in sources if s not in names]
    if missing:
        raise CheckpointError(
            f"{who}: adapter {step_adapter(config)!r} was combined from {sources}, and "
            f"{missing} would not be saved; the recipe rebuilds it from its sources. Way "
            f"out: names=[..., {', '.join(map(repr, missing))}] as well.")


def rebuild_step(step: dict[str, Any], who: str) -> Pass:
    """The pass a recipe step describes.

    A step that wrote into existing weights when it ran (an in-place merge,
    :attr:`~surgery.pass_base.Pass.writes_in_place`) is rebuilt with ``inplace=False``: it
    computes the same values into new tensors, so that loading never writes into the
    storage of the base model it is given.

    Raises:
        CheckpointError: an unknown pass name, or settings the pass refuses.
    """
    try:
        config = dict(step["config"])
        p = known_pass(step["pass"]).from_config(config)
        if p.writes_in_place and config.get("inplace") is True:
            p = known_pass(step["pass"]).from_config({**config, "inplace": False})
    except (KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{who}: a recipe step is malformed ({exc!r}): {step!r}") from None
    except Exception as exc:  # ConfigError from the registry or the pass
        raise CheckpointError(f"{who}: recipe step {step.get('pass')!r} cannot be rebuilt: "
                              f"{exc}") from None
    if p.writes_in_place:
        raise CheckpointError(f"{who}: recipe step {p.describe()} writes into existing weights "
                              f"and has no inplace=False form; loading never writes into the "
                              f"base model's weights.")
    return p
