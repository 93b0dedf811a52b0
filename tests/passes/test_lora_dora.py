"""DoRA (``LoRAPass(use_dora=True)``, ``passes/dora.py``) against PEFT 0.21's
``LoraConfig(use_dora=True)`` on the same weights.

Tolerance, wherever outputs are compared and not said to be equal:
``|ours - reference| <= 1e-6 · (1 + max|reference|)`` (float32). DoRA at init is the layer
only up to rounding (``m / ‖W‖`` is one within an ulp), so "identity at init" is checked to
that tolerance too; merge → unmerge gives the exact tensors back.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from passes.dora import DoRAMagnitude
from surgery import (
    ConfigError,
    LoRAPass,
    MergeError,
    MergeLoRAPass,
    UnmergeLoRAPass,
    UnsupportedSiteError,
    apply_passes,
    audit,
    combine_adapters,
    load_adapters,
    save_adapters,
    set_active,
    trainable_parameters,
    unload,
)
from surgery.zoo import load_model

peft = pytest.importorskip("peft")

CASES = {"hf:llama": ["q_proj", "v_proj", "down_proj"], "hf:gpt2": ["c_attn", "mlp.c_proj"]}


def assert_close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    tol = 1e-6 * (1.0 + reference.abs().max().item())
    err = (ours - reference).abs().max().item()
    assert err <= tol, f"max difference {err:.3g} > {tol:.3g}"


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Factors ~ N(0, 0.1²), magnitudes ~ m · U(0.5, 1.5): every part of DoRA matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif ".lora_magnitude_vector." in name:
                p.mul_(torch.rand(p.shape, generator=gen) + 0.5)


def logits(model: nn.Module, spec, train: bool = False) -> torch.Tensor:
    model.train(train)
    with torch.no_grad():
        return model(*spec.example_inputs).logits


def ours(spec_name: str, seed: int = 0, **lora) -> tuple[nn.Module, nn.Module, object]:
    spec = load_model(spec_name)
    lora = {"rank": 4, "alpha": 8, "use_dora": True, **lora}
    model = apply_passes(spec.model, [LoRAPass(pattern=CASES[spec_name], **lora)])
    randomize(model, seed)
    return spec.model, model, spec


def peft_twin(spec_name: str, model: nn.Module, **lora) -> nn.Module:
    """PEFT's DoRA model on a fresh copy of the zoo model, with ``model``'s adapter values
    copied by name (PEFT's keys less ``base_model.model.`` and ``.base_layer``)."""
    cfg = {"r": 4, "lora_alpha": 8, "use_dora": True, **lora}
    ref = peft.get_peft_model(load_model(spec_name).model, peft.LoraConfig(
        target_modules=CASES[spec_name], fan_in_fan_out=spec_name == "hf:gpt2", **cfg))
    mine = model.state_dict()
    ref.load_state_dict({k: mine[k.removeprefix("base_model.model.").replace(".base_layer", "")]
                         for k in ref.state_dict()})
    return ref


@pytest.mark.parametrize("spec_name", CASES)
def test_magnitude_is_peft_s_parameter_and_starts_at_the_weight_norm(spec_name: str) -> None:
    spec = load_model(spec_name)
    model = apply_passes(spec.model, [LoRAPass(pattern=CASES[spec_name], use_dora=True)])
    mags = {n: p for n, p in model.named_parameters() if "lora_magnitude_vector" in n}
    assert mags, "no magnitude vector"
    ref = peft.get_peft_model(load_model(spec_name).model, peft.LoraConfig(
        r=8, lora_alpha=8, target_modules=CASES[spec_name], use_dora=True,
        fan_in_fan_out=spec_name == "hf:gpt2"))
    peft_mags = {k.removeprefix("base_model.model."): v for k, v in ref.state_dict().items()
                 if "lora_magnitude_vector" in k}
    assert sorted(mags) == sorted(peft_mags)
    for name, mag in mags.items():
        qname = name.removesuffix(".lora_magnitude_vector.default.weight")
        weight = spec.model.get_submodule(qname).weight
        w = weight.T if spec_name == "hf:gpt2" else weight  # Conv1D stores (in, out)
        assert mag.shape == (w.shape[0],)
        assert torch.equal(mag, torch.linalg.norm(w, dim=1))
        assert torch.equal(mag, peft_mags[name])
        assert mag.requires_grad


@pytest.mark.parametrize("spec_name", CASES)
def test_identity_at_init_to_rounding(spec_name: str) -> None:
    spec = load_model(spec_name)
    model = apply_passes(spec.model, [LoRAPass(pattern=CASES[spec_name], use_dora=True)])
    assert_close(logits(model, spec), logits(spec.model, spec))


@pytest.mark.parametrize("spec_name", CASES)
@pytest.mark.parametrize("train", [False, True])
def test_outputs_equal_peft_s(spec_name: str, train: bool) -> None:
    base, model, spec = ours(spec_name)
    ref = peft_twin(spec_name, model)
    got, want = logits(model, spec, train), logits(ref, spec, train)
    assert (want - logits(base, spec)).abs().max() > 1e-3  # the adapter does something
    assert_close(got, want)


@pytest.mark.parametrize("spec_name", CASES)
def test_dropout_in_training_equals_peft_s(spec_name: str) -> None:
    # with dropout active PEFT computes W · dropout(x) for the rescaled base term
    _, model, spec = ours(spec_name, dropout=0.3)
    ref = peft_twin(spec_name, model, lora_dropout=0.3)
    torch.manual_seed(5)
    got = logits(model, spec, train=True)
    torch.manual_seed(5)
    want = logits(ref, spec, train=True)
    assert_close(got, want)


@pytest.mark.parametrize("spec_name", CASES)
def test_gradients_reach_exactly_the_factors_and_the_magnitude(spec_name: str) -> None:
    _, model, spec = ours(spec_name)
    ref = peft_twin(spec_name, model)
    grads = {}
    for m in (model, ref):
        m.train()
        m.zero_grad()
        m(*spec.example_inputs).logits.pow(2).mean().backward()
        grads[m is model] = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p.grad
                             for n, p in m.named_parameters() if p.grad is not None}
    mine, theirs = grads[True], grads[False]
    kinds = {n.split(".")[-3] for n in mine}
    assert kinds == {"lora_A", "lora_B", "lora_magnitude_vector"}
    assert sorted(mine) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert sorted(mine) == sorted(theirs)
    for name in mine:
        assert_close(mine[name], theirs[name])
    assert {id(p) for p in trainable_parameters(model)} == {
        id(p) for n, p in model.named_parameters() if n in mine}


def test_graph_marks_the_dora_path() -> None:
    _, model, _ = ours("hf:llama")
    sg = model.model.layers[0].self_attn.q_proj
    parts = [n.meta["surgery"]["part"] for n in sg.graph.nodes if "surgery" in n.meta]
    assert parts[-2:] == ["dora_scale", "add"]
    assert parts.count("dora_weight") == 3  # weight, lora_A, lora_B (no bias on LLaMA)
    assert {"lora_dropout", "lora_A", "lora_B"} <= set(parts)
    assert isinstance(sg.lora_magnitude_vector.default, DoRAMagnitude)


@pytest.mark.parametrize("spec_name", CASES)
def test_merge_then_unmerge(spec_name: str) -> None:
    base, model, spec = ours(spec_name)
    before = logits(model, spec)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    merged = apply_passes(model, [MergeLoRAPass()])
    assert_close(logits(merged, spec), before)
    assert not any(p.requires_grad for n, p in merged.named_parameters()
                   if "lora_magnitude_vector" in n)
    back = apply_passes(merged, [UnmergeLoRAPass()])
    assert torch.equal(logits(back, spec), before)
    for n, p in back.named_parameters():
        assert torch.equal(p, weights[n]), n
        assert p.requires_grad == model.get_parameter(n).requires_grad, n


def test_merge_weight_is_magnitude_times_direction() -> None:
    base, model, _ = ours("hf:gpt2")
    sg = model.transformer.h[0].attn.c_attn
    w = sg.weight.detach().T  # Conv1D: (in, out) stored
    a, b = sg.lora_A.default.weight.detach(), sg.lora_B.default.weight.detach()
    m = sg.lora_magnitude_vector.default.weight.detach()
    adapted = w + sg.lora_B.default.scaling * b @ a
    want = (m / torch.linalg.norm(adapted, dim=1)).view(-1, 1) * adapted
    merged = apply_passes(model, [MergeLoRAPass()])
    assert_close(merged.transformer.h[0].attn.c_attn.weight.detach().T, want)


def test_a_plain_lora_beside_dora_merges_only_after_it() -> None:
    spec = load_model("hf:llama")
    model = apply_passes(spec.model, [LoRAPass(pattern="q_proj", use_dora=True, name="d"),
                                      LoRAPass(pattern="q_proj", name="p")])
    randomize(model)
    before = logits(model, spec)
    with pytest.raises(MergeError, match=r"the DoRA branch of LoRA 'd' reads the layer's "
                                         r"weight.*Way out: merge LoRA 'd' first"):
        apply_passes(model, [MergeLoRAPass(names=["p"])])
    both = apply_passes(model, [MergeLoRAPass(names=["p", "d"])])
    assert_close(logits(both, spec), before)
    only_dora = apply_passes(model, [MergeLoRAPass(names=["d"])])
    assert_close(logits(only_dora, spec), before)


def test_save_and_load_are_bitwise(tmp_path) -> None:
    base, model, spec = ours("hf:gpt2")
    save_adapters(model, tmp_path / "ck")
    loaded = load_adapters(base, tmp_path / "ck")
    mine = model.state_dict()
    theirs = loaded.state_dict()
    assert sorted(mine) == sorted(theirs)
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k
    assert torch.equal(logits(loaded, spec), logits(model, spec))


def test_audit_counts_the_magnitude() -> None:
    base, model, _ = ours("hf:llama")
    report = audit(model)
    mags = sum(p.numel() for n, p in model.named_parameters() if "lora_magnitude_vector" in n)
    factors = sum(p.numel() for n, p in model.named_parameters()
                  if ".lora_A." in n or ".lora_B." in n)
    assert mags > 0
    assert report.totals.trainable == mags + factors
    (summary,) = report.adapters
    assert (summary.pass_name, summary.name) == ("lora", "default")
    assert summary.params == summary.trainable_params == mags + factors
    assert set(summary.ranks) == {4}


def test_combine_refuses_dora() -> None:
    _, model, _ = ours("hf:llama")
    with pytest.raises(ConfigError, match="DoRA adapter"):
        combine_adapters(model, {"default": 1.0})


def test_refuses_embeddings() -> None:
    spec = load_model("hf:llama")
    with pytest.raises(UnsupportedSiteError, match=r"use_dora.*embed_tokens.*Embedding"):
        apply_passes(spec.model, [LoRAPass(pattern=["q_proj", "embed_tokens"], use_dora=True)])
    with pytest.raises(ConfigError, match="use_dora must be True or False"):
        LoRAPass(use_dora=1)


def test_config_round_trips() -> None:
    p = LoRAPass(pattern="q_proj", use_dora=True)
    assert p.config()["use_dora"] is True
    assert LoRAPass.from_config(p.config()) == p


def test_switched_off_and_unloaded_give_the_base_outputs_exactly() -> None:
    base, model, spec = ours("hf:gpt2")
    want = logits(base, spec)
    assert torch.equal(logits(set_active(model, []), spec), want)
    plain = unload(model)
    assert type(plain.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert torch.equal(logits(plain, spec), want)


def test_two_dora_adapters_on_one_layer_are_not_merged() -> None:
    spec = load_model("hf:llama")
    model = apply_passes(spec.model, [LoRAPass(pattern="q_proj", use_dora=True, name="a"),
                                      LoRAPass(pattern="q_proj", use_dora=True, name="b")])
    with pytest.raises(MergeError, match=r"LoRA 'a' .*it and LoRA 'b' are both DoRA.*keep "
                                         r"them unmerged"):
        apply_passes(model, [MergeLoRAPass()])
