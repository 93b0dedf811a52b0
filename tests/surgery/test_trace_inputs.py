"""Tests of surgery/trace_inputs.py: calling a traced model with other inputs than it was
traced with, on both front ends; and tracing Hugging Face causal LMs with their cache on."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from helpers import MaskedMLP
from surgery import LoRAPass, apply_passes, trace
from surgery.errors import InputMismatchError, SurgeryError


X = torch.randn(2, 5, 8)
MASK = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])


# ---- torch.fx ------------------------------------------------------------------------------


def test_fx_input_fixed_to_its_default_names_it_and_the_way_out() -> None:
    model = MaskedMLP()
    traced = trace(model)
    assert traced._surgery.fixed_inputs == {"attention_mask": None, "scale": 1.0}
    with pytest.raises(InputMismatchError) as info:
        traced(X, attention_mask=MASK)
    assert str(info.value) == (
        "this MaskedMLP (traced with torch.fx) was traced with attention_mask fixed to None, "
        "its default (it was not among the example inputs), and cannot take "
        "attention_mask=a tensor of shape (2, 5) (float32). Way out: trace again "
        "(surgery.map.trace, or apply_passes on the original model) with "
        "example_kwargs={'attention_mask': ...} so that attention_mask becomes an input of "
        "the traced model.")
    assert isinstance(info.value, TypeError) and isinstance(info.value, SurgeryError)
    with pytest.raises(InputMismatchError, match=r"scale fixed to 1.0, its default.*cannot take "
                                                 r"scale=2.0"):
        traced(X, scale=2.0)
    assert torch.equal(traced(X, attention_mask=None, scale=1), model(X))  # the default itself


def test_fx_checks_survive_passes_copies_and_save_load() -> None:
    model = MaskedMLP()
    adapted = apply_passes(model, [LoRAPass(pattern="up")])
    buf = io.BytesIO()
    torch.save(adapted, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for m in (adapted, copy.deepcopy(adapted), loaded):
        assert torch.equal(m(X), model(X))
        with pytest.raises(InputMismatchError, match="attention_mask fixed to None"):
            m(X, attention_mask=MASK)


def test_fx_input_traced_from_example_kwargs_must_be_given() -> None:
    model = MaskedMLP()
    traced = trace(model, example_kwargs={"attention_mask": MASK})
    assert traced._surgery.fixed_inputs == {"scale": 1.0}
    assert torch.equal(traced(X, attention_mask=MASK), model(X, attention_mask=MASK))
    for call in (lambda: traced(X), lambda: traced(X, attention_mask=None)):
        with pytest.raises(InputMismatchError) as info:
            call()
        assert str(info.value) == (
            "this MaskedMLP (traced with torch.fx) was traced with attention_mask as an input "
            "(it was among the example inputs) and needs a value for it; it was called without "
            "attention_mask (or with attention_mask=None). Way out: pass attention_mask=... (for "
            "an attention mask without padding: torch.ones_like(input_ids)), or trace again "
            "without attention_mask among the example inputs, which fixes it to its default.")


def test_fx_positional_example_input_is_an_input_too() -> None:
    model = MaskedMLP()
    traced = trace(model, (X, MASK))
    assert traced._surgery.frontend == "fx"
    assert traced._surgery.fixed_inputs == {"scale": 1.0}
    assert torch.equal(traced(X, MASK), model(X, MASK))


# ---- torch.export --------------------------------------------------------------------------


def test_export_and_fx_say_the_same_about_a_fixed_input() -> None:
    model = MaskedMLP()
    messages = []
    for frontend in ("fx", "export"):
        traced = trace(model, (X,), frontend=frontend)
        assert traced._surgery.fixed_inputs == {"attention_mask": None, "scale": 1.0}
        with pytest.raises(InputMismatchError) as info:
            traced(X, attention_mask=MASK)
        messages.append(str(info.value).split(") was traced ", 1))
        assert torch.equal(traced(X, attention_mask=None), model(X))
    assert messages[0][0] == "this MaskedMLP (traced with torch.fx"
    assert messages[1][0] == "this MaskedMLP (traced through torch.export"
    assert messages[0][1] == messages[1][1]


def test_export_checks_the_call_against_the_traced_inputs(zoo) -> None:
    traced = zoo.traced("hf:llama")  # traced with input_ids and attention_mask=
    spec = zoo.spec("hf:llama")
    ids = spec.example_inputs[0]
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    want = traced(ids, attention_mask=mask).logits
    assert torch.equal(traced(ids, mask).logits, want), "a keyword input given by position"
    assert torch.equal(traced(input_ids=ids, attention_mask=mask, labels=None).logits, want)
    with pytest.raises(InputMismatchError, match=r"^this LlamaForCausalLM \(traced through "
                                                 r"torch.export\) was traced with attention_mask "
                                                 r"as an input .*Way out: pass attention_mask="):
        traced(ids)
    with pytest.raises(InputMismatchError, match=r"position_ids fixed to None, its default .*"
                                                 r"example_kwargs=\{'position_ids': \.\.\.\}"):
        traced(ids, attention_mask=mask, position_ids=torch.arange(ids.shape[1])[None])


# ---- Hugging Face causal LMs with use_cache=True ---------------------------------------------


def _causal_lm(name: str) -> nn.Module:
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "gpt2":
        config = tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64,
                               bos_token_id=0, eos_token_id=0)
        return tf.GPT2LMHeadModel(config).eval()
    config = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return tf.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_causal_lm_with_its_default_cache_setting_traces(name: str, snapshot) -> None:
    model = _causal_lm(name)
    assert model.config.use_cache is True
    before = snapshot(model)
    ids = torch.randint(0, 128, (2, 8))
    adapted = apply_passes(model, [LoRAPass()], example_inputs=(ids,))
    before.assert_unchanged(model)
    assert model.config.use_cache is True, "the caller's config is left alone"
    assert adapted._surgery.notes == [
        "config.use_cache was set to False on the traced copy (a key/value cache cannot be a "
        "graph output); the model given keeps use_cache=True, and the traced model returns no "
        "cache."]
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        assert torch.equal(adapted(ids).logits, want)
        assert torch.equal(adapted(ids, use_cache=False).logits, want)
    with pytest.raises(InputMismatchError, match=r"cannot take use_cache=True\. Way out: call it "
                                                 r"without use_cache"):
        adapted(ids, use_cache=True)
