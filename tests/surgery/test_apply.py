"""Tests of surgery/apply.py: running passes, dry runs, targets, trainable parameters."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

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
from surgery.errors import InputTypeError
from surgery.pass_base import Pass


def test_history_records_every_pass_and_the_freeze(zoo) -> None:
    model = zoo.spec("builtin:tiny").model
    adapted = apply_passes(model, [LoRAPass(), IA3Pass()])
    results = history(adapted)
    assert [r.pass_name for r in results] == ["lora", "ia3", "freeze"]
    assert all(isinstance(r, PassResult) and r.modified for r in results)
    assert all(r.module is None for r in results), "the history holds no model (copies stay small)"
    assert results[0].sites == [f"layers.{i}.attn.{p}_proj" for i in range(2) for p in "qv"]
    added = [c.name for c in results[0].changes if c.kind == "param_added"]
    assert added[:2] == ["layers.0.attn.q_proj.lora_A.default.weight",
                         "layers.0.attn.q_proj.lora_B.default.weight"]
    frozen = {c.name for r in results for c in r.changes if c.kind == "param_frozen"}
    assert frozen == {n for n, _ in model.named_parameters()}
    assert history(model) == [], "the model given keeps no history"
    assert history(nn.Linear(2, 2)) == []


def test_a_single_pass_and_freeze_false(zoo) -> None:
    adapted = apply_passes(zoo.spec("builtin:tiny").model, LoRAPass(), freeze=False)
    q = adapted.get_submodule("layers.0.attn.q_proj")
    assert not q.weight.requires_grad, "the pass itself freezes the layer it adapts"
    assert adapted.get_submodule("lm_head").weight.requires_grad


def test_non_pass_items_are_config_errors(zoo) -> None:
    with pytest.raises(ConfigError, match=r"item 1 is a str, not a Pass"):
        apply_passes(zoo.spec("builtin:tiny").model, [LoRAPass(), "ia3"])  # type: ignore[list-item]


def test_inplace_rewrites_the_model_itself(zoo, run_model) -> None:
    spec = zoo.spec("builtin:tiny")
    work = apply_passes(spec.model, [IA3Pass()])
    out = apply_passes(work, [LoRAPass()], inplace=True)
    assert out is work
    assert [r.pass_name for r in history(work)] == ["ia3", "freeze", "lora"]
    assert work.get_submodule("layers.0.attn.q_proj.lora_A.default") is not None
    assert torch.equal(run_model(work, spec), run_model(spec.model, spec))
    plain = nn.Sequential(nn.Linear(2, 2))
    same = apply_passes(plain, [LoRAPass(pattern="0", rank=1)], inplace=True)
    assert same is plain and type(plain[0]).__name__ == "Linear" and hasattr(plain[0], "lora_A")


def test_compiled_and_data_parallel_wrappers_are_taken_off(zoo, run_model) -> None:
    spec = zoo.spec("builtin:tiny")
    for wrapped in (torch.compile(spec.model, backend="eager"), nn.DataParallel(spec.model)):
        adapted = apply_passes(wrapped, [LoRAPass()])
        assert type(adapted) is type(spec.model)
        assert "layers.0.attn.q_proj.lora_A.default.weight" in adapted.state_dict()
        assert "wrapper" in adapted._surgery.notes[0] and "was taken off" in adapted._surgery.notes[0]
        assert torch.equal(run_model(adapted, spec), run_model(spec.model, spec))
    assert history(nn.DataParallel(adapted))[0].pass_name == "lora"


def test_plan_is_a_dry_run(zoo, snapshot) -> None:
    spec = zoo.spec("hf:gpt2")
    traced = apply_passes(spec.model, [LoRAPass(pattern="c_proj", name="x")])
    before = snapshot(traced)
    results = plan(traced, [LoRAPass(pattern="attn.*"), IA3Pass()], spec.example_inputs)
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
    up = by_name["layers.1.mlp.up_proj"]
    assert (up.shape, up.in_features, up.out_features, up.features) == ((256, 64), 64, 256, "64 → 256")
    assert by_name["layers.1.mlp.down_proj"].role == "ffn_down"
    assert by_name["lm_head"].role == ""
    embed = by_name["embed"]
    assert (embed.shape, embed.features) == ((256, 64), "256 → 64")
    text = str(targets)
    assert text.splitlines()[0].split() == ["name", "type", "role", "in", "→", "out", "calls"]
    assert "layers.1.mlp.up_proj    Linear               ffn_up         64 → 256       1" in text
    md = targets.to_markdown()
    assert md.splitlines()[0] == "| name | type | role | in → out | weight shape | calls | adapters |"
    assert "| layers.1.mlp.up_proj | Linear | ffn_up | 64 → 256 | (256, 64) | 1 |  |" in md


def test_list_targets_shows_adapters_fused_roles_and_attention_modules(zoo) -> None:
    spec = zoo.spec("hf:gpt2")
    adapted = apply_passes(spec.model, [LoRAPass(), IA3Pass(), LoRAPass(name="b")],
                           spec.example_inputs)
    by_name = {t.qname: t for t in list_targets(adapted)}
    c_attn = by_name["transformer.h.0.attn.c_attn"]
    assert (c_attn.type, c_attn.role, c_attn.shape) == ("Conv1D", "qkv (fused)", (64, 192))
    # Conv1D stores (in, out), Linear (out, in): the in → out column reads the same way
    c_fc, head = by_name["transformer.h.0.mlp.c_fc"], by_name["lm_head"]
    assert (c_fc.type, c_fc.shape, c_fc.features) == ("Conv1D", (64, 128), "64 → 128")
    assert (head.type, head.shape, head.features) == ("Linear", (128, 64), "64 → 128")
    assert c_attn.features == "64 → 192"
    assert c_attn.adapters == ("lora:default", "lora:b", "ia3:default")
    assert not any("lora" in q or "ia3" in q for q in by_name)
    encoder_model = zoo.spec("builtin:encoder")
    encoder = {t.qname: t for t in list_targets(encoder_model.model, encoder_model.example_inputs)}
    mha = encoder["layers.0.self_attn"]
    assert (mha.type, mha.role, mha.shape) == ("MultiheadAttention", "attention", (192, 64))
    assert (mha.in_features, mha.out_features) == (64, 64)
    rich_table = list_targets(encoder_model.model).__rich__()
    assert [c.header for c in rich_table.columns] == ["name", "type", "role", "in → out",
                                                      "weight shape", "calls", "adapters"]


def test_trainable_parameters_are_exactly_the_adapters_without_duplicates(zoo) -> None:
    adapted = apply_passes(zoo.spec("hf:gpt2").model, [LoRAPass(pattern="c_fc")])
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
    model = zoo.spec("builtin:encoder").model
    before = snapshot(model)
    with pytest.raises(UnsupportedSiteError, match=what) as info:
        apply_passes(model, [LoRAPass(pattern=pattern)])
    msg = str(info.value)
    assert "in_proj_weight" in msg and "out_proj.weight directly" in msg
    assert "pattern='linear*'" in msg
    before.assert_unchanged(model)


def test_mha_default_lora_says_why_and_what_to_do(zoo) -> None:
    with pytest.raises(UnsupportedSiteError, match=r"the attention of this model is "
                                                   r"nn.MultiheadAttention \(layers.0.self_attn, "
                                                   r"layers.1.self_attn\).*pattern='linear\*'"):
        spec = zoo.spec("builtin:encoder")
        apply_passes(spec.model, [LoRAPass()], spec.example_inputs)


def test_module_of_the_wrong_type_is_named() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(UnsupportedSiteError, match=r"pattern '1' selects 1, a LayerNorm; LoRAPass "
                                                   r"adapts nn.Linear / Conv1D / nn.Conv1d/2d/3d / "
                                                   r"nn.Embedding. Way out: select layers of those "
                                                   r"types"):
        apply_passes(model, [LoRAPass(pattern="1")])


def test_a_layer_inside_a_leaf_module_of_the_map_is_still_a_site() -> None:
    """leaf_modules= shapes the map only: the user's model runs its own code."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    adapted = apply_passes(model, [LoRAPass(pattern="1.0", rank=2)], leaf_modules=["1"])
    assert hasattr(adapted[1][0], "lora_A")


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


def test_mha_called_with_different_arguments_is_refused_by_name(no_mha_fastpath) -> None:
    from surgery import trace

    torch.manual_seed(0)
    model = TwiceAttended().eval()
    x, pad = torch.randn(2, 5, 16), torch.zeros(2, 5, dtype=torch.bool)
    pad[0, -1] = True
    traced = trace(model, (x, pad), frontend="export")
    assert not isinstance(traced.get_submodule("attn"), nn.MultiheadAttention)
    with pytest.raises(UnsupportedSiteError, match=r"selects attn, part of an nn.MultiheadAttention"):
        apply_passes(model, [LoRAPass(pattern="attn")])
    adapted = apply_passes(model, [LoRAPass(pattern="fc")])
    frozen = copy.deepcopy(model).requires_grad_(False)  # same kernels as the frozen base
    assert torch.equal(adapted(x, pad), frozen(x, pad))


# ---- freezing: only the first time a model is adapted ---------------------------------------


def test_a_base_parameter_chosen_to_train_stays_trainable_through_later_passes(zoo) -> None:
    from surgery import MergeLoRAPass, UnmergeLoRAPass

    adapted = apply_passes(zoo.spec("builtin:tiny").model, [LoRAPass()])
    assert not adapted.get_submodule("lm_head").weight.requires_grad, "first time: all frozen"
    adapted.get_submodule("lm_head").weight.requires_grad_(True)
    merged = apply_passes(adapted, [MergeLoRAPass()])
    assert merged.get_submodule("lm_head").weight.requires_grad
    assert [r.pass_name for r in history(merged)] == ["lora", "freeze", "merge_lora"]
    apply_passes(adapted, [IA3Pass()], inplace=True)
    apply_passes(adapted, [MergeLoRAPass()], inplace=True)
    apply_passes(adapted, [UnmergeLoRAPass()], inplace=True)
    assert adapted.get_submodule("lm_head").weight.requires_grad
    assert not adapted.get_submodule("layers.0.attn.k_proj").weight.requires_grad, \
        "IA3Pass freezes the layers it adapts"
    assert not adapted.get_submodule("layers.0.mlp.up_proj").weight.requires_grad
    apply_passes(adapted, [LoRAPass(pattern="up_proj")], inplace=True, freeze=True)
    assert not adapted.get_submodule("lm_head").weight.requires_grad, "freeze=True: all again"


def test_a_plain_model_is_frozen_but_its_adapters(zoo) -> None:
    model = zoo.spec("builtin:tiny").model
    assert all(p.requires_grad for p in model.parameters())
    adapted = apply_passes(model, [LoRAPass()])
    assert {n for n, _ in named_trainable_parameters(adapted)} == {
        f"layers.{i}.attn.{p}_proj.lora_{f}.default.weight"
        for i in range(2) for p in "qv" for f in "AB"}


# ---- passes that write into existing weights -----------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ScaleHeadInPlace(Pass):
    """Doubles ``lm_head.weight`` in its own storage (as an in-place merge does)."""

    name: ClassVar[str] = "scale_head"

    @property
    def writes_in_place(self) -> bool:
        return True

    def run(self, model: nn.Module) -> PassResult:
        with torch.no_grad():
            model.get_submodule("lm_head").weight.mul_(2)
        return PassResult(model, True, (), self.name)


def test_in_place_writes_need_inplace_true_and_the_last_place(zoo, snapshot) -> None:
    model = zoo.fresh("builtin:tiny").model
    adapted = apply_passes(model, [LoRAPass()])
    before, before_model = snapshot(adapted), snapshot(model)
    with pytest.raises(ConfigError, match=r"ScaleHeadInPlace\(\) writes into existing weights, "
                                          r"and in-place merges write into the weights shared "
                                          r"with the model you passed.*call apply_passes\(model, "
                                          r"passes, inplace=True\), or use the pass without"):
        apply_passes(adapted, [ScaleHeadInPlace()])
    with pytest.raises(ConfigError, match=r"so it must be the last pass: its writes cannot be "
                                          r"rolled back if a later pass \(IA3Pass\(\)\) fails"):
        apply_passes(adapted, [ScaleHeadInPlace(), IA3Pass()], inplace=True)
    for dry_run in (lambda: plan(adapted, [ScaleHeadInPlace()]),
                    lambda: ScaleHeadInPlace().plan(adapted)):
        with pytest.raises(ConfigError, match=r"ScaleHeadInPlace.plan: this pass writes into "
                                              r"existing weights"):
            dry_run()
    with pytest.raises(ConfigError, match="must be the last pass"):
        plan(adapted, [ScaleHeadInPlace(), IA3Pass()])
    with pytest.raises(ConfigError, match="must be the last pass"):
        apply_passes(model, [ScaleHeadInPlace(), LoRAPass()], inplace=True)  # before the trace check
    before.assert_unchanged(adapted)
    before_model.assert_unchanged(model)
    weight = adapted.get_submodule("lm_head").weight.detach().clone()
    out = apply_passes(adapted, [IA3Pass(), ScaleHeadInPlace()], inplace=True)
    assert out is adapted and [r.pass_name for r in history(adapted)] == ["lora", "freeze", "ia3",
                                                                           "scale_head"]
    assert torch.equal(adapted.get_submodule("lm_head").weight, 2 * weight)
    assert not LoRAPass().writes_in_place


def test_plan_of_an_in_place_merge_uses_its_dry_run(zoo, snapshot) -> None:
    from surgery import MergeLoRAPass

    adapted = apply_passes(zoo.spec("builtin:tiny").model, [LoRAPass()])
    for p in trainable_parameters(adapted):
        torch.nn.init.normal_(p.data)  # a merge that changes the weights
    before = snapshot(adapted)
    results = plan(adapted, [IA3Pass(), MergeLoRAPass(inplace=True)])
    assert [r.pass_name for r in results] == ["ia3", "merge_lora"]
    assert results[1].sites == [f"layers.{i}.attn.{p}_proj" for i in range(2) for p in "qv"]
    before.assert_unchanged(adapted)


def test_a_failing_in_place_call_on_a_plain_model_leaves_it_exactly_as_it_was(snapshot) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    before = snapshot(model)
    with pytest.raises(Exception, match="'nowhere'"):
        apply_passes(model, [LoRAPass(pattern="0", rank=2), LoRAPass(pattern="nowhere")],
                     inplace=True)
    before.assert_unchanged(model)
    assert "_surgery" not in vars(model) and type(model[0]) is nn.Linear


def test_adapters_join_in_the_training_mode_of_their_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)).eval()
    adapted = apply_passes(model, [LoRAPass(pattern="*", rank=2, dropout=0.5)])
    assert not any(m.training for m in adapted.modules()), "an eval model gets eval adapters"
    for p in trainable_parameters(adapted):
        torch.nn.init.normal_(p)
    x = torch.randn(4, 8)
    assert torch.equal(adapted(x), adapted(x)), "no dropout in eval mode"
    adapted.train()
    assert not torch.equal(adapted(x), adapted(x))


def test_a_model_that_cannot_be_copied_says_why_and_how(snapshot) -> None:
    import threading

    model = nn.Sequential(nn.Linear(4, 4))
    model.lock = threading.Lock()
    with pytest.raises(ConfigError, match=r"could not copy Sequential to adapt it \(TypeError: .*"
                                          r"lock.*Way out: apply_passes\(\.\.\., inplace=True\)"):
        apply_passes(model, [LoRAPass(pattern="0", rank=2)])
    adapted = apply_passes(model, [LoRAPass(pattern="0", rank=2)], inplace=True)
    assert adapted is model and hasattr(model[0], "lora_A")


def test_a_failing_in_place_call_puts_back_config_settings_a_pass_changed(zoo) -> None:
    from surgery import NoMatchError, PrefixPass

    model = zoo.fresh("hf:llama").model
    before = model.config._attn_implementation
    with pytest.raises(NoMatchError):
        apply_passes(model, [PrefixPass(length=2), LoRAPass(pattern="nothing_here")], inplace=True)
    assert model.config._attn_implementation == before
    assert "_surgery" not in vars(model)


def test_a_base_parameter_left_trainable_gets_its_own_storage(snapshot) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    before = snapshot(model)
    adapted = apply_passes(model, [LoRAPass(pattern="0", rank=2)], freeze=False)
    assert adapted[2].weight.requires_grad
    assert adapted[2].weight.data_ptr() != model[2].weight.data_ptr(), "copy on write"
    assert adapted[0].weight.data_ptr() == model[0].weight.data_ptr(), "frozen: still shared"
    opt = torch.optim.SGD(trainable_parameters(adapted), lr=0.1)
    adapted(torch.randn(3, 4)).sum().backward()
    opt.step()
    before.assert_unchanged(model)


def test_keyword_inputs_alone_select_by_role_on_a_transformers_model(zoo) -> None:
    spec = zoo.spec("hf:llama")
    ids = torch.randint(0, spec.model.config.vocab_size, (1, 5))
    first = apply_passes(spec.model, [LoRAPass(pattern="k_proj", rank=2)])
    adapted = apply_passes(first, [LoRAPass(role="q", rank=2, name="q")],
                           example_kwargs={"input_ids": ids})
    layers = spec.model.config.num_hidden_layers
    assert history(adapted)[-1].sites == [f"model.layers.{i}.self_attn.q_proj"
                                          for i in range(layers)]
    assert adapted._surgery.example_inputs is None
    assert torch.equal(adapted._surgery.example_kwargs["input_ids"], ids)
    assert not any(n.startswith("no example_inputs were given") for n in adapted._surgery.notes)


def test_a_dict_as_example_inputs_points_at_example_kwargs(snapshot) -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    before = snapshot(model)
    with pytest.raises(InputTypeError, match=r"apply_passes: example_inputs= is a dict "
                       r"\(keys 'input_ids'\).*Way out: pass the dict as example_kwargs="):
        apply_passes(model, [LoRAPass(role="q")], example_inputs={"input_ids": torch.ones(1)})
    before.assert_unchanged(model)
    assert "_surgery" not in vars(model)
