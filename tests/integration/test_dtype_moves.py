"""``.to(dtype)``, ``.half()`` and ``.to("meta")`` move the adapters with the model.

After a move every floating-point parameter and buffer of the adapted model, adapters
included, has the new dtype (``nn.Module.to`` leaves integer buffers such as BatchNorm's
``num_batches_tracked`` alone) or lives on the meta device, and the model still computes
what it computed in float32, to the new dtype's precision.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import surgery
from integration.cases import CASES, Case, build, convnet
from integration.grads import relative_error

MOVES: dict[str, tuple[Callable[[nn.Module], nn.Module], torch.dtype, float]] = {
    "float64": (lambda m: m.to(torch.float64), torch.float64, 1e-6),
    "half": (lambda m: m.half(), torch.float16, 5e-3),
    "bfloat16": (lambda m: m.to(torch.bfloat16), torch.bfloat16, 3e-2),
}
"""Move → (how, the dtype it gives, relative tolerance (norm-wise) of the outputs against
float32). Measured on these models: float64 at most 2.5e-7 (float32's own rounding), half
6.8e-4, bfloat16 5.4e-3."""

BUILDERS: dict[str, Callable[[], Case]] = {**{n: (lambda n=n: build(n)) for n in CASES},
                                           "convnet": convnet}


def _output(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    return out if isinstance(out, Tensor) else out.logits


def _floating(model: nn.Module) -> dict[str, Tensor]:
    """Every floating-point parameter and buffer, by name."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    return {n: t for n, t in tensors.items() if t.is_floating_point()}


@pytest.mark.parametrize("move", list(MOVES))
@pytest.mark.parametrize("name", list(BUILDERS))
def test_a_dtype_move_takes_the_adapters_along(name: str, move: str) -> None:
    how, dtype, rtol = MOVES[move]
    case = BUILDERS[name]()
    model = case.model.eval()
    with torch.no_grad():
        want = _output(model, case.batch)
    adapters = [n for n, _ in surgery.named_trainable_parameters(model)]
    assert how(model) is model
    tensors = _floating(model)
    assert set(adapters) <= tensors.keys()
    wrong = {n: t.dtype for n, t in tensors.items() if t.dtype != dtype}
    assert not wrong, f"not moved to {dtype}: {wrong}"
    assert [n for n, _ in surgery.named_trainable_parameters(model)] == adapters
    x = case.batch.to(dtype) if case.batch.is_floating_point() else case.batch
    with torch.no_grad():
        got = _output(model, x)
    assert got.dtype == dtype
    assert relative_error(got.float(), want) <= rtol


@pytest.mark.parametrize("name", list(BUILDERS))
def test_to_meta_takes_every_tensor_along(name: str) -> None:
    model = BUILDERS[name]().model
    n_trainable = len(surgery.trainable_parameters(model))
    model.to("meta")
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert [n for n, t in tensors.items() if not t.is_meta] == []
    assert len(surgery.trainable_parameters(model)) == n_trainable
