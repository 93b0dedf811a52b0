"""Every pass on every family of the zoo: the result is the user's class, identity at init,
exactly the adapters train and every one of them gets a gradient, and a deep copy computes
the same.

Models: the built-in transformer (hand-written, fx-traceable) and transformers' GPT-2, LLaMA,
BERT and ViT configs. Passes with their defaults (selection by structural role) and the
prefix with its zero gate (identity at init); then LoRA merged into the weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from surgery import (
    IA3Pass,
    LoRAPass,
    MergeLoRAPass,
    ParallelAdapterPass,
    PrefixPass,
    SerialAdapterPass,
    apply_passes,
    named_trainable_parameters,
)
from surgery.sites.marker import AdapterModule, slot_parameters

MODELS = ["builtin:tiny", "hf:gpt2", "hf:llama", "hf:bert", "hf:vit"]
PASSES = {
    "lora": lambda: [LoRAPass(rank=4)],
    "ia3": lambda: [IA3Pass()],
    "serial": lambda: [SerialAdapterPass(bottleneck=8)],
    "parallel": lambda: [ParallelAdapterPass(bottleneck=8)],
    "prefix": lambda: [PrefixPass(length=4, gate="zero")],
}


def _output(model: nn.Module, spec) -> torch.Tensor:
    out = model(*spec.example_inputs, **(spec.example_kwargs or {}))
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _move(model: nn.Module) -> None:
    """Push every trainable parameter away from its initial value, reproducibly."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in named_trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)


def _adapter_parameters(model: nn.Module) -> set[str]:
    """The parameters of adapter modules and of adapters' parameter slots (IA³'s
    ``<layer>.ia3_l.<adapter>``)."""
    return ({f"{q}.{n}" if q else n for q, m in model.named_modules()
             if isinstance(m, AdapterModule) for n, _ in m.named_parameters()}
            | {q for q, _, _, _ in slot_parameters(model)})


@pytest.mark.parametrize("which", list(PASSES))
@pytest.mark.parametrize("name", MODELS)
def test_every_pass_on_every_family(zoo, name: str, which: str) -> None:
    spec = zoo.spec(name)
    adapted = apply_passes(spec.model, PASSES[which](), spec.example_inputs, spec.example_kwargs)
    assert type(adapted) is type(spec.model)
    adapted.eval()
    with torch.no_grad():
        assert torch.equal(_output(adapted, spec), _output(spec.model, spec)), "identity at init"
    trainable = {n for n, _ in named_trainable_parameters(adapted)}
    assert trainable and trainable == _adapter_parameters(adapted)
    _move(adapted)
    adapted.train()
    _output(adapted, spec).float().pow(2).mean().backward()
    for n, p in named_trainable_parameters(adapted):
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} got no gradient"
    assert all(p.grad is None for p in adapted.parameters() if not p.requires_grad)
    adapted.eval()
    copied = copy.deepcopy(adapted)
    with torch.no_grad():
        assert torch.equal(_output(copied, spec), _output(adapted, spec))


@pytest.mark.parametrize("name", MODELS)
def test_lora_merges_into_the_weights_of_every_family(zoo, name: str) -> None:
    spec = zoo.spec(name)
    adapted = apply_passes(spec.model, [LoRAPass(rank=4)], spec.example_inputs,
                           spec.example_kwargs).eval()
    _move(adapted)
    with torch.no_grad():
        want = _output(adapted, spec)
    merged = apply_passes(adapted, [MergeLoRAPass()])
    assert type(merged) is type(spec.model)
    assert not list(named_trainable_parameters(merged)), "merged adapters are frozen"
    with torch.no_grad():
        got = _output(merged, spec)
    tol = 1e-5 * (1 + want.abs().max().item())  # fp32: (W + s·BA) x against W x + s·B(A x)
    assert (got - want).abs().max().item() <= tol
    assert not torch.equal(got, _output(spec.model, spec).detach()), "the update is in the weights"
