"""Tiny mixture-of-experts models (random weights, nothing downloaded) for the expert LoRA
tests: Qwen3-MoE and Mixtral, 2 layers, hidden 64, 8 experts, top-2."""

from __future__ import annotations

import copy

import torch
from torch import nn

TARGETS = {
    "gate_up": ["mlp.experts.gate_up_proj"],
    "down": ["mlp.experts.down_proj"],
    "both": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
}
"""``target_parameters`` of each case, as PEFT's ``LoraConfig`` takes them."""

FAMILIES = ("qwen3_moe", "mixtral")


def moe_model(family: str, *, implementation: str | None = None, seed: int = 0) -> nn.Module:
    """A tiny causal LM of ``family`` in eval mode (``implementation``: the experts
    implementation, transformers' default ``"grouped_mm"`` when ``None``)."""
    from transformers import (
        MixtralConfig,
        MixtralForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, vocab_size=128)
    if family == "qwen3_moe":
        config = Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=32, num_experts=8,
                                **common)
        cls = Qwen3MoeForCausalLM
    else:
        config = MixtralConfig(intermediate_size=32, num_local_experts=8, **common)
        cls = MixtralForCausalLM
    if implementation is not None:
        config._experts_implementation = implementation
    torch.manual_seed(seed)
    return cls(config).eval()


def token_ids(seed: int = 1) -> torch.Tensor:
    """``(2, 8)`` int64 token ids."""
    return torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(seed))


def peft_twin(model: nn.Module, targets: list[str], *, rank: int = 4, alpha: float = 8.0,
              random: bool = True) -> nn.Module:
    """PEFT's ``target_parameters`` LoRA on a copy of ``model``."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_parameters=list(targets),
                        target_modules=[], init_lora_weights=not random)
    return get_peft_model(copy.deepcopy(model), config).eval()


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors of ``model`` under our keys (PEFT's without ``base_model.model.``)."""
    prefix = "base_model.model."
    return {k[len(prefix):] if k.startswith(prefix) else k: v
            for k, v in model.state_dict().items() if ".lora_" in k}
