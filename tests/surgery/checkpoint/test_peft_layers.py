"""PEFT files of LoRA on convolutions and embeddings and of IA³ on convolutions, both ways
(``surgery/checkpoint/peft_export.py``, ``peft_import.py``, ``peft_keys.py``,
``peft_targets.py``).

Out: an adapted model's files load with ``peft.PeftModel.from_pretrained`` onto a fresh
copy of the base and compute the same outputs, with exactly the keys and shapes PEFT itself
saves. In: PEFT's own files load with ``surgery.import_peft`` and compute what PEFT
computes. Both bit for bit (the same operations in the same order).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from layer_cases import (
    Convs,
    Embeds,
    build,
    conv_inputs,
    embed_inputs,
    randomize,
    tolerance,
)
from safetensors.torch import load_file
from torch import nn

from surgery import (
    CheckpointError,
    IA3Pass,
    LoRAPass,
    apply_passes,
    export_peft,
    import_peft,
)

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:LoRA adapter added to ConvNd layer with groups")

CONVS = ["c1", "c2", "p", "c3"]
CASES = {  # model, inputs, passes, PEFT's config of the same adapter
    "lora_conv": (Convs, conv_inputs, lambda: [LoRAPass(pattern=CONVS, rank=4, alpha=8)],
                  lambda: peft.LoraConfig(target_modules=CONVS, r=4, lora_alpha=8,
                                          init_lora_weights=False)),
    "lora_embedding": (Embeds, embed_inputs,
                       lambda: [LoRAPass(pattern=["emb", "head"], rank=4, alpha=8, dropout=0.1)],
                       lambda: peft.LoraConfig(target_modules=["emb", "head"], r=4, lora_alpha=8,
                                               lora_dropout=0.1, init_lora_weights=False)),
    "ia3_conv": (Convs, conv_inputs,
                 lambda: [IA3Pass(pattern=["c2", "p", "c3"], feedforward=["c2", "c3"])],
                 lambda: peft.IA3Config(target_modules=["c2", "p", "c3"],
                                        feedforward_modules=["c2", "c3"],
                                        init_ia3_weights=False)),
}


def file_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in load_file(str(directory / "adapter_model.safetensors"))
            .items()}


def randomize_linear_lora(model: nn.Module) -> None:
    """``B`` of a LoRA on a linear layer starts at zero: give it values."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B.default.weight") and torch.count_nonzero(param) == 0:
                param.normal_(0, 0.1)


@pytest.mark.parametrize("case", CASES)
def test_export_loads_in_peft_with_peft_s_keys(case: str, tmp_path, snapshot) -> None:
    cls, inputs, passes, config = CASES[case]
    base = build(cls)
    model = apply_passes(base, passes())
    randomize(model)
    randomize_linear_lora(model)
    before = snapshot(model)
    export_peft(model, tmp_path / "ours")
    before.assert_unchanged(model)
    reference = peft.get_peft_model(build(cls), config())
    reference.save_pretrained(str(tmp_path / "peft"))
    assert file_shapes(tmp_path / "ours") == file_shapes(tmp_path / "peft")
    settings = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    if case == "lora_embedding":  # the embedding has no dropout; the linear layer's counts
        assert settings["lora_dropout"] == 0.1
    loaded = peft.PeftModel.from_pretrained(build(cls), str(tmp_path / "ours")).eval()
    x = inputs()
    assert torch.equal(loaded(*x), model(*x))
    assert (model(*x) - base(*x)).abs().max() > 1e-3


@pytest.mark.parametrize("case", CASES)
def test_import_computes_what_peft_computes(case: str, tmp_path, snapshot) -> None:
    cls, inputs, _, config = CASES[case]
    reference = peft.get_peft_model(build(cls), config())
    reference.save_pretrained(str(tmp_path))
    base = build(cls)
    before = snapshot(base)
    ours = import_peft(base, tmp_path)
    before.assert_unchanged(base)
    loaded = peft.PeftModel.from_pretrained(build(cls), str(tmp_path)).eval()
    x = inputs()
    want = loaded(*x)
    assert torch.equal(ours(*x), want)
    assert (want - base(*x)).abs().max() > tolerance(want)


@pytest.mark.parametrize("case", CASES)
def test_export_then_import_is_bitwise(case: str, tmp_path) -> None:
    cls, inputs, passes, _ = CASES[case]
    base = build(cls)
    model = apply_passes(base, passes())
    randomize(model)
    randomize_linear_lora(model)
    export_peft(model, tmp_path)
    back = import_peft(base, tmp_path)
    assert list(back.state_dict()) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_export_refuses_a_convolution_peft_computes_otherwise(tmp_path, snapshot) -> None:
    model = apply_passes(nn.Sequential(nn.Conv2d(3, 4, 3, padding=2, dilation=2)),
                         [LoRAPass(pattern=["0"], rank=2)])
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"export_peft: .* puts LoRA on 0 \(Conv2d, "
                                              r"dilation=\(2, 2\)\); PEFT's lora_A convolution "
                                              r"ignores .* Nothing was written"):
        export_peft(model, tmp_path / "out")
    before.assert_unchanged(model)
    assert not (tmp_path / "out").exists()


def test_import_refuses_ia3_on_conv1d(tmp_path) -> None:
    """PEFT's IA³ has no Conv1d layer; a file saying so is refused, not half-loaded."""
    reference = peft.get_peft_model(build(Convs), peft.IA3Config(target_modules=["p"],
                                                                 feedforward_modules=[]))
    reference.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["target_modules"] = ["c1"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"select c1 \(Conv1d\), a module IA³ cannot adapt"):
        import_peft(build(Convs), tmp_path)
