"""Tests of LoRAPass(init=...) (passes/lora_init.py): each initialisation against PEFT's."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from passes.lora_init import orthogonal_factors
from surgery import (
    ConfigError,
    LoRAPass,
    UnsupportedSiteError,
    apply_passes,
    audit,
    load_adapters,
    save_adapters,
    unload,
)

peft = pytest.importorskip("peft")

REWRITING = ["pissa", "pissa_niter_3", "olora"]
ALL = ["kaiming", "gaussian", "orthogonal", "random", *REWRITING]
ATOL = 1e-6  # float32: B A of the orthogonal init is zero up to rounding of ~1e-2 entries


class Proj(nn.Module):
    """Two projections, ``q_proj`` (6 → 10) and ``v_proj`` (10 → 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(6, 10)
        self.v_proj = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v_proj(torch.relu(self.q_proj(x)))


def _base() -> Proj:
    torch.manual_seed(0)
    return Proj()


def _peft_layer(model: nn.Module, init: object, rank: int = 4) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.LoraConfig(r=rank, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                 init_lora_weights=init)
        return peft.get_peft_model(copy.deepcopy(model), config).base_model.model


def _factors(module: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    layer = module.get_submodule(name)
    return layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()


def test_random_is_peft_false_draw_for_draw() -> None:
    base = _base()
    torch.manual_seed(1)
    reference = _peft_layer(base, False)
    torch.manual_seed(1)
    model = apply_passes(base, [LoRAPass(pattern=["q_proj", "v_proj"], rank=4, alpha=8,
                                         init="random")])
    for name in ("q_proj", "v_proj"):
        ours, theirs = _factors(model, name), _factors(reference, name)
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
        assert ours[1].abs().min() > 0  # B is not zero
    x = torch.randn(3, 6)
    assert not torch.allclose(model(x), base(x))  # "random" changes the output at init
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=ATOL)


def test_orthogonal_factors_are_peft_draw_for_draw() -> None:
    reference = _peft_layer(_base(), "orthogonal").q_proj
    torch.manual_seed(7)
    reference.orthogonal_init("default")
    torch.manual_seed(7)
    lora_a, lora_b = orthogonal_factors(6, 10, 4, dtype=torch.float32)
    assert torch.equal(lora_a, reference.lora_A["default"].weight)
    assert torch.equal(lora_b, reference.lora_B["default"].weight)
    assert lora_a.shape == (4, 6) and lora_b.shape == (10, 4)


def test_orthogonal_is_identity_at_init_and_leaves_the_caller_unchanged(snapshot) -> None:
    base = _base()
    before = snapshot(base)
    model = apply_passes(base, [LoRAPass(pattern=["q_proj", "v_proj"], rank=4, init="orthogonal")])
    before.assert_unchanged(base)
    for name in ("q_proj", "v_proj"):
        lora_a, lora_b = _factors(model, name)
        assert lora_a.abs().min() > 0 and lora_b.abs().min() > 0
        assert (lora_b @ lora_a).abs().max() < ATOL
        assert torch.equal(model.get_submodule(name).weight, base.get_submodule(name).weight)
    x = torch.randn(3, 6)
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=ATOL)


def test_orthogonal_in_bfloat16_takes_the_weight_dtype() -> None:
    base = _base().to(torch.bfloat16)
    model = apply_passes(base, [LoRAPass(pattern="q_proj", rank=2, init="orthogonal")])
    lora_a, lora_b = _factors(model, "q_proj")
    assert lora_a.dtype == lora_b.dtype == torch.bfloat16


@pytest.mark.parametrize("init", ["orthogonal", "random", *REWRITING])
def test_save_load_is_bitwise(init: str, tmp_path, snapshot) -> None:
    base = _base()
    model = apply_passes(base, [LoRAPass(pattern=["q_proj", "v_proj"], rank=4, init=init)])
    save_adapters(model, tmp_path)
    before = snapshot(base)
    torch.manual_seed(123)  # the replayed init draws other numbers; the file's replace them
    loaded = load_adapters(base, tmp_path)
    before.assert_unchanged(base)
    for name in ("q_proj", "v_proj"):
        for ours, theirs in zip(_factors(loaded, name), _factors(model, name), strict=True):
            assert torch.equal(ours, theirs)
        assert torch.equal(loaded.get_submodule(name).weight, model.get_submodule(name).weight)
    x = torch.randn(3, 6)
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("init", ALL)
def test_config_round_trip(init: str) -> None:
    p = LoRAPass(pattern="q_proj", rank=4, rank_for={"v_proj": 2}, init=init)
    assert LoRAPass.from_config(p.config()) == p


def test_unknown_init_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"init must be one of 'kaiming', 'gaussian', "
                                          r"'orthogonal', 'random', 'pissa', 'pissa_niter_<K>', "
                                          r"'olora', got 'orthogonl' "
                                          r"\(nearest: 'orthogonal'"):
        LoRAPass(init="orthogonl")


@pytest.mark.parametrize("init", ["loftq", "eva", "pissa_niter_0", "pissa_niter_x"])
def test_other_peft_inits_are_refused(init: str) -> None:
    with pytest.raises(ConfigError, match=r"init must be one of 'kaiming', 'gaussian', "
                                          r"'orthogonal', 'random', 'pissa', "
                                          r"'pissa_niter_<K>', 'olora'"):
        LoRAPass(init=init)


def test_pissa_with_dora_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"init='pissa' with use_dora=True is not supported"):
        LoRAPass(init="pissa", use_dora=True)


SVD_TOL = dict(rtol=0, atol=2e-5)  # float32 SVD / QR of entries ~0.3: products to ~1e-6


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_rewriting_inits_equal_peft(init: str, snapshot) -> None:
    base = _base()
    before = snapshot(base)
    reference = _peft_layer(base, init)
    model = apply_passes(base, [LoRAPass(pattern=["q_proj", "v_proj"], rank=4, alpha=8,
                                         init=init)])
    before.assert_unchanged(base)
    for name in ("q_proj", "v_proj"):
        (a, b), (ra, rb) = _factors(model, name), _factors(reference, name)
        torch.testing.assert_close(b @ a, rb @ ra, **SVD_TOL)
        if init == "olora":  # QR is unique up to signs; LAPACK's is the same on both sides
            torch.testing.assert_close(a, ra, **SVD_TOL)
            torch.testing.assert_close(b, rb, **SVD_TOL)
        residual = model.get_submodule(name).weight
        torch.testing.assert_close(residual, reference.get_submodule(name).base_layer.weight,
                                   **SVD_TOL)
        assert residual is not base.get_submodule(name).weight
        assert not torch.equal(residual, base.get_submodule(name).weight)
    x = torch.randn(3, 6)
    torch.testing.assert_close(model(x), base(x), **SVD_TOL)
    torch.testing.assert_close(model(x), reference(x), **SVD_TOL)


def test_pissa_niter_equals_peft_on_a_weight_of_low_rank() -> None:
    base = _base()
    with torch.no_grad():  # rank 3 < 4: the randomised SVD then finds the top subspace exactly
        base.q_proj.weight.copy_(torch.randn(10, 3) @ torch.randn(3, 6) / 3)
    reference = _peft_layer(base, "pissa_niter_2")
    model = apply_passes(base, [LoRAPass(pattern=["q_proj", "v_proj"], rank=4, alpha=8,
                                         init="pissa_niter_2")])
    (a, b), (ra, rb) = _factors(model, "q_proj"), _factors(reference, "q_proj")
    torch.testing.assert_close(b @ a, rb @ ra, **SVD_TOL)
    torch.testing.assert_close(model.q_proj.weight, reference.q_proj.base_layer.weight,
                               **SVD_TOL)
    x = torch.randn(3, 6)
    torch.testing.assert_close(model(x), base(x), **SVD_TOL)


def test_pissa_niter_is_the_same_on_every_run() -> None:
    base = _base()
    runs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = apply_passes(base, [LoRAPass(pattern="q_proj", rank=4, init="pissa_niter_1")])
        runs.append((*_factors(model, "q_proj"), model.q_proj.weight.detach()))
    assert all(torch.equal(p, q) for p, q in zip(*runs, strict=True))


@pytest.mark.parametrize("init", REWRITING)
def test_audit_lists_the_rewritten_base(init: str) -> None:
    model = apply_passes(_base(), [LoRAPass(pattern="q_proj", rank=4, init=init)])
    row = next(r for r in audit(model).rows if r.name == "q_proj")
    assert "rewritten by lora" in row.provenance
    (change,) = [c for r in model._surgery.history for c in r.changes
                 if c.kind == "param_rewritten"]
    label = "OLoRA" if init == "olora" else "PiSSA"
    assert change.name == "q_proj.weight" and change.detail.startswith(f"{label} residual")
    assert change.shape == (10, 6) and not change.trainable


@pytest.mark.parametrize("init", REWRITING)
def test_unload_folds_the_update_back_into_the_residual(init: str) -> None:
    base = _base()
    model = apply_passes(base, [LoRAPass(pattern="q_proj", rank=4, alpha=8, init=init)])
    with torch.no_grad():  # as after training
        model.q_proj.lora_B.default.weight.add_(0.1)
    a, b = _factors(model, "q_proj")
    plain = unload(model)
    expected = model.q_proj.weight.double() + 2.0 * (b.double() @ a.double())
    torch.testing.assert_close(plain.q_proj.weight.double(), expected, **SVD_TOL)
    x = torch.randn(3, 6)
    torch.testing.assert_close(plain(x), model(x), **SVD_TOL)


def test_rewriting_a_tied_weight_is_refused(snapshot) -> None:
    base = _base()
    base.v_proj = nn.Linear(6, 10)
    base.v_proj.weight = base.q_proj.weight
    before = snapshot(base)
    with pytest.raises(UnsupportedSiteError, match=r"q_proj.weight is tied to v_proj.weight"):
        apply_passes(base, [LoRAPass(pattern="q_proj", rank=4, init="pissa")])
    before.assert_unchanged(base)


@pytest.mark.parametrize("init", REWRITING)
def test_rewriting_inits_on_conv1d_keep_the_output(init: str) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = nn.Sequential(transformers.pytorch_utils.Conv1D(10, 6))  # weight (6, 10)
    adapted = apply_passes(model, [LoRAPass(pattern="0", rank=4, init=init)])
    a, b = _factors(adapted, "0")
    assert a.shape == (4, 6) and b.shape == (10, 4)
    torch.testing.assert_close(adapted[0].weight + 2.0 * (b @ a).T, model[0].weight, **SVD_TOL)
    x = torch.randn(3, 6)
    torch.testing.assert_close(adapted(x), model(x), **SVD_TOL)


def test_orthogonal_needs_even_ranks() -> None:
    with pytest.raises(ConfigError, match=r"init='orthogonal'.*every rank must be even.*got 3"):
        LoRAPass(rank=4, rank_for={"v_proj": 3}, init="orthogonal")


def test_random_init_on_convolutions_and_embeddings_changes_outputs() -> None:
    """``init="random"`` (PEFT's ``init_lora_weights=False``) leaves B non-zero on every
    layer kind: a convolution's B takes the convolution's own default init, an embedding's
    factors are both standard normal, as PEFT's."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
    emb = nn.Sequential(nn.Embedding(10, 6))
    for model, x in ((conv, torch.randn(2, 3, 5, 5)), (emb, torch.randint(0, 10, (2, 4)))):
        adapted = apply_passes(model, [LoRAPass(pattern="0", rank=2, init="random")])
        factors = [p for n, p in adapted.named_parameters() if "lora_" in n]
        assert len(factors) == 2 and all(bool(p.abs().sum() > 0) for p in factors)
        assert not torch.equal(adapted(x), model(x))


@pytest.mark.parametrize("init", ["orthogonal"])
def test_linear_only_inits_refuse_convolutions(init: str, snapshot) -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 3))
    before = snapshot(model)
    with pytest.raises(ConfigError, match=rf"init='{init}'\): 0 is a Conv2d; this init is "
                                          rf"offered on nn.Linear"):
        apply_passes(model, [LoRAPass(pattern="0", rank=2, init=init)])
    before.assert_unchanged(model)


def test_export_peft_refuses_a_rewritten_base(tmp_path) -> None:
    from surgery import CheckpointError, export_peft

    model = apply_passes(_base(), [LoRAPass(pattern="q_proj", rank=4, init="olora")])
    with pytest.raises(CheckpointError, match=r"adapter 'default' was added with a "
                                              r"base-rewriting initialisation \(OLoRA residual"):
        export_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.filterwarnings("ignore:LoRAPass. rank 6 is larger")
def test_rank_above_the_weight_rank_is_refused(snapshot) -> None:
    base = _base()
    before = snapshot(base)
    with pytest.raises(ConfigError, match=r"init='pissa'\): v_proj is 4 × 10 .* at most 4 "
                                          r"singular vectors; rank 6 is more"):
        apply_passes(base, [LoRAPass(pattern=["q_proj", "v_proj"], rank=6, init="pissa")])
    before.assert_unchanged(base)


@pytest.mark.parametrize("init", REWRITING)
def test_a_layer_used_under_two_names_is_rewritten_once(init: str) -> None:
    base = _base()
    base.k_proj = base.q_proj  # one module, two names
    model = apply_passes(base, [LoRAPass(pattern="q_proj", rank=4, init=init)])
    assert model.k_proj is model.q_proj
    assert not torch.equal(model.q_proj.weight, base.q_proj.weight)
    x = torch.randn(3, 6)
    torch.testing.assert_close(model(x), base(x), **SVD_TOL)
