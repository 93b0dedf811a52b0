"""The adapted model is the user's own model: its class, methods, inputs, cache, training.

transformers causal LMs (LLaMA, GPT-2) with LoRA go through what their users do with them:
``labels=``, ``generate()`` with the KV cache (compared with PEFT on the same adapter weights),
``transformers.Trainer``, gradient checkpointing, calls without a mask, with
``inputs_embeds`` and ``output_hidden_states``; BERT takes a tokenizer's whole output and a
boolean mask; a nanoGPT-style model keeps its own methods; copies keep everything.
"""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from surgery import IA3Pass, LoRAPass, apply_passes, audit, named_trainable_parameters

tf = pytest.importorskip("transformers")
tf.logging.set_verbosity_error()


def _llama(**overrides: object) -> nn.Module:
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            pad_token_id=0, **overrides)
    return tf.LlamaForCausalLM(config).eval()


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = tf.GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                           bos_token_id=127, eos_token_id=127, pad_token_id=0)
    return tf.GPT2LMHeadModel(config).eval()


CAUSAL = {
    "llama": (_llama, ["q_proj", "v_proj"]),
    "gpt2": (_gpt2, ["c_attn"]),
}


def _ids(batch: int = 2, seq: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _randomise_adapters(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in named_trainable_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _adapt(name: str) -> tuple[nn.Module, nn.Module]:
    build, targets = CAUSAL[name]
    model = build()
    adapted = apply_passes(model, [LoRAPass(pattern=targets, rank=4, alpha=8)])
    _randomise_adapters(adapted)
    return model, adapted


def _peft_with_our_weights(model: nn.Module, adapted: nn.Module, targets: list[str]) -> nn.Module:
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                             fan_in_fan_out=isinstance(model, tf.GPT2LMHeadModel))
    reference = peft.get_peft_model(copy.deepcopy(model), config).eval()
    ours = {k: v for k, v in adapted.state_dict().items() if ".lora_" in k}
    missing, unexpected = reference.load_state_dict(
        {f"base_model.model.{k}": v for k, v in ours.items()}, strict=False)
    assert not unexpected and len(ours) == sum(".lora_" in k for k in reference.state_dict())
    return reference


@pytest.mark.parametrize("name", list(CAUSAL))
def test_the_result_is_the_users_class_with_its_methods(name: str) -> None:
    model, adapted = _adapt(name)
    assert type(adapted) is type(model)
    assert adapted.config is not model.config and adapted.config.to_dict() == model.config.to_dict()
    assert adapted.get_input_embeddings() is not None and callable(adapted.generate)
    keys = set(adapted.state_dict())
    assert set(model.state_dict()) <= keys, "every key of the user's model is kept"
    assert all(".lora_" in k for k in keys - set(model.state_dict()))


@pytest.mark.parametrize("name", list(CAUSAL))
def test_labels_give_a_loss_whose_gradient_reaches_exactly_the_adapters(name: str) -> None:
    model, adapted = _adapt(name)
    ids = _ids()
    adapted.train()
    out = adapted(input_ids=ids, labels=ids)
    assert out.loss.ndim == 0 and math.isfinite(out.loss.item())
    out.loss.backward()
    got = {n for n, p in adapted.named_parameters() if p.grad is not None}
    assert got == {n for n, _ in named_trainable_parameters(adapted)}
    assert all(p.grad.abs().sum() > 0 for n, p in adapted.named_parameters() if n in got)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", list(CAUSAL))
def test_generate_with_the_cache_equals_peft_and_generation_without_it(name: str) -> None:
    model, adapted = _adapt(name)
    reference = _peft_with_our_weights(model, adapted, CAUSAL[name][1])
    ids = _ids()
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.equal(adapted(ids).logits, reference(input_ids=ids).logits)
        cached = adapted.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        uncached = adapted.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                    use_cache=False)
        theirs = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8,
                                    do_sample=False)
        base = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert cached.shape == (2, 16)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, theirs)
    assert not torch.equal(cached, base), "the adapters change what is generated"
    out = adapted(ids, use_cache=True)
    assert out.past_key_values is not None, "the KV cache comes back"


@pytest.mark.parametrize("name", list(CAUSAL))
def test_other_calling_conventions(name: str) -> None:
    model, adapted = _adapt(name)
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
        no_mask = adapted(ids).logits
        mask = adapted(ids, attention_mask=torch.ones_like(ids)).logits
        embeds = adapted(inputs_embeds=adapted.get_input_embeddings()(ids)).logits
        hidden = adapted(ids, output_hidden_states=True)
        one = adapted(ids[:1, :3]).logits
    assert torch.equal(no_mask, mask) and torch.equal(no_mask, embeds)
    assert not torch.equal(no_mask, want)
    assert len(hidden.hidden_states) == 3 and hidden.hidden_states[0].shape == (2, 8, 64)
    assert one.shape == (1, 3, 128), "a batch of one and another length"


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_adapter_gradients(reentrant: bool) -> None:
    _, adapted = _adapt("llama")
    ids = _ids()
    adapted.train()
    adapted(input_ids=ids, labels=ids).loss.backward()
    want = {n: p.grad.clone() for n, p in named_trainable_parameters(adapted)}
    adapted.zero_grad(set_to_none=True)
    adapted.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:  # the embeddings are frozen: reentrant checkpointing needs a grad input
        adapted.enable_input_require_grads()
    adapted(input_ids=ids, labels=ids).loss.backward()
    got = {n: p.grad for n, p in named_trainable_parameters(adapted)}
    assert got.keys() == want.keys()
    for n in want:
        assert torch.equal(got[n], want[n]), n


def test_a_trainer_trains_the_adapted_model(tmp_path) -> None:
    _, adapted = _adapt("llama")
    before = {n: p.detach().clone() for n, p in adapted.named_parameters()}
    data = [{"input_ids": ids, "labels": ids} for ids in _ids(6, 8)]
    args = tf.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                                learning_rate=1e-2, report_to=[], save_strategy="no",
                                use_cpu=True, logging_steps=1, disable_tqdm=True)
    trainer = tf.Trainer(model=adapted, args=args, train_dataset=data)
    result = trainer.train()
    assert result.global_step == 3 and math.isfinite(result.training_loss)
    for n, p in adapted.named_parameters():
        moved = not torch.equal(p.detach(), before[n])
        assert moved == p.requires_grad, f"{n}: only adapters move"


def test_attention_dropout_still_acts_in_train_mode() -> None:
    model = _llama(attention_dropout=0.5)
    adapted = apply_passes(model, [LoRAPass(pattern=["q_proj", "v_proj"], rank=4)])
    ids = _ids()
    adapted.train()
    with torch.no_grad():
        assert not torch.equal(adapted(ids).logits, adapted(ids).logits)
        adapted.eval()
        assert torch.equal(adapted(ids).logits, model(ids).logits)


def test_bert_takes_a_tokenizers_whole_output_and_a_boolean_mask() -> None:
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=64)
    model = tf.BertModel(config).eval()
    ids = _ids(2, 7)
    batch = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids),
             "attention_mask": torch.ones_like(ids)}
    batch["attention_mask"][1, 5:] = 0
    adapted = apply_passes(model, [LoRAPass(), IA3Pass()], (ids,), {"attention_mask": batch["attention_mask"]})
    with torch.no_grad():
        assert torch.equal(adapted(**batch).last_hidden_state, model(**batch).last_hidden_state)
        as_bool = dict(batch, attention_mask=batch["attention_mask"].bool())
        assert torch.equal(adapted(**as_bool).last_hidden_state, model(**as_bool).last_hidden_state)
    _randomise_adapters(adapted)
    with torch.no_grad():
        padded = adapted(**batch).last_hidden_state[1, :5]
        alone = adapted(input_ids=ids[1:, :5]).last_hidden_state[0]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)  # padding stays ignored


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention: fused qkv, SDPA with dropout only in training."""

    def __init__(self, d: int, heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0,
                                           is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, d))


class NanoGPT(nn.Module):
    """A nanoGPT-style model: own ``generate`` and ``configure_optimizers``, optional targets."""

    def __init__(self, vocab: int = 64, d: int = 32, block: int = 16) -> None:
        super().__init__()
        self.block = block
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block, d)
        self.attn = CausalSelfAttention(d)
        self.c_fc = nn.Linear(d, 4 * d)
        self.mlp_proj = nn.Linear(4 * d, d)
        self.ln = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT does

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, t = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        x = x + self.attn(self.ln(x))
        x = x + self.mlp_proj(F.gelu(self.c_fc(self.ln(x))))
        logits = self.lm_head(self.ln(x))
        if targets is None:
            return logits[:, [-1], :], None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    def configure_optimizers(self, lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=lr)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.block:])
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return idx


def test_a_nanogpt_style_model_keeps_its_methods_with_and_without_targets() -> None:
    torch.manual_seed(0)
    model = NanoGPT().eval()
    adapted = apply_passes(model, [LoRAPass(pattern=["c_attn", "c_proj"], rank=4)])
    assert type(adapted) is NanoGPT and type(adapted.attn) is CausalSelfAttention
    assert adapted.wte.weight is adapted.lm_head.weight, "tying survives the copy"
    idx = torch.randint(0, 64, (2, 5))
    assert torch.equal(adapted.generate(idx, 4), model.generate(idx, 4))
    logits, loss = adapted(idx)
    assert loss is None and logits.shape == (2, 1, 64)
    opt = adapted.configure_optimizers(1e-2)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {
        id(p) for _, p in named_trainable_parameters(adapted)}
    adapted.train()
    _, loss = adapted(idx, targets=idx)
    loss.backward()
    opt.step()
    adapted.eval()
    with torch.no_grad():
        assert not torch.equal(adapted(idx)[0], model(idx)[0]), "the step moved the adapters"


def test_a_layer_and_an_mlp_are_models_too() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 16)
    layer = nn.Linear(16, 16)
    for passes in ([LoRAPass(pattern="*", rank=4)], [IA3Pass(pattern="*")]):
        adapted = apply_passes(layer, passes)
        assert torch.equal(adapted(x), layer(x))
        assert set(layer.state_dict()) <= set(adapted.state_dict())
        _randomise_adapters(adapted)
        adapted(x).sum().backward()
        assert all(p.grad is not None for _, p in named_trainable_parameters(adapted))
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    adapted = apply_passes(mlp, [LoRAPass(pattern="*", rank=4), IA3Pass(pattern="2")])
    assert type(adapted) is nn.Sequential and torch.equal(adapted(x), mlp(x))
    assert sorted(n for n, _ in named_trainable_parameters(adapted)) == [
        "0.lora_A.default.weight", "0.lora_B.default.weight", "2.ia3_l.default",
        "2.lora_A.default.weight", "2.lora_B.default.weight"]


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_keep_outputs_audit_and_history(how: str) -> None:
    model, adapted = _adapt("llama")
    ids = _ids()
    if how == "deepcopy":
        copied = copy.deepcopy(adapted)
    elif how == "pickle":
        copied = pickle.loads(pickle.dumps(adapted))
    else:
        buf = io.BytesIO()
        torch.save(adapted, buf)
        buf.seek(0)
        copied = torch.load(buf, weights_only=False)
    assert type(copied) is type(model)
    with torch.no_grad():
        assert torch.equal(copied(ids).logits, adapted(ids).logits)
    assert [r.pass_name for r in copied._surgery.history] == ["lora", "freeze"]
    assert audit(copied).totals == audit(adapted).totals
    assert sorted(n for n, _ in named_trainable_parameters(copied)) == sorted(
        n for n, _ in named_trainable_parameters(adapted))


def test_a_prefix_on_nanogpt_attention_keeps_the_model_and_its_dropout() -> None:
    from surgery import PrefixPass

    torch.manual_seed(0)
    model = NanoGPT().eval()
    idx = torch.randint(0, 64, (2, 5))
    with pytest.raises(Exception, match="the map records no shapes. Way out: pass example_inputs"):
        apply_passes(model, [PrefixPass(length=4)])
    adapted = apply_passes(model, [PrefixPass(length=4, gate="zero")], example_inputs=(idx,))
    assert type(adapted) is NanoGPT
    assert torch.equal(adapted.generate(idx, 4), model.generate(idx, 4)), "zero gate: identity"
    _randomise_adapters(adapted)
    with torch.no_grad():
        assert not torch.equal(adapted(idx)[0], model(idx)[0])
        adapted.train()
        assert not torch.equal(adapted(idx, idx)[0], adapted(idx, idx)[0]), "attention dropout acts"
    adapted.train()
    adapted(idx, targets=idx)[1].backward()
    assert {n for n, p in adapted.named_parameters() if p.grad is not None} == {
        n for n, _ in named_trainable_parameters(adapted)}


def test_checkpointing_switched_on_before_surgery_keeps_checkpointing() -> None:
    model = _llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    adapted = apply_passes(model, [LoRAPass(pattern=["q_proj", "v_proj"], rank=4)]).train()
    adapted.enable_input_require_grads()  # reentrant checkpointing with frozen embeddings
    _randomise_adapters(adapted)
    calls = []
    adapted.model.layers[0].mlp.register_forward_hook(lambda *_: calls.append(1))
    ids = _ids()
    adapted(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 2, "the block ran again during backward: it is checkpointed"
    assert all(p.grad is not None for _, p in named_trainable_parameters(adapted))
