"""LoRA on ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (``passes/lora_layers.py`` through
``passes/lora.py``), against PEFT 0.21's ``lora.Conv1d/2d/3d`` on the same weights.

The model (:class:`layer_cases.Convs`) has a Conv1d, a Conv2d with ``groups=2`` and
``stride=2``, a 1×1 Conv2d and a Conv3d. Outputs equal PEFT's bit for bit (the same
convolutions in the same order); merged outputs agree to ``1e-6 · (1 + max|y|)``.
"""

from __future__ import annotations

import pytest
import torch
from layer_cases import (
    Convs,
    assert_close,
    build,
    conv_inputs,
    copy_into_peft,
    peft_twin,
    randomize,
)
from torch import nn

from passes.lora_conv import LoRAConvFactor
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
from surgery.adapters.merge_math import conv_lora_delta

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:LoRA adapter added to ConvNd layer with groups")

ALL = ["c1", "c2", "p", "c3"]
FOLDABLE = ["c1", "p", "c3"]  # c2 has groups=2


def adapted(targets: list[str], *, seed: int = 0, **lora) -> tuple[nn.Module, nn.Module]:
    """``(base, adapted)`` with random LoRA factors on ``targets``."""
    base = build(Convs)
    lora.setdefault("rank", 4)
    lora.setdefault("alpha", 8)
    model = apply_passes(base, [LoRAPass(pattern=targets, **lora)])
    randomize(model, seed)
    return base, model


def test_parameter_names_and_shapes_are_peft_s() -> None:
    base, model = adapted(ALL)
    twin = peft_twin(base, peft.LoraConfig(target_modules=ALL, r=4, lora_alpha=8))
    peft_keys = {k.removeprefix("base_model.model.").replace(".base_layer.", "."): tuple(v.shape)
                 for k, v in twin.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == peft_keys
    assert ours["c2.lora_A.default.weight"] == (4, 4, 3, 3)  # A reads every input channel
    assert ours["c2.lora_B.default.weight"] == (6, 2, 1, 1)  # B is grouped: rank / groups
    assert ours["c3.lora_A.default.weight"] == (4, 2, 1, 3, 3)
    assert ours["c1.lora_B.default.weight"] == (6, 4, 1)


def test_identity_at_init_is_bitwise() -> None:
    base = build(Convs)
    model = apply_passes(base, [LoRAPass(pattern=ALL, rank=4)])
    x = conv_inputs()
    assert torch.equal(model(*x), base(*x))
    assert all(torch.count_nonzero(m.weight) == 0 for m in model.modules()
               if isinstance(m, LoRAConvFactor) and m.factor == "B")


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_outputs_equal_peft_bitwise(mode: str, use_rslora: bool) -> None:
    base, model = adapted(ALL, use_rslora=use_rslora)
    twin = peft_twin(base, peft.LoraConfig(target_modules=ALL, r=4, lora_alpha=8,
                                           use_rslora=use_rslora))
    copy_into_peft(model, twin)
    model.train(mode == "train")
    twin.train(mode == "train")
    x = conv_inputs()
    ours, theirs = model(*x), twin(*x)
    assert torch.equal(ours, theirs)
    assert (ours - base(*x)).abs().max() > 1e-3  # the adapter counts


def test_gradients_equal_peft_s() -> None:
    base, model = adapted(ALL)
    twin = peft_twin(base, peft.LoraConfig(target_modules=ALL, r=4, lora_alpha=8))
    copy_into_peft(model, twin)
    x = conv_inputs()
    model(*x).square().sum().backward()
    twin(*x).square().sum().backward()
    theirs = {k.removeprefix("base_model.model."): p.grad for k, p in twin.named_parameters()
              if p.requires_grad}
    ours = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    assert set(ours) == set(theirs) and len(ours) == 8
    for key, grad in ours.items():
        assert grad is not None and grad.abs().max() > 0, key
        assert_close(grad, theirs[key])


@pytest.mark.parametrize("site", FOLDABLE)
def test_merged_weight_is_peft_s_delta(site: str) -> None:
    """``W + scaling · B ∘ A`` against PEFT's ``get_delta_weight`` (the 1×1 case included)."""
    base, model = adapted([site])
    twin = peft_twin(base, peft.LoraConfig(target_modules=[site], r=4, lora_alpha=8))
    copy_into_peft(model, twin)
    merged = apply_passes(model, [MergeLoRAPass()])
    layer = twin.base_model.model.get_submodule(site)
    expected = layer.base_layer.weight + layer.get_delta_weight("default")
    assert_close(merged.get_submodule(site).weight, expected)


def test_merge_outputs_and_unmerge_restores_bitwise() -> None:
    base, model = adapted(FOLDABLE)
    x = conv_inputs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = model(*x)
    merged = apply_passes(model, [MergeLoRAPass()])
    assert_close(merged(*x), reference)
    for site in FOLDABLE:
        assert not torch.equal(merged.get_submodule(site).weight, base.get_submodule(site).weight)
    back = apply_passes(merged, [UnmergeLoRAPass()])
    for key, value in back.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(back(*x), reference)


def test_bf16_merge_is_one_cast_of_the_fp32_sum() -> None:
    base = build(Convs).to(torch.bfloat16)
    model = apply_passes(base, [LoRAPass(pattern=["c1"], rank=4, alpha=8)])
    randomize(model)
    merged = apply_passes(model, [MergeLoRAPass()])
    a, b = model.c1.lora_A.default.weight, model.c1.lora_B.default.weight
    delta = conv_lora_delta(a.detach().float(), b.detach().float(), 2.0)
    assert torch.equal(merged.c1.weight, (base.c1.weight.float() + delta).to(torch.bfloat16))
    back = apply_passes(merged, [UnmergeLoRAPass()])
    assert torch.equal(back.c1.weight, base.c1.weight)


def test_grouped_convolution_refuses_to_merge(snapshot) -> None:
    _, model = adapted(["c2"])
    before = snapshot(model)
    with pytest.raises(MergeError, match=r"MergeLoRAPass: LoRA 'default' at c2 \(Conv2d, "
                                         r"groups=2\) cannot be merged: its lora_A reads every "
                                         r"input channel"):
        apply_passes(model, [MergeLoRAPass()])
    with pytest.raises(MergeError, match=r"unload: LoRA 'default' at c2 \(Conv2d, groups=2\)"):
        unload(model)
    before.assert_unchanged(model)


@pytest.mark.parametrize("layer", [
    nn.Conv2d(3, 5, 3, padding=2, dilation=2),
    nn.Conv1d(3, 5, 3, padding=1, padding_mode="reflect"),
    nn.Conv2d(3, 5, 3, padding="same", padding_mode="circular"),
], ids=["dilation", "reflect", "same_circular"])
def test_lora_a_follows_the_layer_so_merging_is_exact(layer: nn.Module) -> None:
    """Dilation and padding modes (which PEFT's ``lora_A`` ignores) are the layer's."""
    torch.manual_seed(0)
    model = apply_passes(nn.Sequential(layer), [LoRAPass(pattern=["0"], rank=2)])
    randomize(model)
    x = torch.randn(2, 3, *(7,) * (layer.weight.dim() - 2))
    reference = model(x)
    assert reference.shape == layer(x).shape
    assert_close(apply_passes(model, [MergeLoRAPass()])(x), reference)


def test_rank_must_be_a_multiple_of_groups(snapshot) -> None:
    base = build(Convs)
    before = snapshot(base)
    with pytest.raises(ConfigError, match=r"LoRAPass: c2 \(Conv2d, groups=2\) needs a rank that "
                                          r"groups divides .* got rank 3. Way out: "
                                          r"rank_for=\{'c2': 2\}"):
        apply_passes(base, [LoRAPass(pattern=["c1", "c2"], rank=3)])
    before.assert_unchanged(base)
    apply_passes(base, [LoRAPass(pattern=["c1", "c2"], rank=3, rank_for={"c2": 2})])


def test_audit_counts_and_ranks() -> None:
    _, model = adapted(ALL, rank_for={"c3": 2})
    report = audit(model)
    (lora,) = report.adapters
    # A: rank · in · kernel; B: out · rank / groups
    expected = {"c1": 4 * 4 * 3 + 6 * 4, "c2": 4 * 4 * 9 + 6 * 2, "p": 4 * 6 + 8 * 4,
                "c3": 2 * 2 * 9 + 4 * 2}
    assert lora.params == lora.trainable_params == sum(expected.values())
    assert lora.sites == tuple(ALL) and lora.ranks == (4, 4, 4, 2)
    assert sum(p.numel() for p in trainable_parameters(model)) == sum(expected.values())


def test_save_and_load_round_trip_bitwise(tmp_path, snapshot) -> None:
    base, model = adapted(ALL, dropout=0.1)
    save_adapters(model, tmp_path)
    before = snapshot(base)
    loaded = load_adapters(base, tmp_path)
    before.assert_unchanged(base)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = conv_inputs()
    assert torch.equal(loaded(*x), model(*x))


def test_switched_off_is_bitwise_the_base() -> None:
    base, model = adapted(ALL, name="a")
    x = conv_inputs()
    assert torch.equal(set_active(model, [])(*x), base(*x))


def test_dropout_draws_like_peft_in_training() -> None:
    base, model = adapted(["c1", "c3"], dropout=0.5)
    twin = peft_twin(base, peft.LoraConfig(target_modules=["c1", "c3"], r=4, lora_alpha=8,
                                           lora_dropout=0.5))
    copy_into_peft(model, twin)
    model.train()
    twin.train()
    x = conv_inputs()
    torch.manual_seed(3)
    ours = model(*x)
    torch.manual_seed(3)
    assert torch.equal(ours, twin(*x))


def test_combine_cat_is_the_sum_of_the_updates() -> None:
    base = build(Convs)
    model = apply_passes(base, [LoRAPass(pattern=FOLDABLE, rank=2, name="a"),
                                LoRAPass(pattern=FOLDABLE, rank=3, alpha=6, name="b")])
    randomize(model)
    x = conv_inputs()
    both = model(*x)
    mixed = combine_adapters(model, {"a": 1.0, "b": 1.0}, method="cat", name="ab")
    assert mixed.c1.lora_A.ab.weight.shape == (5, 4, 3)
    assert_close(mixed(*x), both)


def test_combine_refuses_a_grouped_convolution() -> None:
    _, model = adapted(ALL, name="a")
    with pytest.raises(ConfigError, match=r"combine_adapters: c2 \(Conv2d, groups=2\) carries "
                                          r"LoRA 'a', whose lora_B is a grouped convolution"):
        combine_adapters(model, {"a": 0.5})


def test_unload_gives_the_plain_model_with_merged_weights() -> None:
    _, model = adapted(FOLDABLE)
    x = conv_inputs()
    plain = unload(model)
    assert type(plain.c1) is nn.Conv1d and type(plain.c3) is nn.Conv3d
    fresh = Convs()
    fresh.load_state_dict(plain.state_dict(), strict=True)
    assert_close(fresh.eval()(*x), model(*x))


def test_transposed_convolution_is_not_a_lora_site() -> None:
    with pytest.raises(UnsupportedSiteError, match=r"ConvTranspose2d; LoRAPass adapts nn.Linear "
                                                   r"/ Conv1D / nn.Conv1d/2d/3d / nn.Embedding"):
        apply_passes(nn.Sequential(nn.ConvTranspose2d(2, 2, 3)), [LoRAPass(pattern=["0"])])
