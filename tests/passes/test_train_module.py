"""Tests of passes/train_module.py: ``TrainModulePass`` trains chosen base modules fully (PEFT's
``modules_to_save``), keeps names and keys, survives later passes, copies and unload, never
writes into the caller's model (ties included), and refuses what it cannot mean."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from surgery import (
    ConfigError,
    LoRAPass,
    NoMatchError,
    TrainModulePass,
    UnsupportedSiteError,
    apply_passes,
    audit,
    named_trainable_parameters,
    plan,
    trainable_parameters,
)
from surgery.adapters.unload import unload
from surgery.pass_base import pass_class

LORA_QV = {f"layers.{i}.attn.{p}_proj.lora_{f}.default.weight"
           for i in range(2) for p in "qv" for f in "AB"}
"""The LoRA parameters of ``LoRAPass(pattern=["q_proj", "v_proj"])`` on the tiny transformer."""


def _step(model: nn.Module, spec, lr: float = 0.1) -> None:
    """One SGD step on the mean square of the output."""
    opt = torch.optim.SGD(trainable_parameters(model), lr=lr)
    out = model(*spec.example_inputs, **(spec.example_kwargs or {}))
    out = out if isinstance(out, torch.Tensor) else out.logits
    out.float().pow(2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_selected_modules_train_fully_with_names_and_keys_unchanged(zoo) -> None:
    model = zoo.spec("builtin:tiny").model
    adapted = apply_passes(model, [LoRAPass(pattern=["q_proj", "v_proj"]),
                                   TrainModulePass(pattern=["lm_head", "layers.1.mlp"])])
    assert TrainModulePass.name == "train_module" and pass_class("train_module") is TrainModulePass
    trained = {"lm_head.weight", "lm_head.bias"} | {
        f"layers.1.mlp.{p}.{t}" for p in ("up_proj", "down_proj") for t in ("weight", "bias")}
    assert {n for n, _ in named_trainable_parameters(adapted)} == LORA_QV | trained
    assert adapted._surgery.trained_modules == {"lm_head": "train_module",
                                                "layers.1.mlp": "train_module"}
    assert type(adapted.lm_head) is nn.Linear and type(adapted.layers[1].mlp) is type(model.layers[1].mlp)
    assert set(adapted.state_dict()) == set(model.state_dict()) | LORA_QV
    result = adapted._surgery.history[1]
    assert result.pass_name == "train_module" and result.step == TrainModulePass(
        pattern=["lm_head", "layers.1.mlp"])
    assert {c.name for c in result.changes} == trained
    assert {(c.kind, c.trainable, c.detail) for c in result.changes} == {
        ("param_unfrozen", True, "trained fully")}
    assert not any(c.name in trained for c in adapted._surgery.history[-1].changes)  # "freeze"


def test_training_never_writes_into_the_caller_s_model(zoo, snapshot) -> None:
    spec = zoo.fresh("builtin:tiny")
    model = spec.model
    before = snapshot(model)
    adapted = apply_passes(model, [TrainModulePass(pattern="lm_head")])
    assert adapted.lm_head.weight.data_ptr() != model.lm_head.weight.data_ptr()  # copy on write
    assert adapted.ln_f.weight.data_ptr() == model.ln_f.weight.data_ptr()  # frozen: shared
    start = adapted.lm_head.weight.detach().clone()
    _step(adapted, spec)
    assert not torch.equal(adapted.lm_head.weight, start), "the trained module moved"
    before.assert_unchanged(model)  # bit for bit, flags and storage included


def test_a_later_apply_passes_keeps_trained_modules_trainable(zoo, snapshot) -> None:
    spec = zoo.fresh("builtin:tiny")
    first = apply_passes(spec.model, [TrainModulePass(pattern="ln_f")])
    _step(first, spec)
    before = snapshot(first)
    for freeze in (None, True):
        later = apply_passes(first, [LoRAPass(pattern="q_proj", name="b")], freeze=freeze)
        assert later.ln_f.weight.requires_grad and later.ln_f.bias.requires_grad
        assert later._surgery.trained_modules == {"ln_f": "train_module"}
        assert later.ln_f.weight.data_ptr() != first.ln_f.weight.data_ptr()
        assert torch.equal(later.ln_f.weight, first.ln_f.weight)
        _step(later, spec)
    before.assert_unchanged(first)
    for copied in (copy.deepcopy(later), pickle.loads(pickle.dumps(later))):
        assert copied._surgery.trained_modules == {"ln_f": "train_module"}
        assert copied.ln_f.weight.requires_grad
        again = apply_passes(copied, [LoRAPass(pattern="v_proj", name="c")], freeze=True)
        assert again.ln_f.weight.requires_grad


def test_a_tied_weight_stays_tied_and_trains_under_both_names(zoo, snapshot) -> None:
    spec = zoo.fresh("hf:gpt2")
    model = spec.model
    assert model.lm_head.weight is model.transformer.wte.weight
    before = snapshot(model)
    adapted = apply_passes(model, [LoRAPass(pattern="c_attn", rank=2),
                                   TrainModulePass(pattern="transformer.wte")])
    assert adapted.lm_head.weight is adapted.transformer.wte.weight
    assert adapted.lm_head.weight.requires_grad and adapted.transformer.wte.weight.requires_grad
    assert adapted.transformer.wte.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    start = adapted.transformer.wte.weight.detach().clone()
    _step(adapted, spec)
    assert adapted.lm_head.weight is adapted.transformer.wte.weight
    assert not torch.equal(adapted.transformer.wte.weight, start)
    before.assert_unchanged(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    # the audit counts the tied tensor once, as trainable, where it is first held
    report = audit(adapted)
    rows = {r.name: r for r in report.rows}
    assert rows["transformer.wte"].provenance == "trained fully (train_module)"
    assert rows["transformer.wte"].trainable_params == start.numel()
    assert report.totals.trainable == sum(p.numel() for p in trainable_parameters(adapted))
    # a pass adapting the other holder of the tied weight would freeze it: refused
    snap = snapshot(adapted)
    with pytest.raises(ConfigError, match=r"LoRAPass\(pattern='lm_head'.*froze "
                                          r"transformer\.wte\.weight, a parameter of "
                                          r"transformer\.wte, which is trained fully "
                                          r"\(train_module\).*Way out"):
        apply_passes(adapted, [LoRAPass(pattern="lm_head", name="x")])
    snap.assert_unchanged(adapted)


def test_the_audit_says_trained_fully_and_counts_them(zoo) -> None:
    model = zoo.spec("builtin:tiny").model
    adapted = apply_passes(model, [LoRAPass(pattern="q_proj", rank=2),
                                   TrainModulePass(pattern="layers.1.mlp")])
    report = audit(adapted)
    rows = {r.name: r for r in report.rows}
    for name in ("layers.1.mlp.up_proj", "layers.1.mlp.down_proj"):
        assert rows[name].trained_by == ("train_module",) and rows[name].trainable == "yes"
        assert rows[name].provenance == "trained fully (train_module)"
        assert name in str(report) and "trained fully (train_module)" in str(report)
    assert rows["layers.0.mlp.up_proj"].provenance == "frozen (base)"
    mlp = sum(p.numel() for p in model.layers[1].mlp.parameters())
    assert report.totals.trainable == mlp + 2 * 2 * (2 * 64)
    collapsed = {r.name: r for r in audit(adapted, depth=3).rows}
    assert collapsed["layers.1.mlp"].trained_by == ("train_module",)
    # trained in a second call: frozen by the first call's "freeze" step, trained now
    later = apply_passes(apply_passes(model, [LoRAPass(pattern="q_proj")]),
                         [TrainModulePass(pattern="ln_f")])
    assert {r.name: r for r in audit(later).rows}["ln_f"].provenance == "trained fully (train_module)"


def test_unload_keeps_the_trained_values(zoo, run_model) -> None:
    spec = zoo.fresh("builtin:tiny")
    adapted = apply_passes(spec.model, [LoRAPass(pattern="v_proj"), TrainModulePass(pattern="lm_head")])
    _step(adapted, spec)
    _step(adapted, spec)
    plain = unload(adapted)
    assert torch.equal(plain.lm_head.weight, adapted.lm_head.weight)
    assert not torch.equal(plain.lm_head.weight, spec.model.lm_head.weight)
    y = run_model(adapted, spec)
    assert (run_model(plain, spec) - y).abs().max() <= 1e-5 * (1 + y.abs().max())
    copy.deepcopy(spec.model).load_state_dict(plain.state_dict(), strict=True)


def test_refusals_name_the_module_and_change_nothing(zoo, snapshot) -> None:
    adapted = apply_passes(zoo.spec("builtin:tiny").model, [LoRAPass(pattern=["q_proj", "v_proj"])])
    before = snapshot(adapted)
    with pytest.raises(UnsupportedSiteError, match=r"TrainModulePass: layers\.0\.attn\.q_proj "
                                                   r"\(Linear\) is adapted already \(a site graph\)"
                                                   r".*Way out: exclude=\['layers\.0\.attn\.q_proj'\]"):
        apply_passes(adapted, [TrainModulePass(pattern="layers.0.attn.q_proj")])
    with pytest.raises(UnsupportedSiteError, match=r"TrainModulePass: layers\.0\.attn \(\w+\) holds "
                                                   r"the adapted layer layers\.0\.attn\.q_proj"):
        apply_passes(adapted, [TrainModulePass(pattern="layers.0.attn")])
    with pytest.raises(UnsupportedSiteError, match=r"TrainModulePass: layers\.0\.attn\.q_proj"
                                                   r"\.lora_A\.default \(LoRAProjection\) lies "
                                                   r"inside layers\.0\.attn\.q_proj, a layer "
                                                   r"adapted already"):
        apply_passes(adapted, [TrainModulePass(pattern="layers.0.attn.q_proj.lora_A.default")])
    with pytest.raises(NoMatchError, match=r"TrainModulePass: pattern 'lm_haed' matches no module"
                                           r".*Nearest candidates: lm_head"):
        apply_passes(adapted, [TrainModulePass(pattern="lm_haed")])
    with pytest.raises(NoMatchError, match="TrainModulePass: the selection is empty after exclude"):
        apply_passes(adapted, [TrainModulePass(pattern="lm_head", exclude="lm_head")])
    before.assert_unchanged(adapted)
    with pytest.raises(ConfigError, match="TrainModulePass: pattern= is required"):
        TrainModulePass()
    with pytest.raises(ConfigError, match="TrainModulePass: a pattern must be a string"):
        TrainModulePass(pattern=3)  # type: ignore[arg-type]


def test_a_later_pass_may_not_adapt_inside_a_trained_module(zoo, snapshot) -> None:
    spec = zoo.spec("builtin:tiny")
    trained = apply_passes(spec.model, [TrainModulePass(pattern="layers.1.mlp")])
    before = snapshot(trained)
    with pytest.raises(ConfigError, match=r"LoRAPass\(pattern='up_proj'\): adapts "
                                          r"layers\.1\.mlp\.up_proj, which is or lies inside "
                                          r"layers\.1\.mlp, a module trained fully "
                                          r"\(train_module\).*exclude=\['layers\.1\.mlp\.up_proj'\]"):
        apply_passes(trained, [LoRAPass(pattern="up_proj")])
    before.assert_unchanged(trained)
    # in place, the model and its record of trained modules come back as they were
    work = apply_passes(spec.model, [])
    snap = snapshot(work)
    with pytest.raises(ConfigError, match="trained fully"):
        apply_passes(work, [TrainModulePass(pattern="lm_head"), LoRAPass(pattern="lm_head")],
                     inplace=True)
    snap.assert_unchanged(work)
    assert work._surgery.trained_modules == {}


def test_plan_leaves_the_model_s_record_alone(zoo) -> None:
    adapted = apply_passes(zoo.spec("builtin:tiny").model, [LoRAPass(pattern="q_proj")])
    results = plan(adapted, [TrainModulePass(pattern="ln_f")])
    assert [c.name for c in results[0].changes] == ["ln_f.weight", "ln_f.bias"]
    assert adapted._surgery.trained_modules == {}
    assert not adapted.ln_f.weight.requires_grad


@pytest.mark.parametrize("inplace", [False, True])
def test_disable_adapters_runs_the_trained_modules_as_they_were(zoo, inplace: bool) -> None:
    """PEFT's ``disable_adapter()`` runs ``modules_to_save``'s original module: so does
    ``surgery.disable_adapters``, with the values from before training, also in a copy, a
    nested block and another dtype; the trained values are back after the block."""
    from surgery import disable_adapters

    spec = zoo.fresh("builtin:tiny")
    model, ids = spec.model, spec.example_inputs
    base = model(*ids)
    work = copy.deepcopy(model) if inplace else model
    adapted = apply_passes(work, [LoRAPass(pattern="q_proj", init="random"),
                                  TrainModulePass(pattern="lm_head")], inplace=inplace)
    for _ in range(2):
        _step(adapted, spec)
    trained = adapted.lm_head.weight.detach().clone()
    y = adapted(*ids)
    assert not torch.equal(y, base)
    with disable_adapters(adapted):
        assert torch.equal(adapted(*ids), base)
        with disable_adapters(adapted):
            assert torch.equal(adapted(*ids), base)
        assert torch.equal(adapted(*ids), base)  # the inner block left the originals in
    assert torch.equal(adapted.lm_head.weight, trained) and torch.equal(adapted(*ids), y)
    twin = copy.deepcopy(adapted)
    with disable_adapters(twin):
        assert torch.equal(twin(*ids), base)
    wide = copy.deepcopy(adapted).double()
    with disable_adapters(wide):
        assert wide.lm_head.weight.dtype == torch.float64
        assert torch.equal(wide.lm_head.weight, model.lm_head.weight.double())
