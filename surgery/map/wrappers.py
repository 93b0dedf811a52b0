"""Wrappers a model may come in: ``torch.compile``'s ``OptimizedModule`` and
``DistributedDataParallel`` / ``DataParallel``. Surgery works on the bare model inside."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["unwrap", "is_compiled", "memo_compiled_as_bare"]


def is_compiled(module: nn.Module) -> bool:
    """True for a ``torch.compile`` wrapper (an ``OptimizedModule`` holding ``_orig_mod``)."""
    return (type(module).__name__ == "OptimizedModule"
            and module.__dict__.get("_modules", {}).get("_orig_mod") is not None)


def unwrap(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """The bare model inside a ``torch.compile`` wrapper (``_orig_mod``) or a
    ``DistributedDataParallel`` / ``DataParallel`` wrapper (``module``), and a note for each
    wrapper taken off. Adapters are applied to the bare model, so their names and
    state-dict keys are the bare model's."""
    notes = []
    while True:
        if is_compiled(model):
            inner = model._modules["_orig_mod"]
            notes.append(f"the torch.compile wrapper ({type(model).__name__}) was taken off: "
                         f"the adapted model is the bare {type(inner).__name__}; compile it again "
                         f"if you want it compiled.")
            model = inner
            continue
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            notes.append(f"the {type(model).__name__} wrapper was taken off: the adapted model is "
                         f"the bare {type(model.module).__name__}; wrap it again to train it "
                         f"distributed.")
            model = model.module
            continue
        return model, notes


def memo_compiled_as_bare(model: nn.Module, memo: dict[int, Any],
                                 copy_fn: Any) -> None:
    """Make a deep copy of ``model`` (with ``memo``) hold, in place of every
    ``torch.compile`` wrapper among its submodules, a copy of the module it wraps:
    ``memo[id(wrapper)] = copy_fn(wrapper._orig_mod, memo)``. Deep-copying the wrapper
    itself writes into the module it wraps."""
    for module in list(model.modules()):
        if is_compiled(module) and id(module) not in memo:
            memo[id(module)] = copy_fn(module._modules["_orig_mod"], memo)
