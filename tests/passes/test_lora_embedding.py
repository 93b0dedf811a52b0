"""LoRA on ``nn.Embedding`` (``passes/lora_layers.py`` through ``passes/lora.py``), against
PEFT 0.21's ``lora.Embedding`` on the same weights.

The factors are parameters named as PEFT's, ``emb.lora_embedding_A.<adapter>``
``(rank, num_embeddings)`` (zero at init) and ``emb.lora_embedding_B.<adapter>``
``(embedding_dim, rank)``; the branch is ``F.embedding(ids, Aᵀ, padding_idx, ...) @ Bᵀ ·
scaling``. Outputs and gradients equal PEFT's bit for bit; merged outputs agree to
``1e-6 · (1 + max|y|)``.
"""

from __future__ import annotations

import pytest
import torch
from layer_cases import (
    Embeds,
    assert_close,
    build,
    copy_into_peft,
    embed_inputs,
    peft_twin,
    randomize,
)
from torch import nn

from surgery import (
    AlreadyAdaptedError,
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
    unload,
)

peft = pytest.importorskip("peft")


def adapted(*, seed: int = 0, targets: tuple[str, ...] = ("emb",), embedding: dict | None = None,
            **lora) -> tuple[nn.Module, nn.Module]:
    """``(base, adapted)`` with random LoRA factors on the embedding (and ``targets``)."""
    base = build(Embeds, **(embedding or {}))
    lora.setdefault("rank", 4)
    lora.setdefault("alpha", 8)
    model = apply_passes(base, [LoRAPass(pattern=list(targets), **lora)])
    randomize(model, seed)
    return base, model


def test_parameter_names_are_peft_s() -> None:
    base, model = adapted()
    keys = list(model.state_dict())
    assert keys == ["emb.weight", "emb.lora_embedding_A.default", "emb.lora_embedding_B.default",
                    "head.weight", "head.bias"]
    assert model.emb.lora_embedding_A.default.shape == (4, 20)
    assert model.emb.lora_embedding_B.default.shape == (8, 4)
    twin = peft_twin(base, peft.LoraConfig(target_modules=["emb"], r=4, lora_alpha=8))
    theirs = [k.removeprefix("base_model.model.").replace(".base_layer.", ".")
              for k in twin.state_dict()]
    assert theirs == keys


def test_identity_at_init_is_bitwise_and_a_starts_at_zero() -> None:
    base = build(Embeds)
    model = apply_passes(base, [LoRAPass(pattern=["emb"], rank=4)])
    assert torch.count_nonzero(model.emb.lora_embedding_A.default) == 0
    assert torch.count_nonzero(model.emb.lora_embedding_B.default) == 4 * 8  # normal, as PEFT
    (ids,) = embed_inputs()
    assert torch.equal(model(ids), base(ids))


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("embedding", [{}, {"max_norm": 1.0}, {"scale_grad_by_freq": True}],
                         ids=["padding_idx", "max_norm", "scale_grad_by_freq"])
def test_outputs_and_gradients_equal_peft_bitwise(mode: str, embedding: dict) -> None:
    """Dropout is PEFT's too: none on an embedding, whatever ``lora_dropout`` says."""
    base, model = adapted(targets=("emb", "head"), embedding=embedding, dropout=0.5)
    twin = peft_twin(base, peft.LoraConfig(target_modules=["emb", "head"], r=4, lora_alpha=8,
                                           lora_dropout=0.5))
    copy_into_peft(model, twin)
    if mode == "eval":  # dropout on head would draw differently, so train mode needs it off
        model.train(False), twin.train(False)
    else:
        model.head.lora_dropout.default.p = 0.0
        twin.base_model.model.head.lora_dropout.default.p = 0.0
        model.train(), twin.train()
    (ids,) = embed_inputs()
    ours, theirs = model(ids), twin(ids)
    assert torch.equal(ours, theirs)
    assert (ours - base(ids)).abs().max() > 1e-3
    ours.square().sum().backward()
    theirs.square().sum().backward()
    grads = {k.removeprefix("base_model.model."): p.grad for k, p in twin.named_parameters()
             if p.requires_grad}
    for key, param in model.named_parameters():
        if param.requires_grad:
            assert torch.equal(param.grad, grads[key]), key
    padding = model.emb.lora_embedding_A.default.grad[:, 0]
    assert torch.count_nonzero(padding) == 0  # padding_idx: no gradient, as for the table


def test_a_sparse_embedding_trains() -> None:
    """The branch's lookup has a dense gradient (PEFT's backward fails on ``sparse=True``)."""
    base, model = adapted(embedding={"sparse": True})
    twin = peft_twin(base, peft.LoraConfig(target_modules=["emb"], r=4, lora_alpha=8))
    copy_into_peft(model, twin)
    (ids,) = embed_inputs()
    assert torch.equal(model(ids), twin(ids))
    model(ids).square().sum().backward()
    grad = model.emb.lora_embedding_A.default.grad
    assert grad.layout == torch.strided and grad.abs().max() > 0


def test_merge_outputs_and_unmerge_restores_bitwise() -> None:
    base, model = adapted()
    (ids,) = embed_inputs()
    reference = model(ids)
    merged = apply_passes(model, [MergeLoRAPass()])
    a, b = model.emb.lora_embedding_A.default, model.emb.lora_embedding_B.default
    expected = base.emb.weight + 2.0 * (b.detach() @ a.detach()).T
    assert_close(merged.emb.weight, expected)
    assert_close(merged(ids), reference)
    back = apply_passes(merged, [UnmergeLoRAPass()])
    assert torch.equal(back.emb.weight, base.emb.weight)
    assert back.emb.weight.data_ptr() == base.emb.weight.data_ptr()  # the base's storage again
    assert torch.equal(back(ids), reference)


def test_merged_weight_equals_peft_s_merge() -> None:
    base, model = adapted()
    twin = peft_twin(base, peft.LoraConfig(target_modules=["emb"], r=4, lora_alpha=8))
    copy_into_peft(model, twin)
    merged = apply_passes(model, [MergeLoRAPass()])
    assert_close(merged.emb.weight, twin.merge_and_unload().emb.weight)


def test_max_norm_refuses_to_merge(snapshot) -> None:
    _, model = adapted(embedding={"max_norm": 1.0})
    before = snapshot(model)
    with pytest.raises(MergeError, match=r"emb \(Embedding\) cannot take an adapter into its "
                                         r"weight: it renormalises every row it reads"):
        apply_passes(model, [MergeLoRAPass()])
    before.assert_unchanged(model)


def test_one_lora_adapter_per_embedding(snapshot) -> None:
    _, model = adapted()
    before = snapshot(model)
    with pytest.raises(AlreadyAdaptedError, match=r"LoRAPass: emb \(Embedding\) already has LoRA "
                                                  r"adapter 'default' in lora_embedding_A.default; "
                                                  r"an embedding holds one LoRA adapter"):
        apply_passes(model, [LoRAPass(pattern=["emb", "head"], name="other")])
    before.assert_unchanged(model)
    with pytest.raises(ConfigError, match=r"combine_adapters: emb \(Embedding\) carries LoRA "
                                          r"'default'.*holds one LoRA adapter"):
        combine_adapters(model, {"default": 0.5})


def test_an_adapter_name_the_module_has_as_attribute_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"adapter name 'rank' cannot name the LoRA parameters"):
        apply_passes(build(Embeds), [LoRAPass(pattern=["emb"], name="rank")])


def test_an_embedding_with_its_own_forward_is_not_a_site() -> None:
    class Scaled(nn.Embedding):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return super().forward(ids) * 2.0

    with pytest.raises(UnsupportedSiteError, match=r"selects 0, a Scaled; LoRAPass adapts"):
        apply_passes(nn.Sequential(Scaled(5, 3)), [LoRAPass(pattern=["0"])])


def test_audit_save_load_switch_off_and_unload(tmp_path, snapshot) -> None:
    base, model = adapted(targets=("emb", "head"))
    (ids,) = embed_inputs()
    (lora,) = audit(model).adapters
    assert lora.params == lora.trainable_params == 4 * 20 + 8 * 4 + 4 * 8 + 5 * 4
    assert lora.ranks == (4, 4)
    rows = {row.name: row for row in audit(model).rows}
    row = rows["emb.lora_embedding_A"]
    assert row.params == 80 and row.trainable == "yes" and row.type == "LoRAEmbeddingFactor"
    save_adapters(model, tmp_path)
    before = snapshot(base)
    loaded = load_adapters(base, tmp_path)
    before.assert_unchanged(base)
    assert torch.equal(loaded.emb.lora_embedding_B.default, model.emb.lora_embedding_B.default)
    assert torch.equal(loaded(ids), model(ids))
    assert torch.equal(set_active(model, [])(ids), base(ids))
    plain = unload(model)
    assert type(plain.emb) is nn.Embedding and plain.emb.padding_idx == 0
    assert_close(plain(ids), model(ids))


def test_on_llama_embed_tokens_equal_peft(zoo) -> None:
    spec = zoo.spec("hf:llama")
    model = apply_passes(spec.model, [LoRAPass(pattern=["embed_tokens", "q_proj"], rank=4)])
    assert model.model.embed_tokens.lora_embedding_A.default.shape == (4, 128)
    randomize(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.dim() == 2 and torch.count_nonzero(p) == 0:
                p.normal_(0, 0.1)  # q_proj's B
    twin = peft.get_peft_model(zoo.fresh("hf:llama").model,
                               peft.LoraConfig(target_modules=["embed_tokens", "q_proj"], r=4,
                                               lora_alpha=8))
    copy_into_peft(model, twin)
    with torch.no_grad():
        ours = model(*spec.example_inputs, **spec.example_kwargs).logits
        theirs = twin.eval()(*spec.example_inputs, **spec.example_kwargs).logits
    assert torch.equal(ours, theirs)
