"""Fifty AdamW steps with weight decay move the adapters and leave the base bit for bit.

The optimizer is handed every parameter of the model, frozen ones included, as a careless
training script would: decoupled weight decay (``weight_decay=0.1``) would shrink any base
weight that got a gradient, so the base staying bitwise equal shows no frozen parameter
ever got one, and the frozen weights' storage was not written through another alias.
In float32, and in bfloat16 after ``.to(torch.bfloat16)`` (where the optimizer states live
in bfloat16 too).
"""

from __future__ import annotations

import pytest
import torch

from integration.cases import CASES, build, convnet

STEPS = 50

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", [*CASES, "convnet"])
def test_adamw_moves_only_the_adapters(name: str, dtype: torch.dtype) -> None:
    case = convnet() if name == "convnet" else build(name)
    model = case.model.train().to(dtype)
    if case.batch.is_floating_point():
        case.batch = case.batch.to(dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # lr 1e-2: an Adam step is about lr, and IA³ vectors sit near 1.0 where bfloat16's
    # spacing is 2**-7; a 1e-3 step would round away there.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = case.loss(model, case.batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], "training made progress"
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p.detach(), before[n]), f"the adapter parameter {n} did not move"
        else:
            assert p.grad is None, f"the frozen parameter {n} got a gradient"
            assert torch.equal(p.detach(), before[n]), f"the frozen parameter {n} changed"
    assert any(not p.requires_grad for p in model.parameters())
