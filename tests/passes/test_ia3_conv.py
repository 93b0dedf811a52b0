"""IA³ on ``nn.Conv2d`` / ``nn.Conv3d`` (``passes/ia3.py``, ``IA3Vector`` in
``passes/modules.py``), against PEFT 0.21's ``ia3.Conv2d/3d`` on the same weights.

The vector is the parameter ``<layer>.ia3_l.<adapter>`` of shape ``(1, C, 1, 1)`` /
``(1, C, 1, 1, 1)``, as PEFT's, ``C`` the output channels (output scaling) or the input
channels (a feed-forward layer's input scaling); it scales the channel dimension. State
dicts load across both ways; outputs equal PEFT's bit for bit; merged outputs and weights
agree to ``1e-6 · (1 + max|y|)``, groups included.
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

from surgery import (
    IA3Pass,
    LoRAPass,
    MergeIA3Pass,
    MergeLoRAPass,
    UnmergeIA3Pass,
    UnmergeLoRAPass,
    UnsupportedSiteError,
    apply_passes,
    audit,
    load_adapters,
    save_adapters,
)

peft = pytest.importorskip("peft")

SITES = ["c2", "p", "c3"]
FEEDFORWARD = {"none": [], "grouped": ["c2", "c3"], "one_by_one": ["p"]}


def adapted(feedforward: list[str], seed: int = 0) -> tuple[nn.Module, nn.Module]:
    base = build(Convs)
    model = apply_passes(base, [IA3Pass(pattern=SITES, feedforward=feedforward)])
    randomize(model, seed)
    return base, model


def twin_of(base: nn.Module, model: nn.Module, feedforward: list[str]) -> nn.Module:
    twin = peft_twin(base, peft.IA3Config(target_modules=SITES, feedforward_modules=feedforward))
    copy_into_peft(model, twin)
    return twin


@pytest.mark.parametrize("ff", FEEDFORWARD)
def test_vectors_scale_channels_and_start_at_one(ff: str) -> None:
    base = build(Convs)
    model = apply_passes(base, [IA3Pass(pattern=SITES, feedforward=FEEDFORWARD[ff])])
    x = conv_inputs()
    assert torch.equal(model(*x), base(*x))
    for site in SITES:
        layer = base.get_submodule(site)
        vec = model.get_submodule(f"{site}.ia3.default")
        param = model.get_parameter(f"{site}.ia3_l.default")
        width = layer.in_channels if site in FEEDFORWARD[ff] else layer.out_channels
        shape = (1, width) + (1,) * (layer.weight.dim() - 2)
        assert param.shape == shape and vec.mode == ("input" if site in FEEDFORWARD[ff]
                                                     else "output")
        assert torch.equal(param, torch.ones(shape))


def _ours(peft_key: str) -> str:
    """Our name of a PEFT model's key: ``base_model.model.`` and ``.base_layer`` taken out,
    nothing else."""
    return peft_key.removeprefix("base_model.model.").replace(".base_layer.", ".")


@pytest.mark.parametrize("ff", FEEDFORWARD)
def test_peft_state_dict_loads_strictly_both_ways(ff: str) -> None:
    base = build(Convs)
    twin = peft_twin(base, peft.IA3Config(target_modules=SITES, feedforward_modules=FEEDFORWARD[ff]))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in twin.named_parameters():
            if ".ia3_l." in name:
                param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
    model = apply_passes(base, [IA3Pass(pattern=SITES, feedforward=FEEDFORWARD[ff])])
    theirs = {_ours(k): v for k, v in twin.state_dict().items()}
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        {k: v.shape for k, v in theirs.items()}
    model.load_state_dict(theirs, strict=True)
    x = conv_inputs()
    assert torch.equal(model(*x), twin(*x))
    assert (model(*x) - base(*x)).abs().max() > 1e-3
    other = peft_twin(base, peft.IA3Config(target_modules=SITES, feedforward_modules=FEEDFORWARD[ff]))
    ours = model.state_dict()
    other.load_state_dict({k: ours[_ours(k)] for k in other.state_dict()}, strict=True)
    assert torch.equal(other(*x), model(*x))


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("ff", FEEDFORWARD)
def test_outputs_equal_peft_bitwise(ff: str, mode: str) -> None:
    base, model = adapted(FEEDFORWARD[ff])
    twin = twin_of(base, model, FEEDFORWARD[ff])
    model.train(mode == "train")
    twin.train(mode == "train")
    x = conv_inputs()
    assert torch.equal(model(*x), twin(*x))
    assert (model(*x) - base(*x)).abs().max() > 1e-3


@pytest.mark.parametrize("ff", FEEDFORWARD)
def test_merge_matches_peft_and_unmerge_restores_bitwise(ff: str) -> None:
    base, model = adapted(FEEDFORWARD[ff])
    twin = twin_of(base, model, FEEDFORWARD[ff])
    x = conv_inputs()
    reference = model(*x)
    merged = apply_passes(model, [MergeIA3Pass()])
    assert_close(merged(*x), reference)
    peft_merged = twin.merge_and_unload()
    for site in SITES:
        assert_close(merged.get_submodule(site).weight, peft_merged.get_submodule(site).weight)
        assert_close(merged.get_submodule(site).bias, peft_merged.get_submodule(site).bias)
    back = apply_passes(merged, [UnmergeIA3Pass()])
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert torch.equal(back(*x), reference)


def test_lora_and_ia3_on_one_convolution_merge_together() -> None:
    """IA³ scales the layer as LoRA adapted it: ``(W ∘ x + s · B ∘ A ∘ x) · l``."""
    base = build(Convs)
    model = apply_passes(base, [LoRAPass(pattern=["c3", "p"], rank=2),
                                IA3Pass(pattern=["c3", "p"], feedforward=["p"])])
    randomize(model)
    with torch.no_grad():
        for name in ("c3", "p"):
            model.get_submodule(name).lora_B.default.weight.normal_(0, 0.1)
    x = conv_inputs()
    reference = model(*x)
    merged = apply_passes(model, [MergeLoRAPass(), MergeIA3Pass()])
    assert_close(merged(*x), reference)
    back = apply_passes(merged, [UnmergeIA3Pass(), UnmergeLoRAPass()])
    assert torch.equal(back.c3.weight, base.c3.weight) and torch.equal(back.p.weight, base.p.weight)


def test_conv1d_is_not_an_ia3_site() -> None:
    with pytest.raises(UnsupportedSiteError, match=r"selects c1, a Conv1d; IA3Pass adapts "
                                                   r"nn.Linear / Conv1D / nn.Conv2d / nn.Conv3d"):
        apply_passes(build(Convs), [IA3Pass(pattern=["c1"], feedforward=[])])


def test_audit_and_save_load_round_trip(tmp_path, snapshot) -> None:
    base, model = adapted(FEEDFORWARD["grouped"])
    (ia3,) = audit(model).adapters
    assert ia3.params == ia3.trainable_params == 4 + 8 + 2  # c2, c3: in; p: out
    save_adapters(model, tmp_path)
    before = snapshot(base)
    loaded = load_adapters(base, tmp_path)
    before.assert_unchanged(base)
    x = conv_inputs()
    assert torch.equal(loaded(*x), model(*x))
