"""Shared cases for the PEFT import and export tests (tests/surgery/checkpoint/
test_peft_import.py, test_peft_export.py): which layers each zoo model adapts, PEFT reference
models with random adapter weights, and the comparison of outputs.

PEFT is the reference here (a test dependency): ``peft.PeftModel`` on a fresh copy of the
same zoo model (``load_model`` seeds the weights, so every copy is equal).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

MODELS = ["hf:gpt2", "hf:llama", "hf:bert"]


@dataclass(frozen=True)
class Layers:
    """Layers adapted on one zoo model, as names that PEFT's ``target_modules`` list and
    fx-surgery's patterns both read as "the whole name or a dot-suffix"."""

    lora: list[str]
    ia3: list[str]
    feedforward: list[str]
    saved: str  # a module trained fully (modules_to_save), not tied to another


LAYERS = {
    "hf:gpt2": Layers(["c_attn", "mlp.c_proj"], ["c_attn", "mlp.c_proj"], ["mlp.c_proj"],
                      "transformer.ln_f"),
    "hf:llama": Layers(["q_proj", "v_proj", "down_proj"], ["k_proj", "v_proj", "down_proj"],
                       ["down_proj"], "lm_head"),
    "hf:bert": Layers(["query", "value", "intermediate.dense"], ["key", "value", "output.dense"],
                      ["output.dense"], "pooler.dense"),
}


def output(model: nn.Module, spec: Any) -> torch.Tensor:
    """The main output of ``model`` on the spec's example inputs, in eval mode, no grad."""
    model.eval()
    with torch.no_grad():
        out = model(*spec.example_inputs, **(spec.example_kwargs or {}))
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def assert_close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    """``|ours - reference| <= 1e-6 · (1 + max|reference|)`` everywhere (float32)."""
    tol = 1e-6 * (1.0 + reference.abs().max().item())
    err = (ours - reference).abs().max().item()
    assert err <= tol, f"max difference {err:.3g} > {tol:.3g}"


def assert_differs(a: torch.Tensor, b: torch.Tensor) -> None:
    """The adapter changes the outputs (so a comparison with it means something)."""
    assert (a - b).abs().max().item() > 1e-3


def randomize_peft(model: nn.Module, seed: int = 0) -> None:
    """Seeded random values for every LoRA factor and IA³ vector of a PEFT model, and a
    visible change to the modules it trains fully (``modules_to_save`` copies); found by
    PEFT's layer types, so base modules named ``lora_A`` are left alone."""
    from peft.tuners.ia3 import IA3Layer
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for param in [*module.lora_A.parameters(), *module.lora_B.parameters()]:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
            elif isinstance(module, IA3Layer):
                for param in module.ia3_l.parameters():
                    param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
            elif isinstance(module, ModulesToSaveWrapper):
                for param in module.modules_to_save.parameters():
                    param.add_(torch.randn(param.shape, generator=gen) * 0.1)


def peft_model(name: str, zoo: Any, config: Any, adapter_name: str = "default") -> nn.Module:
    """A PEFT model on a fresh copy of zoo model ``name`` with random adapter weights."""
    model = peft.get_peft_model(zoo.fresh(name).model, config, adapter_name=adapter_name)
    randomize_peft(model)
    return model.eval()


def save_peft(model: nn.Module, directory: Path) -> Path:
    """``model.save_pretrained(directory)`` (safetensors); returns ``directory``."""
    model.save_pretrained(str(directory))
    return directory


def edit_config(directory: Path, **changes: Any) -> None:
    """Rewrite settings of the ``adapter_config.json`` in ``directory``."""
    path = directory / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def load_peft(name: str, zoo: Any, directory: Path, **kwargs: Any) -> nn.Module:
    """``PeftModel.from_pretrained`` on a fresh copy of zoo model ``name``."""
    return peft.PeftModel.from_pretrained(zoo.fresh(name).model, str(directory), **kwargs).eval()


class OddNames(nn.Module):
    """Module names holding ``base_model``, ``model``, ``lora``, ``weight`` and ``base``.

    Input: float32 ``(batch, 8)``. Output: float32 ``(batch, 4)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.base_model = nn.ModuleDict({"model": nn.Linear(8, 16)})
        self.lora_A = nn.Linear(16, 16)
        self.base = nn.ModuleDict({"weight": nn.Linear(16, 16), "lora_B_weight": nn.Linear(16, 4)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.base_model["model"](x))
        h = torch.relu(self.lora_A(h))
        return self.base["lora_B_weight"](torch.relu(self.base["weight"](h)))


ODD_TARGETS = ["base_model.model", "lora_A", "base.weight", "base.lora_B_weight"]
