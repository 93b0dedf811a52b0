"""DoRA on ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (``passes/dora.py``,
``passes/dora_conv.py``) against PEFT 0.21's ``DoraConv1d/2d/3dLayer`` on the same weights.

The model is :class:`layer_cases.Convs` (a Conv1d, a Conv2d with ``groups=2`` and
``stride=2``, a 1×1 Conv2d, a Conv3d). Without groups, outputs and gradients equal PEFT's
bit for bit (the same norm, ``W x`` taken off the layer's result less its bias, the same
products in the same order). Tolerance, wherever outputs are compared and not said to be
equal: ``1e-6 · (1 + max|y|)`` (float32). The grouped convolution is checked against the
dense layer DoRA describes (PEFT's grouped norm is not that layer's, see
``passes/dora_conv.py``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from layer_cases import Convs, assert_close, build, conv_inputs, copy_into_peft, peft_twin
from layer_cases import randomize as randomize_factors
from torch import nn

from passes.dora import DoRAMagnitude
from surgery import (
    LoRAPass,
    MergeError,
    MergeLoRAPass,
    UnmergeLoRAPass,
    UnsupportedSiteError,
    apply_passes,
    audit,
    load_adapters,
    save_adapters,
    set_active,
    trainable_parameters,
)

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:LoRA adapter added to ConvNd layer with groups")

ALL = ["c1", "c2", "p", "c3"]
UNGROUPED = ["c1", "p", "c3"]
OUT = {"c1": (1, 6, 1), "c2": (1, 6, 1, 1), "p": (1, 8, 1, 1), "c3": (1, 4, 1, 1, 1)}


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Factors ~ N(0, 0.1²) and magnitudes scaled by U(0.5, 1.5): every part of DoRA counts."""
    randomize_factors(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, DoRAMagnitude):
                mod.weight.mul_(torch.rand(mod.weight.shape, generator=gen) + 0.5)


def adapted(targets: list[str], **lora) -> tuple[nn.Module, nn.Module]:
    base = build(Convs)
    lora = {"rank": 4, "alpha": 8, "use_dora": True, **lora}
    model = apply_passes(base, [LoRAPass(pattern=targets, **lora)])
    randomize(model)
    return base, model


def twin_of(base: nn.Module, model: nn.Module, targets: list[str], **lora) -> nn.Module:
    twin = peft_twin(base, peft.LoraConfig(target_modules=targets, r=4, lora_alpha=8,
                                           use_dora=True, **lora))
    copy_into_peft(model, twin)
    return twin


def test_magnitude_has_peft_s_name_shape_and_initial_value() -> None:
    base = build(Convs)
    model = apply_passes(base, [LoRAPass(pattern=ALL, rank=4, use_dora=True)])
    twin = peft_twin(base, peft.LoraConfig(target_modules=ALL, r=4, lora_alpha=8,
                                           use_dora=True))
    theirs = {k.removeprefix("base_model.model."): v for k, v in twin.state_dict().items()
              if "lora_magnitude_vector" in k}
    mine = {n: p for n, p in model.named_parameters() if "lora_magnitude_vector" in n}
    assert sorted(mine) == sorted(theirs) == sorted(
        f"{s}.lora_magnitude_vector.default.weight" for s in ALL)
    for site in ALL:
        mag = mine[f"{site}.lora_magnitude_vector.default.weight"]
        assert tuple(mag.shape) == OUT[site]
        assert torch.equal(mag, theirs[f"{site}.lora_magnitude_vector.default.weight"])
        weight = base.get_submodule(site).weight
        assert torch.equal(mag.flatten(), weight.flatten(1).norm(dim=1))
        assert mag.requires_grad


def test_identity_at_init() -> None:
    base = build(Convs)
    model = apply_passes(base, [LoRAPass(pattern=ALL, rank=4, use_dora=True)])
    x = conv_inputs()
    ungrouped = apply_passes(base, [LoRAPass(pattern=UNGROUPED, rank=4, use_dora=True)])
    # m and the norm are the same sum: m / ‖W‖ is exactly one and B zero
    assert torch.equal(ungrouped(*x), base(*x))
    assert_close(model(*x), base(*x))


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_outputs_equal_peft_s(train: bool, use_rslora: bool) -> None:
    base, model = adapted(UNGROUPED, use_rslora=use_rslora)
    twin = twin_of(base, model, UNGROUPED, use_rslora=use_rslora)
    model.train(train)
    twin.train(train)
    x = conv_inputs()
    with torch.no_grad():
        ours, theirs = model(*x), twin(*x)
    assert (theirs - base(*x)).abs().max() > 1e-2  # the adapter counts
    assert torch.equal(ours, theirs)


def test_with_dropout_in_training_w_x_is_computed_from_the_dropped_input() -> None:
    base, model = adapted(UNGROUPED, dropout=0.5)
    twin = twin_of(base, model, UNGROUPED, lora_dropout=0.5)
    x = conv_inputs()
    model.train()
    twin.train()
    torch.manual_seed(3)
    with torch.no_grad():
        ours = model(*x)
    torch.manual_seed(3)
    with torch.no_grad():
        theirs = twin(*x)
    assert (ours - model.eval()(*x)).abs().max() > 1e-2  # dropout drew
    assert_close(ours, theirs)


def test_gradients_equal_peft_s() -> None:
    base, model = adapted(UNGROUPED)
    twin = twin_of(base, model, UNGROUPED)
    x = conv_inputs()
    model(*x).square().sum().backward()
    twin(*x).square().sum().backward()
    theirs = {k.removeprefix("base_model.model."): p for k, p in twin.named_parameters()
              if p.requires_grad}
    mine = dict(model.named_parameters())
    assert sorted(n for n, p in mine.items() if p.requires_grad) == sorted(theirs)
    for name, p in theirs.items():
        assert mine[name].grad is not None and p.grad.abs().max() > 0, name
        assert torch.equal(mine[name].grad, p.grad), name
    assert all(p.grad is None for n, p in mine.items() if not p.requires_grad)


def _dense_reference(conv: nn.Conv2d, site: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """DoRA on a grouped convolution as the dense layer it becomes: ``V`` holds ``W`` in its
    diagonal blocks plus ``s · B_bd A``; ``y = conv(x, m / ‖V‖ · V) + b``."""
    g, out = conv.groups, conv.out_channels
    per_in = conv.in_channels // g
    dense = torch.zeros(out, conv.in_channels, *conv.kernel_size)
    for k in range(g):
        rows, cols = slice(k * out // g, (k + 1) * out // g), slice(k * per_in, (k + 1) * per_in)
        dense[rows, cols] = conv.weight[rows]
    a, b = site.lora_A.default.weight, site.lora_B.default.weight
    b_dense = torch.block_diag(*b.flatten(1).chunk(g))
    v = dense + 2.0 * (b_dense @ a.flatten(1)).view_as(dense)
    m = site.lora_magnitude_vector.default.weight.flatten()
    w = (m / v.flatten(1).norm(dim=1)).view(-1, 1, 1, 1) * v
    return F.conv2d(x, w, conv.bias, conv.stride, conv.padding)


def test_a_later_adapter_on_the_layer_does_not_enter_dora_s_w_x() -> None:
    """DoRA reads ``W x`` off the layer's own result: a plain LoRA adapter put on the same
    layer afterwards adds its update beside DoRA's, not inside ``(m / ‖V‖ - 1) · W x``."""
    base, model = adapted(["c1"])
    model = apply_passes(model, [LoRAPass(pattern="c1", rank=2, alpha=2, name="other")])
    randomize_factors(model, seed=5)
    randomize(model, seed=6)
    x = conv_inputs()[0]
    with torch.no_grad():
        both = model.c1(x)
        dora_only = set_active(model, ["default"]).c1(x)
        other_only = set_active(model, ["other"]).c1(x)
        plain = base.c1(x)
    assert (other_only - plain).abs().max() > 1e-2 and (dora_only - plain).abs().max() > 1e-2
    assert_close(both, dora_only + (other_only - plain))


def test_grouped_convolution_is_the_dense_dora_layer() -> None:
    base, model = adapted(["c2"])
    x = conv_inputs()[1]
    with torch.no_grad():
        got = model.c2(x)
        want = _dense_reference(base.c2, model.c2, x)
    assert (want - base.c2(x)).abs().max() > 1e-2
    assert_close(got, want)


def test_stride_and_unbatched_input() -> None:
    base, model = adapted(["c1", "c3"])
    x1, _, x3 = conv_inputs()
    with torch.no_grad():
        assert_close(model.c1(x1[0]), model.c1(x1)[0])
        assert_close(model.c3(x3[1]), model.c3(x3)[1])


def test_merge_weight_is_magnitude_times_direction_and_unmerge_is_exact() -> None:
    base, model = adapted(UNGROUPED)
    x = conv_inputs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = model(*x)
    merged = apply_passes(model, [MergeLoRAPass()])
    for site in UNGROUPED:
        sg = model.get_submodule(site)
        w = base.get_submodule(site).weight
        a, b = sg.lora_A.default.weight, sg.lora_B.default.weight
        v = w + 2.0 * (b.flatten(1) @ a.flatten(1)).view_as(w)
        m = sg.lora_magnitude_vector.default.weight.flatten()
        expected = (m / v.flatten(1).norm(dim=1)).view(-1, *(1,) * (w.dim() - 1)) * v
        assert_close(merged.get_submodule(site).weight, expected)
    assert_close(merged(*x), reference)
    back = apply_passes(merged, [UnmergeLoRAPass()])
    for key, value in back.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(back(*x), reference)


def test_grouped_convolution_refuses_to_merge() -> None:
    _, model = adapted(["c2"])
    with pytest.raises(MergeError, match=r"DoRA 'default' at c2 \(Conv2d, groups=2\) cannot "
                                         r"be merged"):
        apply_passes(model, [MergeLoRAPass()])


def test_audit_counts_the_magnitude() -> None:
    _, model = adapted(ALL)
    (lora,) = audit(model).adapters
    factors = {"c1": 4 * 4 * 3 + 6 * 4, "c2": 4 * 4 * 9 + 6 * 2, "p": 4 * 6 + 8 * 4,
               "c3": 4 * 2 * 9 + 4 * 4}
    magnitudes = {"c1": 6, "c2": 6, "p": 8, "c3": 4}
    total = sum(factors.values()) + sum(magnitudes.values())
    assert lora.params == lora.trainable_params == total
    assert lora.ranks == (4, 4, 4, 4)
    assert sum(p.numel() for p in trainable_parameters(model)) == total


def test_save_load_and_switch_off_are_bitwise(tmp_path) -> None:
    base, model = adapted(ALL)
    x = conv_inputs()
    save_adapters(model, tmp_path)
    loaded = load_adapters(base, tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert torch.equal(loaded(*x), model(*x))
    assert torch.equal(set_active(model, [])(*x), base(*x))


def test_embeddings_are_still_refused() -> None:
    class Emb(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.emb(ids)

    with pytest.raises(UnsupportedSiteError, match=r"emb is a Embedding; DoRA is supported on "
                                                   r"nn\.Linear, transformers' Conv1D and "
                                                   r"nn\.Conv1d/2d/3d"):
        apply_passes(Emb(), [LoRAPass(pattern="emb", use_dora=True)])
