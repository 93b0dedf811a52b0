"""A merged model moved to another dtype or device unmerges into that dtype or device.

A merge keeps the weight it replaced so that unmerging gives it back bit for bit. When the
merged model is moved in between (``.to(torch.float64)``, ``.half()``, ``.to("meta")``),
the weight given back must be the kept one moved the same way: unmerging then yields what
moving the never-merged model would have, bit for bit, and the model still runs.

The models carry serial adapters on merged layers (TinyTransformer's attention output
projections, the MLP's middle layer): their bottleneck reads the layer's output, LoRA
included, and must read it again after the unmerge ("none": no move at all).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from integration.cases import build
from surgery import MergeIA3Pass, MergeLoRAPass, UnmergeIA3Pass, UnmergeLoRAPass, apply_passes

MOVES: dict[str, Callable[[nn.Module], nn.Module]] = {
    "none": lambda m: m,
    "float64": lambda m: m.to(torch.float64),
    "half": lambda m: m.half(),
    "meta": lambda m: m.to("meta"),
}


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("move", list(MOVES))
@pytest.mark.parametrize("name", ["tiny", "mlp"])
def test_unmerge_after_a_move_gives_the_moved_weights(name: str, move: str) -> None:
    case = build(name)
    plain = MOVES[move](build(name).model.eval())  # the same model, never merged
    merged = apply_passes(case.model.eval(), [MergeLoRAPass(), MergeIA3Pass()])
    back = apply_passes(MOVES[move](merged), [UnmergeIA3Pass(), UnmergeLoRAPass()])
    want, got = _state(plain), _state(back)
    assert got.keys() == want.keys()
    for n in want:
        assert (got[n].dtype, got[n].device) == (want[n].dtype, want[n].device), n
        if move != "meta":
            assert torch.equal(got[n], want[n]), n
    if move != "meta":
        x = case.batch.to(want[n].dtype) if case.batch.is_floating_point() else case.batch
        with torch.no_grad():
            assert torch.equal(back(x), plain(x))
