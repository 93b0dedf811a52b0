"""The module types both front ends keep as real ``call_module`` nodes.

Linear-like layers (where adapters attach) and ``nn.MultiheadAttention`` stay opaque on both
front ends; dropout and normalisation layers are also called as real modules on the export
front end, so ``train()`` / ``eval()`` keep switching them.
"""

from __future__ import annotations

import inspect

from torch import nn

__all__ = [
    "LINEAR_TYPES",
    "MODE_TYPES",
    "SIGNATURE_TYPES",
    "is_hf_conv1d",
    "is_dense_linear",
    "is_linear_like",
    "is_leaf_type",
    "runs_own_forward",
]

LINEAR_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Embedding,
)

# Modules that export would otherwise bake into their graph with the training flag of the
# moment (dropout, batch statistics); they are called as real modules on both front ends.
MODE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
)

# Modules that export keeps whole (``preserve_module_call_signature``) and that are then
# called as the real module object, as on the fx front end.
SIGNATURE_TYPES: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)


def is_hf_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (a linear layer storing its weight as ``(in, out)``)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def is_dense_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and transformers' ``Conv1D``: ``y = x W^T + b`` (weight stored
    ``(out, in)``, or ``(in, out)`` for ``Conv1D``)."""
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


def runs_own_forward(module: nn.Module, types: tuple[type[nn.Module], ...]) -> bool:
    """True when ``module`` is an instance of one of ``types`` and its class runs that
    type's own ``forward``.

    A subclass that writes a ``forward`` of its own (OPT's and BART's learned positional
    embeddings subclass ``nn.Embedding`` and take an attention mask or past length) is not
    the layer its base class is: kept opaque, it would be called with the base's arguments.
    """
    forward = type(module).forward
    return any(isinstance(module, t) and forward is t.forward for t in types)


def _linear_with_one_input(module: nn.Module) -> bool:
    """An ``nn.Linear`` subclass with a ``forward`` of its own that still takes one input
    (Falcon's ``FalconLinear`` computes ``x @ W.T + b`` its own way): called as a linear
    layer is, it is one."""
    if not isinstance(module, nn.Linear):
        return False
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    required = [p for p in params if p.default is p.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(required) == 1


def is_linear_like(module: nn.Module) -> bool:
    """True for the layers adapters attach to: Linear, Conv, Embedding running torch's own
    ``forward`` (see :func:`runs_own_forward`), an ``nn.Linear`` subclass whose own
    ``forward`` takes one input, and transformers' Conv1D."""
    return (runs_own_forward(module, LINEAR_TYPES) or is_hf_conv1d(module)
            or _linear_with_one_input(module))


def is_leaf_type(module: nn.Module) -> bool:
    """True for modules both front ends keep as opaque ``call_module`` nodes: the layers of
    :func:`is_linear_like` and ``nn.MultiheadAttention`` with torch's own ``forward``. Any
    other subclass of them is traced through."""
    return is_linear_like(module) or runs_own_forward(module, (nn.MultiheadAttention,))
