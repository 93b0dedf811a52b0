"""Tests of PEFT's LoRA ``bias`` setting in export_peft / import_peft: the trained base
biases travel under PEFT's keys both ways, and each side computes what the other does."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from surgery import (
    LoRAPass,
    apply_passes,
    export_peft,
    import_peft,
    named_trainable_parameters,
)
from surgery.zoo import load_model

peft = pytest.importorskip("peft")

PREFIX = "base_model.model."
GPT2_BIASES = {f"transformer.h.{i}.{m}.bias" for i in range(2)
               for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
               } | {"transformer.ln_f.bias"}


@pytest.fixture(scope="module")
def gpt2():
    return load_model("hf:gpt2")


def _logits(model: torch.nn.Module, spec) -> torch.Tensor:
    return model(*spec.example_inputs, **spec.example_kwargs).logits


def _trained(spec, mode: str) -> torch.nn.Module:
    """LoRA on c_attn with ``bias=mode``, biases and B moved off their initial values."""
    adapted = apply_passes(spec.model, [LoRAPass(pattern="c_attn", rank=4, bias=mode)])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in adapted._surgery.trained_parameters:
            param = adapted.get_parameter(name)
            param.data = param + torch.randn(param.shape, generator=gen)
        for name, param in adapted.named_parameters():
            if ".lora_B." in name:
                param.data = torch.randn(param.shape, generator=gen)
    return adapted


@pytest.mark.parametrize("mode", ["lora_only", "all"])
def test_export_writes_peft_s_bias_keys_and_peft_computes_the_same(gpt2, tmp_path: Path,
                                                                   mode: str) -> None:
    adapted = _trained(gpt2, mode)
    export_peft(adapted, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["bias"] == mode
    keys = {k for k in load_file(tmp_path / "adapter_model.safetensors") if k.endswith("bias")}
    adapted_layers = {f"{PREFIX}transformer.h.{i}.attn.c_attn.base_layer.bias" for i in range(2)}
    if mode == "lora_only":
        assert keys == adapted_layers
    else:
        assert keys == adapted_layers | {PREFIX + n for n in GPT2_BIASES
                                         if ".c_attn." not in n}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.PeftModel.from_pretrained(copy.deepcopy(gpt2.model), tmp_path)
    assert torch.equal(_logits(reference, gpt2), _logits(adapted, gpt2))


@pytest.mark.parametrize("mode", ["lora_only", "all"])
def test_import_of_a_peft_file_with_bias_trains_and_loads_the_biases(gpt2, tmp_path: Path,
                                                                     mode: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(copy.deepcopy(gpt2.model), peft.LoraConfig(
            r=4, target_modules=["c_attn"], bias=mode))
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if param.requires_grad:
                param.add_(0.5)
    reference.save_pretrained(tmp_path)
    before = {k: v.clone() for k, v in gpt2.model.state_dict().items()}
    imported = import_peft(gpt2.model, tmp_path)
    want = {n.removeprefix(PREFIX).replace("base_layer.", "").replace(".default", "")
            for n, p in reference.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert set(imported._surgery.trained_parameters) == want
    assert want == ({f"transformer.h.{i}.attn.c_attn.bias" for i in range(2)}
                    if mode == "lora_only" else GPT2_BIASES)
    assert {n for n, _ in named_trainable_parameters(imported)} >= want
    assert torch.equal(_logits(imported, gpt2), _logits(reference, gpt2))
    assert all(torch.equal(gpt2.model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("mode", ["lora_only", "all"])
def test_export_import_round_trip_is_bitwise(gpt2, tmp_path: Path, mode: str) -> None:
    adapted = _trained(gpt2, mode)
    export_peft(adapted, tmp_path)
    back = import_peft(gpt2.model, tmp_path)
    assert back._surgery.trained_parameters == adapted._surgery.trained_parameters
    for name in adapted._surgery.trained_parameters:
        assert torch.equal(back.get_parameter(name), adapted.get_parameter(name)), name
    assert torch.equal(_logits(back, gpt2), _logits(adapted, gpt2))
