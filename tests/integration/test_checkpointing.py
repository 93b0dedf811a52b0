"""Activation checkpointing around adapted blocks gives the gradients of a plain step.

Three ways users switch it on: a wrapper calling :func:`torch.utils.checkpoint.checkpoint`
around each block of TinyTransformer, :func:`torch.utils.checkpoint.checkpoint_sequential`
over the MLP, and transformers' ``activation_checkpointing_enable()`` (named
``gradient_checkpointing_enable()`` before 5.x) on the adapted LLaMA; each with
``use_reentrant=True`` and ``False``. The recomputation runs the same float32
operations in the same order, so adapter gradients are bitwise equal to the reference
(:func:`conftest.one_process`) and frozen parameters get none.

Reentrant checkpointing differentiates only through inputs that require a gradient, and
the embeddings (or the MLP's input) are frozen, so the tests make the first block's input
require one, as users do (transformers' ``enable_input_require_grads()`` registers the same
hook on the input embeddings).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import surgery
from integration.cases import base_grads, build


class Checkpointed(nn.Module):
    """Runs ``block`` under :func:`torch.utils.checkpoint.checkpoint`."""

    def __init__(self, block: nn.Module, reentrant: bool) -> None:
        super().__init__()
        self.block = block
        self.reentrant = reentrant

    def forward(self, *args: Any) -> Any:
        return checkpoint(self.block, *args, use_reentrant=self.reentrant)


class CheckpointedSequential(nn.Module):
    """Runs ``seq`` in ``segments`` pieces under
    :func:`torch.utils.checkpoint.checkpoint_sequential`."""

    def __init__(self, seq: nn.Sequential, segments: int, reentrant: bool) -> None:
        super().__init__()
        self.seq = seq
        self.segments = segments
        self.reentrant = reentrant

    def forward(self, x: Tensor) -> Tensor:
        return checkpoint_sequential(self.seq, self.segments, x, use_reentrant=self.reentrant)


def _require_grad(module: nn.Module, inputs: Any, output: Tensor) -> None:
    """Forward hook: the output requires a gradient (for reentrant checkpointing)."""
    output.requires_grad_(True)


def _count_calls(module: nn.Module) -> list[int]:
    """A list that grows by one each time ``module`` runs forward.

    Hooked on the first layer of a block: non-reentrant recomputation stops early, once the
    last tensor backward needs is recomputed, so a later layer's hook may not fire again.
    """
    calls: list[int] = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def _assert_same_step(model: nn.Module, params: dict[str, nn.Parameter], want: dict[str, Tensor],
                      calls: list[int]) -> None:
    assert len(calls) == 2, "the block ran again in backward: it was checkpointed"
    assert base_grads(model) == [], "a frozen parameter got a gradient"
    assert params.keys() == want.keys()
    for name, p in params.items():
        assert p.grad is not None, f"{name} got no gradient through the checkpoint"
        assert torch.equal(p.grad, want[name]), name


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_around_each_block(one_process: dict, reentrant: bool) -> None:
    case = build("tiny")
    model = case.model
    params = dict(surgery.named_trainable_parameters(model))
    calls = _count_calls(model.layers[0].ln_1)
    for i, block in enumerate(model.layers):
        model.layers[i] = Checkpointed(block, reentrant)
    if reentrant:
        model.embed.register_forward_hook(_require_grad)
    case.loss(model, case.batch).backward()
    _assert_same_step(model, params, one_process["tiny"], calls)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_sequential_over_the_mlp(one_process: dict, reentrant: bool) -> None:
    case = build("mlp")
    params = dict(surgery.named_trainable_parameters(case.model))
    calls = _count_calls(case.model[0])
    x = case.batch.clone().requires_grad_(reentrant)
    case.loss(CheckpointedSequential(case.model, 2, reentrant), x).backward()
    _assert_same_step(case.model, params, one_process["mlp"], calls)


@pytest.mark.parametrize("reentrant", [False, True])
def test_transformers_gradient_checkpointing(one_process: dict, reentrant: bool) -> None:
    case = build("llama")
    model = case.model
    params = dict(surgery.named_trainable_parameters(model))
    calls = _count_calls(model.model.layers[0].input_layernorm)
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5.x on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if reentrant:
        model.enable_input_require_grads()
    case.loss(model, case.batch).backward()
    _assert_same_step(model, params, one_process["llama"], calls)
