"""DoRA adapters in PEFT's files, both ways (``surgery/checkpoint/peft_export.py`` and
``peft_import.py`` with ``use_dora``): ``export_peft`` → ``PeftModel.from_pretrained`` and
PEFT's ``save_pretrained`` → ``import_peft`` compute the same outputs to within
``1e-6 · (1 + max|y|)`` (float32). The magnitude travels as
``base_model.model.<layer>.lora_magnitude_vector`` ``(out,)`` (PEFT's key: no ``.weight``),
``(1, out, 1, ...)`` on a convolution.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from layer_cases import Convs, build, conv_inputs
from peft_cases import (
    assert_close,
    assert_differs,
    load_peft,
    output,
    peft_model,
    save_peft,
)
from safetensors.torch import load_file
from torch import nn

from surgery import CheckpointError, LoRAPass, apply_passes, export_peft, import_peft
from surgery.checkpoint.peft_keys import PREFIX

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to:UserWarning")

TARGETS = {"hf:llama": ["q_proj", "v_proj", "down_proj"], "hf:gpt2": ["c_attn", "mlp.c_proj"]}


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Factors ~ N(0, 0.1²) and magnitudes scaled by U(0.5, 1.5), in fx-surgery's or PEFT's
    model alike (found by parameter name: these models have no other ``lora_`` names)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif ".lora_magnitude_vector." in name:
                p.mul_(torch.rand(p.shape, generator=gen) + 0.5)


@pytest.mark.parametrize("name", list(TARGETS))
def test_export_then_peft_loads_it(name, zoo, tmp_path) -> None:
    spec = zoo.spec(name)
    model = apply_passes(spec.model, [LoRAPass(pattern=TARGETS[name], rank=4, alpha=8,
                                               use_dora=True)])
    randomize(model)
    export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    mags = {k: v for k, v in tensors.items() if k.endswith(".lora_magnitude_vector")}
    assert len(mags) == len(tensors) // 3 > 0
    for key, value in mags.items():
        mine = model.get_parameter(key.removeprefix(PREFIX).replace(
            ".lora_magnitude_vector", ".lora_magnitude_vector.default.weight"))
        assert torch.equal(value, mine.detach())
    ref = load_peft(name, zoo, tmp_path)
    want = output(ref, spec)
    assert_differs(want, output(spec.model, spec))
    assert_close(output(model, spec), want)


@pytest.mark.parametrize("name", list(TARGETS))
def test_peft_saves_then_import(name, zoo, tmp_path) -> None:
    spec = zoo.spec(name)
    ref = peft_model(name, zoo, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS[name], use_dora=True,
        fan_in_fan_out=name == "hf:gpt2"))
    randomize(ref)
    save_peft(ref, tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sum(k.endswith(".lora_magnitude_vector") for k in saved) == len(saved) // 3
    model = import_peft(spec.model, tmp_path)
    assert any(".lora_magnitude_vector.default.weight" in n for n, _ in model.named_parameters())
    want = output(ref, spec)
    assert_differs(want, output(spec.model, spec))
    assert_close(output(model, spec), want)


def test_import_refuses_dora_on_an_embedding(zoo, tmp_path) -> None:
    ref = peft_model("hf:llama", zoo, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], use_dora=True))
    save_peft(ref, tmp_path)
    with pytest.raises(CheckpointError, match=r"DoRA \(use_dora\) on model\.embed_tokens "
                                              r"\(Embedding, an embedding\).*Nothing was loaded"):
        import_peft(zoo.spec("hf:llama").model, tmp_path)


def test_export_refuses_dora_mixed_with_plain_lora(zoo, tmp_path: Path) -> None:
    spec = zoo.spec("hf:llama")
    model = apply_passes(spec.model, [LoRAPass(pattern="q_proj", use_dora=True, name="a")])
    model = apply_passes(model, [LoRAPass(pattern="v_proj", name="a")])
    with pytest.raises(CheckpointError, match=r"'a' is DoRA at .*q_proj but plain LoRA at "
                                              r".*v_proj"):
        export_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


CONV_SITES = ["c1", "c2", "p", "c3"]
UNGROUPED = ["c1", "p", "c3"]
"""The convolutions of :class:`layer_cases.Convs` without groups (``c2`` has two)."""


@pytest.mark.filterwarnings("ignore:LoRA adapter added to ConvNd layer with groups")
def test_dora_on_a_grouped_convolution_does_not_cross(tmp_path: Path) -> None:
    """PEFT normalises a grouped convolution's DoRA weight from B·A reshaped into the grouped
    weight's shape (not the layer's update), so the files would not compute the same thing:
    both ways are refused by name, and nothing is written."""
    base = build(Convs)
    model = apply_passes(base, [LoRAPass(pattern=CONV_SITES, rank=4, alpha=8, use_dora=True)])
    with pytest.raises(CheckpointError, match=r"DoRA \(use_dora\) on c2 \(Conv2d, groups=2\).*"
                                              r"Way out: keep this adapter"):
        export_peft(model, tmp_path / "ours")
    assert not (tmp_path / "ours").exists()
    config = peft.LoraConfig(target_modules=CONV_SITES, r=4, lora_alpha=8, use_dora=True)
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(str(tmp_path / "theirs"))
    with pytest.raises(CheckpointError, match=r"DoRA \(use_dora\) on c2 \(Conv2d, groups=2\)"):
        import_peft(copy.deepcopy(base), tmp_path / "theirs")


def _conv_output(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(*conv_inputs())


def test_convolution_dora_crosses_both_ways(tmp_path: Path) -> None:
    """Conv1d/2d/3d DoRA: export → PEFT loads the same magnitudes ``(1, out, 1, ...)`` and
    computes our outputs; PEFT's file → import gives back every tensor bit for bit."""
    base = build(Convs)
    model = apply_passes(base, [LoRAPass(pattern=UNGROUPED, rank=4, alpha=8, use_dora=True)])
    randomize(model)
    export_peft(model, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_dora"]
    tensors = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    mags = {k: v for k, v in tensors.items() if k.endswith(".lora_magnitude_vector")}
    assert {k: tuple(v.shape) for k, v in mags.items()} == {
        f"{PREFIX}c1.lora_magnitude_vector": (1, 6, 1),
        f"{PREFIX}p.lora_magnitude_vector": (1, 8, 1, 1),
        f"{PREFIX}c3.lora_magnitude_vector": (1, 4, 1, 1, 1)}
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    for name, p in ref.named_parameters():
        if "lora_" in name:
            mine = model.get_parameter(name.removeprefix(PREFIX))
            assert torch.equal(p, mine.detach()), name
    want, got = _conv_output(ref), _conv_output(model)
    assert_differs(want, _conv_output(base))
    assert_close(got, want)

    ref.save_pretrained(str(tmp_path / "theirs"))
    back = import_peft(copy.deepcopy(base), tmp_path / "theirs")
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert torch.equal(_conv_output(back), got)
