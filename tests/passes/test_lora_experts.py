"""LoRA on fused expert weights (``LoRAPass(target_parameters=...)``) against PEFT's
``target_parameters`` LoRA, on tiny Qwen3-MoE and Mixtral models.

PEFT adds the dense per-expert delta to the weight before the grouped matmul; we add the
low-rank term to the routed tokens after it, so the two round differently: logits are
compared with ``atol=1e-5`` (float32; seen: about 2e-7).
"""

from __future__ import annotations

import pytest
import torch

import surgery
from passes.lora_experts_factor import ExpertLoRAFactor
from surgery import LoRAPass, MergeLoRAPass, UnmergeLoRAPass, apply_passes
from surgery.errors import ConfigError, NoMatchError

pytest.importorskip("transformers")
pytest.importorskip("peft")

from moe_cases import FAMILIES, TARGETS, lora_state, moe_model, peft_twin, token_ids  # noqa: E402

ATOL = 1e-5
CASES = [(f, t) for f in FAMILIES for t in TARGETS]


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {f: moe_model(f) for f in FAMILIES}


def _adapt(model: torch.nn.Module, targets: list[str], init: str = "random",
           **kw) -> torch.nn.Module:
    return apply_passes(model, [LoRAPass(target_parameters=targets, rank=4, alpha=8.0,
                                         init=init, **kw)])


@pytest.mark.parametrize("family,target", CASES)
def test_names_and_shapes_equal_peft(models, family, target) -> None:
    model = models[family]
    ours = {k: tuple(v.shape) for k, v in lora_state(_adapt(model, TARGETS[target])).items()}
    theirs = {k: tuple(v.shape) for k, v in lora_state(peft_twin(model, TARGETS[target])).items()}
    assert ours == theirs
    assert len(ours) == 2 * 2 * len(TARGETS[target])  # 2 layers, A and B per weight
    if target == "both":  # PEFT's nesting: the first weight's factors under base_layer
        assert "model.layers.0.mlp.experts.base_layer.lora_A.default.weight" in ours
        assert ours["model.layers.0.mlp.experts.lora_A.default.weight"] == (4 * 8, 32)


@pytest.mark.parametrize("family,target", CASES)
def test_base_keys_are_the_users(models, family, target) -> None:
    model = models[family]
    adapted = _adapt(model, TARGETS[target])
    base_keys = [k for k in adapted.state_dict() if ".lora_" not in k]
    assert base_keys == list(model.state_dict())


@pytest.mark.parametrize("family,target", CASES)
def test_logits_equal_peft_both_ways(models, family, target) -> None:
    model, ids = models[family], token_ids()
    ours = _adapt(model, TARGETS[target])
    theirs = peft_twin(model, TARGETS[target])
    # ours -> PEFT
    missing, unexpected = theirs.base_model.model.load_state_dict(lora_state(ours), strict=False)
    assert unexpected == [] and not [k for k in missing if ".lora_" in k]
    with torch.no_grad():
        a, p, base = ours(input_ids=ids).logits, theirs(input_ids=ids).logits, model(input_ids=ids).logits
    assert (a - base).abs().max() > 1e-3  # the adapters do change the output
    torch.testing.assert_close(a, p, atol=ATOL, rtol=0)
    # PEFT -> ours (fresh random factors on PEFT's side)
    again = peft_twin(model, TARGETS[target])
    ours2 = _adapt(model, TARGETS[target], init="kaiming")
    ours2.load_state_dict(lora_state(again), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(ours2(input_ids=ids).logits, again(input_ids=ids).logits,
                                   atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_at_init_bitwise_and_caller_untouched(models, family, snapshot) -> None:
    model, ids = models[family], token_ids()
    before = snapshot(model)
    adapted = _adapt(model, TARGETS["both"], init="kaiming")
    with torch.no_grad():
        assert torch.equal(adapted(input_ids=ids).logits, model(input_ids=ids).logits)
    before.assert_unchanged(model)


@pytest.mark.parametrize("family,target", CASES)
def test_loss_gradient_reaches_exactly_the_adapters(models, family, target) -> None:
    model, ids = models[family], token_ids()
    adapted = _adapt(model, TARGETS[target])
    adapted.train()
    adapted(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in adapted.named_parameters() if p.grad is not None}
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert with_grad == trainable == set(lora_state(adapted))
    assert all(bool(p.grad.abs().sum() > 0) for n, p in adapted.named_parameters()
               if p.grad is not None)
    assert {id(p) for p in surgery.trainable_parameters(adapted)} == \
        {id(p) for n, p in adapted.named_parameters() if n in trainable}


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_cache_equals_peft(models, family) -> None:
    model, ids = models[family], token_ids()
    ours = _adapt(model, TARGETS["both"])
    theirs = peft_twin(model, TARGETS["both"])
    theirs.base_model.model.load_state_dict(lora_state(ours), strict=False)
    mask = torch.ones_like(ids)
    a = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                      pad_token_id=0)
    p = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                        pad_token_id=0)
    assert torch.equal(a, p)


@pytest.mark.parametrize("family,target", CASES)
def test_audit_counts_equal_peft(models, family, target) -> None:
    model = models[family]
    report = surgery.audit(_adapt(model, TARGETS[target]))
    trainable, total = peft_twin(model, TARGETS[target]).get_nb_trainable_parameters()
    assert f"trainable params: {trainable:,} || all params: {total:,}" in str(report)


@pytest.mark.parametrize("family,target", CASES)
def test_merge_then_unmerge_exact(models, family, target) -> None:
    model, ids = models[family], token_ids()
    adapted = _adapt(model, TARGETS[target])
    with torch.no_grad():
        ref = adapted(input_ids=ids).logits
        merged = apply_passes(adapted, [MergeLoRAPass()])
        experts = merged.get_submodule("model.layers.0.mlp.experts")
        assert "lora" not in experts.code  # the branches left the graph
        torch.testing.assert_close(merged(input_ids=ids).logits, ref, atol=ATOL, rtol=0)
        back = apply_passes(merged, [UnmergeLoRAPass()])
        assert torch.equal(back(input_ids=ids).logits, ref)
    for (k, v), (k2, v2) in zip(back.state_dict().items(), adapted.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    # merged weights: W_e + scaling * B_e A_e for every expert
    name = TARGETS[target][0].rpartition(".")[2]
    sg = adapted.get_submodule("model.layers.0.mlp.experts")
    head = next(m for m in sg.modules() if isinstance(m, ExpertLoRAFactor)
                and m.factor == "B" and m.param == name)
    a_mod = head.partner(sg)
    w = getattr(sg, name).double()
    a = a_mod.weight.double().reshape(8, 4, -1)
    b = head.weight.double().reshape(head.weight.shape[0], 4, 8).permute(2, 0, 1)
    expect = (w + 2.0 * torch.bmm(b, a)).float()  # scaling = alpha / rank = 2
    assert torch.allclose(getattr(experts, name), expect, atol=1e-6, rtol=0)


def test_in_place_merge_and_unmerge_restore_the_storage(models) -> None:
    model, ids = models["qwen3_moe"], token_ids()
    adapted = _adapt(model, TARGETS["both"])
    sg = adapted.get_submodule("model.layers.1.mlp.experts")
    sg.gate_up_proj.data = sg.gate_up_proj.data.clone()  # its own storage: the caller's stays
    sg.down_proj.data = sg.down_proj.data.clone()
    original = sg.gate_up_proj.detach().clone()
    with torch.no_grad():
        ref = adapted(input_ids=ids).logits
    apply_passes(adapted, [MergeLoRAPass(inplace=True)], inplace=True)
    assert not torch.equal(sg.gate_up_proj, original)
    apply_passes(adapted, [UnmergeLoRAPass(inplace=True)], inplace=True)
    assert torch.equal(sg.gate_up_proj, original)
    with torch.no_grad():
        assert torch.equal(adapted(input_ids=ids).logits, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_unload_gives_the_plain_class(models, family) -> None:
    model, ids = models[family], token_ids()
    adapted = _adapt(model, TARGETS["both"])
    plain = surgery.unload(adapted)
    experts = plain.get_submodule("model.layers.0.mlp.experts")
    assert type(experts) is type(model.get_submodule("model.layers.0.mlp.experts"))
    fresh = type(model)(model.config)
    fresh.load_state_dict(plain.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, adapted(input_ids=ids).logits,
                                   atol=ATOL, rtol=0)


def test_disable_set_active_delete(models) -> None:
    model, ids = models["qwen3_moe"], token_ids()
    two = apply_passes(model, [
        LoRAPass(target_parameters=TARGETS["both"], rank=4, init="random", name="a"),
        LoRAPass(target_parameters=TARGETS["both"], rank=2, init="random", name="b")])
    only_a = _adapt(model, TARGETS["both"], name="a")
    only_a.load_state_dict({k: v for k, v in two.state_dict().items() if ".a." in k},
                           strict=False)
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with surgery.disable_adapters(two):
            assert torch.equal(two(input_ids=ids).logits, base)
        surgery.set_active(two, ["a"])
        torch.testing.assert_close(two(input_ids=ids).logits, only_a(input_ids=ids).logits,
                                   atol=ATOL, rtol=0)
        surgery.set_active(two, ["a", "b"])
        rest = surgery.delete_adapter(two, "b")
        assert not [k for k in rest.state_dict() if ".b." in k]
        assert torch.equal(rest(input_ids=ids).logits, only_a(input_ids=ids).logits)


def test_save_and_load_adapters_bitwise(models, tmp_path) -> None:
    model, ids = models["mixtral"], token_ids()
    adapted = _adapt(model, TARGETS["both"])
    surgery.save_adapters(adapted, tmp_path)
    loaded = surgery.load_adapters(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, adapted(input_ids=ids).logits)


@pytest.mark.parametrize("implementation", ["eager", "batched_mm"])
def test_other_experts_implementations_run_grouped(implementation) -> None:
    model, ids = moe_model("qwen3_moe", implementation=implementation), token_ids()
    adapted = _adapt(model, TARGETS["both"], init="kaiming")
    assert any("runs transformers' grouped_mm" in n for n in adapted._surgery.notes)
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, model(input_ids=ids).logits,
                                   atol=ATOL, rtol=0)


@pytest.mark.parametrize("setting,match", [
    (dict(dropout=0.1), "dropout"),
    (dict(use_dora=True), "use_dora"),
    (dict(bias="all"), "bias"),
    (dict(init="pissa"), "init"),
])
def test_peft_refusals(setting, match) -> None:
    with pytest.raises(ConfigError, match=match):
        LoRAPass(target_parameters=["gate_up_proj"], **setting)


def test_no_match_names_the_expert_weights(models) -> None:
    with pytest.raises(NoMatchError, match="gate_up_proj"):
        _adapt(models["qwen3_moe"], ["mlp.experts.up_proj"])


def test_no_match_lists_the_expert_weights_nearest_first(models) -> None:
    with pytest.raises(NoMatchError) as info:
        _adapt(models["qwen3_moe"], ["mlp.experts.up_proj"])
    msg = str(info.value)
    assert msg.startswith("LoRAPass: target_parameters pattern 'mlp.experts.up_proj' matches no "
                          "expert weight; target_parameters reaches only the 3-D fused expert "
                          "weights of transformers' experts modules (dimension 0 = experts).")
    listed = msg.split("The expert weights, nearest first: ")[1].split(". Way out")[0]
    assert listed.split(", ") == [f"model.layers.{i}.mlp.experts.{w}"
                                  for w in ("gate_up_proj", "down_proj") for i in (0, 1)]
    assert "list_targets" not in msg


def test_a_linear_weight_in_target_parameters_points_at_its_module(zoo) -> None:
    model = zoo.spec("hf:llama").model
    layers = model.config.num_hidden_layers
    with pytest.raises(NoMatchError) as info:
        apply_passes(model, [LoRAPass(target_parameters=["q_proj.weight"])])
    msg = str(info.value)
    assert (f"It matches {layers} other parameter(s): model.layers.0.self_attn.q_proj.weight"
            in msg)
    assert ("The weight of a layer such as model.layers.0.self_attn.q_proj is adapted through "
            "its module: LoRAPass(pattern='q_proj').") in msg
    assert "LlamaForCausalLM has no fused experts module" in msg
    assert "There are no candidate parameters at all" not in msg


def test_other_weights_on_an_adapted_module_refused(models) -> None:
    adapted = _adapt(models["qwen3_moe"], TARGETS["down"], name="a")
    with pytest.raises(ConfigError, match="same weights"):
        _adapt(adapted, TARGETS["both"], name="b")


def test_update_reads_the_routed_tokens_only(models) -> None:
    """Each expert's factors see only the rows routed to it: zeroing expert 3's B changes
    nothing for tokens that no top-k choice sent to expert 3."""
    model = models["qwen3_moe"]
    adapted = _adapt(model, TARGETS["down"])
    sg = adapted.get_submodule("model.layers.0.mlp.experts")
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(2))
    index = torch.tensor([[0, 1], [1, 2], [0, 2], [3, 4], [0, 1], [2, 4]])
    weights = torch.full((6, 2), 0.5)
    with torch.no_grad():
        before = sg(x, index, weights)
        head = sg.lora_B.default
        head.weight.view(64, 4, 8)[:, :, 3] = 0.0
        after = sg(x, index, weights)
    assert torch.equal(after[[0, 1, 2, 4, 5]], before[[0, 1, 2, 4, 5]])
    assert not torch.equal(after[3], before[3])
