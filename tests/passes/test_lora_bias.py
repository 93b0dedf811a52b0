"""Tests of passes/lora_bias.py: ``LoRAPass(bias=...)`` trains exactly the biases PEFT's
``LoraConfig(bias=...)`` trains, records them on the model's state, never writes into the
caller's model, shows them in the audit, and saves and loads them bitwise."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from surgery import (
    ConfigError,
    LoRAPass,
    MergeLoRAPass,
    apply_passes,
    audit,
    load_adapters,
    named_trainable_parameters,
    plan,
    save_adapters,
    trainable_parameters,
    unload,
)
from surgery.checkpoint.state import adapter_state
from surgery.zoo import load_model

peft = pytest.importorskip("peft")

TARGETS = {"hf:llama": ["q_proj", "v_proj"], "hf:gpt2": ["c_attn", "c_fc"]}
MODES = ("none", "lora_only", "all")


@pytest.fixture(scope="module")
def specs() -> dict:
    return {name: load_model(name) for name in TARGETS}


def _peft_trainable(model: nn.Module, targets: list[str], mode: str) -> set[str]:
    """PEFT's trainable parameter names, without ``base_model.model.`` and ``base_layer.``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(copy.deepcopy(model),
                                  peft.LoraConfig(r=4, target_modules=targets, bias=mode))
    return {n.removeprefix("base_model.model.").replace("base_layer.", "")
            for n, p in ref.named_parameters() if p.requires_grad}


def _loss(model: nn.Module, spec) -> torch.Tensor:
    return model(*spec.example_inputs, **(spec.example_kwargs or {})).logits.pow(2).mean()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(TARGETS))
def test_trainable_set_is_peft_s_and_gradients_reach_exactly_it(specs, name: str,
                                                                mode: str) -> None:
    spec = specs[name]
    targets = TARGETS[name]
    adapted = apply_passes(spec.model, [LoRAPass(pattern=targets, rank=4, bias=mode)])
    got = {n for n, _ in named_trainable_parameters(adapted)}
    assert got == _peft_trainable(spec.model, targets, mode)
    biases = {n for n in got if n.endswith(".bias")}
    assert set(adapted._surgery.trained_parameters) == biases
    assert set(adapted._surgery.trained_parameters.values()) <= {"lora"}
    if name == "hf:gpt2":  # GPT-2 has biases everywhere: the modes differ
        expected = {"none": 0, "lora_only": 4, "all": 13}[mode]
        assert len(biases) == expected
        if mode == "lora_only":
            assert biases == {f"transformer.h.{i}.{t}.bias" for i in range(2)
                              for t in ("attn.c_attn", "mlp.c_fc")}
    _loss(adapted, spec).backward()
    with_grad = {n for n, p in adapted.named_parameters() if p.grad is not None}
    assert with_grad == got
    assert all(adapted.get_parameter(n).grad.abs().sum() > 0 for n in biases)


def test_train_step_leaves_the_caller_s_model_bitwise_unchanged(specs) -> None:
    spec = specs["hf:gpt2"]
    before = {k: v.clone() for k, v in spec.model.state_dict().items()}
    adapted = apply_passes(spec.model, [LoRAPass(pattern=TARGETS["hf:gpt2"], bias="all")])
    old = adapted.get_parameter("transformer.h.0.attn.c_attn.bias").detach().clone()
    opt = torch.optim.SGD(trainable_parameters(adapted), lr=0.5)
    _loss(adapted, spec).backward()
    opt.step()
    assert not torch.equal(adapted.get_parameter("transformer.h.0.attn.c_attn.bias"), old)
    assert not torch.equal(adapted.get_parameter("transformer.ln_f.bias"),
                           before["transformer.ln_f.bias"])
    after = spec.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(p.requires_grad for p in spec.model.parameters())  # the caller's flags too


def test_caller_s_flags_and_dry_runs_are_left_alone(specs) -> None:
    model = copy.deepcopy(specs["hf:gpt2"].model).requires_grad_(False)
    steps = [LoRAPass(pattern="c_attn", bias="all")]
    plan(model, steps)
    adapted = apply_passes(model, steps)
    assert not any(p.requires_grad for p in model.parameters())
    assert getattr(model, "_surgery", None) is None
    assert len(adapted._surgery.trained_parameters) == 13
    assert adapted.get_parameter("transformer.ln_f.bias") is not model.transformer.ln_f.bias


def test_later_pass_keeps_recorded_biases_trainable(specs) -> None:
    spec = specs["hf:gpt2"]
    first = apply_passes(spec.model, [LoRAPass(pattern="c_attn", bias="lora_only")])
    second = apply_passes(first, [LoRAPass(pattern="c_attn", name="other")])
    assert second.get_parameter("transformer.h.0.attn.c_attn.bias").requires_grad
    assert second._surgery.trained_parameters == first._surgery.trained_parameters
    assert not second.get_parameter("transformer.h.0.attn.c_attn.weight").requires_grad


def test_audit_rows_show_the_trained_biases(specs) -> None:
    adapted = apply_passes(specs["hf:gpt2"].model,
                           [LoRAPass(pattern=TARGETS["hf:gpt2"], bias="lora_only")])
    rows = {r.name: r for r in audit(adapted).rows}
    row = rows["transformer.h.0.attn.c_attn"]
    assert row.trained_params == ("bias (lora)",) and row.trainable == "partial"
    assert "bias trained (lora)" in row.provenance
    assert rows["transformer.h.0.attn.c_proj"].trained_params == ()
    assert "bias trained (lora)" in str(audit(adapted))
    collapsed = {r.name: r for r in audit(adapted, depth=3).rows}
    assert collapsed["transformer.h.0"].trained_params == ("attn.c_attn.bias (lora)",
                                                           "mlp.c_fc.bias (lora)")


@pytest.mark.parametrize("mode", ["lora_only", "all"])
def test_save_load_round_trips_biases_bitwise(specs, tmp_path: Path, mode: str) -> None:
    spec = specs["hf:gpt2"]
    adapted = apply_passes(spec.model, [LoRAPass(pattern=TARGETS["hf:gpt2"], bias=mode)])
    with torch.no_grad():
        for n in adapted._surgery.trained_parameters:
            adapted.get_parameter(n).add_(0.25)
    saved = adapter_state(adapted)
    assert set(adapted._surgery.trained_parameters) <= set(saved)
    save_adapters(adapted, tmp_path)
    loaded = load_adapters(spec.model, tmp_path)
    assert loaded._surgery.trained_parameters == adapted._surgery.trained_parameters
    for key, entry in adapter_state(loaded).items():
        assert torch.equal(entry.tensor, saved[key].tensor), key
    assert set(adapter_state(loaded)) == set(saved)
    assert {n for n, _ in named_trainable_parameters(loaded)} == {
        n for n, _ in named_trainable_parameters(adapted)}
    torch.testing.assert_close(_loss(loaded, spec), _loss(adapted, spec), rtol=0, atol=0)
    bias = "transformer.h.1.mlp.c_fc.bias"
    assert not torch.equal(loaded.get_parameter(bias), spec.model.get_parameter(bias))


def test_merge_does_not_fold_biases_and_unload_keeps_them(specs) -> None:
    spec = specs["hf:gpt2"]
    adapted = apply_passes(spec.model, [LoRAPass(pattern="c_attn", bias="lora_only")])
    name = "transformer.h.0.attn.c_attn.bias"
    with torch.no_grad():
        adapted.get_parameter(name).add_(1.0)
    trained = adapted.get_parameter(name).detach().clone()
    merged = apply_passes(adapted, [MergeLoRAPass()])
    assert torch.equal(merged.get_parameter(name), trained)
    plain = unload(adapted)
    assert torch.equal(plain.get_parameter(name), trained)


@pytest.mark.parametrize("mode", MODES)
def test_config_round_trip(mode: str) -> None:
    p = LoRAPass(pattern=["q_proj"], bias=mode)
    assert p.config()["bias"] == mode
    assert LoRAPass.from_config(p.config()) == p
    assert LoRAPass().bias == "none"


@pytest.mark.parametrize("bad", ["lora", "All", None, True])
def test_other_values_are_refused(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"LoRAPass: bias must be one of 'none', 'lora_only'"):
        LoRAPass(bias=bad)
