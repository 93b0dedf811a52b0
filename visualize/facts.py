"""What the diagrams read off a model besides its graphs: parameter totals, the parameters a
pass rewrote, whether an inserted module scales a layer, attributes by dotted path."""

from __future__ import annotations

from typing import Any

from torch import nn

from surgery.sites.marker import AdapterModule

__all__ = ["fetch_attr", "param_totals", "rewritten_params", "scaling_mode"]


def fetch_attr(owner: nn.Module, target: str) -> Any:
    """``owner``'s attribute at dotted path ``target``, or ``None`` where a part is missing."""
    obj: Any = owner
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def param_totals(model: nn.Module) -> tuple[int, int]:
    """``(all parameter elements, trainable ones)`` of ``model``, as :func:`surgery.audit` counts.

    Every parameter of the model counts, called from the graph or not (a merged adapter's
    unused modules included); a parameter shared by several modules counts once; trainable
    means ``requires_grad``.
    """
    params = list(model.parameters())  # distinct Parameter objects, each once
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def scaling_mode(module: nn.Module | None) -> str | None:
    """``"output"`` / ``"input"`` for an inserted module that multiplies a layer's output or
    input by a learned vector (IA³: its fold mode), else ``None``."""
    mode = module.fold_mode if isinstance(module, AdapterModule) else None
    return mode if mode in ("output", "input") else None


def rewritten_params(model: nn.Module) -> dict[str, str]:
    """Map parameter names a pass rewrote (``param_rewritten`` changes) to the names of the
    passes that did, in order (``"merge_lora + merge_ia3"``)."""
    state = getattr(model, "_surgery", None)
    by: dict[str, dict[str, None]] = {}  # parameter -> the passes, in order, once each
    for result in getattr(state, "history", None) or []:
        for change in result.changes:
            if change.kind == "param_rewritten":
                by.setdefault(change.name, {})[change.pass_name] = None
    return {name: " + ".join(passes) for name, passes in by.items()}
