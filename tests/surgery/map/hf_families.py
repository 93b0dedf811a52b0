"""Tiny random transformers models of many families, built from configs (no downloads).

Every model has hidden size 32, 4 heads, two layers per stack (so repeated blocks exist)
and a vocabulary of 128 with its special tokens inside it.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

tf = pytest.importorskip("transformers")

_TOKENS = dict(vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_DECODER = dict(num_attention_heads=4, num_hidden_layers=2, intermediate_size=64,
                hidden_size=32, max_position_embeddings=64, **_TOKENS)


def _seq2seq(**extra: object) -> dict:
    return dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                decoder_start_token_id=1, **_TOKENS, **extra)


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_DECODER, num_key_value_heads=2)),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(
        **_DECODER, num_key_value_heads=2, sliding_window=4)),
    "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(
        **_DECODER, num_key_value_heads=2, head_dim=8, sliding_window=4,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**_DECODER, num_key_value_heads=2)),
    "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**_DECODER, num_key_value_heads=2)),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
        n_embd=32, n_head=4, n_layer=2, n_positions=64, **_TOKENS)),
    "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**_DECODER)),
    "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(
        hidden_size=32, num_attention_heads=4, num_hidden_layers=2, ffn_dim=64,
        word_embed_proj_dim=32, max_position_embeddings=64, **_TOKENS)),
    "bloom": lambda: tf.BloomForCausalLM(tf.BloomConfig(
        hidden_size=32, n_head=4, n_layer=2, **_TOKENS)),
    "falcon": lambda: tf.FalconForCausalLM(tf.FalconConfig(
        hidden_size=32, num_attention_heads=4, num_hidden_layers=2, alibi=True,
        new_decoder_architecture=False, multi_query=True, **_TOKENS)),
    "bert": lambda: tf.BertModel(tf.BertConfig(**_DECODER)),
    "roberta": lambda: tf.RobertaModel(tf.RobertaConfig(
        **{**_DECODER, "max_position_embeddings": 66})),
    "t5": lambda: tf.T5ForConditionalGeneration(tf.T5Config(
        d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
        **_TOKENS)),
    "bart": lambda: tf.BartForConditionalGeneration(tf.BartConfig(
        **_seq2seq(max_position_embeddings=64))),
    "whisper": lambda: tf.WhisperForConditionalGeneration(tf.WhisperConfig(
        **_seq2seq(num_mel_bins=8, max_source_positions=16, max_target_positions=32))),
    "vit": lambda: tf.ViTModel(tf.ViTConfig(
        hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64,
        image_size=16, patch_size=8)),
}
"""Family name (transformers' ``model_type``) -> a builder of a tiny random model."""


def build(name: str) -> nn.Module:
    """A tiny random ``name`` model in eval mode, seeded (the same weights every call)."""
    torch.manual_seed(0)
    return BUILDERS[name]().eval()


def adapted_sites(adapted: nn.Module, pass_name: str) -> list[str]:
    """The sites the last ``pass_name`` pass (``"lora"``, ``"ia3"``) adapted, in order."""
    results = [r for r in adapted._surgery.history if r.pass_name == pass_name]
    assert results, [r.pass_name for r in adapted._surgery.history]
    return results[-1].sites
