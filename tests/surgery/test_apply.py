"""Tests of surgery/apply.py: running passes, dry runs, targets, trainable parameters."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from surgery import (
    ConfigError,
    IA3Pass,
    LoRAPass,
    PassResult,
    UnsupportedSiteError,
    apply_passes,
    history,
    list_targets,
    named_trainable_parameters,
    plan,
    trainable_parameters,
)


def test_history_records_every_pass_and_the_freeze(zoo) -> None:
    adapted = apply_passes(zoo.traced("builtin:tiny"), [LoRAPass(), IA3Pass()])
    results = history(adapted)
    assert [r.pass_name for r in results] == ["lora", "ia3", "freeze"]
    assert all(isinstance(r, PassResult) and r.modified and r.module is adapted for r in results)
    assert results[0].sites == [f"layers.{i}.attn.{p}_proj" for i in range(2) for p in "qv"]
    added = [c.name for c in results[0].changes if c.kind == "param_added"]
    assert added[:2] == ["layers.0.attn.q_proj.lora_A.default.weight",
                         "layers.0.attn.q_proj.lora_B.default.weight"]
    frozen = {c.name for r in results for c in r.changes if c.kind == "param_frozen"}
    assert frozen == {n for n, _ in zoo.traced("builtin:tiny").named_parameters()}
    assert history(zoo.traced("builtin:tiny")) == [], "the traced input keeps its own history"
    assert history(nn.Linear(2, 2)) == []


def test_a_single_pass_and_freeze_false(zoo) -> None:
    adapted = apply_passes(zoo.traced("builtin:tiny"), LoRAPass(), freeze=False)
    q = adapted.get_submodule("layers.0.attn.q_proj")
    assert not q.weight.requires_grad, "the pass itself freezes the layer it adapts"
    assert adapted.get_submodule("lm_head").weight.requires_grad


def test_non_pass_items_and_inplace_on_plain_models_are_config_errors(zoo) -> None:
    with pytest.raises(ConfigError, match=r"item 1 is a str, not a Pass"):
        apply_passes(zoo.traced("builtin:tiny"), [LoRAPass(), "ia3"])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match=r"inplace=True needs a model that is already traced"):
        apply_passes(nn.Sequential(nn.Linear(2, 2)), [LoRAPass(pattern="0")], inplace=True)


def test_inplace_rewrites_the_traced_model_itself(zoo, run_model) -> None:
    spec = zoo.spec("builtin:tiny")
    work = apply_passes(zoo.traced("builtin:tiny"), [IA3Pass()])
    out = apply_passes(work, [LoRAPass()], inplace=True)
    assert out is work
    assert [r.pass_name for r in history(work)] == ["ia3", "freeze", "lora"]
    assert work.get_submodule("layers.0.attn.q_proj.lora_A.default") is not None
    assert torch.equal(run_model(work, spec), run_model(spec.model, spec))


def test_plan_is_a_dry_run(zoo, snapshot) -> None:
    traced = zoo.traced("hf:gpt2")
    before = snapshot(traced)
    results = plan(traced, [LoRAPass(pattern="attn.*"), IA3Pass()])
    before.assert_unchanged(traced)
    assert [r.pass_name for r in results] == ["lora", "ia3"]
    assert results[0].sites == [f"transformer.h.{i}.attn.{p}" for i in range(2) for p in ("c_attn", "c_proj")]
    changes = LoRAPass(pattern="c_fc").plan(traced)
    before.assert_unchanged(traced)
    assert [c.name for c in changes if c.kind == "param_added"] == [
        f"transformer.h.{i}.mlp.c_fc.lora_{f}.default.weight" for i in range(2) for f in "AB"]


def test_plan_on_a_plain_model_leaves_it_alone(zoo, snapshot) -> None:
    model = zoo.spec("builtin:convnet").model
    before = snapshot(model)
    results = plan(model, LoRAPass(pattern="classifier.*"))
    assert results[0].sites == ["classifier.0", "classifier.3"]
    before.assert_unchanged(model)


def test_list_targets_of_the_builtin_model(zoo) -> None:
    targets = list_targets(zoo.spec("builtin:tiny").model)
    by_name = {t.qname: t for t in targets}
    assert [t.qname for t in targets][:3] == ["embed", "pos_embed", "layers.0.attn.q_proj"]
    q = by_name["layers.0.attn.q_proj"]
    assert (q.type, q.role, q.shape, q.calls, q.adapters) == ("Linear", "query", (64, 64), 1, ())
    assert by_name["layers.1.mlp.up_proj"].shape == (256, 64)
    assert by_name["layers.1.mlp.down_proj"].role == "ffn_down"
    assert by_name["lm_head"].role == ""
    text = str(targets)
    assert text.splitlines()[0].split() == ["name", "type", "role", "shape", "calls"]
    md = targets.to_markdown()
    assert md.splitlines()[0] == "| name | type | role | weight shape | calls | adapters |"
    assert "| layers.0.attn.q_proj | Linear | query | (64, 64) | 1 |  |" in md


def test_list_targets_shows_adapters_fused_roles_and_attention_modules(zoo) -> None:
    adapted = apply_passes(zoo.traced("hf:gpt2"), [LoRAPass(), IA3Pass(), LoRAPass(name="b")])
    by_name = {t.qname: t for t in list_targets(adapted)}
    c_attn = by_name["transformer.h.0.attn.c_attn"]
    assert (c_attn.type, c_attn.role, c_attn.shape) == ("Conv1D", "qkv (fused)", (64, 192))
    assert c_attn.adapters == ("lora:default", "lora:b", "ia3:default")
    assert not any("lora" in q or "ia3" in q for q in by_name)
    encoder = {t.qname: t for t in list_targets(zoo.traced("builtin:encoder"))}
    mha = encoder["layers.0.self_attn"]
    assert (mha.type, mha.role, mha.shape) == ("MultiheadAttention", "attention", (192, 64))


def test_trainable_parameters_are_exactly_the_adapters_without_duplicates(zoo) -> None:
    adapted = apply_passes(zoo.traced("hf:gpt2"), [LoRAPass(pattern="c_fc")])
    params = trainable_parameters(adapted)
    names = [n for n, _ in named_trainable_parameters(adapted)]
    assert len(params) == len({id(p) for p in params}) == len(names) == 4
    assert all(".lora_" in n for n in names)


# ---- nn.MultiheadAttention: what can and cannot be adapted ---------------------------------


@pytest.mark.parametrize("pattern,what", [
    ("self_attn", "layers.0.self_attn, part of an nn.MultiheadAttention"),
    ("out_proj", r"layers.0.self_attn.out_proj \(inside layers.0.self_attn\)"),
    (["linear1", "self_attn.*"], r"layers.0.self_attn.out_proj \(inside layers.0.self_attn\)"),
])
def test_mha_projections_cannot_take_a_lora_branch(zoo, snapshot, pattern, what: str) -> None:
    traced = zoo.traced("builtin:encoder")
    before = snapshot(traced)
    with pytest.raises(UnsupportedSiteError, match=what) as info:
        apply_passes(traced, [LoRAPass(pattern=pattern)])
    msg = str(info.value)
    assert "in_proj_weight" in msg and "out_proj.weight directly" in msg
    assert "pattern='linear*'" in msg
    before.assert_unchanged(traced)


def test_mha_default_lora_says_why_and_what_to_do(zoo) -> None:
    with pytest.raises(UnsupportedSiteError, match=r"the attention of this model is "
                                                   r"nn.MultiheadAttention \(layers.0.self_attn, "
                                                   r"layers.1.self_attn\).*pattern='linear\*'"):
        apply_passes(zoo.traced("builtin:encoder"), [LoRAPass()])


def test_module_of_the_wrong_type_is_named() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(UnsupportedSiteError, match=r"pattern '1' selects 1, a LayerNorm; LoRAPass "
                                                   r"adapts nn.Linear / Conv1D. Way out: select "
                                                   r"layers of those types"):
        apply_passes(model, [LoRAPass(pattern="1")])


def test_layer_inside_a_leaf_module_is_named() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    with pytest.raises(UnsupportedSiteError, match=r"1.0, which runs inside 1 \(Sequential\).*"
                                                   r"leaf_modules="):
        apply_passes(model, [LoRAPass(pattern="1.0")], leaf_modules=["1"])


class TwiceAttended(nn.Module):
    """One ``nn.MultiheadAttention`` called with different arguments at two calls."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        y, _ = self.attn(x, x, x, key_padding_mask=pad)
        z, _ = self.attn(y, x, x, need_weights=False)
        return self.fc(z)


def test_mha_that_export_must_decompose_is_still_explained(no_mha_fastpath) -> None:
    from surgery import trace

    torch.manual_seed(0)
    model = TwiceAttended().eval()
    x, pad = torch.randn(2, 5, 16), torch.zeros(2, 5, dtype=torch.bool)
    pad[0, -1] = True
    traced = trace(model, (x, pad), frontend="export")
    assert not isinstance(traced.get_submodule("attn"), nn.MultiheadAttention)
    assert torch.equal(traced(x, pad), model(x, pad))
    with pytest.raises(UnsupportedSiteError, match=r"selects attn, part of an nn.MultiheadAttention "
                                                   r"that torch.export decomposed.*pattern='linear\*'"):
        apply_passes(traced, [LoRAPass(pattern="attn")])
    adapted = apply_passes(traced, [LoRAPass(pattern="fc")])
    frozen = copy.deepcopy(model).requires_grad_(False)  # same kernels as the frozen base
    assert torch.equal(adapted(x, pad), frozen(x, pad))
