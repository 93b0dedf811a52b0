"""PEFT files in and out under adapter names that are not Python identifiers
(``surgery.export_peft`` / ``surgery.import_peft``; the rule is in
``surgery/adapters/names.py``).

PEFT keys its adapter layers by the name as given (``lora_A.test-adapter.weight`` in the
model's state dict), writes a non-default adapter to ``<directory>/<name>/`` and leaves the
name out of the keys in its files. Outputs are compared in float32 to within
``1e-6 · (1 + max|y|)`` (see ``peft_cases.assert_close``).
"""

from __future__ import annotations

import pytest
import torch
from peft_cases import assert_close, assert_differs, load_peft, output, peft_model, save_peft
from safetensors.torch import load_file
from torch import nn

from surgery import (
    CheckpointError,
    IA3Pass,
    LoRAPass,
    adapter_names,
    apply_passes,
    export_peft,
    import_peft,
    set_active,
    trainable_parameters,
)

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings(
    "ignore:fan_in_fan_out is set to:UserWarning",
    "ignore:Setting `save_embedding_layers`:UserWarning")

NAMES = ["test-adapter", "my adapter", "über", "a+b"]
MODEL = "hf:llama"
PASSES = {
    "lora": lambda n: LoRAPass(pattern=["q_proj", "v_proj"], rank=4, alpha=8, name=n),
    "dora": lambda n: LoRAPass(pattern="q_proj", rank=4, use_dora=True, name=n),
    "ia3": lambda n: IA3Pass(pattern=["k_proj", "v_proj", "down_proj"],
                             feedforward=["down_proj"], name=n),
}


def _randomize(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in trainable_parameters(model):
            param.add_(torch.randn(param.shape, generator=gen) * 0.1)


def _adapter_keys(model: nn.Module, name: str) -> set[str]:
    """State-dict keys holding ``.<name>.`` or ending in ``.<name>``, without PEFT's
    ``base_model.model.`` prefix (an IA³ vector is ``<layer>.ia3_l.<name>`` in both)."""
    keys = {k.removeprefix("base_model.model.") for k in model.state_dict()}
    return {k for k in keys if f".{name}." in f"{k}."}


@pytest.mark.parametrize("kind", list(PASSES))
@pytest.mark.parametrize("name", NAMES)
def test_export_loads_in_peft_under_the_name(zoo, tmp_path, kind: str, name: str) -> None:
    spec = zoo.spec(MODEL)
    model = apply_passes(spec.model, [LoRAPass(pattern="o_proj", rank=2), PASSES[kind](name)],
                         example_inputs=spec.example_inputs, example_kwargs=spec.example_kwargs)
    _randomize(model)
    assert export_peft(model, tmp_path) == [tmp_path, tmp_path / name]
    files = load_file(str(tmp_path / name / "adapter_model.safetensors"))
    assert files and not any(name in key for key in files)  # PEFT's files leave the name out
    reference = load_peft(MODEL, zoo, tmp_path / name, adapter_name=name)
    assert list(reference.peft_config) == [name]
    assert _adapter_keys(reference, name) == _adapter_keys(model, name) != set()
    ours = output(set_active(model, [name]), spec)
    assert_close(ours, output(reference, spec))
    assert_differs(ours, output(spec.model, spec))


@pytest.mark.parametrize("kind", ["lora", "ia3"])
@pytest.mark.parametrize("name", NAMES)
def test_import_a_peft_adapter_saved_under_the_name(zoo, tmp_path, kind: str, name: str) -> None:
    config = (peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
              if kind == "lora" else
              peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                             feedforward_modules=["down_proj"]))
    reference = peft_model(MODEL, zoo, config, adapter_name=name)
    save_peft(reference, tmp_path)
    assert (tmp_path / name / "adapter_config.json").is_file()
    spec = zoo.spec(MODEL)
    ours = import_peft(spec.model, tmp_path / name, adapter_name=name)
    assert adapter_names(ours) == {name: (kind,)}
    assert _adapter_keys(ours, name) == _adapter_keys(reference, name) != set()
    assert_close(output(ours, spec), output(reference, spec))


def test_an_absolute_name_is_not_exported(zoo, tmp_path) -> None:
    spec = zoo.spec(MODEL)
    model = apply_passes(spec.model, [LoRAPass(pattern="q_proj", rank=2, name="/x")])
    with pytest.raises(CheckpointError, match=r"^export_peft: adapter '/x' would go to its own "
                                              r"directory .* absolute path"):
        export_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
