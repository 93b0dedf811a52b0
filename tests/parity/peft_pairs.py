"""One case, two models on the same weights: PEFT's and ours.

:func:`pair` builds the PEFT model of a case from its config dict on a fresh small model,
gives every adapter tensor seeded random values far from its initialisation (LoRA ``B`` is
not zero, so outputs are not trivially equal), saves it in PEFT's format and loads that with
:func:`surgery.import_peft`, whose translation of PEFT's settings into our passes
(:mod:`surgery.checkpoint.peft_targets`) is the one under test. The adapter weights of the
two models are then equal by name (ours are PEFT's without ``base_model.model.``,
``.base_layer`` and, for ``modules_to_save``, ``.modules_to_save.<adapter>``).
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import nn

import surgery
from parity.peft_models import build, example_input

PEFT_PREFIX = "base_model.model."


@dataclass
class Pair:
    """PEFT's model (``theirs``, a ``peft.PeftModel``) and ours (the user's class) with the
    same weights, their input ``x`` and the base model they were both made from."""

    theirs: Any
    ours: nn.Module
    base: nn.Module
    x: torch.Tensor


def peft_config(kind: str, config: dict[str, Any]) -> Any:
    """``LoraConfig(**config)`` or ``IA3Config(**config)`` (``kind``: ``"lora"`` / ``"ia3"``)."""
    import peft

    cls = peft.LoraConfig if kind == "lora" else peft.IA3Config
    return cls(**config)


def randomize(model: nn.Module, seed: int) -> None:
    """Seeded random values in every adapter tensor of a PEFT model: LoRA factors
    ``N(0, 0.3²)``, DoRA magnitudes ``U(0.5, 1.5)``, IA³ vectors ``U(0.5, 1.5)``, and a
    ``N(0, 0.1²)`` step added to the ``modules_to_save`` copies (their originals untouched)."""
    from peft.tuners.ia3 import IA3Layer
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for param in [*module.lora_A.parameters(), *module.lora_B.parameters(),
                              *module.lora_embedding_A.values(),
                              *module.lora_embedding_B.values()]:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
                for param in module.lora_magnitude_vector.parameters():
                    param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
            elif isinstance(module, IA3Layer):
                for param in module.ia3_l.parameters():
                    param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
            elif isinstance(module, ModulesToSaveWrapper):
                for param in module.modules_to_save.parameters():
                    param.add_(torch.randn(param.shape, generator=gen) * 0.1)


def pair(model_id: str, kind: str, configs: dict[str, dict[str, Any]], seed: int = 0) -> Pair:
    """PEFT's model and ours for ``configs`` (adapter name -> config dict, in the order the
    adapters are added) on model ``model_id``, with equal random adapter weights.

    The first adapter is active in both (PEFT's ``get_peft_model`` leaves it so; ours are
    made active alike with :func:`surgery.set_active`); both models are in eval mode.
    """
    import peft

    base = build(model_id)
    names = list(configs)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(kind, configs[names[0]]),
                                 adapter_name=names[0])
    for name in names[1:]:
        theirs.add_adapter(name, peft_config(kind, configs[name]))
    randomize(theirs, seed)
    theirs.set_adapter(names[0])
    # the README model card PEFT also writes is not needed here (and is slow to render)
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(
            type(theirs), "create_or_update_model_card", lambda *args: None):
        theirs.save_pretrained(tmp, selected_adapters=names)
        ours = base
        for name in names:
            where = Path(tmp) if name == "default" else Path(tmp) / name
            ours = surgery.import_peft(ours, where, adapter_name=name)
    surgery.set_active(ours, names[0])
    # import_peft gives every tensor storage of its own, aligned as PEFT's parameters are
    assert all(p.data_ptr() % 64 == 0 for p in ours.parameters())
    return Pair(theirs.eval(), ours.eval(), base, example_input())


def ours_name(peft_name: str) -> str:
    """Our parameter name for PEFT's ``peft_name``: without ``base_model.model.``,
    ``.base_layer`` and ``.modules_to_save.<adapter>``; nothing else is renamed (an IA³
    vector is ``<layer>.ia3_l.<adapter>`` in both, an embedding factor
    ``<layer>.lora_embedding_A.<adapter>``)."""
    name = peft_name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")
    if ".modules_to_save." in name:
        head, _, rest = name.partition(".modules_to_save.")
        name = head + "." + rest.partition(".")[2]
    return name


def trainable(theirs: Any, ours: nn.Module) -> tuple[dict[str, int], dict[str, int]]:
    """``(PEFT's trainable parameters renamed to ours, ours)``: name -> number of elements."""
    mine = {n: p.numel() for n, p in ours.named_parameters() if p.requires_grad}
    peft_side = {ours_name(n): p.numel() for n, p in theirs.named_parameters()
                 if p.requires_grad}
    return peft_side, mine


def run(model: nn.Module, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """The output of ``model`` on ``x`` without autograd."""
    with torch.no_grad():
        return model(x, **kwargs)


def run_seeded(model: nn.Module, x: torch.Tensor, seed: int = 7) -> torch.Tensor:
    """The output in training mode after ``torch.manual_seed(seed)`` (dropout masks drawn
    from the same generator state in both models); the model is put back in eval mode."""
    model.train()
    try:
        torch.manual_seed(seed)
        return run(model, x)
    finally:
        model.eval()


def activation_scale(model: nn.Module, x: torch.Tensor) -> float:
    """The largest ``|value|`` any leaf module of ``model`` outputs on ``x`` (eval mode):
    the scale at which float32 rounding happens inside the model, which a final
    log-softmax hides from the output."""
    biggest = [0.0]

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            biggest[0] = max(biggest[0], output.detach().abs().max().item())

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        run(model, x)
    finally:
        for handle in handles:
            handle.remove()
    return biggest[0]


def tolerance(reference: torch.Tensor, scale: float = 0.0) -> float:
    """``1e-6 · (1 + max(max|y|, scale))``: float32 rounding of differently ordered
    arithmetic on values of size ``scale`` (see :func:`activation_scale`)."""
    return 1e-6 * (1.0 + max(reference.abs().max().item(), scale))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|``."""
    return (a - b).abs().max().item()


def assert_close(ours: torch.Tensor, reference: torch.Tensor, exact: bool = False,
                 scale: float = 0.0) -> None:
    """Bitwise equal (``exact``) or within :func:`tolerance` ``(reference, scale)``."""
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    err = max_diff(ours, reference)
    if exact:
        assert torch.equal(ours, reference), f"not bitwise equal: max difference {err:.3g}"
        return
    tol = tolerance(reference, scale)
    assert err <= tol, f"max difference {err:.3g} > {tol:.3g}"
